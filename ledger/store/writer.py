"""The writer: one task per process that runs commands in group-committed transactions.

It takes every command waiting in its queue (up to ``MAX_BATCH``; when fewer wait than recently
waited at once, after up to ``LINGER_SECONDS`` for more) and runs them in one transaction with
one COMMIT, one fsync. Group commit shares a transaction, never a fate:

1. *Optimistic*: every command runs and stages its writes in memory (a command that raises has
   written nothing); the succeeded ones are flushed together and committed.
2. *Isolated*, only when step 1 failed in the database (a value the database refused, a
   uniqueness conflict with another process, an aborted PostgreSQL transaction): the whole
   transaction is rolled back and the batch runs again, each command inside its own SAVEPOINT
   and flushed before the next, so the command that fails is rolled back to its savepoint and
   answered alone while every other command commits.

Nobody is answered before the COMMIT that holds their work returned. If the COMMIT fails, or
the connection is lost, every command of the batch is answered ``503`` and the writer's cache
forgets everything it may have learned.

Where the backend locks per tenant (PostgreSQL), the transaction starts with ``reserve``: the
batch's tenants are locked, their chain heads validate the cache, and positions are reserved,
in one round trip; the optimistic batch's writes then go with the COMMIT in a second one.
Elsewhere (SQLite) the transaction is the only writer and positions follow ``max(position)``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from ledger.errors import (
    CommitFailed,
    LedgerError,
    StoreConflict,
    StoreUnavailable,
    VersionConflict,
)
from ledger.records import CreditBalances, Projector
from ledger.sql import Backend, WriteConn
from ledger.store import tables
from ledger.store.cache import ChainHead, WriterCache
from ledger.store.uow import UnitOfWork

T = TypeVar("T")
Command = Callable[[UnitOfWork], Awaitable[T]]

log = structlog.get_logger(__name__)

MAX_BATCH = 512
# Group commit's patience: a batch smaller than the number of commands recently seen waiting
# at once (their callers were just answered and are likely sending again) waits up to this
# long for them, so that concurrent writers keep sharing a transaction instead of settling
# into two half-size batches that alternate. A lone writer never waits.
LINGER_SECONDS = 0.002
PEAK_SECONDS = 1.0  # how long the recent peak of waiting commands is remembered


class _Retry(Exception):
    """The optimistic transaction failed in the database; run the batch isolated."""


@dataclass(slots=True)
class _Request:
    command: Command[Any]
    tenants: Sequence[str]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class WriterStats:
    """Counters for operators (the API exposes them as metrics)."""

    batches: int = 0
    commands: int = 0
    events: int = 0
    isolated_batches: int = 0
    failed_commits: int = 0
    last_batch_size: int = 0
    last_commit_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # since the last read, then cleared
    commit_seconds: list[float] = field(default_factory=list)
    # per-tenant write locks (PostgreSQL): totals since start, and the last batch's figures
    lock_wait_seconds: float = 0.0  # waiting for the tenants' locks
    lock_hold_seconds: float = 0.0  # from holding them to the COMMIT's answer
    lock_wait_weighted: float = 0.0  # wait x commands: the wait as the commands felt it
    command_seconds: float = 0.0  # batch time x commands: what the commands waited in all
    last_locked_round_trips: int = 0  # requests sent while the locks were held
    lingered: int = 0  # batches that waited for more commands (``LINGER_SECONDS``)


@dataclass(slots=True)
class Committed:
    """What a committed batch tells the store: its last position, whether it erased, how
    many events it appended and the tenants they belong to."""

    last_position: int
    erased: bool
    events: int = 0
    tenants: frozenset[str] = frozenset()


class Writer:
    def __init__(
        self,
        backend: Backend,
        projectors: Sequence[Projector],
        cache: WriterCache,
        on_commit: Callable[[Committed], Awaitable[None]],
        *,
        balances: CreditBalances | None = None,
    ) -> None:
        self._backend = backend
        self._projectors = projectors
        self._cache = cache
        self._on_commit = on_commit
        self._balances = balances
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.stats = WriterStats()
        self._per_command = 1.0  # events per command, to size a batch's reservation
        self._waiting = 0  # commands submitted and not answered yet
        self._peak = 0  # the most that waited at once, lately
        self._peak_at = 0.0
        self._want = 0  # queued commands that end a linger early (0: nobody lingers)
        self._arrived = asyncio.Event()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ledger-writer")

    async def stop(self) -> None:
        """Finish every queued command, then end."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def execute(self, command: Command[T], tenants: Sequence[str]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(command, tenants, future))  # unbounded: never waits
        self._waiting += 1
        if self._waiting >= self._peak:
            self._peak, self._peak_at = self._waiting, time.monotonic()
        if self._want and self._queue.qsize() >= self._want:
            self._arrived.set()
        # no shield: a caller cancelled while waiting cancels only its future, which the
        # writer then leaves unanswered; its command runs (or ran) all the same
        try:
            return await future
        finally:
            self._waiting -= 1

    async def _linger(self, have: int) -> None:
        """Wait up to ``LINGER_SECONDS`` for the writers recently seen to send again."""
        if time.monotonic() - self._peak_at > PEAK_SECONDS:
            self._peak, self._peak_at = self._waiting, time.monotonic()  # forget an old peak
        want = min(self._peak, MAX_BATCH) - have
        if want <= 0 or self._queue.qsize() >= want:
            return
        self._want = want
        self._arrived.clear()
        self.stats.lingered += 1
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                await self._arrived.wait()
        except TimeoutError:
            pass
        finally:
            self._want = 0

    async def _loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            requests = [first]
            stop = False
            if self._peak > 1 and LINGER_SECONDS:
                await self._linger(1)
            while len(requests) < MAX_BATCH and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                requests.append(nxt)
            await self._run_batch(requests)
            if stop:
                return

    async def _run_batch(self, requests: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            try:
                outcomes = await self._transaction(requests, isolate=False)
            except _Retry as exc:
                self._cache.forget()
                self.stats.isolated_batches += 1
                log.info("ledger.batch_isolated", commands=len(requests), reason=str(exc))
                outcomes = await self._transaction(requests, isolate=True)
        except Exception as exc:
            self._cache.forget()
            self.stats.failed_commits += 1
            log.error("ledger.batch_failed", commands=len(requests), error=_describe(exc))
            failure = StoreUnavailable(
                "the database did not commit this write; nothing of it was recorded, "
                "retry it (with the same Idempotency-Key)"
            )
            outcomes = [failure] * len(requests)
        seconds = time.perf_counter() - started
        self.stats.command_seconds += seconds * len(requests)
        self.stats.batches += 1
        self.stats.commands += len(requests)
        self.stats.last_batch_size = len(requests)
        self.stats.last_commit_seconds = seconds
        if len(self.stats.batch_sizes) < 10_000:
            self.stats.batch_sizes.append(len(requests))
            self.stats.commit_seconds.append(seconds)
        for request, outcome in zip(requests, outcomes, strict=True):
            if request.future.done():
                continue
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    async def _transaction(self, requests: list[_Request], *, isolate: bool) -> list[Any]:
        outcomes: list[Any] = []
        tenants = sorted({t for r in requests for t in r.tenants})
        locked_at = 0.0
        trips = 0
        async with self._backend.write() as conn:
            reserved = await self._reserve(conn, tenants, len(requests))
            if reserved is None:  # one writer for the whole ledger: positions follow the max
                position = await tables.max_position(conn)
                if position != self._cache.last_position:
                    await self._cache.catch_up(conn, position)  # another process wrote
                await self._cache.load_heads(conn, tenants)
                positions = [position + 1]
                more: Callable[[int], Awaitable[list[int]]] = functools.partial(
                    _following, positions
                )
            else:
                positions, more = reserved, conn.more_positions
                locked_at, trips = time.perf_counter(), conn.round_trips
            uow = UnitOfWork(
                conn, self._cache, self._projectors, positions, more, balances=self._balances
            )
            for request in requests:
                uow.begin_command()
                if isolate:
                    await conn.savepoint()
                try:
                    outcome = await request.command(uow)
                    if isolate:
                        await uow.flush_command()
                        await conn.sync()  # a command's own statements fail as its own
                        await conn.release_savepoint()
                    uow.commit_command()
                except Exception as exc:
                    if isolate:
                        await conn.rollback_savepoint()  # raises if the transaction is lost
                    elif conn.failed:
                        raise _Retry(_describe(exc)) from exc
                    uow.rollback_command()
                    outcome = _answer(exc)
                outcomes.append(outcome)
            if not isolate:
                try:
                    await uow.flush_batch(last=True)  # with the COMMIT, where the backend can
                except CommitFailed:
                    raise  # committed or not, nobody knows: never run it again
                except Exception as exc:
                    raise _Retry(_describe(exc)) from exc
        # COMMIT returned: only now may anyone be answered, and the cache learn
        if reserved is not None:
            self.stats.lock_hold_seconds += time.perf_counter() - locked_at
            self.stats.last_locked_round_trips = conn.round_trips - trips + 1
        events = len(uow.batch.events)
        self._per_command = 0.8 * self._per_command + 0.2 * events / len(requests)
        self._cache.learn(uow.batch.learned(), uow.last_position)
        self.stats.events += events
        appended_by = frozenset(recorded.tenant for recorded, _ in uow.batch.events)
        committed = Committed(uow.last_position, bool(uow.batch.erasures), events, appended_by)
        await self._on_commit(committed)
        return outcomes

    async def _reserve(
        self, conn: WriteConn, tenants: list[str], commands: int
    ) -> list[int] | None:
        """Lock the batch's tenants and validate the cache (per-tenant backends); positions."""
        known = [self._cache.heads[t].position if t in self._cache.heads else -1 for t in tenants]
        count = int(commands * max(1.0, self._per_command) * 1.25) + 4 if tenants else 0
        reservation = await conn.reserve(tenants, known, count)
        if reservation is None:
            return None
        heads = {t: ChainHead(*h) for t, h in reservation.heads.items()}
        self._cache.validate(tenants, heads, reservation.stale)
        self.stats.lock_wait_seconds += reservation.wait_seconds
        self.stats.lock_wait_weighted += reservation.wait_seconds * commands
        return reservation.positions


async def _following(positions: list[int], count: int) -> list[int]:
    """Dense positions after the last of ``positions`` (the single-writer backend)."""
    return list(range(positions[-1] + 1, positions[-1] + 1 + count))


def _answer(exc: Exception) -> Exception:
    """The error a failed command's caller gets."""
    if isinstance(exc, StoreConflict):
        return VersionConflict(f"a concurrent write got there first ({exc.message})")
    if not isinstance(exc, LedgerError):
        log.error("ledger.command_failed", error=_describe(exc), exc_info=exc)
    return exc


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"
