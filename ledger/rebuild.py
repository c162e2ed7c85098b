"""Rebuilding read models: replay every event from position 0 into shadow tables, then swap.

The replay reads the history in chunks and folds job states with the same ``evolve`` the write
path uses. Projections get *compacted* changes (each job once, from nothing to its final state),
so a million events cost a fraction of a million row writes. Shadow tables, created without
their secondary indexes, fill in short transactions while servers keep writing; then, holding
the write lock, the rebuild folds the events appended meanwhile, the backend swaps the shadows
in (``Backend.swap_tables``) and the live tables are indexed, in one transaction: readers see
the old read models or the new ones, never a half-built one. Which tables a read model has,
and how their rows compare, the projectors describe (``Projector.specs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from ledger.credits import check_amounts
from ledger.events import JOB_EVENT_TYPES, Event, decode_stored
from ledger.jobs import JobState, evolve
from ledger.records import Batch, Change, Projector, Recorded, TableSpec
from ledger.sql import Backend, Conn, TableSwap, WriteConn

log = structlog.get_logger(__name__)
SUFFIX = "__rebuild"
DECODE_MEMO = 50_000
_MISSING = object()
READ_CHUNK = 50_000
WRITE_CHUNK = 50_000
Progress = Callable[[int, int], None]
_COLUMNS = "position, tenant, stream, version, type, occurred_us, data"


@dataclass(frozen=True, slots=True)
class Report:
    events: int
    seconds: float
    difference: str | None = None

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float(self.events)


class Fold:
    """Job states and tenant events folded so far."""

    def __init__(self, *, check: bool = False) -> None:
        # an import: the job lifecycle and the amounts checked as the write path checks them
        self.check = check
        self.jobs: dict[tuple[str, str], JobState] = {}
        self.decoded: dict[tuple[str, str | None], Event | None] = {}
        self.difference: str | None = None
        self.tenant_events: list[tuple[Recorded, Event | None]] = []
        self.count = 0
        self.position = 0

    def feed(self, rows: Sequence[Sequence[Any]], *, copy: bool = True) -> set[tuple[str, str]]:
        """Fold ``rows``; ``copy=False`` mutates the states in place (nobody else holds them)."""
        touched: set[tuple[str, str]] = set()
        jobs = self.jobs
        job_types = JOB_EVENT_TYPES
        decoded = self.decoded
        for position, tenant, stream, version, type_, occurred, data in rows:
            if type_ in job_types:
                key = (tenant, stream)
                # events are frozen, so equal texts can share one decoded event
                event = decoded.get((type_, data), _MISSING)
                if event is _MISSING:
                    event = decode_stored(type_, data)
                    if self.check:
                        check_amounts(event)  # the price a job was queued at
                    if len(decoded) < DECODE_MEMO:
                        decoded[(type_, data)] = event
                jobs[key] = evolve(
                    jobs.get(key),
                    event,  # type: ignore[arg-type]
                    type_=type_,
                    job_id=stream,
                    occurred_us=occurred,
                    position=position,
                    check=self.check,
                    copy=copy,
                    own_executions=not copy,  # the fold's states share nothing then
                )
                touched.add(key)
            else:
                recorded = Recorded(
                    position=position,
                    tenant=tenant,
                    stream=stream,
                    version=version,
                    event_id="",
                    type=type_,
                    occurred_at="",
                    occurred_us=occurred,
                    recorded_at="",
                    actor="",
                    data=data,
                    data_hash="",
                    prev_hash="",
                    hash="",
                )
                tenant_event = decode_stored(type_, data)
                if self.check:
                    check_amounts(tenant_event)  # a price set, a grant
                self.tenant_events.append((recorded, tenant_event))
            self.position = position
        self.count += len(rows)
        return touched


async def _read_from(conn: Conn, after: int, until: int | None) -> list[Sequence[Any]]:
    sql = f"SELECT {_COLUMNS} FROM events WHERE position > ?"
    params: list[Any] = [after]
    if until is not None:
        sql += " AND position <= ?"
        params.append(until)
    return await conn.fetchall(sql + f" ORDER BY position LIMIT {READ_CHUNK}", params)


async def _recorded_at(conn: Conn, tenant_events: Sequence[tuple[Recorded, Event | None]]) -> None:
    """Tenant events need their recorded times (keys and prices show them)."""
    if not tenant_events:
        return
    positions = [r.position for r, _ in tenant_events]
    found: dict[int, str] = {}
    for i in range(0, len(positions), 500):
        part = positions[i : i + 500]
        rows = await conn.fetchall(
            f"SELECT position, recorded_at FROM events WHERE position IN "
            f"({', '.join('?' * len(part))})",
            part,
        )
        found.update({r[0]: r[1] for r in rows})
    for recorded, _ in tenant_events:
        recorded.recorded_at = found.get(recorded.position, "")


async def rebuild(
    backend: Backend,
    projectors: Sequence[Projector],
    *,
    verify: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Replay into shadows of ``projectors``; swap them in, or (``verify``) compare them."""
    started = time.perf_counter()
    shadows = [p.with_suffix(SUFFIX) for p in projectors]
    async with backend.write() as conn:
        await _create_shadows(conn, projectors)
    fold = Fold()
    gc.disable()  # a replay allocates millions of objects that all live until the end
    try:
        end = await _replay_and_swap(backend, projectors, shadows, fold, verify, progress)
    finally:
        gc.enable()
    log.info(
        "rebuild.swapped" if not verify else "rebuild.compared",
        seconds=round(time.perf_counter() - started, 3),
        cpu=round(time.process_time(), 3),
    )
    if progress is not None:
        progress(fold.position, max(end, fold.position))
    return Report(fold.count, time.perf_counter() - started, fold.difference)


async def _replay_and_swap(
    backend: Backend,
    projectors: Sequence[Projector],
    shadows: Sequence[Projector],
    fold: Fold,
    verify: bool,
    progress: Progress | None,
) -> int:
    """Replay one snapshot, fill the shadows, catch up and swap; the snapshot's last position."""
    started = time.perf_counter()
    async with backend.read(snapshot=True, bulk=True) as conn:
        row = await conn.fetchone("SELECT max(position) FROM events")
        end = (row[0] if row else None) or 0
        # each tenant's chain head as of the snapshot: what the catch-up starts after
        heads = {t: p for t, p in await conn.fetchall("SELECT tenant, position FROM chain_heads")}
        # the next chunk is read (in the database's thread) while this one is folded
        rows = await _read_from(conn, 0, end)
        while rows:
            following = asyncio.ensure_future(_read_from(conn, rows[-1][0], end))
            fold.feed(rows, copy=False)
            if progress is not None:
                progress(fold.position, end)
            rows = await following
        await _recorded_at(conn, fold.tenant_events)
    # shadows are disposable until the swap: fill them without waiting for the disk
    log.info(
        "rebuild.replayed",
        events=fold.count,
        jobs=len(fold.jobs),
        seconds=round(time.perf_counter() - started, 3),
        cpu=round(time.process_time(), 3),
    )
    await backend.set_durable(False)
    await backend.set_bulk(True)
    try:
        await _fill(backend, shadows, fold)
        log.info(
            "rebuild.filled",
            seconds=round(time.perf_counter() - started, 3),
            cpu=round(time.process_time(), 3),
        )
        fold.difference = await _catch_up_and_swap(
            backend, projectors, shadows, fold, heads, verify
        )
    finally:
        await backend.set_bulk(False)
        await backend.set_durable(True)
    return end


async def _catch_up_and_swap(
    backend: Backend,
    projectors: Sequence[Projector],
    shadows: Sequence[Projector],
    fold: Fold,
    heads: dict[str, int],
    verify: bool,
) -> str | None:
    """Under the write lock: fold what was appended meanwhile, then swap (or compare).

    What was appended meanwhile is found per tenant, after the tenant's head in the replay's
    snapshot: each tenant commits in position order, but across tenants (PostgreSQL) a lower
    position may commit after a higher one, so "after the last position folded" could miss it.

    Runs with durability relaxed: the old tables hold only current data (a redaction
    overwrote erased rows when it happened), so dropping them need not zero their pages, and a
    swap lost to a crash leaves the old, consistent read models in place to rebuild again.
    """
    difference: str | None = None
    async with backend.write() as conn:
        # events appended while we replayed: fold them on top, under the write lock
        befores: dict[tuple[str, str], JobState | None] = {}
        late: list[tuple[Recorded, Event | None]] = []
        moved = [
            (tenant, heads.get(tenant, 0))
            for tenant, position in await conn.fetchall("SELECT tenant, position FROM chain_heads")
            if position != heads.get(tenant)
        ]
        rows = []
        for tenant, after in moved:
            rows.extend(
                await conn.fetchall(
                    f"SELECT {_COLUMNS} FROM events WHERE tenant = ? AND position > ?",
                    (tenant, after),
                )
            )
        if rows:
            rows.sort(key=lambda r: r[0])
            snapshot = dict(fold.jobs)
            mark = len(fold.tenant_events)
            for key in fold.feed(rows):
                befores.setdefault(key, snapshot.get(key))
            late.extend(fold.tenant_events[mark:])
        if befores or late:
            await _recorded_at(conn, late)  # keys and prices made meanwhile show their times
            batch = Batch(events=late)
            for key, before in befores.items():
                batch.changes[key] = Change(key[0], before, fold.jobs[key])
            for shadow in shadows:
                await shadow.apply(conn, batch)
        if verify:
            difference = await _compare(conn, projectors)
            await _drop_shadows(conn, projectors)
        else:
            await _swap(backend, conn, projectors)
    return difference


async def _create_shadows(conn: Conn, projectors: Sequence[Projector]) -> None:
    """Empty shadow tables, without secondary indexes (they are built once, after the swap)."""
    await _drop_shadows(conn, projectors)
    for p in projectors:
        for sql in p.ddl(SUFFIX):
            await conn.execute(sql)


async def _drop_shadows(conn: Conn, projectors: Sequence[Projector]) -> None:
    for p in projectors:
        for table in p.tables:
            await conn.execute(f"DROP TABLE IF EXISTS {table}{SUFFIX}")


def swaps(projectors: Sequence[Projector]) -> list[TableSwap]:
    return [
        TableSwap(live=t.name, shadow=t.name + SUFFIX, columns=t.columns, key=t.key)
        for p in projectors
        for t in p.specs
    ]


async def _swap(backend: Backend, conn: Conn, projectors: Sequence[Projector]) -> None:
    """The backend swaps the shadows in; then the live tables get their indexes."""
    await backend.swap_tables(conn, swaps(projectors))
    for p in projectors:
        for sql in p.indexes():
            await conn.execute(sql)


async def write_models(
    backend: Backend, conn: WriteConn, projectors: Sequence[Projector], fold: Fold
) -> None:
    """Inside one write transaction: write ``fold`` into fresh shadows and swap them in.

    Each chunk's rows are encoded while the database writes the one before (SQLite's write
    connection runs its buffered statements in its own thread at ``sync()``).
    """
    writing = asyncio.ensure_future(conn.sync())  # what the caller left buffered, too
    await asyncio.sleep(0)  # let it take the statements buffered so far and start
    try:
        await _create_shadows(conn, projectors)
        shadows = [p.with_suffix(SUFFIX) for p in projectors]
        for batch in _batches(fold):
            for shadow in shadows:
                await shadow.apply(conn, batch)
            await writing
            writing = asyncio.ensure_future(conn.sync())  # rows do not pile up in memory
            await asyncio.sleep(0)
        await writing
    finally:
        if not writing.done():
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writing
    await _swap(backend, conn, projectors)


class _Recorder:
    """A ``Conn`` that keeps the statements a projector writes, to run them later (a
    projector's ``apply`` only writes), so rows are encoded outside the write transaction."""

    dialect = "recorder"

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any, bool]] = []

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.statements.append((sql, params, False))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.statements.append((sql, list(rows), True))

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise AssertionError("a projector's apply only writes")

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise AssertionError("a projector's apply only writes")

    async def replay(self, backend: Backend) -> None:
        """Run the statements in one short write transaction."""
        async with backend.write() as conn:
            for sql, args, many in self.statements:
                if many:
                    await conn.executemany(sql, args)
                else:
                    await conn.execute(sql, args)


def _batches(fold: Fold) -> Iterator[Batch]:
    if fold.tenant_events:
        yield Batch(events=fold.tenant_events)
    items = list(fold.jobs.items())
    for i in range(0, len(items), WRITE_CHUNK):
        batch = Batch()
        for key, state in items[i : i + WRITE_CHUNK]:
            batch.changes[key] = Change(key[0], None, state)
        yield batch


async def _fill(backend: Backend, shadows: Sequence[Projector], fold: Fold) -> None:
    """Write the folded states into the shadows in short transactions; each chunk's rows are
    encoded while the database writes the chunk before."""
    writing: asyncio.Future[None] | None = None
    try:
        for batch in _batches(fold):
            recorder = _Recorder()
            for shadow in shadows:
                await shadow.apply(recorder, batch)
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(recorder.replay(backend))
            await asyncio.sleep(0)  # let it take the write lock and start
        if writing is not None:
            await writing
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writing


def _normal(value: Any) -> Any:
    """Compare JSON text by meaning (key order is not a difference)."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            return value
    return value


async def _compare(conn: Conn, projectors: Sequence[Projector]) -> str | None:
    """The first row where a live table and its replay differ, or ``None``."""
    for p in projectors:
        for spec in p.specs:
            columns = ", ".join(spec.columns)
            live = await conn.fetchall(f"SELECT {columns} FROM {spec.name}")
            fresh = await conn.fetchall(f"SELECT {columns} FROM {spec.name}{SUFFIX}")
            live_rows = _rows(spec, live)
            fresh_rows = _rows(spec, fresh)
            table = spec.name
            for a, b in zip(live_rows, fresh_rows, strict=False):
                if a != b:
                    return f"{table}: live row {_show(a)} differs from replayed {_show(b)}"
            if len(live_rows) != len(fresh_rows):
                extra = live_rows[len(fresh_rows) :] or fresh_rows[len(live_rows) :]
                side = "live" if len(live_rows) > len(fresh_rows) else "replayed"
                return f"{table}: only the {side} model has row {_show(extra[0])}"
    return None


def _rows(spec: TableSpec, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    kept = [tuple(_normal(v) for v in r) for r in rows if not spec.is_zero(r)]
    return sorted(kept, key=lambda r: tuple(str(v) for v in r))


def _show(row: tuple[Any, ...]) -> str:
    text = repr(row)
    return text if len(text) < 300 else text[:300] + "..."
