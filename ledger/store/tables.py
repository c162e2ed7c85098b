"""The ledger's own tables: writing what a unit of work staged, and the point reads of them.

Events, chain heads, results and idempotency answers live here; the read models belong to the
projections. Idempotency answers are kept compressed and for ``IDEMPOTENCY_WINDOW_US`` only.
"""

from __future__ import annotations

import base64
import zlib

from ledger.records import EVENT_COLUMNS
from ledger.sql import Conn
from ledger.store.staging import IdempotentAnswer, Staged, StoredResult

IDEMPOTENCY_WINDOW_US = 24 * 3600 * 1_000_000
SELECT_EVENTS = f"SELECT {EVENT_COLUMNS} FROM events"
ERASED_TABLES = ("events", "results", "idempotency")  # the ledger's tables a redaction edits
_INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * 15)})"
_UPSERT_HEAD = (
    "INSERT INTO chain_heads (tenant, position, hash, count) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (tenant) DO UPDATE SET position = excluded.position, "
    "hash = excluded.hash, count = excluded.count"
)
_INSERT_RESULT = (
    "INSERT INTO results (result_id, tenant, job_id, expires_us, payload) VALUES (?, ?, ?, ?, ?)"
)
_UPSERT_IDEMPOTENCY = (
    "INSERT INTO idempotency (tenant, key, fingerprint, status, body, job_id, created_us) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, key) DO UPDATE SET "
    "fingerprint = excluded.fingerprint, status = excluded.status, body = excluded.body, "
    "job_id = excluded.job_id, created_us = excluded.created_us"
)
# Answers are JSON text, stored deflated and base64-encoded (the column is text on both).
_PACKED = "z:"


def pack(body: str) -> str:
    return _PACKED + base64.b64encode(zlib.compress(body.encode(), 6)).decode()


def unpack(stored: str) -> str:
    if stored.startswith(_PACKED):
        return zlib.decompress(base64.b64decode(stored[len(_PACKED) :])).decode()
    return stored


async def write_staged(conn: Conn, staged: Staged) -> None:
    """Write the ledger's rows of ``staged`` (the projections write theirs after)."""
    if staged.events:
        await conn.executemany(_INSERT_EVENT, [r.row() for r, _ in staged.events])
        await conn.executemany(_UPSERT_HEAD, [(t, *h) for t, h in staged.heads.items()])
    if staged.results:
        await conn.executemany(_INSERT_RESULT, staged.results)
    if staged.idempotency:
        await conn.executemany(
            _UPSERT_IDEMPOTENCY,
            [
                (
                    r.tenant,
                    r.key,
                    r.answer.fingerprint,
                    r.answer.status,
                    pack(r.answer.body),
                    r.job_id,
                    r.created_us,
                )
                for r in staged.idempotency.values()
            ],
        )
    for erasure in staged.erasures:
        await conn.execute(
            # earlier job.redacted events keep their data: a record of a redaction (its
            # reason, the state it kept) holds nothing it erased, and stays for every later one
            "UPDATE events SET data = NULL, redacted = 1 "
            "WHERE tenant = ? AND stream = ? AND position < ? AND type <> 'job.redacted'",
            erasure,
        )
        await conn.execute(
            "DELETE FROM results WHERE tenant = ? AND job_id = ?",
            (erasure.tenant, erasure.job_id),
        )
        # The keys stay (a replay must not create the job again); the answers, which hold
        # the erased data, go.
        await conn.execute(
            "UPDATE idempotency SET body = ? WHERE tenant = ? AND job_id = ?",
            ("", erasure.tenant, erasure.job_id),
        )


async def idempotent_answer(
    conn: Conn, tenant: str, key: str, *, now: int
) -> tuple[IdempotentAnswer, str | None] | None:
    """The answer stored under ``key`` within the window, and the job it concerns."""
    row = await conn.fetchone(
        "SELECT fingerprint, status, body, created_us, job_id FROM idempotency "
        "WHERE tenant = ? AND key = ?",
        (tenant, key),
    )
    if row is None or row[3] < now - IDEMPOTENCY_WINDOW_US:
        return None
    return IdempotentAnswer(row[0], row[1], unpack(row[2]) if row[2] else ""), row[4]


async def purge_idempotency(conn: Conn, *, now: int) -> int:
    """Drop answers older than the window; how many."""
    cutoff = now - IDEMPOTENCY_WINDOW_US
    row = await conn.fetchone("SELECT count(*) FROM idempotency WHERE created_us < ?", (cutoff,))
    await conn.execute("DELETE FROM idempotency WHERE created_us < ?", (cutoff,))
    return int(row[0]) if row else 0


async def drop_expired_results(conn: Conn, *, now: int) -> int:
    row = await conn.fetchone("SELECT count(*) FROM results WHERE expires_us < ?", (now,))
    await conn.execute("DELETE FROM results WHERE expires_us < ?", (now,))
    return int(row[0]) if row else 0


async def max_position(conn: Conn) -> int:
    row = await conn.fetchone("SELECT max(position) FROM events")
    return (row[0] if row else None) or 0


async def event_count(conn: Conn) -> tuple[int, int]:
    """How many events the ledger holds and its highest position, from the chain heads.

    The count grows with every committed event, in whatever order positions commit, so it
    tells a watcher that *something* committed where the highest position may not move.
    """
    row = await conn.fetchone("SELECT sum(count), max(position) FROM chain_heads")
    return (int(row[0] or 0), int(row[1] or 0)) if row else (0, 0)


async def stored_result(conn: Conn, tenant: str, result_id: str) -> StoredResult | None:
    row = await conn.fetchone(
        "SELECT job_id, expires_us, payload FROM results WHERE tenant = ? AND result_id = ?",
        (tenant, result_id),
    )
    return None if row is None else StoredResult(row[0], row[1], row[2])
