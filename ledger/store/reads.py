"""The ledger's own reads: a job replayed from its stream, streams, the event log, heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ledger.events import decode_stored
from ledger.jobs import JobState, evolve
from ledger.records import Recorded
from ledger.sql import Conn
from ledger.store.cache import ChainHead
from ledger.store.tables import SELECT_EVENTS

REPLAY_CHUNK = 2_000  # rows per query of a replay: long streams never hold one huge answer


async def load_job(
    conn: Conn, tenant: str, job_id: str, *, as_of: int | None = None
) -> JobState | None:
    """Replay the job's stream (up to position ``as_of``) into its state."""
    state: JobState | None = None
    version = 0
    while True:
        sql = (
            "SELECT position, type, occurred_us, data, version FROM events "
            "WHERE tenant = ? AND stream = ? AND version > ?"
        )
        params: list[Any] = [tenant, job_id, version]
        if as_of is not None:
            sql += " AND position <= ?"
            params.append(as_of)
        rows = await conn.fetchall(sql + " ORDER BY version LIMIT ?", [*params, REPLAY_CHUNK])
        for position, type_, occurred, data, _ in rows:
            state = evolve(
                state,
                decode_stored(type_, data),
                type_=type_,
                job_id=job_id,
                occurred_us=occurred,
                position=position,
            )
        if len(rows) < REPLAY_CHUNK:
            return state
        version = rows[-1][4]


async def stream(conn: Conn, tenant: str, name: str) -> list[Recorded]:
    rows = await conn.fetchall(
        f"{SELECT_EVENTS} WHERE tenant = ? AND stream = ? ORDER BY version", (tenant, name)
    )
    return [Recorded.from_row(r) for r in rows]


async def events(
    conn: Conn,
    tenant: str,
    *,
    after: int = 0,
    limit: int = 100,
    types: Sequence[str] = (),
    stream: str | None = None,
    streams_from: tuple[str, Sequence[Any]] | None = None,
) -> list[Recorded]:
    """The tenant's events after ``after``, in position order.

    ``streams_from`` is a query (and its parameters) naming the streams to keep, e.g. a read
    model's job ids of one project.
    """
    sql = f"{SELECT_EVENTS} WHERE tenant = ? AND position > ?"
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
    sql += " ORDER BY position LIMIT ?"
    params.append(limit)
    return [Recorded.from_row(r) for r in await conn.fetchall(sql, params)]


async def head(conn: Conn, tenant: str) -> ChainHead | None:
    row = await conn.fetchone(
        "SELECT position, hash, count FROM chain_heads WHERE tenant = ?", (tenant,)
    )
    return None if row is None else ChainHead(*row)
