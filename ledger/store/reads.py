"""The ledger's own reads: a job replayed from its stream, streams, the event log, heads."""

from __future__ import annotations

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


async def head(conn: Conn, tenant: str) -> ChainHead | None:
    row = await conn.fetchone(
        "SELECT position, hash, count FROM chain_heads WHERE tenant = ?", (tenant,)
    )
    return None if row is None else ChainHead(*row)


async def tenants(conn: Conn) -> list[str]:
    """Every tenant with events, in order."""
    return [r[0] for r in await conn.fetchall("SELECT tenant FROM chain_heads ORDER BY tenant")]
