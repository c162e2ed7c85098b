"""PostgreSQL appends of different tenants in parallel (per-tenant write locks).

Several ``EventStore``s over one database stand for several server processes: each has its own
writer, its own connection pool and its own cache, exactly as a ``jobledger serve`` process
does. What must hold per tenant while they append at once: the chain, versions and a feed that
a reader resumes after the last position it saw, without missing or repeating an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import audit, chain
from ledger.backends import backend_for
from ledger.backends.postgres import PostgresBackend, Unrenderable, inline, literal
from ledger.errors import InvalidTransition, Rejected
from ledger.events import JobCompleted, JobProgressed, JobQueued, JobStarted
from ledger.jobs import JobState
from ledger.store import EventStore, UnitOfWork
from projections import new_store


@contextlib.asynccontextmanager
async def stores(url: str, n: int) -> AsyncIterator[list[EventStore]]:
    """``n`` running stores over one database: ``n`` writers, as ``n`` processes have."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(new_store(backend_for(url)).running()) for _ in range(n)
        ]


def queue(tenant: str, job_id: str) -> Any:
    async def run(uow: UnitOfWork) -> JobState:
        state, _ = await uow.apply(tenant, job_id, JobQueued(agent="a/b"), actor="t")
        return state

    return run


def step(tenant: str, job_id: str, event: Any) -> Any:
    async def run(uow: UnitOfWork) -> JobState:
        state, _ = await uow.apply(tenant, job_id, event, actor="t")
        return state

    return run


# -- literals: the values a batch's script carries (no server needed) -------------------------


def test_literals_quote_text_and_refuse_what_text_cannot_hold() -> None:
    """Quotes are doubled, backslashes stay; NUL and lone surrogates are refused."""
    assert literal("it's") == "'it''s'"
    assert literal("a\\'b") == "'a\\''b'"
    assert literal(None) == "NULL" and literal(True) == "1" and literal(-7) == "(-7)"
    for bad in ("a\x00b", "\ud800"):
        with pytest.raises(Unrenderable):
            literal(bad)
    with pytest.raises(Unrenderable):
        literal(b"bytes")
    with pytest.raises(Unrenderable):
        literal(float("nan"))


def test_inline_replaces_parameters_but_never_inside_literals_or_values() -> None:
    """``$n`` in a string literal of the SQL, or inside a value, is left alone."""
    sql = "UPDATE t SET a = $1, b = '$2' WHERE c = $2 -- $1\n"
    assert inline(sql, ["x $2 y", "z'"]) == (
        "UPDATE t SET a = 'x $2 y', b = '$2' WHERE c = 'z''' -- $1\n"
    )


# -- the locks ----------------------------------------------------------------------------------


_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(_TEXT, min_size=1, max_size=4),
    number=st.integers(-(2**63), 2**63 - 1),
    real=st.floats(allow_nan=False, allow_infinity=False),
)
async def test_every_value_a_literal_carries_comes_back_exactly(
    pg_url: str, texts: list[str], number: int, real: float
) -> None:
    """What the script renders is what PostgreSQL stores: any text (quotes, backslashes,
    ``$1``, ``--``, ``;``, every plane of Unicode) comes back byte for byte, so no value can
    end its literal and run as SQL; integers and floats come back equal."""
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET standard_conforming_strings = on")
        rows = ", ".join(f"({i}, {literal(t)})" for i, t in enumerate(texts))
        got = await conn.fetch(f"SELECT * FROM (VALUES {rows}) AS v(i, t) ORDER BY i")
        assert [r["t"] for r in got] == texts
        assert await conn.fetchval(f"SELECT {literal(number)}::bigint") == number
        # right after an operator a negative literal stays one value (``0--5`` would end in a
        # comment); numeric, so that minus the smallest bigint does not overflow
        assert await conn.fetchval(f"SELECT 0::numeric-{literal(number)}") == -number
        assert await conn.fetchval(f"SELECT {literal(real)}::float8") == real
    finally:
        await conn.close()


async def test_different_tenants_write_at_once_one_tenant_waits(
    pg_backend: PostgresBackend,
) -> None:
    """A batch of tenant a does not wait for one of tenant b; a second batch of a does."""
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold(tenants: list[str]) -> None:
        async with pg_backend.write() as conn:
            await conn.reserve(tenants, [-1] * len(tenants), 1)
            holding.set()
            await release.wait()

    first = asyncio.create_task(hold(["a"]))
    await holding.wait()

    async def reserve(tenants: list[str]) -> list[int]:
        async with pg_backend.write() as conn:
            got = await conn.reserve(tenants, [-1] * len(tenants), 2)
            assert got is not None
            return got.positions

    other = await asyncio.wait_for(reserve(["b"]), 10)  # not blocked by a's open batch
    same = asyncio.create_task(reserve(["b", "a"]))  # a batch spanning both waits for a
    whole = asyncio.create_task(_exclusive(pg_backend))  # a rebuild-style write waits too
    await asyncio.sleep(0.5)
    assert not same.done() and not whole.done()
    release.set()
    await first
    later = await asyncio.wait_for(same, 10)
    await asyncio.wait_for(whole, 10)
    assert len(other) == 2 and len(later) == 2 and later == sorted(later)
    assert min(later) > max(other)  # drawn after the lock was had


async def _exclusive(backend: PostgresBackend) -> None:
    async with backend.write() as conn:
        await conn.execute("INSERT INTO ledger_meta (name, value) VALUES (?, ?)", ("x", "1"))


async def test_a_warm_batch_holds_the_tenant_locks_for_two_round_trips(pg_url: str) -> None:
    """The lock call and one script with the COMMIT; a read the cache cannot answer is a third."""
    async with stores(pg_url, 1) as (store,):
        await store.execute(queue("t1", "j1"), tenants=["t1"])
        await store.execute(queue("t2", "j2"), tenants=["t2"])
        for _ in range(3):  # warm: the jobs' states and the tenants' heads are cached
            await asyncio.gather(
                store.execute(step("t1", "j1", JobProgressed(message="x")), tenants=["t1"]),
                store.execute(step("t2", "j2", JobProgressed(message="y")), tenants=["t2"]),
            )
            assert store.stats.last_locked_round_trips == 2
        store._cache.forget()  # cold: the job's state must be read under the lock
        await store.execute(step("t1", "j1", JobProgressed(message="z")), tenants=["t1"])
        assert store.stats.last_locked_round_trips == 3
        assert store.stats.lock_hold_seconds > 0


# -- several writers ------------------------------------------------------------------------------


async def test_each_writer_validates_its_cache_per_tenant(pg_url: str) -> None:
    """A writer sees another's changes to a tenant it locks, and keeps what did not move."""
    async with stores(pg_url, 2) as (a, b):
        await a.execute(queue("t1", "j1"), tenants=["t1"])
        await a.execute(queue("t1", "keep"), tenants=["t1"])
        await a.execute(queue("t2", "j2"), tenants=["t2"])
        await b.execute(step("t1", "j1", JobStarted()), tenants=["t1"])  # a's j1 is stale
        await b.execute(step("t2", "j2", JobStarted()), tenants=["t2"])  # and a's j2
        # a completes j1: valid only if it sees b's start (a cached j1 as queued)
        done = await a.execute(step("t1", "j1", JobCompleted()), tenants=["t1"])
        assert done.status == "completed" and done.version == 3
        assert ("t1", "keep") in a._cache.jobs  # the stream b did not touch stays cached
        assert ("t2", "j2") in a._cache.jobs  # t2 was not locked: not yet looked at
        with pytest.raises(InvalidTransition):  # b cannot start j1 again: it sees a's end
            await b.execute(step("t1", "j1", JobStarted()), tenants=["t1"])
        started_again = step("t2", "j2", JobStarted())
        with pytest.raises(InvalidTransition):  # a now sees j2 started by b
            await a.execute(started_again, tenants=["t2"])
        head = await a.head("t1")
        events = await a.events("t1")
        assert head is not None and head.length == len(events) == 4  # 3 of j1, 1 of keep
        prev = chain.GENESIS
        for e in events:
            assert e.prev_hash == prev
            prev = e.hash
        assert prev == head.hash


async def test_a_tenants_feed_resumed_after_its_last_position_misses_nothing(pg_url: str) -> None:
    """Four writers append to one tenant (and to others) while a reader tails that tenant.

    The pitfall: positions drawn before the tenant's lock. A batch then holds a lower position
    while a later batch of the same tenant, with a higher one, commits first; a reader that
    resumes after the higher position never sees the lower. Positions are drawn under the lock,
    so every tenant's events commit in position order.
    """
    rounds, in_flight = 30, 6
    async with stores(pg_url, 5) as (*writers, reader):
        done = asyncio.Event()
        seen: list[int] = []

        async def tail() -> None:
            after = 0
            while True:
                finished = done.is_set()
                page = await reader.events("hot", after=after, limit=500)
                seen.extend(e.position for e in page)
                if page:
                    after = page[-1].position
                elif finished:
                    return
                else:
                    await asyncio.sleep(0.001)

        async def write(n: int, store: EventStore) -> None:
            for r in range(rounds):
                hot = [f"w{n}-{r}-{i}" for i in range(in_flight)]
                await asyncio.gather(
                    *(store.execute(queue("hot", j), tenants=["hot"]) for j in hot),
                    store.execute(queue(f"cold{n}", f"c{r}"), tenants=[f"cold{n}"]),
                    store.execute(
                        queue("hot", f"both{n}-{r}"), tenants=["hot", f"cold{(n + 1) % 4}"]
                    ),
                )

        tailing = asyncio.create_task(tail())
        await asyncio.gather(*(write(n, s) for n, s in enumerate(writers)))
        done.set()
        await asyncio.wait_for(tailing, 60)
        final = [e.position for e in await reader.events("hot", limit=100_000)]
    assert len(final) == 4 * rounds * (in_flight + 1)
    assert final == sorted(set(final))
    assert seen == final  # every event once, in position order


async def test_a_value_the_script_cannot_carry_costs_only_its_command(pg_url: str) -> None:
    """Text with a NUL is refused before anything is sent; the batch's other command commits."""

    async def bad(uow: UnitOfWork) -> None:
        await uow.apply("t1", "j1", JobQueued(agent="a/b"), actor="t")
        await uow.conn.execute(
            "INSERT INTO ledger_meta (name, value) VALUES (?, ?)", ("bad", "a\x00b")
        )

    async with stores(pg_url, 1) as (store,):
        outcomes = await asyncio.gather(  # queued together: one batch
            store.execute(bad, tenants=["t1"]),
            store.execute(queue("t2", "j2"), tenants=["t2"]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], Rejected), outcomes[0]
        assert isinstance(outcomes[1], JobState) and outcomes[1].status == "queued"
        assert await store.events("t1") == [] and len(await store.events("t2")) == 1
        assert store.stats.isolated_batches == 1 and store.stats.failed_commits == 0


async def test_an_export_of_every_tenant_is_one_snapshot(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The all-tenant export, read a chunk at a time, is the ledger as of its start.

    A transaction holds a lower position while other tenants commit higher ones; it commits
    after the export has read past its position, and another event follows. Paging by
    ``position > last`` on fresh connections would export that later event and never the
    lower one: a cut of the ledger that never existed.
    """
    monkeypatch.setattr(audit, "EXPORT_CHUNK", 1)
    async with stores(pg_url, 1) as (store,):
        raw = await asyncpg.connect(pg_url)
        try:
            tx = raw.transaction()
            await tx.start()
            low = await raw.fetchval("SELECT nextval('event_positions')")
            await store.execute(queue("b", "j1"), tenants=["b"])
            await store.execute(queue("b", "j2"), tenants=["b"])
            before = [e.position for e in await store.events("b")]
            assert min(before) > low
            chunks = audit.export_chunks(store.backend, audit.ExportFilter(), "ndjson")
            first = await anext(chunks)
            await raw.execute(  # the late, lower position: a copy of b's first event
                "INSERT INTO events SELECT $1, 'late', stream, version, 'evt_late', type, "
                "occurred_at, occurred_us, recorded_at, actor, data, data_hash, prev_hash, hash "
                "FROM events WHERE position = $2",
                low,
                before[0],
            )
            await tx.commit()
            await store.execute(queue("b", "j3"), tenants=["b"])
            blocks = [first[0]] + [block async for block, _ in chunks]
        finally:
            await raw.close()
    exported = [
        json.loads(line)["position"] for block in blocks for line in block.decode().splitlines()
    ]
    assert exported == before
