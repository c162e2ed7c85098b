"""The audit log: exporting events (NDJSON, CSV) in constant memory and verifying the chain.

Verification recomputes, for every event, ``data_hash`` from the canonical form of the stored
data (which must be the stored text itself) and ``hash`` from
the previous hash and the header, checks each tenant's chain links, and checks the chain's end
against the stored head, so an edited, deleted or reordered row is found (section 7).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ledger import chain, csvcells
from ledger.clock import parse_us
from ledger.errors import Invalid
from ledger.records import EVENT_COLUMNS, Recorded
from ledger.sql import Backend, Conn, Row

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
EXPORT_CHUNK = 10_000


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


class TenantEventRecord(EventRecord, omit_defaults=True, kw_only=True):
    """An event of an export of every tenant: the line names its tenant (after the fields the
    chain covers; verifiers take the header by name, so the extra field changes no hash)."""

    tenant: str


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


def csv_header() -> bytes:
    return (",".join(CSV_FIELDS) + "\n").encode()


@dataclass(frozen=True, slots=True)
class ExportFilter:
    tenant: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    stream: str | None = None
    streams: frozenset[str] | None = None  # e.g. an account's jobs and credit stream
    until_position: int | None = None  # a consistent end: nothing appended after it


def one_snapshot(backend: Backend, flt: ExportFilter) -> bool:
    """Whether reading ``flt`` page by page needs one snapshot to be complete.

    Paging by ``position > last seen`` is safe where positions commit in order: always on
    SQLite (one writer), and within one tenant on PostgreSQL (its write lock is held from the
    positions' reservation to the COMMIT). Across tenants on PostgreSQL a lower position of one
    tenant may commit after a higher one of another, so a later page could pass it for good:
    such a read runs in one ``REPEATABLE READ`` snapshot instead and is complete as of it.
    """
    return flt.tenant is None and backend.dialect == "postgres"


@contextlib.asynccontextmanager
async def _pages(backend: Backend, flt: ExportFilter) -> AsyncIterator[Conn | None]:
    """The connection every page of ``flt`` is read on; ``None``: a fresh one per page."""
    if not one_snapshot(backend, flt):
        yield None
        return
    async with backend.read(snapshot=True, bulk=True) as conn:
        yield conn


async def _fetch(backend: Backend, conn: Conn | None, sql: str, params: list[Any]) -> list[Row]:
    if conn is not None:
        return await conn.fetchall(sql, params)
    async with backend.read(bulk=True) as fresh:
        return await fresh.fetchall(sql, params)


async def iter_events(
    backend: Backend, flt: ExportFilter, conn: Conn | None = None
) -> AsyncIterator[list[Recorded]]:
    """Chunks of events in position order; memory stays flat however long the history.

    ``conn``: read every chunk on it (a snapshot the caller holds); otherwise see
    ``one_snapshot``.
    """
    if conn is None and one_snapshot(backend, flt):
        async with _pages(backend, flt) as snapshot:
            async for events in iter_events(backend, flt, snapshot):
                yield events
        return
    where, params = _where(flt)
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY position LIMIT {CHUNK}"
    after = 0
    while True:
        params[0] = after
        rows = await _fetch(backend, conn, sql, params)
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


_EXPORT_COLUMNS = (
    "position, event_id, stream, version, type, occurred_at, recorded_at, actor, data, "
    "data_hash, prev_hash, hash, redacted"
)
_LINES = msgspec.json.Encoder().encode_lines
_Raw = msgspec.Raw


def _where(flt: ExportFilter) -> tuple[str, list[Any]]:
    """The filter's SQL; its first parameter is the position to read after."""
    where: list[str] = ["position > ?"]
    params: list[Any] = [0]
    for clause, value in (
        ("tenant = ?", flt.tenant),
        ("stream = ?", flt.stream),
        ("occurred_us >= ?", flt.since_us),
        ("occurred_us < ?", flt.until_us),
        ("position <= ?", flt.until_position),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    return " AND ".join(where), params


def _export_sql(flt: ExportFilter) -> tuple[str, list[Any]]:
    where, params = _where(flt)
    columns = _EXPORT_COLUMNS if flt.tenant is not None else _EXPORT_COLUMNS + ", tenant"
    return (
        f"SELECT {columns} FROM events WHERE {where} ORDER BY position LIMIT {EXPORT_CHUNK}",
        params,
    )


def _csv(rows: Sequence[Sequence[Any]]) -> bytes:
    return csvcells.rows_text(
        (p, e, s, v, t, o, r, a, "null" if d is None else d, dh, ph, h)
        for p, e, s, v, t, o, r, a, d, dh, ph, h, *_ in rows
    ).encode()


def _line_sql(backend: Backend, tenants: bool) -> str:
    """SQL that renders each event as its NDJSON line, byte for byte what ``EventRecord``
    (and ``TenantEventRecord``) encode to: the database builds the text in one ``format``
    call, in its own thread, and one string a row crosses into Python instead of thirteen
    values."""
    q = backend.json_text
    fields = (
        ("position", "position"),
        ("event_id", q("event_id")),
        ("stream", q("stream")),
        ("version", "version"),
        ("type", q("type")),
        ("occurred_at", q("occurred_at")),
        ("recorded_at", q("recorded_at")),
        ("actor", q("actor")),
        ("data", "coalesce(data, 'null')"),
        ("data_hash", q("data_hash")),
        ("prev_hash", q("prev_hash")),
        ("hash", q("hash")),
    )
    template = ",".join(f'"{name}":%s' for name, _ in fields) + "%s"
    values = [expr for _, expr in fields]
    values.append("CASE WHEN redacted <> 0 THEN ',\"redacted\":true' ELSE '' END")
    if tenants:
        template += ',"tenant":%s'
        values.append(q("tenant"))
    return f"format('{{{template}}}', {', '.join(values)})"


async def export_chunks(
    backend: Backend, flt: ExportFilter, fmt: str = "ndjson"
) -> AsyncIterator[tuple[bytes, int]]:
    """The export as encoded chunks with the last position each covers, in constant memory.

    NDJSON lines are rendered by the database (``_line_sql``) and, unless a set of streams
    filters them here or the read must be one snapshot (``one_snapshot``), joined by the
    backend into one block a chunk (``fetch_lines``: on SQLite, bytes in a worker thread, on a
    connection per chunk); CSV rows are encoded here. The next chunk is read (in
    the database's thread) while this one is written.
    """
    if fmt == "csv" or flt.streams is not None or one_snapshot(backend, flt):
        async for chunk in _row_chunks(backend, flt, fmt):
            yield chunk
        return
    where, params = _where(flt)
    line = _line_sql(backend, tenants=flt.tenant is None)
    sql = (
        f"SELECT position, {line} FROM events WHERE {where} ORDER BY position LIMIT {EXPORT_CHUNK}"
    )

    def read(after: int) -> Awaitable[tuple[bytes, int, int]]:
        return backend.fetch_lines(sql, [after, *params[1:]])

    block, last, count = await read(0)
    while count:
        following = asyncio.ensure_future(read(last)) if count == EXPORT_CHUNK else None
        yield block, last
        block, last, count = await following if following is not None else (b"", 0, 0)


async def _row_chunks(
    backend: Backend, flt: ExportFilter, fmt: str
) -> AsyncIterator[tuple[bytes, int]]:
    """CSV chunks, or NDJSON ones filtered by ``flt.streams`` here."""
    csv_format = fmt == "csv"
    if csv_format:
        sql, params = _export_sql(flt)
    else:
        where, params = _where(flt)
        line = _line_sql(backend, tenants=flt.tenant is None)
        sql = (
            f"SELECT position, stream, {line} FROM events WHERE {where} ORDER BY position "
            f"LIMIT {EXPORT_CHUNK}"
        )
    async with _pages(backend, flt) as snapshot:
        async for chunk in _export_pages(backend, snapshot, flt, sql, params, csv_format):
            yield chunk


async def _export_pages(
    backend: Backend,
    snapshot: Conn | None,
    flt: ExportFilter,
    sql: str,
    params: list[Any],
    csv_format: bool,
) -> AsyncIterator[tuple[bytes, int]]:
    stream_at = 2 if csv_format else 1

    async def read(after: int) -> list[Any]:
        params[0] = after
        return await _fetch(backend, snapshot, sql, list(params))

    rows = await read(0)
    following: asyncio.Future[list[Any]] | None = None
    try:
        while rows:
            last = rows[-1][0]
            following = asyncio.ensure_future(read(last)) if len(rows) == EXPORT_CHUNK else None
            if flt.streams is not None:
                rows = [r for r in rows if r[stream_at] in flt.streams]
            if rows:
                if csv_format:
                    yield _csv(rows), last
                else:
                    yield ("\n".join([r[2] for r in rows]) + "\n").encode(), last
            rows = await following if following is not None else []
    finally:  # a reader that stops early: the snapshot's connection must be idle to go back
        if following is not None and not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await following


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    count: int
    head: str
    bad_position: int | None = None
    reason: str = ""
    # each intact chain, as (tenant or "", its event count, its last hash), in order of its
    # first event; a file does not name tenants, so its chains are labelled ""
    chains: tuple[tuple[str, int, str], ...] = ()


def _header(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e[k] for k in chain.HEADER_FIELDS}


def check_event(e: dict[str, Any], prev_hash: str) -> str | None:
    """Why this event (as exported) breaks the chain after ``prev_hash``; ``None`` if sound."""
    if e.get("prev_hash") != prev_hash:
        return "prev_hash does not link to the previous event (a row is missing or moved)"
    data = e.get("data")
    if data is not None:
        try:
            text = chain.canonical(data)
        except ValueError:  # a lone surrogate cannot be UTF-8, NaN is no JSON
            text = b""
        if chain.sha256_hex(text) != e.get("data_hash"):
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
    heads: dict[str, int] = {}  # the end of each chain -> its index in ``counts``
    counts: list[list[Any]] = []  # [count, last hash] per chain, in order of its first event
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
        index = heads.pop(prev, None) if isinstance(prev, str) else None
        if index is None:
            index = len(counts)
            counts.append([0, ""])
        counts[index][0] += 1
        counts[index][1] = e["hash"]
        heads[e["hash"]] = index
        count += 1
        last = e["hash"]
    return Verdict(True, count, last, chains=tuple(("", n, h) for n, h in counts))


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
    }


def _row_problem(e: Recorded, prev: str, redacted_before: int) -> str | None:
    """Why a stored row breaks its tenant's chain after ``prev``; ``None`` if it is sound."""
    if e.prev_hash != prev:
        return "prev_hash does not link to the tenant's previous event (a row is missing or moved)"
    if e.data is None:
        if redacted_before <= e.position:
            return "data was removed without a later job.redacted event"
    else:
        stored = e.data.encode()
        try:
            text = chain.canonical_text(stored)
        except ValueError:
            text = b""
        if chain.sha256_hex(text) != e.data_hash:
            return "data does not match data_hash (the data was edited)"
        if text != stored:
            return "the stored data is not its canonical text (the row was edited)"
    if e.redacted != (e.data is None):
        return "the redacted flag does not match the stored data (the row was edited)"
    if chain.header_hash(prev, _row_event(e)) != e.hash:
        return "hash does not match the header (the event was edited)"
    try:
        occurred = parse_us(e.occurred_at, field="occurred_at")
    except Invalid:
        occurred = None
    if occurred != e.occurred_us:
        return "the stored time differs from occurred_at (the row was edited)"
    return None


async def _first_missing(backend: Backend, after: int, before: int) -> int | None:
    """The first position strictly between ``after`` and ``before`` that has no row."""
    if before - after <= 1:
        return None
    async with backend.read() as conn:
        if await conn.fetchone("SELECT 1 FROM events WHERE position = ?", (after + 1,)) is None:
            return after + 1
        row = await conn.fetchone(
            "SELECT min(e.position) FROM events e WHERE e.position > ? AND e.position < ? "
            "AND NOT EXISTS (SELECT 1 FROM events f WHERE f.position = e.position + 1)",
            (after, before - 1),
        )
    return None if row is None or row[0] is None else int(row[0]) + 1


async def _last_redaction(backend: Backend, tenant: str, stream: str) -> int:
    async with backend.read() as conn:
        row = await conn.fetchone(
            "SELECT max(position) FROM events WHERE tenant = ? AND stream = ? "
            "AND type = 'job.redacted'",
            (tenant, stream),
        )
    return int(row[0]) if row is not None and row[0] is not None else 0


async def verify_store(backend: Backend, tenant: str | None = None) -> Verdict:
    """Verify the chains in the database, and each chain's end against its stored head.

    The heads and the events are read as of one moment, so events appended meanwhile (a server
    keeps running) are no failure: on SQLite the heads' snapshot names the last position to
    check (one writer commits positions in order); on PostgreSQL everything is read in that one
    snapshot (positions of different tenants commit out of order).

    A break names where it is. On SQLite positions are dense, so a hole names the missing
    position. On PostgreSQL positions have gaps by design (positions a batch reserved but did
    not use), so a hole is no evidence; the hash links are, and a break names the first event
    that does not link and the range the missing event was in.
    """
    if backend.dialect != "postgres":
        return await _verify(backend, None, tenant)
    async with backend.read(snapshot=True, bulk=True) as conn:
        return await _verify(backend, conn, tenant)


async def _verify(backend: Backend, snapshot: Conn | None, tenant: str | None) -> Verdict:
    dense = snapshot is None
    async with (
        contextlib.nullcontext(snapshot) if snapshot else backend.read(snapshot=True)
    ) as conn:
        rows = await conn.fetchall(
            "SELECT tenant, stream, max(position) FROM events WHERE type = 'job.redacted' "
            "GROUP BY tenant, stream"
        )
        redactions = {(r[0], r[1]): r[2] for r in rows}
        head_rows = await conn.fetchall("SELECT tenant, position, hash, count FROM chain_heads")
        top = await conn.fetchone("SELECT max(position) FROM events")
    upto = (top[0] if top else None) or 0
    heads = {r[0]: (r[1], r[2], r[3]) for r in head_rows if tenant in (None, r[0])}
    chains: dict[str, tuple[str, int, int]] = {}  # tenant -> (hash, count, last position)
    beyond: dict[str, int] = {}  # tenant -> its first event past the recorded head
    count, last = 0, chain.GENESIS
    flt = ExportFilter(tenant=tenant, until_position=upto)
    async for events in iter_events(backend, flt, snapshot):
        for e in events:
            prev, n, last_pos = chains.get(e.tenant, (chain.GENESIS, 0, 0))
            key = (e.tenant, e.stream)
            if dense and e.data is None and redactions.get(key, 0) <= e.position:
                redactions[key] = await _last_redaction(backend, *key)  # one made meanwhile?
            reason = _row_problem(e, prev, redactions.get(key, 0))
            if reason is not None:
                bad = e.position
                if e.prev_hash != prev:
                    missing = await _first_missing(backend, last_pos, e.position) if dense else None
                    if missing is not None:
                        bad = missing
                        reason = (
                            f"the event at position {missing} is missing (deleted): "
                            f"position {e.position} does not link to the tenant's previous event"
                        )
                    elif not dense:
                        reason = (
                            f"position {e.position} does not link to the tenant's previous event "
                            f"(at position {last_pos}): an event between them is missing "
                            "(deleted), or a row was moved"
                        )
                return Verdict(False, count, last, bad, reason)
            head = heads.get(e.tenant)
            if head is not None and n + 1 > head[2]:
                beyond.setdefault(e.tenant, e.position)
            chains[e.tenant] = (e.hash, n + 1, e.position)
            count += 1
            last = e.hash
    broken: list[tuple[int, str]] = []
    for name, (position, digest, n) in heads.items():
        got_hash, got_n, got_pos = chains.get(name, (chain.GENESIS, 0, 0))
        if (got_hash, got_n) == (digest, n):
            continue
        if got_n > n:
            reason = (
                f"tenant {name}'s chain has {got_n} events, its head says {n} (rows were added)"
            )
            broken.append((beyond[name], reason))
        elif dense:
            bad = await _first_missing(backend, got_pos, position + 1) or max(got_pos, position)
            reason = (
                f"tenant {name}'s chain ends at {got_n} events, its head says {n} "
                f"(the event at position {bad} was removed)"
            )
            broken.append((bad, reason))
        else:
            bad = max(got_pos, position)
            reason = (
                f"tenant {name}'s chain ends at {got_n} events (position {got_pos}), its head "
                f"says {n} ending at position {bad} (events after {got_pos} were removed)"
            )
            broken.append((bad, reason))
    for name, (_, _, last_pos) in chains.items():
        if name not in heads:
            broken.append((last_pos, f"tenant {name} has no recorded head"))
    if broken:
        bad, reason = min(broken)
        return Verdict(False, count, last, bad, reason)
    if tenant is not None:
        return Verdict(True, count, chains.get(tenant, (chain.GENESIS, 0, 0))[0])
    ends = tuple((name, n, digest) for name, (digest, n, _) in sorted(chains.items()))
    return Verdict(True, count, last, chains=ends)


def read_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from handle
