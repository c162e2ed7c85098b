"""The event store: append-only events, group commit, projections in the same transaction.

Writes are *commands*: async functions of a ``UnitOfWork``. One writer task takes every command
waiting in its queue, runs them one after another inside a single database transaction (each
command all-or-nothing: a command that raises leaves no trace), flushes the events and every
projection, and commits once: one fsync for the whole batch. Positions are assigned under the
backend's write lock, so commit order is position order and no reader ever sees a gap behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from ledger import chain
from ledger.clock import format_us, now_us
from ledger.errors import LedgerError, StoreConflict, VersionConflict
from ledger.events import Event, decode_stored, event_type, to_data
from ledger.ids import new_event_id
from ledger.jobs import JobState, evolve
from ledger.records import EVENT_COLUMNS, Batch, Change, Projector, Recorded
from ledger.schema import LEDGER_SCHEMA
from ledger.sql import Backend, Conn

T = TypeVar("T")
Command = Callable[["UnitOfWork"], Awaitable[T]]

log = structlog.get_logger(__name__)

MAX_BATCH = 512
JOB_CACHE = 50_000
CATCH_UP_MAX = 10_000  # events another process appended; more and the caches start afresh
_INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * 15)})"
_SELECT_EVENTS = f"SELECT {EVENT_COLUMNS} FROM events"


@dataclass(slots=True)
class _Staged:
    """What a batch (or one command inside it) has written but not yet flushed."""

    events: list[tuple[Recorded, Event | None]] = field(default_factory=list)
    jobs: dict[tuple[str, str], JobState] = field(default_factory=dict)
    befores: dict[tuple[str, str], JobState | None] = field(default_factory=dict)
    heads: dict[str, tuple[int, str, int]] = field(default_factory=dict)
    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    event_ids: dict[tuple[str, str], Recorded] = field(default_factory=dict)
    results: list[tuple[Any, ...]] = field(default_factory=list)
    idempotency: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    erasures: list[tuple[str, str, int]] = field(default_factory=list)

    def merge(self, other: _Staged) -> None:
        self.events.extend(other.events)
        self.jobs.update(other.jobs)
        for key, before in other.befores.items():
            self.befores.setdefault(key, before)
        self.heads.update(other.heads)
        self.versions.update(other.versions)
        self.event_ids.update(other.event_ids)
        self.results.extend(other.results)
        self.idempotency.update(other.idempotency)
        self.erasures.extend(other.erasures)


class UnitOfWork:
    """The view one command has of the ledger inside the writer's transaction."""

    def __init__(self, store: EventStore, conn: Conn, next_position: int) -> None:
        self.store = store
        self.conn = conn
        self.now = now_us()
        self._next = next_position
        self._batch = _Staged()
        self._cmd = _Staged()
        self._flushed: list[Batch] = []

    # -- reads -----------------------------------------------------------------------------

    async def job(self, tenant: str, job_id: str, *, fresh: bool = False) -> JobState | None:
        """The job's current state (deleted ones included), or ``None``.

        ``fresh``: the id was just made by this server (a ULID), so the database need not be
        asked whether it exists.
        """
        key = (tenant, job_id)
        for staged in (self._cmd, self._batch):
            if key in staged.jobs:
                return staged.jobs[key]
        if fresh:
            return None
        cached = self.store._pending_jobs.get(key)
        if cached is None:
            cached = self.store._jobs.get(key)
            if cached is not None:
                self.store._jobs.move_to_end(key)
        if cached is not None:
            return cached
        state = await load_job(self.conn, tenant, job_id)
        if state is not None:
            self.store._remember(key, state)
        return state

    async def find_event(self, tenant: str, event_id: str) -> Recorded | None:
        key = (tenant, event_id)
        for staged in (self._cmd, self._batch):
            if key in staged.event_ids:
                return staged.event_ids[key]
        row = await self.conn.fetchone(
            f"{_SELECT_EVENTS} WHERE tenant = ? AND event_id = ?", (tenant, event_id)
        )
        return None if row is None else Recorded.from_row(row)

    async def idempotent(self, tenant: str, key: str) -> tuple[str, int, str] | None:
        """A stored answer for this ``Idempotency-Key`` (fingerprint, status, body), if fresh."""
        staged = self._cmd.idempotency.get((tenant, key)) or self._batch.idempotency.get(
            (tenant, key)
        )
        if staged is not None:
            return staged[2], staged[3], staged[4]
        row = await self.conn.fetchone(
            "SELECT fingerprint, status, body, created_us FROM idempotency "
            "WHERE tenant = ? AND key = ?",
            (tenant, key),
        )
        if row is None or row[3] < self.now - IDEMPOTENCY_WINDOW_US:
            return None
        return row[0], row[1], row[2]

    async def latest(self, tenant: str, stream: str) -> Event | None:
        """The newest event of a (non-job) stream, staged ones included; ``None`` if none."""
        for staged in (self._cmd, self._batch):
            for recorded, event in reversed(staged.events):
                if recorded.stream == stream and recorded.tenant == tenant:
                    return event
        key = (tenant, stream)
        for known in (self.store._pending_latest, self.store._latest):
            if key in known:
                return known[key]
        row = await self.conn.fetchone(
            "SELECT type, data FROM events WHERE tenant = ? AND stream = ? "
            "ORDER BY version DESC LIMIT 1",
            (tenant, stream),
        )
        event = None if row is None else decode_stored(row[0], row[1])
        # committed state (this batch's own writes are in _pending_latest), safe to remember
        self.store._latest[key] = event
        return event

    async def flushed(self) -> Conn:
        """The connection, with every earlier command of this batch already written to it.

        A command that reads projections (prices, balances) calls this before it stages
        anything, so it sees the events that precede it in position order.
        """
        await self._flush(self._batch)
        self._batch = _Staged()
        return self.conn

    # -- writes ----------------------------------------------------------------------------

    async def apply(
        self,
        tenant: str,
        job_id: str,
        event: Event,
        *,
        actor: str,
        occurred_us: int | None = None,
        event_id: str | None = None,
        fresh: bool = False,
    ) -> tuple[JobState, Recorded]:
        """Check ``event`` against the job's state machine and stage it; the new state."""
        before = await self.job(tenant, job_id, fresh=fresh)
        occurred = self.now if occurred_us is None else occurred_us
        position = self._next
        after = evolve(
            before,
            event,
            type_=event_type(event),
            job_id=job_id,
            occurred_us=occurred,
            position=position,
            check=True,
        )
        recorded = self._stage(
            tenant, job_id, after.version, event, actor=actor, occurred=occurred, event_id=event_id
        )
        key = (tenant, job_id)
        if key not in self._cmd.befores and key not in self._batch.befores:
            self._cmd.befores[key] = before
        self._cmd.jobs[key] = after
        return after, recorded

    async def append(
        self,
        tenant: str,
        stream: str,
        event: Event,
        *,
        actor: str,
        occurred_us: int | None = None,
        event_id: str | None = None,
    ) -> Recorded:
        """Stage an event on a stream that is not a job (keys, prices, credits)."""
        key = (tenant, stream)
        version = self._cmd.versions.get(key) or self._batch.versions.get(key)
        if version is None:
            version = self.store._pending_versions.get(key) or self.store._versions.get(key)
        if version is None:
            row = await self.conn.fetchone(
                "SELECT max(version) FROM events WHERE tenant = ? AND stream = ?", key
            )
            version = (row[0] if row else None) or 0
        occurred = self.now if occurred_us is None else occurred_us
        recorded = self._stage(
            tenant, stream, version + 1, event, actor=actor, occurred=occurred, event_id=event_id
        )
        self._cmd.versions[key] = version + 1
        return recorded

    def remember(
        self, tenant: str, key: str, fingerprint: str, status: int, body: str, job_id: str | None
    ) -> None:
        """Store an answer under an ``Idempotency-Key`` in the same transaction."""
        self._cmd.idempotency[(tenant, key)] = (
            tenant,
            key,
            fingerprint,
            status,
            body,
            job_id,
            self.now,
        )

    def put_result(
        self, tenant: str, result_id: str, job_id: str, payload: str, expires_us: int | None
    ) -> None:
        self._cmd.results.append((result_id, tenant, job_id, expires_us, payload))

    def erase(self, tenant: str, job_id: str, before_position: int) -> None:
        """Erase the data of the job's events before ``before_position`` and its results."""
        self._cmd.erasures.append((tenant, job_id, before_position))

    def _stage(
        self,
        tenant: str,
        stream: str,
        version: int,
        event: Event,
        *,
        actor: str,
        occurred: int,
        event_id: str | None,
    ) -> Recorded:
        head = self._cmd.heads.get(tenant) or self._batch.heads.get(tenant)
        if head is None:
            head = self.store._pending_heads.get(tenant) or self.store._heads.get(tenant)
        if head is None:
            raise AssertionError("tenant heads are loaded before a batch runs")
        position = self._next
        self._next += 1
        type_ = event_type(event)
        data = chain.canonical(to_data(event)).decode()
        data_hash = chain.sha256_hex(data.encode())
        eid = event_id or new_event_id()
        occurred_at, recorded_at = format_us(occurred), format_us(self.now)
        digest = chain.event_hash(
            head[1],
            position=position,
            event_id=eid,
            stream=stream,
            version=version,
            type=type_,
            occurred_at=occurred_at,
            recorded_at=recorded_at,
            actor=actor,
            data_hash=data_hash,
        )
        recorded = Recorded(
            position=position,
            tenant=tenant,
            stream=stream,
            version=version,
            event_id=eid,
            type=type_,
            occurred_at=occurred_at,
            occurred_us=occurred,
            recorded_at=recorded_at,
            actor=actor,
            data=data,
            data_hash=data_hash,
            prev_hash=head[1],
            hash=digest,
        )
        self._cmd.heads[tenant] = (position, digest, head[2] + 1)
        self._cmd.events.append((recorded, event))
        self._cmd.event_ids[(tenant, eid)] = recorded
        return recorded

    # -- the batch's life ------------------------------------------------------------------

    async def _prepare(self, command_tenants: Sequence[str]) -> None:
        missing = [t for t in command_tenants if t not in self.store._heads]
        for tenant in dict.fromkeys(missing):
            row = await self.conn.fetchone(
                "SELECT position, hash, count FROM chain_heads WHERE tenant = ?", (tenant,)
            )
            self.store._heads[tenant] = (row[0], row[1], row[2]) if row else (0, chain.GENESIS, 0)

    def _begin(self) -> None:
        self._cmd = _Staged()

    def _commit_command(self) -> None:
        self._batch.merge(self._cmd)
        self._cmd = _Staged()

    def _rollback_command(self) -> None:
        self._next -= len(self._cmd.events)
        self._cmd = _Staged()

    async def _flush(self, staged: _Staged) -> None:
        if not staged.events and not staged.idempotency and not staged.results:
            return
        conn = self.conn
        if staged.events:
            await conn.executemany(_INSERT_EVENT, [r.row() for r, _ in staged.events])
            await conn.executemany(
                "INSERT INTO chain_heads (tenant, position, hash, count) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant) DO UPDATE SET position = excluded.position, "
                "hash = excluded.hash, count = excluded.count",
                [(t, *h) for t, h in staged.heads.items()],
            )
        if staged.results:
            await conn.executemany(
                "INSERT INTO results (result_id, tenant, job_id, expires_us, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                staged.results,
            )
        if staged.idempotency:
            await conn.executemany(
                "INSERT INTO idempotency (tenant, key, fingerprint, status, body, job_id, "
                "created_us) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, key) DO UPDATE "
                "SET fingerprint = excluded.fingerprint, status = excluded.status, "
                "body = excluded.body, job_id = excluded.job_id, created_us = excluded.created_us",
                list(staged.idempotency.values()),
            )
        for tenant, job_id, before in staged.erasures:
            await conn.execute(
                "UPDATE events SET data = NULL, redacted = 1 "
                "WHERE tenant = ? AND stream = ? AND position < ?",
                (tenant, job_id, before),
            )
            await conn.execute(
                "DELETE FROM results WHERE tenant = ? AND job_id = ?", (tenant, job_id)
            )
            await conn.execute(
                "DELETE FROM idempotency WHERE tenant = ? AND job_id = ?", (tenant, job_id)
            )
        batch = Batch(events=staged.events)
        for key, after in staged.jobs.items():
            batch.changes[key] = Change(key[0], staged.befores.get(key), after)
        for projector in self.store.projectors:
            await projector.apply(conn, batch)
        self._flushed.append(batch)
        self.store._pending_heads.update(staged.heads)
        self.store._pending_versions.update(staged.versions)
        for recorded, event in staged.events:
            if recorded.stream.startswith("$"):
                self.store._pending_latest[(recorded.tenant, recorded.stream)] = event
        self.store._pending_jobs.update(staged.jobs)
        self.store._erased |= bool(staged.erasures)


IDEMPOTENCY_WINDOW_US = 24 * 3600 * 1_000_000


@dataclass(slots=True)
class _Request:
    command: Command[Any]
    tenants: Sequence[str]
    future: asyncio.Future[Any]


class EventStore:
    """Appends events through one writer task; serves the ledger's own reads."""

    def __init__(self, backend: Backend, projectors: Sequence[Projector]) -> None:
        self.backend = backend
        self.projectors = list(projectors)
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._jobs: OrderedDict[tuple[str, str], JobState] = OrderedDict()
        self._heads: dict[str, tuple[int, str, int]] = {}
        self._versions: dict[tuple[str, str], int] = {}
        # the newest event of each non-job stream (prices, keys, credits) this process has seen
        self._latest: dict[tuple[str, str], Event | None] = {}
        self._pending_latest: dict[tuple[str, str], Event | None] = {}
        self._pending_heads: dict[str, tuple[int, str, int]] = {}
        self._pending_versions: dict[tuple[str, str], int] = {}
        self._pending_jobs: dict[tuple[str, str], JobState] = {}
        self._erased = False
        self._watching = False
        self._last_position = -1
        self.head_position = 0
        self._tick = asyncio.Event()

    # -- life ------------------------------------------------------------------------------

    async def start(self, *, writer: bool = True) -> None:
        await self.backend.open()
        statements = list(LEDGER_SCHEMA)
        for projector in self.projectors:
            statements.extend(projector.ddl())
            statements.extend(projector.indexes())
        await self.backend.ensure_schema(statements)
        self.head_position = await self.max_position()
        if writer:
            self._writer = asyncio.create_task(self._write_loop(), name="ledger-writer")
            self._watching = True
            self._watcher = asyncio.create_task(self._watch_loop(), name="ledger-watcher")

    async def stop(self) -> None:
        """Finish every queued command, then close the database."""
        if self._writer is not None:
            await self._queue.put(None)
            await self._writer
            self._writer = None
        if self._watcher is not None:
            self._watching = False  # ends the loop even if the cancellation below is lost
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.backend.close()

    @contextlib.asynccontextmanager
    async def running(self, *, writer: bool = True) -> AsyncIterator[EventStore]:
        await self.start(writer=writer)
        try:
            yield self
        finally:
            await self.stop()

    # -- writes ----------------------------------------------------------------------------

    async def execute(self, command: Command[T], *, tenants: Sequence[str]) -> T:
        """Run ``command`` in the next batch; its result once the batch is durable."""
        if self._writer is None:
            raise RuntimeError("the store's writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(command, tenants, future))
        return await asyncio.shield(future)

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            requests = [first]
            stop = False
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
        try:
            outcomes = await self._transaction(requests)
        except StoreConflict as exc:
            self._forget()
            if len(requests) > 1:
                for request in requests:
                    await self._run_batch([request])
                return
            outcomes = [VersionConflict(f"a concurrent write got there first ({exc.message})")]
        except Exception as exc:
            self._forget()
            log.exception("ledger.batch_failed", commands=len(requests))
            outcomes = [exc] * len(requests)
        for request, outcome in zip(requests, outcomes, strict=True):
            if request.future.done():
                continue
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    async def _transaction(self, requests: list[_Request]) -> list[Any]:
        outcomes: list[Any] = []
        self._pending_heads.clear()
        self._pending_versions.clear()
        self._pending_latest.clear()
        self._pending_jobs.clear()
        self._erased = False
        async with self.backend.write() as conn:
            position = await _max_position(conn)
            if position != self._last_position:
                await self._catch_up(conn, position)  # another process wrote
            uow = UnitOfWork(self, conn, position + 1)
            await uow._prepare([t for r in requests for t in r.tenants])
            for request in requests:
                uow._begin()
                try:
                    outcomes.append(await request.command(uow))
                    uow._commit_command()
                except LedgerError as exc:
                    uow._rollback_command()
                    outcomes.append(exc)
                except Exception as exc:
                    uow._rollback_command()
                    log.exception("ledger.command_failed")
                    outcomes.append(exc)
            await uow._flush(uow._batch)
            last = uow._next - 1
        # committed: only now do the caches learn what the batch wrote
        self._heads.update(self._pending_heads)
        self._versions.update(self._pending_versions)
        self._latest.update(self._pending_latest)
        for key, state in self._pending_jobs.items():
            self._remember(key, state)
        self._last_position = last
        if last > self.head_position:
            self.head_position = last
            self._wake()
            await self.backend.signal()
        if self._erased:
            await self.backend.erase_residue()
        return outcomes

    def _remember(self, key: tuple[str, str], state: JobState) -> None:
        self._jobs[key] = state
        self._jobs.move_to_end(key)
        if len(self._jobs) > JOB_CACHE:
            self._jobs.popitem(last=False)

    async def _catch_up(self, conn: Conn, position: int) -> None:
        """Forget the cached states that another process's events (or a failure) made stale."""
        if self._last_position < 0 or not 0 < position - self._last_position <= CATCH_UP_MAX:
            self._forget()
            return
        rows = await conn.fetchall(
            "SELECT DISTINCT tenant, stream FROM events WHERE position > ?",
            (self._last_position,),
        )
        for tenant, stream in rows:
            self._jobs.pop((tenant, stream), None)
            self._versions.pop((tenant, stream), None)
            self._latest.pop((tenant, stream), None)
            self._heads.pop(tenant, None)

    def _forget(self) -> None:
        self._jobs.clear()
        self._heads.clear()
        self._versions.clear()
        self._latest.clear()
        self._last_position = -1

    # -- change notification ---------------------------------------------------------------

    def _wake(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def wait_for_change(self, seconds: float) -> None:
        """Sleep until new events are committed (by any process) or ``seconds`` pass."""
        tick = self._tick
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tick.wait(), seconds)

    async def _watch_loop(self) -> None:
        # Not ``while True``: on Python 3.11 ``asyncio.wait_for`` (in the backends' waits) can
        # swallow a cancellation that arrives as its timeout fires, and ``stop()`` would then
        # wait for this task forever.
        while self._watching:
            try:
                await self.backend.wait_for_signal(0.25)
                position = await self.max_position()
                if position > self.head_position:
                    self.head_position = position
                    self._wake()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("ledger.watch_failed", exc_info=True)
                await asyncio.sleep(1.0)

    # -- reads -----------------------------------------------------------------------------

    async def max_position(self) -> int:
        async with self.backend.read() as conn:
            return await _max_position(conn)

    async def load_job(
        self, tenant: str, job_id: str, *, as_of: int | None = None
    ) -> JobState | None:
        """Replay the job's stream (up to ``as_of``) into its state: time travel."""
        async with self.backend.read() as conn:
            return await load_job(conn, tenant, job_id, as_of=as_of)

    async def stream(self, tenant: str, stream: str) -> list[Recorded]:
        async with self.backend.read() as conn:
            rows = await conn.fetchall(
                f"{_SELECT_EVENTS} WHERE tenant = ? AND stream = ? ORDER BY version",
                (tenant, stream),
            )
        return [Recorded.from_row(r) for r in rows]

    async def events(
        self,
        tenant: str,
        *,
        after: int = 0,
        limit: int = 100,
        types: Sequence[str] = (),
        stream: str | None = None,
        streams_from: tuple[str, Sequence[Any]] | None = None,
    ) -> list[Recorded]:
        """The tenant's events after ``after``, in position order.

        ``streams_from`` is a query (and its parameters) naming the streams to keep, e.g. a
        read model's job ids of one project.
        """
        sql = f"{_SELECT_EVENTS} WHERE tenant = ? AND position > ?"
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
        async with self.backend.read() as conn:
            rows = await conn.fetchall(sql, params)
        return [Recorded.from_row(r) for r in rows]

    async def head(self, tenant: str) -> tuple[int, str, int] | None:
        async with self.backend.read() as conn:
            row = await conn.fetchone(
                "SELECT position, hash, count FROM chain_heads WHERE tenant = ?", (tenant,)
            )
        return None if row is None else (row[0], row[1], row[2])

    async def result(
        self, tenant: str, result_id: str
    ) -> tuple[str, int | None, str | None] | None:
        """``(job_id, expires_us, payload)`` of a stored result."""
        async with self.backend.read() as conn:
            row = await conn.fetchone(
                "SELECT job_id, expires_us, payload FROM results "
                "WHERE tenant = ? AND result_id = ?",
                (tenant, result_id),
            )
        return None if row is None else (row[0], row[1], row[2])

    async def drop_expired_results(self, now: int) -> int:
        """Drop result payloads past their expiry (the events keep their hashes)."""

        async def drop(uow: UnitOfWork) -> int:
            rows = await uow.conn.fetchall(
                "SELECT count(*) FROM results WHERE expires_us < ?", (now,)
            )
            await uow.conn.execute("DELETE FROM results WHERE expires_us < ?", (now,))
            return int(rows[0][0]) if rows else 0

        return await self.execute(drop, tenants=())


async def _max_position(conn: Conn) -> int:
    row = await conn.fetchone("SELECT max(position) FROM events")
    return (row[0] if row else None) or 0


async def load_job(
    conn: Conn, tenant: str, job_id: str, *, as_of: int | None = None
) -> JobState | None:
    sql = "SELECT position, type, occurred_us, data FROM events WHERE tenant = ? AND stream = ?"
    params: list[Any] = [tenant, job_id]
    if as_of is not None:
        sql += " AND position <= ?"
        params.append(as_of)
    rows = await conn.fetchall(sql + " ORDER BY version", params)
    state: JobState | None = None
    for position, type_, occurred, data in rows:
        state = evolve(
            state,
            decode_stored(type_, data),
            type_=type_,
            job_id=job_id,
            occurred_us=occurred,
            position=position,
        )
    return state
