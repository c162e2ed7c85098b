"""Waiting on conditions instead of sleeping for a fixed time.

A test that sleeps "long enough" is slow when the machine is idle and flaky when it is busy.
``wait_until`` polls a condition until it holds, and fails the test (naming what it waited for)
when a generous deadline passes first:

    await wait_until(lambda: server.alive, 10, "the server is up")
    answer = await wait_until(revoked_everywhere, 5, "the key is refused everywhere")

The condition may be a plain function or a coroutine function; its first truthy value is
returned. ``wait_until_sync`` is the same for code that cannot await.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.01  # the first pause between checks; it doubles up to MAX_POLL_SECONDS
MAX_POLL_SECONDS = 0.1


# ``timeout`` is the condition's own deadline: an ``asyncio.timeout`` around the call could not
# say in its error what was awaited.
async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109
    what: str = "",
) -> T:
    """The first truthy value of ``predicate()``; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = POLL_SECONDS
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout} s in vain for {what or predicate!r}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_POLL_SECONDS)


def wait_until_sync(predicate: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    """``wait_until`` for synchronous code (it blocks the thread between checks)."""
    deadline = time.monotonic() + timeout
    pause = POLL_SECONDS
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout} s in vain for {what or predicate!r}")
        time.sleep(pause)
        pause = min(pause * 2, MAX_POLL_SECONDS)
