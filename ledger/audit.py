"""The audit log: exporting events (NDJSON, CSV) in constant memory and verifying the chain.

Verification recomputes, for every event, ``data_hash`` from the stored data and ``hash`` from
the previous hash and the header, checks each tenant's chain links, and checks the chain's end
against the stored head, so an edited, deleted or reordered row is found (section 7).
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from ledger import chain
from ledger.records import EVENT_COLUMNS, Recorded
from ledger.sql import Backend

CSV_FIELDS = (
    "position",
    "event_id",
    "stream",
    "version",
    "type",
    "occurred_at",
    "recorded_at",
    "actor",
    "data",
    "data_hash",
    "prev_hash",
    "hash",
)
CHUNK = 5000


class EventRecord(msgspec.Struct, omit_defaults=True):
    """An event as the API and the export show it (section 6)."""

    position: int
    event_id: str
    stream: str
    version: int
    type: str
    occurred_at: str
    recorded_at: str
    actor: str
    data: msgspec.Raw | None
    data_hash: str
    prev_hash: str
    hash: str
    redacted: bool = False


_ENCODE_LINE = msgspec.json.Encoder().encode


def record(event: Recorded) -> EventRecord:
    return EventRecord(
        position=event.position,
        event_id=event.event_id,
        stream=event.stream,
        version=event.version,
        type=event.type,
        occurred_at=event.occurred_at,
        recorded_at=event.recorded_at,
        actor=event.actor,
        data=None if event.data is None else msgspec.Raw(event.data.encode()),
        data_hash=event.data_hash,
        prev_hash=event.prev_hash,
        hash=event.hash,
        redacted=event.redacted,
    )


def ndjson_lines(events: Iterable[Recorded]) -> bytes:
    return b"".join(_ENCODE_LINE(record(e)) + b"\n" for e in events)


def csv_header() -> bytes:
    return (",".join(CSV_FIELDS) + "\n").encode()


def csv_lines(events: Iterable[Recorded]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for e in events:
        writer.writerow(
            (
                e.position,
                e.event_id,
                e.stream,
                e.version,
                e.type,
                e.occurred_at,
                e.recorded_at,
                e.actor,
                "" if e.data is None else e.data,
                e.data_hash,
                e.prev_hash,
                e.hash,
            )
        )
    return out.getvalue().encode()


@dataclass(frozen=True, slots=True)
class ExportFilter:
    tenant: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    stream: str | None = None
    streams: frozenset[str] | None = None  # e.g. an account's jobs and credit stream


async def iter_events(backend: Backend, flt: ExportFilter) -> AsyncIterator[list[Recorded]]:
    """Chunks of events in position order; memory stays flat however long the history."""
    where, params = ["position > ?"], [0]
    if flt.tenant is not None:
        where.append("tenant = ?")
        params.append(flt.tenant)  # type: ignore[arg-type]
    if flt.stream is not None:
        where.append("stream = ?")
        params.append(flt.stream)  # type: ignore[arg-type]
    if flt.since_us is not None:
        where.append("occurred_us >= ?")
        params.append(flt.since_us)
    if flt.until_us is not None:
        where.append("occurred_us < ?")
        params.append(flt.until_us)
    sql = (
        f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} "
        f"ORDER BY position LIMIT {CHUNK}"
    )
    after = 0
    while True:
        params[0] = after
        async with backend.read() as conn:
            rows = await conn.fetchall(sql, params)
        if not rows:
            return
        events = [Recorded.from_row(r) for r in rows]
        after = events[-1].position
        if flt.streams is not None:
            events = [e for e in events if e.stream in flt.streams]
        if events:
            yield events
        if len(rows) < CHUNK:
            return


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    count: int
    head: str
    bad_position: int | None = None
    reason: str = ""


def _header(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e[k] for k in chain.HEADER_FIELDS}


def check_event(e: dict[str, Any], prev_hash: str) -> str | None:
    """Why this event (as exported) breaks the chain after ``prev_hash``; ``None`` if sound."""
    if e.get("prev_hash") != prev_hash:
        return "prev_hash does not link to the previous event (a row is missing or moved)"
    data = e.get("data")
    if data is not None:
        if chain.sha256_hex(chain.canonical(data)) != e.get("data_hash"):
            return "data does not match data_hash (the data was edited)"
    try:
        expected = chain.header_hash(prev_hash, _header(e))
    except (KeyError, TypeError, ValueError):
        return "the event lacks header fields"
    if expected != e.get("hash"):
        return "hash does not match the header (the event was edited)"
    return None


def verify_lines(lines: Iterable[bytes | str]) -> Verdict:
    """Verify an NDJSON export: every event's hashes, and the links between them.

    Events of several tenants may interleave: each event must extend the end of some chain
    (or start one with 64 zeros). The first event of a filtered export anchors its chain.
    """
    heads: set[str] = set()
    count, last = 0, chain.GENESIS
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = msgspec.json.decode(line)
            position = e["position"]
        except (msgspec.DecodeError, KeyError, TypeError):
            return Verdict(False, count, last, None, f"line {number} is not an event")
        prev = e.get("prev_hash")
        if prev != chain.GENESIS and prev not in heads and count > 0:
            return Verdict(
                False,
                count,
                last,
                position,
                "prev_hash does not link to an earlier event (a row is missing or moved)",
            )
        reason = check_event(e, prev if isinstance(prev, str) else "")
        if reason is not None:
            return Verdict(False, count, last, position, reason)
        heads.discard(prev)
        heads.add(e["hash"])
        count += 1
        last = e["hash"]
    return Verdict(True, count, last)


def _row_event(e: Recorded) -> dict[str, Any]:
    return {
        "position": e.position,
        "event_id": e.event_id,
        "stream": e.stream,
        "version": e.version,
        "type": e.type,
        "occurred_at": e.occurred_at,
        "recorded_at": e.recorded_at,
        "actor": e.actor,
        "data_hash": e.data_hash,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    }


async def verify_store(backend: Backend, tenant: str | None = None) -> Verdict:
    """Verify the chains in the database, and each chain's end against its stored head."""
    async with backend.read() as conn:
        rows = await conn.fetchall(
            "SELECT tenant, stream, max(position) FROM events WHERE type = 'job.redacted' "
            "GROUP BY tenant, stream"
        )
        redactions = {(r[0], r[1]): r[2] for r in rows}
        head_rows = await conn.fetchall("SELECT tenant, position, hash, count FROM chain_heads")
    heads = {r[0]: (r[1], r[2], r[3]) for r in head_rows}
    chains: dict[str, tuple[str, int, int]] = {}  # tenant -> (hash, count, last position)
    count, last = 0, chain.GENESIS
    async for events in iter_events(backend, ExportFilter(tenant=tenant)):
        for e in events:
            prev, n, _ = chains.get(e.tenant, (chain.GENESIS, 0, 0))
            if e.data is None:
                if redactions.get((e.tenant, e.stream), 0) <= e.position:
                    return Verdict(
                        False,
                        count,
                        last,
                        e.position,
                        "data was removed without a later job.redacted event",
                    )
                body = _row_event(e)
            else:
                if chain.sha256_hex(e.data.encode()) != e.data_hash:
                    return Verdict(
                        False,
                        count,
                        last,
                        e.position,
                        "data does not match data_hash (the data was edited)",
                    )
                body = _row_event(e)
            if e.prev_hash != prev:
                return Verdict(
                    False,
                    count,
                    last,
                    e.position,
                    "prev_hash does not link to the tenant's previous event "
                    "(a row is missing or moved)",
                )
            if chain.header_hash(prev, _header(body)) != e.hash:
                return Verdict(
                    False,
                    count,
                    last,
                    e.position,
                    "hash does not match the header (the event was edited)",
                )
            chains[e.tenant] = (e.hash, n + 1, e.position)
            count += 1
            last = e.hash
    for name, (position, digest, n) in heads.items():
        if tenant is not None and name != tenant:
            continue
        got_hash, got_n, got_pos = chains.get(name, (chain.GENESIS, 0, 0))
        if (got_hash, got_n) != (digest, n):
            return Verdict(
                False,
                count,
                last,
                got_pos + 1 if got_pos < position else position,
                f"tenant {name}'s chain ends at {got_n} events, its head says {n} "
                "(events were removed)",
            )
    for name in chains:
        if name not in heads:
            return Verdict(False, count, last, None, f"tenant {name} has no recorded head")
    if tenant is not None:
        return Verdict(True, count, chains.get(tenant, (chain.GENESIS, 0, 0))[0])
    return Verdict(True, count, last)


def read_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from handle
