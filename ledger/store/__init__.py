"""The event store: append-only events, group commit, projections in the same transaction.

Writes are *commands*: async functions of a ``UnitOfWork``, run by the process's one writer
(``writer.py``) in group-committed transactions where each command succeeds or fails alone.
Positions are assigned under the backend's write lock, so commit order is position order and no
reader ever sees a gap behind it. The rooms:

- ``writer.py``: the queue, batching, the optimistic and the isolated transaction;
- ``uow.py``: what one command sees and stages;
- ``cache.py``: the writer's cache of committed state (``ChainHead``, job states, versions);
- ``staging.py``: the named rows a unit of work stages;
- ``tables.py``: the ledger's own tables (events, heads, results, idempotency);
- ``reads.py``: the ledger's point reads (a job's replay, a stream, a chain head).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import structlog

from ledger import scans
from ledger.clock import now_us
from ledger.jobs import JobState
from ledger.records import CreditBalances, Projector, Recorded
from ledger.schema import LEDGER_SCHEMA
from ledger.sql import Backend
from ledger.store import reads, tables
from ledger.store.cache import ChainHead, WriterCache
from ledger.store.reads import load_job
from ledger.store.staging import IdempotentAnswer, StoredResult
from ledger.store.tables import IDEMPOTENCY_WINDOW_US
from ledger.store.uow import UnitOfWork
from ledger.store.writer import MAX_BATCH, Command, Committed, Writer, WriterStats

log = structlog.get_logger(__name__)

WATCH_SECONDS = 0.25
STOP_WATCHER_SECONDS = 2.0

__all__ = [
    "IDEMPOTENCY_WINDOW_US",
    "MAX_BATCH",
    "ChainHead",
    "Command",
    "EventStore",
    "IdempotentAnswer",
    "StoredResult",
    "UnitOfWork",
    "WriterStats",
    "load_job",
]


class EventStore:
    """Appends events through one writer task; serves the ledger's own reads."""

    def __init__(
        self,
        backend: Backend,
        projectors: Sequence[Projector],
        *,
        balances: CreditBalances | None = None,
    ) -> None:
        self.backend = backend
        self.projectors = list(projectors)
        self._cache = WriterCache()
        self._writer = Writer(
            backend, self.projectors, self._cache, self._committed, balances=balances
        )
        self._watcher: asyncio.Task[None] | None = None
        self._watching = False
        self.head_position = 0
        self.changes = 0  # moves on every commit this process learns of: a waiter's token
        # per tenant: its commits through this process, plus every commit whose tenants are
        # not known here (another process's, or seen only as a new event count)
        self._tenant_changes: dict[str, int] = {}
        self._unattributed = 0
        self._tenant_ticks: dict[str, asyncio.Event] = {}
        self._events_seen = 0  # the ledger's event count as the watcher last read it
        self._looked = 0.0  # when the watcher last read it (time.monotonic())
        self._tick = asyncio.Event()
        # where a redaction leaves erased bytes: the ledger's tables and erasable read models
        self._residue_tables = [
            *tables.ERASED_TABLES,
            *(spec.name for p in self.projectors for spec in p.specs if spec.erasable),
        ]

    @property
    def stats(self) -> WriterStats:
        return self._writer.stats

    @property
    def queue_depth(self) -> int:
        return self._writer.queue_depth

    # -- life ------------------------------------------------------------------------------

    async def start(self, *, writer: bool = True) -> None:
        await self.backend.open()
        statements = list(LEDGER_SCHEMA)
        for projector in self.projectors:
            statements.extend(projector.ddl())
            statements.extend(projector.indexes())
        await self.backend.ensure_schema(statements)
        self.head_position = await self.max_position()
        async with self.backend.read() as conn:
            self._events_seen = (await tables.event_count(conn))[0]
        if writer:
            self._writer.start()
            self._watching = True
            self._watcher = asyncio.create_task(self._watch_loop(), name="ledger-watcher")

    async def stop(self) -> None:
        """Finish every queued command, then close the database.

        The watcher gets a bounded time to end; if it is stuck in the database (a connect, a
        pool checkout), closing the backend below ends what it waits for.
        """
        await self._writer.stop()
        watcher, self._watcher = self._watcher, None
        self._watching = False
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait({watcher}, timeout=STOP_WATCHER_SECONDS)
        await self.backend.close()
        if watcher is not None and not watcher.done():
            watcher.cancel()
            await asyncio.wait({watcher}, timeout=STOP_WATCHER_SECONDS)
        if watcher is not None and watcher.done() and not watcher.cancelled():
            watcher.exception()  # retrieved, so asyncio does not log it at exit

    @contextlib.asynccontextmanager
    async def running(self, *, writer: bool = True) -> AsyncIterator[EventStore]:
        await self.start(writer=writer)
        try:
            yield self
        finally:
            await self.stop()

    # -- writes ----------------------------------------------------------------------------

    async def execute(self, command: Command[Any], *, tenants: Sequence[str]) -> Any:
        """Run ``command`` in the next batch; its result once the batch is durable."""
        if not self._writer.running:
            raise RuntimeError("the store's writer is not running")
        return await self._writer.execute(command, tenants)

    async def _committed(self, committed: Committed) -> None:
        # With per-tenant locks a commit may hold positions below the head (another tenant's
        # batch took later ones and committed first): every commit with events wakes.
        if committed.events:
            self.head_position = max(self.head_position, committed.last_position)
            self._wake(committed.tenants)
            await self.backend.signal()
        if committed.erased:
            await self.backend.erase_residue(self._residue_tables)

    # -- change notification ---------------------------------------------------------------

    def _wake(self, tenants: Iterable[str] | None = None) -> None:
        """Wake the waiters of every tenant, or (``tenants``) of those tenants only."""
        self.changes += 1
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        if tenants is None:
            self._unattributed += 1
            ticks, self._tenant_ticks = self._tenant_ticks, {}
            for waiting in ticks.values():
                waiting.set()
            return
        for tenant in tenants:
            self._tenant_changes[tenant] = self._tenant_changes.get(tenant, 0) + 1
            if tenant in self._tenant_ticks:
                self._tenant_ticks.pop(tenant).set()

    def change_token(self, tenant: str | None = None) -> int:
        """A token that moves when events are committed: any (no ``tenant``), or events that
        may be ``tenant``'s: its own commits through this process and every commit whose
        tenants this process does not learn (another process's). Read it *before* reading
        the ledger and hand it to ``wait_for_change`` with the same ``tenant``.

        One tenant's stream of writes then wakes the other tenants' waiters only when the
        watcher sees the event count move (at most every ``WATCH_SECONDS``), not per commit.
        """
        if tenant is None:
            return self.changes
        return self._unattributed + self._tenant_changes.get(tenant, 0)

    async def wait_for_change(
        self, seconds: float, *, seen: int | None = None, tenant: str | None = None
    ) -> None:
        """Sleep until new events are committed (by any process; with ``tenant``, events that
        may be that tenant's) or ``seconds`` pass.

        ``seen`` is ``change_token(tenant)`` as the caller read it *before* it last read the
        ledger: if a commit came in since, this returns at once. Without it, a commit that
        lands while the caller reads would wake nobody, and the caller would sleep through it.
        """
        if tenant is None:
            tick = self._tick
        else:
            tick = self._tenant_ticks.get(tenant) or self._tenant_ticks.setdefault(
                tenant, asyncio.Event()
            )
        if seen is not None and seen != self.change_token(tenant):
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await tick.wait()

    async def _watch_loop(self) -> None:
        while self._watching:
            try:
                if await self.backend.wait_for_signal(WATCH_SECONDS):
                    # Another process committed events and said so: wake the waiters at once
                    # (they read anyway), and look only every WATCH_SECONDS: with several busy
                    # writers a read per signal would be a query per commit per process.
                    self._wake()
                    if time.monotonic() - self._looked < WATCH_SECONDS:
                        continue
                async with self.backend.read() as conn:
                    count, position = await tables.event_count(conn)
                self._looked = time.monotonic()
                # Something committed since the watcher last looked (ours too: counting our
                # own commits here could overshoot a concurrent read and sleep through
                # another process's next commit; an extra wake-up only costs a read).
                if count != self._events_seen:
                    self._events_seen = count
                    self.head_position = max(self.head_position, position)
                    self._wake()
            except asyncio.CancelledError:
                raise
            except Exception:
                if not self._watching:
                    return
                log.warning("ledger.watch_failed", exc_info=True)
                await asyncio.sleep(1.0)

    # -- reads -----------------------------------------------------------------------------

    async def max_position(self) -> int:
        async with self.backend.read() as conn:
            return await tables.max_position(conn)

    async def load_job(
        self, tenant: str, job_id: str, *, as_of: int | None = None
    ) -> JobState | None:
        """Replay the job's stream (up to ``as_of``) into its state: time travel."""
        async with self.backend.read(bulk=True) as conn:
            return await load_job(conn, tenant, job_id, as_of=as_of)

    async def stream(self, tenant: str, stream: str) -> list[Recorded]:
        async with self.backend.read() as conn:
            return await reads.stream(conn, tenant, stream)

    async def events(self, tenant: str, **query: Any) -> list[Recorded]:
        """The tenant's events in position order (``scans.events_page`` has the filters)."""
        return await scans.events_page(self.backend, tenant, **query)

    async def tenants(self) -> list[str]:
        """Every tenant with events, in order."""
        async with self.backend.read() as conn:
            return await reads.tenants(conn)

    async def head(self, tenant: str) -> ChainHead | None:
        async with self.backend.read() as conn:
            return await reads.head(conn, tenant)

    async def result(self, tenant: str, result_id: str) -> StoredResult | None:
        async with self.backend.read() as conn:
            return await tables.stored_result(conn, tenant, result_id)

    async def sweep(self) -> tuple[int, int]:
        """Drop expired result payloads and idempotency answers: ``(results, answers)``."""

        async def drop(uow: UnitOfWork) -> tuple[int, int]:
            now = now_us()
            results = await tables.drop_expired_results(uow.conn, now=now)
            answers = await tables.purge_idempotency(uow.conn, now=now)
            return results, answers

        result: tuple[int, int] = await self.execute(drop, tenants=())
        return result
