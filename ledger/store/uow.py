"""The unit of work: the view one command has of the ledger inside the writer's transaction.

A command reads through it (its own staged writes first, then the batch's, then the writer's
cache of committed state, then the database) and stages events; nothing is written to the
database until the writer flushes, so a command that raises leaves no trace by construction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from ledger import chain
from ledger.clock import format_us, now_us
from ledger.credits import to_units
from ledger.errors import Invalid
from ledger.events import CreditsGranted, Event, decode_stored, event_type, to_data
from ledger.ids import new_event_id
from ledger.jobs import EXECUTION_EVENTS, JobState, evolve
from ledger.records import CreditBalances, CreditTotals, Projector, Recorded
from ledger.sql import WriteConn
from ledger.store import tables
from ledger.store.cache import ChainHead, WriterCache
from ledger.store.reads import load_job
from ledger.store.staging import (
    Erasure,
    IdempotencyRow,
    IdempotentAnswer,
    ResultRow,
    Staged,
)


class UnitOfWork:
    def __init__(
        self,
        conn: WriteConn,
        cache: WriterCache,
        projectors: Sequence[Projector],
        positions: list[int],
        more_positions: Callable[[int], Awaitable[list[int]]],
        *,
        balances: CreditBalances | None = None,
    ) -> None:
        """``positions``: what the writer reserved for this transaction, increasing;
        ``more_positions(n)`` gives ``n`` more, all after them, when a batch needs more."""
        self.conn = conn
        self.now = now_us()
        self._cache = cache
        self._projectors = projectors
        self._balances = balances
        self._positions = positions
        self._used = 0  # positions staged so far (by this batch's surviving commands)
        self._more = more_positions
        self.batch = Staged()  # the commands of this transaction that succeeded
        self._cmd = Staged()  # the command running now

    @property
    def last_position(self) -> int:
        """The newest position staged; without any, the one before the reservation."""
        if self._used:
            return self._positions[self._used - 1]
        return self._positions[0] - 1 if self._positions else 0

    async def _position_ready(self) -> int:
        """The position the next staged event gets (reserving more when they ran out)."""
        if self._used >= len(self._positions):
            self._positions.extend(await self._more(max(16, len(self._positions))))
        return self._positions[self._used]

    # -- reads -----------------------------------------------------------------------------

    async def job(self, tenant: str, job_id: str, *, fresh: bool = False) -> JobState | None:
        """The job's current state (deleted ones included), or ``None``.

        ``fresh``: the id was just made by this server (a ULID), so the database need not be
        asked whether it exists.
        """
        key = (tenant, job_id)
        for staged in (self._cmd, self.batch):
            if key in staged.jobs:
                return staged.jobs[key]
        if fresh:
            return None
        cached = self._cache.job(key)
        if cached is not None:
            return cached
        state = await load_job(self.conn, tenant, job_id)
        if state is not None:
            self._cache.remember_job(key, state)  # committed state: safe to keep
        return state

    async def find_event(self, tenant: str, event_id: str) -> Recorded | None:
        key = (tenant, event_id)
        for staged in (self._cmd, self.batch):
            if key in staged.event_ids:
                return staged.event_ids[key]
        row = await self.conn.fetchone(
            f"{tables.SELECT_EVENTS} WHERE tenant = ? AND event_id = ?", (tenant, event_id)
        )
        return None if row is None else Recorded.from_row(row)

    async def idempotent(self, tenant: str, key: str) -> tuple[IdempotentAnswer, str | None] | None:
        """The answer stored under this ``Idempotency-Key`` and its job, if fresh."""
        for staged in (self._cmd, self.batch):
            row = staged.idempotency.get((tenant, key))
            if row is not None:
                return row.answer, row.job_id
        return await tables.idempotent_answer(self.conn, tenant, key, now=self.now)

    async def latest(self, tenant: str, stream: str) -> Event | None:
        """The newest event of a (non-job) stream, staged ones included; ``None`` if none."""
        for staged in (self._cmd, self.batch):
            for recorded, event in reversed(staged.events):
                if recorded.stream == stream and recorded.tenant == tenant:
                    return event
        key = (tenant, stream)
        if key in self._cache.latest:
            return self._cache.latest[key]
        row = await self.conn.fetchone(
            "SELECT type, data FROM events WHERE tenant = ? AND stream = ? "
            "ORDER BY version DESC LIMIT 1",
            key,
        )
        event = None if row is None else decode_stored(row[0], row[1])
        self._cache.latest[key] = event  # committed state: safe to keep
        self._cache.keep(key)
        return event

    async def credit_totals(self, tenant: str, account: str) -> CreditTotals:
        """The account's totals as of this point of the transaction (staged writes included)."""
        if self._balances is None:
            raise RuntimeError("the store was opened without a credits read model")
        committed = await self._balances.totals(self.conn, tenant, account)
        granted, used = committed.granted, committed.used
        jobs: dict[tuple[str, str], JobState] = {**self.batch.jobs, **self._cmd.jobs}
        for staged in (self.batch, self._cmd):
            for recorded, event in staged.events:
                if (
                    isinstance(event, CreditsGranted)
                    and recorded.tenant == tenant
                    and event.account == account
                ):
                    granted += to_units(event.amount, field="amount", allow_negative=True)
        for key, after in jobs.items():
            if key[0] != tenant or after.account != account:
                continue
            before = self.batch.befores.get(key, self._cmd.befores.get(key))
            used += after.credits_used - (before.credits_used if before is not None else 0)
        return CreditTotals(granted, used)

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
        position = await self._position_ready()
        occurred = self.now if occurred_us is None else occurred_us
        key = (tenant, job_id)
        # A state this command made itself (an earlier event of it on the same job) is folded
        # in place: only the command holds it, and a command that fails is dropped whole. Its
        # executions map too, once an execution event of the command copied it.
        owned = self._cmd.owned.get(key)
        after = evolve(
            before,
            event,
            type_=event_type(event),
            job_id=job_id,
            occurred_us=occurred,
            position=position,
            check=True,
            copy=owned is None,
            own_executions=owned is True,
        )
        recorded = self._stage(
            tenant, job_id, after.version, event, actor=actor, occurred=occurred, event_id=event_id
        )
        self._cmd.befores.setdefault(key, before)
        self._cmd.jobs[key] = after
        self._cmd.owned[key] = (
            owned is True or before is None or isinstance(event, EXECUTION_EVENTS)
        )
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
        version = self._cmd.versions.get(key) or self.batch.versions.get(key)
        if version is None:
            version = self._cache.versions.get(key)
        if version is None:
            row = await self.conn.fetchone(
                "SELECT max(version) FROM events WHERE tenant = ? AND stream = ?", key
            )
            version = (row[0] if row else None) or 0
            self._cache.versions[key] = version  # committed state: safe to keep
            self._cache.keep(key)
        occurred = self.now if occurred_us is None else occurred_us
        await self._position_ready()
        recorded = self._stage(
            tenant, stream, version + 1, event, actor=actor, occurred=occurred, event_id=event_id
        )
        self._cmd.versions[key] = version + 1
        return recorded

    def remember(self, tenant: str, key: str, answer: IdempotentAnswer, job_id: str | None) -> None:
        """Store an answer under an ``Idempotency-Key`` in the same transaction."""
        self._cmd.idempotency[(tenant, key)] = IdempotencyRow(tenant, key, answer, job_id, self.now)

    def put_result(
        self, tenant: str, result_id: str, job_id: str, payload: str, expires_us: int | None
    ) -> None:
        self._cmd.results.append(ResultRow(result_id, tenant, job_id, expires_us, payload))

    def erase(self, tenant: str, job_id: str, before_position: int) -> None:
        """Erase the data of the job's events before ``before_position`` and its results."""
        self._cmd.erasures.append(Erasure(tenant, job_id, before_position))

    def head_position(self, tenant: str) -> int:
        """The newest position of the tenant's chain, this command's staged events included
        (what a write answers in ``X-Ledger-Position``)."""
        return self._head(tenant).position

    def _head(self, tenant: str) -> ChainHead:
        head = self._cmd.heads.get(tenant) or self.batch.heads.get(tenant)
        if head is None:
            head = self._cache.heads.get(tenant)
        if head is None:
            raise AssertionError("a command touched a tenant it did not declare")
        return head

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
        head = self._head(tenant)
        position = self._positions[self._used]  # made ready by the caller
        self._used += 1
        type_ = event_type(event)
        try:
            canonical = chain.canonical(to_data(event))
        except (UnicodeError, ValueError) as exc:  # a lone surrogate, a NaN
            raise Invalid(f"the event's data cannot be stored: {exc}", field="data") from None
        data = canonical.decode()
        data_hash = chain.sha256_hex(canonical)
        eid = event_id or new_event_id()
        occurred_at, recorded_at = format_us(occurred), format_us(self.now)
        digest = chain.event_hash(
            head.hash,
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
            prev_hash=head.hash,
            hash=digest,
        )
        self._cmd.heads[tenant] = ChainHead(position, digest, head.length + 1)
        self._cmd.events.append((recorded, event))
        self._cmd.event_ids[(tenant, eid)] = recorded
        return recorded

    # -- the command's life (driven by the writer) -----------------------------------------

    def begin_command(self) -> None:
        self._cmd = Staged()

    def commit_command(self) -> None:
        self.batch.merge(self._cmd)
        self._cmd = Staged()

    def rollback_command(self) -> None:
        self._used -= len(self._cmd.events)
        self._cmd = Staged()

    async def flush_command(self) -> None:
        """Write the running command's rows and projections now (inside its savepoint)."""
        await self._flush(self._cmd)

    async def flush_batch(self, *, last: bool = False) -> None:
        """Write every succeeded command's rows and projections at once (``last``: only the
        COMMIT follows, so a backend may send them with it; see ``WriteConn.sync``)."""
        await self._flush(self.batch, last=last)

    async def _flush(self, staged: Staged, *, last: bool = False) -> None:
        if staged.empty():
            return
        await tables.write_staged(self.conn, staged)
        batch = staged.batch()
        for projector in self._projectors:
            await projector.apply(self.conn, batch)
        await self.conn.sync(last=last)  # a buffering connection runs it all now: errors here
