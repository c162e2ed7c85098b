"""Reads that may touch many rows: bounded per call, or kept off the event loop.

The store's own reads are short indexed lookups, which SQLite serves right on the event loop's
thread (``Backend.read()``). Reads here may touch many rows: a feed filtered by type, job or
project scans the tenant's events until it has a page, and replaying a job with 50 000 events
decodes all of them. They run through ``read(bulk=True)`` (a worker thread on SQLite; every
PostgreSQL read is asynchronous anyway) and fold or hand out their rows in chunks, with the
loop free between chunks, so one request never holds every other one up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ledger.events import decode_stored
from ledger.jobs import JobState, evolve
from ledger.records import EVENT_COLUMNS, Recorded
from ledger.sql import Backend

CHUNK = 1000  # rows decoded between two returns to the event loop
_SELECT = f"SELECT {EVENT_COLUMNS} FROM events"


async def events_page(
    backend: Backend,
    tenant: str,
    *,
    after: int = 0,
    limit: int = 100,
    types: Sequence[str] = (),
    hidden_types: Sequence[str] = (),
    stream: str | None = None,
    streams_from: tuple[str, Sequence[Any]] | None = None,
) -> list[Recorded]:
    """The tenant's events after ``after`` in position order, at most ``limit`` of them.

    ``types`` keeps only those types and ``hidden_types`` drops those; ``streams_from`` is a
    query (and its parameters) naming the streams to keep, e.g. one project's job ids. A page
    without filters is an index range read of ``limit`` rows; a filtered one may scan, so it
    runs off the event loop.
    """
    sql = f"{_SELECT} WHERE tenant = ? AND position > ?"
    params: list[Any] = [tenant, after]
    if streams_from is not None:
        sql += f" AND stream IN ({streams_from[0]})"
        params.extend(streams_from[1])
    if stream is not None:
        sql += " AND stream = ?"
        params.append(stream)
    if types:
        sql += f" AND type IN ({', '.join('?' * len(types))})"
        params.extend(types)
    if hidden_types:
        # rare types (key events): skipping them costs the scan nothing
        sql += f" AND type NOT IN ({', '.join('?' * len(hidden_types))})"
        params.extend(hidden_types)
    sql += " ORDER BY position LIMIT ?"
    params.append(limit)
    scans = bool(types) or stream is not None or streams_from is not None
    async with backend.read(bulk=scans) as conn:
        rows = await conn.fetchall(sql, params)
    return [Recorded.from_row(r) for r in rows]


async def stream_chunks(
    backend: Backend, tenant: str, stream: str, *, upto: int | None = None
) -> AsyncIterator[list[Recorded]]:
    """A stream's events in version order (up to position ``upto``), ``CHUNK`` at a time."""
    sql = f"{_SELECT} WHERE tenant = ? AND stream = ? AND version > ?"
    if upto is not None:
        sql += " AND position <= ?"
    sql += " ORDER BY version LIMIT ?"
    version = 0
    while True:
        params: list[Any] = [tenant, stream, version]
        if upto is not None:
            params.append(upto)
        async with backend.read(bulk=True) as conn:
            rows = await conn.fetchall(sql, [*params, CHUNK])
        if not rows:
            return
        chunk = [Recorded.from_row(r) for r in rows]
        yield chunk
        if len(rows) < CHUNK:
            return
        version = chunk[-1].version


async def job_as_of(backend: Backend, tenant: str, job_id: str, as_of: int) -> JobState | None:
    """The job as it stood after position ``as_of``: its stream replayed in chunks."""
    state: JobState | None = None
    async for chunk in stream_chunks(backend, tenant, job_id, upto=as_of):
        for event in chunk:
            state = evolve(
                state,
                decode_stored(event.type, event.data),
                type_=event.type,
                job_id=job_id,
                occurred_us=event.occurred_us,
                position=event.position,
            )
        await asyncio.sleep(0)  # let other requests run between chunks
    return state
