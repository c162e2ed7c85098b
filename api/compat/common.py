"""What every dialect shares: registering a handler under a dialect, time formats, full lists.

A dialect maps; it never computes. Reads go through the same projections and helpers the
native routes use (``api.jobs``), and writes through the same commands.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from api.context import caller, store
from api.http import Handler, endpoint
from ledger.jobs import JobState
from projections import jobs

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PAGE = 1000


def dialect_endpoint(
    dialect: str, routes: web.RouteTableDef, method: str, path: str, **options: Any
) -> Callable[[Handler], Handler]:
    """``endpoint`` (auth, roles) for a dialect's handler, whose errors the dialect renders."""

    def register(handler: Handler) -> Handler:
        handler.__dialect__ = dialect  # type: ignore[attr-defined]
        return endpoint(routes, method, path, tag="compat", **options)(handler)

    return register


def _utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def seconds_z(us: int | None) -> str | None:
    """``2026-03-30T10:15:00Z``: whole seconds (truncated), UTC."""
    return None if us is None else _utc(us).strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds_naive(us: int | None) -> str | None:
    """``2024-01-15T10:30:00``: whole seconds (truncated), UTC without a zone suffix."""
    return None if us is None else _utc(us).strftime("%Y-%m-%dT%H:%M:%S")


def millis_z(us: int | None) -> str | None:
    """``2026-06-08T12:00:00.000Z``: milliseconds (truncated), UTC."""
    if us is None:
        return None
    dt = _utc(us)
    return f"{dt.strftime('%Y-%m-%dT%H:%M:%S')}.{dt.microsecond // 1000:03d}Z"


async def list_jobs(
    request: web.Request, query: jobs.ListQuery, limit: int | None = None
) -> list[JobState]:
    """Every job matching ``query`` from its ``offset`` on (at most ``limit``), in one snapshot.

    The caller's project scope always applies. Pages through ``jobs.page`` with its cursor, so
    an unbounded list ("all jobs", MCRIT's ``limit=0``) never asks the database for all at once.
    """
    who = caller(request)
    query.project = who.project if who.project is not None else query.project
    found: list[JobState] = []
    async with store(request).backend.read(snapshot=True) as conn:
        while limit is None or len(found) < limit:
            query.limit = PAGE if limit is None else min(PAGE, limit - len(found))
            page, cursor = await jobs.page(conn, who.tenant, query)
            found.extend(page)
            if cursor is None:
                break
            query.cursor, query.offset = cursor, 0
    return found
