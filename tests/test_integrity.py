"""Group commit shares a transaction, never a fate: good and bad commands of several tenants.

The property test drives the store itself with batches that mix valid commands of several
tenants with commands that fail in every way a command can: in its own logic, in the state
machine, in a projection while the batch is flushed, and in the database (a value the backend
refuses). It runs on SQLite and on PostgreSQL. Afterwards every acknowledged command is in the
log, every refused one left nothing, the chains verify, and the read models equal a rebuild.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import commands
from ledger.audit import verify_store
from ledger.backends import backend_for
from ledger.errors import JobNotFound, LedgerError
from ledger.events import CreditsGranted, JobCompleted, JobQueued, JobStarted
from ledger.rebuild import rebuild
from ledger.store import EventStore, UnitOfWork
from ledger.store import writer as writer_module
from tests.waits import wait_until

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TENANTS = ("t1", "t2", "t3")
KINDS = (
    "create",
    "start",
    "complete",
    "grant",
    "missing_job",  # fails in its own logic
    "bad_transition",  # fails in the state machine
    "grant_out_of_range",  # fails in the credits projection, while the batch is flushed
    "poison_text",  # fails in the database: text the backend cannot store
    "poison_number",  # fails in the database: an integer no column can hold
)


@dataclass(frozen=True, slots=True)
class Spec:
    tenant: str
    kind: str
    job: int


SPECS = st.lists(
    st.builds(Spec, st.sampled_from(TENANTS), st.sampled_from(KINDS), st.integers(0, 3)),
    min_size=1,
    max_size=40,
)


def _eid() -> str:
    return "ev_" + uuid.uuid4().hex


def _command(spec: Spec, run: str) -> tuple[Any, list[str]]:
    """A command for ``spec`` and the event ids it appends if it succeeds."""
    tenant, job_id = spec.tenant, f"{run}-j{spec.job}"
    ids = [_eid()]

    async def create(uow: UnitOfWork) -> None:
        if await uow.job(tenant, job_id) is not None:
            raise LedgerError("exists")
        await uow.apply(
            tenant, job_id, JobQueued(agent="a", account="acc"), actor="t", event_id=ids[0]
        )

    async def start(uow: UnitOfWork) -> None:
        if await uow.job(tenant, job_id) is None:
            raise JobNotFound(job_id)
        await uow.apply(tenant, job_id, JobStarted(), actor="t", event_id=ids[0])

    async def complete(uow: UnitOfWork) -> None:
        if await uow.job(tenant, job_id) is None:
            raise JobNotFound(job_id)
        await uow.apply(tenant, job_id, JobCompleted(row_count=3), actor="t", event_id=ids[0])
        uow.put_result(tenant, "res_" + ids[0], job_id, "[1,2,3]", None)

    async def grant(uow: UnitOfWork) -> None:
        await commands.grant(
            uow, tenant, CreditsGranted(account="acc", amount=Decimal("2.5")), actor="t"
        )

    async def missing_job(uow: UnitOfWork) -> None:
        await uow.apply(tenant, f"{run}-nope", JobStarted(), actor="t", event_id=ids[0])

    async def bad_transition(uow: UnitOfWork) -> None:
        await uow.apply(tenant, job_id, JobQueued(agent="a"), actor="t", event_id=ids[0])
        await uow.apply(tenant, job_id, JobQueued(agent="a"), actor="t", event_id=_eid())

    async def grant_out_of_range(uow: UnitOfWork) -> None:
        # bypasses the edge's validation, as a bug would: the projection refuses it at flush
        event = CreditsGranted(account="acc", amount=Decimal("1e20"))
        await uow.append(tenant, "$credits/acc", event, actor="t", event_id=ids[0])

    async def poison_text(uow: UnitOfWork) -> None:
        # NUL: PostgreSQL refuses it in text; a lone surrogate: neither can encode it
        queued = JobQueued(agent="a\x00b\ud800", account="acc")
        await uow.apply(tenant, f"{run}-poison-{ids[0]}", queued, actor="t", event_id=ids[0])

    async def poison_number(uow: UnitOfWork) -> None:
        await uow.apply(tenant, job_id + "-n", JobQueued(agent="a"), actor="t", event_id=ids[0])
        uow.put_result(tenant, "res_" + ids[0], job_id, "[]", 2**70)

    table = {
        "create": create,
        "start": start,
        "complete": complete,
        "grant": grant,
        "missing_job": missing_job,
        "bad_transition": bad_transition,
        "grant_out_of_range": grant_out_of_range,
        "poison_text": poison_text,
        "poison_number": poison_number,
    }
    return table[spec.kind], ids


async def _event_ids(store: EventStore) -> set[str]:
    async with store.backend.read() as conn:
        rows = await conn.fetchall(
            "SELECT event_id FROM events WHERE tenant IN (?, ?, ?) AND stream NOT LIKE '$%'",
            TENANTS,
        )
    return {r[0] for r in rows}


async def _grant_count(store: EventStore) -> int:
    async with store.backend.read() as conn:
        row = await conn.fetchone(
            "SELECT count(*) FROM events WHERE tenant IN (?, ?, ?) AND type = 'credits.granted'",
            TENANTS,
        )
    return int(row[0]) if row else 0


@SETTINGS
@given(specs=SPECS)
async def test_a_batch_shares_a_transaction_never_a_fate(
    store: EventStore, specs: list[Spec]
) -> None:
    """Every acknowledged command is durable and every refused one left nothing."""
    run = uuid.uuid4().hex[:8]
    grants_before = await _grant_count(store)
    before = await _event_ids(store)
    built = [(_command(spec, run), spec) for spec in specs]
    # all queued at once: the writer takes them into one batch
    outcomes = await asyncio.gather(
        *(store.execute(cmd, tenants=[spec.tenant]) for (cmd, _), spec in built),
        return_exceptions=True,
    )
    acknowledged: set[str] = set()
    refused: set[str] = set()
    granted = 0
    for ((_, ids), spec), outcome in zip(built, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, LedgerError), f"{spec.kind}: {outcome!r}"
            refused.update(ids)
        else:
            assert spec.kind in ("create", "start", "complete", "grant"), spec.kind
            if spec.kind == "grant":
                granted += 1
            else:
                acknowledged.update(ids)
    for spec, outcome in zip(specs, outcomes, strict=True):
        if spec.kind in ("grant_out_of_range", "poison_text", "poison_number"):
            assert isinstance(outcome, LedgerError), f"{spec.kind} was acknowledged"
        if spec.kind == "grant":
            assert not isinstance(outcome, BaseException), f"a valid grant failed: {outcome!r}"
    after = await _event_ids(store)
    assert after - before == acknowledged
    assert not (after & refused)
    assert await _grant_count(store) == grants_before + granted
    for tenant in TENANTS:
        verdict = await verify_store(store.backend, tenant)
        assert verdict.ok, verdict.reason
    report = await rebuild(store.backend, store.projectors, verify=True)
    assert report.difference is None, report.difference


async def test_a_valid_command_alone_after_a_failed_flush_commits(store: EventStore) -> None:
    """A batch of one poisoned and one valid command: the valid one is durable, in order."""

    async def poisoned(uow: UnitOfWork) -> None:
        await uow.append(
            "t1", "$credits/x", CreditsGranted(account="x", amount=Decimal("1e30")), actor="t"
        )

    async def valid(uow: UnitOfWork) -> int:
        recorded = await uow.append(
            "t2", "$credits/y", CreditsGranted(account="y", amount=Decimal(1)), actor="t"
        )
        return recorded.position

    bad, good = await asyncio.gather(
        store.execute(poisoned, tenants=["t1"]),
        store.execute(valid, tenants=["t2"]),
        return_exceptions=True,
    )
    assert isinstance(bad, LedgerError)
    assert isinstance(good, int)
    assert store.stats.isolated_batches >= 1
    events = await store.events("t2")
    assert [e.position for e in events] == [good]
    assert (await store.events("t1")) == []


async def _nothing(uow: UnitOfWork) -> int:
    return 1


@pytest.fixture
async def bare_store(db_url: str) -> AsyncIterator[EventStore]:
    """A store with no server around it: nothing else submits commands."""
    async with EventStore(backend_for(db_url), []).running() as running:
        yield running


async def test_a_lone_writer_never_lingers(bare_store: EventStore) -> None:
    """One caller at a time: every batch starts at once (group commit waits for nobody)."""
    for _ in range(5):
        assert await bare_store.execute(_nothing, tenants=["t1"]) == 1
    assert bare_store.stats.lingered == 0
    assert bare_store.stats.batches == 5


async def test_writers_recently_seen_are_waited_for(
    bare_store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After 8 commands waited at once, a batch that starts with fewer waits for the others
    (here as long as it takes), and starts as soon as they are there."""
    store = bare_store
    monkeypatch.setattr(writer_module, "LINGER_SECONDS", 60.0)
    assert await asyncio.gather(*(store.execute(_nothing, tenants=["t1"]) for _ in range(8)))
    first = asyncio.ensure_future(store.execute(_nothing, tenants=["t1"]))
    await wait_until(lambda: store._writer._want > 0, 30, "the writer to linger")
    rest = [store.execute(_nothing, tenants=["t2"]) for _ in range(7)]
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 30)  # not 60 s
    assert results == [1] * 8
    assert store.stats.last_batch_size == 8
    assert store.stats.lingered >= 1
