"""Importing an audit export: the restore of a backup, the move between SQLite and PostgreSQL.

``import_file`` reads an NDJSON export (``jobledger export`` or ``GET /v1/audit/export``) into
an empty database, in one transaction:

- every event's hashes are recomputed as it passes (``data_hash`` from the canonical form of
  its data, the same rule as ``jobledger verify --file``; ``hash`` from ``prev_hash`` and the
  header) and it must extend its tenant's chain, which
  starts at 64 zeros; positions increase and each stream's versions count up from 1;
- events keep their positions, ids, times and hashes, and are written in large batches
  (``COPY`` on PostgreSQL) while the next batch is checked, into the events table without its
  secondary indexes (the table is empty): they are built once at the end, which also checks
  that no two events share an event id;
- on SQLite the load is written once, into the database file (``Backend.loading``: a
  rollback journal instead of the WAL while it lasts), and is still one atomic transaction;
- jobs are folded on the way, so the read models are written from that fold (no second pass
  over the events) and swapped in as a rebuild swaps them; each tenant's chain head is its
  last event.

A one-tenant export does not name its tenant (its lines are exactly what the chain covers), so
the caller names it; an export of every tenant names each line's ``tenant``. Anything wrong and
nothing stays: the transaction rolls back, the database is left empty, and ``ImportRefused``
names the position (or the line) and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from ledger import chain
from ledger.clock import parse_us
from ledger.errors import Invalid, LedgerError, StoreConflict
from ledger.events import JOB_EVENT_TYPES
from ledger.ids import JOB_ID, RESERVED_JOB_IDS
from ledger.rebuild import Fold, write_models
from ledger.records import EVENT_COLUMNS, Projector
from ledger.schema import LEDGER_SCHEMA
from ledger.sql import Backend, Conn

log = structlog.get_logger(__name__)

READ_BYTES = 8 << 20  # the file is read and decoded in pieces of about this size
DATA_MEMO = 50_000
COLUMNS = tuple(EVENT_COLUMNS.split(", "))
EVENT_INDEXES = ("events_stream", "events_event_id", "events_tenant")
Progress = Callable[[int, int], None]


class ImportRefused(LedgerError):
    """The export cannot be imported; nothing was written."""

    code = "invalid"

    def __init__(self, reason: str, *, position: int | None = None, line: int | None = None):
        if position is not None:
            where = f" at position {position}"
        elif line is not None:
            where = f" at line {line}"
        else:
            where = ""
        super().__init__(f"import refused{where}: {reason}")
        self.position = position
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ImportReport:
    events: int
    tenants: int
    jobs: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float(self.events)


class Line(msgspec.Struct):
    """One exported event; ``data`` stays the exact bytes of the line (``null`` when erased)."""

    position: int
    event_id: str
    stream: str
    version: int
    type: str
    occurred_at: str
    recorded_at: str
    actor: str
    data: msgspec.Raw
    data_hash: str
    prev_hash: str
    hash: str
    redacted: bool = False
    tenant: str | None = None


_DECODE_LINES = msgspec.json.Decoder(Line).decode_lines
_DECODE_LINE = msgspec.json.Decoder(Line).decode
_ENCODE_INTO = msgspec.json.Encoder().encode_into
_NULL = b"null"


def _pieces(path: str) -> Iterator[tuple[bytes, int]]:
    """The file in pieces of whole lines, each with the number of bytes read so far."""
    done = 0
    rest = b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(READ_BYTES)
            done += len(block)
            if not block:
                if rest.strip():
                    yield rest, done
                return
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            rest = block[cut:]
            yield block[:cut], done


class _Times:
    """``occurred_at`` as microseconds: the seconds part is parsed once per distinct second."""

    def __init__(self) -> None:
        self._seconds: dict[str, int] = {}

    def us(self, text: str) -> int:
        # the ledger writes YYYY-MM-DDTHH:MM:SS[.ffffff]Z; anything else takes the long way
        if len(text) >= 20 and text[-1] == "Z" and text[19] in ".Z":
            base = self._seconds.get(text[:19])
            if base is None:
                base = parse_us(text[:19] + "Z", field="occurred_at")
                if len(self._seconds) > 100_000:
                    self._seconds.clear()
                self._seconds[text[:19]] = base
            fraction = text[20:-1]
            if not fraction:
                return base
            if len(fraction) <= 6 and fraction.isdigit():
                return base + int(fraction.ljust(6, "0"))
        return parse_us(text, field="occurred_at")


class _Importer:
    def __init__(self, tenant: str | None) -> None:
        self.tenant = tenant
        self.heads: dict[str, list[Any]] = {}  # tenant -> [position, hash, count]
        self.versions: dict[tuple[str, str], int] = {}
        self.erased: dict[tuple[str, str], int] = {}  # last event whose data is gone
        self.redactions: dict[tuple[str, str], int] = {}  # last job.redacted
        self.recorded_at: dict[int, str] = {}  # of tenant events (prices and keys show it)
        self.times = _Times()
        self.data = _Data()
        self.buffer = bytearray(chain.GENESIS.encode() + b"\n")
        self.fold = Fold(check=True)  # what the write path would refuse, an import refuses
        self.position = 0
        self.count = 0
        self.lines = 0

    def decode(self, piece: bytes) -> list[Line]:
        try:
            return _DECODE_LINES(piece)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        for number, text in enumerate(piece.splitlines(), self.lines + 1):
            if not text.strip():
                continue
            try:
                _DECODE_LINE(text)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ImportRefused(f"not an exported event ({exc})", line=number) from None
        raise ImportRefused("not an exported event", line=self.lines + 1)

    def check(self, lines: list[Line]) -> list[tuple[Any, ...]]:
        """The events rows of ``lines``, every hash checked and the jobs folded."""
        rows: list[tuple[Any, ...]] = []
        fold_rows: list[tuple[Any, ...]] = []
        heads, versions = self.heads, self.versions
        sha256, encode_into, header = hashlib.sha256, _ENCODE_INTO, chain.Header
        buffer = self.buffer  # prev_hash, "\n", then the header (``encode_into`` at 65)
        data_text = self.data.text
        us = self.times.us
        job_types = JOB_EVENT_TYPES
        last = self.position
        for e in lines:
            position = e.position
            if position <= last:
                raise ImportRefused(
                    f"positions must increase (it follows position {last})", position=position
                )
            tenant = e.tenant or self.tenant
            if tenant is None:
                raise ImportRefused(
                    "the export does not name its tenant (a one-tenant export): "
                    "give the tenant to import it as",
                    position=position,
                )
            if self.tenant is not None and e.tenant is not None and e.tenant != self.tenant:
                raise ImportRefused(
                    f"the event belongs to tenant {e.tenant!r}, not {self.tenant!r}",
                    position=position,
                )
            head = heads.get(tenant)
            prev = chain.GENESIS if head is None else head[1]
            if e.prev_hash != prev:
                reason = (
                    "the tenant's chain does not start at 64 zeros (not a whole-tenant export)"
                    if head is None
                    else "prev_hash does not link to the tenant's previous event "
                    "(an event is missing or moved)"
                )
                raise ImportRefused(reason, position=position)
            raw = e.data
            stream = e.stream
            if "\x00" in f"{tenant}{stream}{e.actor}{e.event_id}{e.recorded_at}":
                raise ImportRefused("a header field holds a NUL character", position=position)
            if e.type in JOB_EVENT_TYPES:
                if not JOB_ID.fullmatch(stream) or stream in RESERVED_JOB_IDS:
                    raise ImportRefused(
                        f"{e.type} on stream {stream!r}, which is not a job id",
                        position=position,
                    )
            elif not stream.startswith("$"):  # the tenant's own streams: $keys/, $prices/...
                raise ImportRefused(
                    f"{e.type} on stream {stream!r}, a job's stream", position=position
                )
            if len(raw) == 4 and bytes(raw) == _NULL:
                data = None
                if not e.redacted:
                    raise ImportRefused(
                        "data is missing but not marked redacted", position=position
                    )
                self.erased[(tenant, stream)] = position
            else:
                if e.redacted:
                    raise ImportRefused("data is marked redacted but present", position=position)
                data = data_text(raw, e.data_hash, position)
            # prev is 64 hex digits (the genesis, or a hash computed here), so this keeps
            # the buffer's layout
            buffer[0:64] = prev.encode()
            encode_into(
                header(
                    e.actor,
                    e.data_hash,
                    e.event_id,
                    e.occurred_at,
                    position,
                    e.recorded_at,
                    stream,
                    e.type,
                    e.version,
                ),
                buffer,
                65,
            )
            if sha256(buffer).hexdigest() != e.hash:
                raise ImportRefused(
                    "hash does not match the header (the event was edited)", position=position
                )
            key = (tenant, stream)
            version = versions.get(key, 0) + 1
            if e.version != version:
                raise ImportRefused(
                    f"version {e.version} of stream {stream!r} should be {version}",
                    position=position,
                )
            versions[key] = version
            try:
                occurred = us(e.occurred_at)
            except Invalid as exc:
                raise ImportRefused(exc.message, position=position) from None
            type_ = e.type
            if type_ not in job_types:
                self.recorded_at[position] = e.recorded_at
            elif type_ == "job.redacted":
                self.redactions[key] = position
            if head is None:
                heads[tenant] = [position, e.hash, 1]
            else:
                head[0], head[1], head[2] = position, e.hash, head[2] + 1
            rows.append(
                (
                    position,
                    tenant,
                    stream,
                    version,
                    e.event_id,
                    type_,
                    e.occurred_at,
                    occurred,
                    e.recorded_at,
                    e.actor,
                    data,
                    e.data_hash,
                    prev,
                    e.hash,
                    int(e.redacted),
                )
            )
            fold_rows.append((position, tenant, stream, version, type_, occurred, data))
            last = position
        self._fold(fold_rows)
        self.position = last
        self.count += len(rows)
        return rows

    def _fold(self, rows: Sequence[tuple[Any, ...]]) -> None:
        try:
            self.fold.feed(rows, copy=False)
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError, LedgerError) as exc:
            bad = next((r for r in rows if r[0] > self.fold.position), rows[0])
            if isinstance(exc, KeyError):
                reason = f"unknown event type {bad[4]!r}"
            elif isinstance(exc, LedgerError):  # the job's lifecycle, or an amount out of bounds
                reason = f"{bad[4]} of {bad[2]!r}: {exc.message}"
            else:
                reason = f"the data is not a valid {bad[4]} ({exc})"
            raise ImportRefused(reason, position=bad[0]) from None

    def finish(self) -> list[tuple[Any, ...]]:
        """Checks that need the whole file; the chain heads' rows."""
        for key, position in self.erased.items():
            if self.redactions.get(key, 0) <= position:
                raise ImportRefused(
                    "data was removed without a later job.redacted event", position=position
                )
        for recorded, _ in self.fold.tenant_events:
            recorded.recorded_at = self.recorded_at.get(recorded.position, "")
        return [(t, h[0], h[1], h[2]) for t, h in self.heads.items()]


class _Data:
    """Each event's stored data text, checked against its ``data_hash``.

    Histories repeat data texts (``{}``, the same agent and account, the same row counts):
    a text already checked against the same hash is not hashed again (up to ``DATA_MEMO``
    distinct texts are remembered, then the memory starts over).
    """

    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[str, str]] = {}

    def text(self, raw: msgspec.Raw, data_hash: str, position: int) -> str:
        key = bytes(raw)
        seen = self._seen.get(key)
        if seen is not None and seen[0] == data_hash:
            return seen[1]
        text = _data_text(key, data_hash, position)
        if len(self._seen) >= DATA_MEMO:
            self._seen.clear()
        self._seen[key] = (data_hash, text)
        return text


def _data_text(raw: bytes, data_hash: str, position: int) -> str:
    """The stored text of ``data``: its canonical form, which must hash to ``data_hash``.

    This is ``jobledger verify --file``'s rule: the hash is over the canonical form of the
    decoded value, never over the line's bytes, so a text whose own bytes hash right but which
    is not canonical (a repeated key, spaces, escapes) is refused like any edit, and what is
    stored is always the canonical text. An export writes the canonical text as it is, so
    ``chain.canonical_text`` mostly returns ``raw`` itself (its shortcut).
    """
    try:
        text = chain.canonical_text(raw)
    except ValueError:
        text = b""
    if hashlib.sha256(text).hexdigest() != data_hash:
        raise ImportRefused(
            "data does not match data_hash (the data was edited)", position=position
        )
    return text.decode()


async def import_file(
    backend: Backend,
    projectors: Sequence[Projector],
    path: str,
    *,
    tenant: str | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Import the NDJSON export at ``path`` into ``backend``'s empty database (see above)."""
    started = time.perf_counter()
    total = await asyncio.to_thread(os.path.getsize, path)
    state = _Importer(tenant)
    gc.disable()  # a fold allocates hundreds of thousands of long-lived objects
    try:
        async with backend.loading():
            await backend.set_bulk(True)
            try:
                await _import(backend, projectors, state, path, total, progress, started)
            finally:
                await backend.set_bulk(False)
    finally:
        gc.enable()
    if state.count:
        await backend.signal()
    seconds = time.perf_counter() - started
    log.info("import.done", events=state.count, seconds=round(seconds, 3))
    return ImportReport(state.count, len(state.heads), len(state.fold.jobs), seconds)


async def _import(
    backend: Backend,
    projectors: Sequence[Projector],
    state: _Importer,
    path: str,
    total: int,
    progress: Progress | None,
    started: float,
) -> None:
    """One write transaction: the events without their secondary indexes (the table is
    empty, so they are built once at the end, from sorted keys, instead of updated a million
    times), the indexes, the chain heads, the read models."""
    async with backend.write() as conn:
        if await conn.fetchone("SELECT 1 FROM events LIMIT 1") is not None:
            raise ImportRefused("the database already holds events (import into an empty one)")
        for name in EVENT_INDEXES:
            await conn.execute(f"DROP INDEX IF EXISTS {name}")
        try:
            await _load(backend, conn, state, path, total, progress)
            heads = state.finish()
            log.info("import.loaded", events=state.count, seconds=_since(started), cpu=_cpu())
            for sql in LEDGER_SCHEMA:
                if any(f"INDEX IF NOT EXISTS {name} " in sql for name in EVENT_INDEXES):
                    await conn.execute(sql)
            await conn.executemany(
                "INSERT INTO chain_heads (tenant, position, hash, count) VALUES (?, ?, ?, ?)",
                heads,
            )
            # on SQLite the indexes are built (in the database's thread) while the first
            # read model rows are encoded
            await write_models(backend, conn, projectors, state.fold)
        except StoreConflict as exc:
            raise ImportRefused(
                f"two events share an event id or a stream version ({exc.message})"
            ) from None
        log.info("import.projected", jobs=len(state.fold.jobs), seconds=_since(started), cpu=_cpu())


async def _load(
    backend: Backend,
    conn: Conn,
    state: _Importer,
    path: str,
    total: int,
    progress: Progress | None,
) -> None:
    """Check and write the file piece by piece; a piece is written while the next is checked."""
    writing: asyncio.Future[None] | None = None
    try:
        for piece, done in _pieces(path):
            rows = state.check(state.decode(piece))
            state.lines += piece.count(b"\n")
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(backend.copy_rows(conn, "events", COLUMNS, rows))
            await asyncio.sleep(0)  # let the write start before the next piece is checked
            if progress is not None:
                progress(done, total)
        if writing is not None:
            await writing
            writing = None
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writing


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _cpu() -> float:
    """CPU seconds of this process so far (every thread): what the load costs on a busy
    machine, where wall time mostly measures the others."""
    return round(time.process_time(), 3)
