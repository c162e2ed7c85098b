"""The PostgreSQL backend: what is specific to it, and several servers over one database.

The rest of the suite already runs on PostgreSQL through the ``db_url`` fixture; these tests
cover the translation of the shared SQL, the driver's errors, schema creation racing between
processes, cross-process wake-ups, and two ``jobledger serve`` processes appending at once while
a reader tails the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ledger.backends import backend_for
from ledger.backends.postgres import PostgresBackend, translate
from ledger.errors import StoreConflict, StoreUnavailable
from ledger.schema import LEDGER_SCHEMA
from projections import all_projectors
from tests.conftest import create_pg_database, drop_pg_database, pg_server_url
from tests.serverproc import Key, acli, acreate_key, free_port, served
from tests.waits import wait_until

needs_pg = pytest.mark.skipif(
    pg_server_url() is None, reason="JOBLEDGER_TEST_POSTGRES is not set: no PostgreSQL server"
)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh, empty database of its own, dropped afterwards."""
    if pg_server_url() is None:
        pytest.skip("JOBLEDGER_TEST_POSTGRES is not set: no PostgreSQL server")
    url = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(url)


def all_statements() -> list[str]:
    statements = list(LEDGER_SCHEMA)
    for projector in all_projectors():
        statements.extend(projector.ddl())
        statements.extend(projector.indexes())
    return statements


@pytest.fixture
async def backend(pg_url: str) -> AsyncIterator[PostgresBackend]:
    """An open backend over the fresh database, with the whole schema."""
    made = backend_for(pg_url)
    assert isinstance(made, PostgresBackend)
    await made.open()
    try:
        await made.ensure_schema(all_statements())
        yield made
    finally:
        await made.close()


# -- the SQL translation (no server needed) ---------------------------------------------------


def test_placeholders_become_numbered_outside_literals() -> None:
    """``?`` turns into ``$1..$n`` except inside string literals, quoted names and comments."""
    sql = "SELECT '?', \"a?b\", x FROM t WHERE a = ? AND b = 'it''s ?' AND c IN (?, ?) -- ?\n"
    assert translate(sql) == (
        "SELECT '?', \"a?b\", x FROM t WHERE a = $1 AND b = 'it''s ?' AND c IN ($2, $3) -- ?\n"
    )
    assert translate("/* ? */ SELECT ?") == "/* ? */ SELECT $1"


def test_ddl_widens_integers_and_sorts_text_by_bytes() -> None:
    """``INTEGER`` becomes ``BIGINT`` and DDL text columns get the byte order SQLite uses."""
    ddl = translate("CREATE TABLE IF NOT EXISTS e (position INTEGER PRIMARY KEY, name TEXT)")
    assert ddl == (
        'CREATE TABLE IF NOT EXISTS e (position BIGINT PRIMARY KEY, name TEXT COLLATE "C")'
    )
    assert translate("SELECT name FROM e WHERE name LIKE ? ESCAPE '\\'") == (
        "SELECT name FROM e WHERE name ILIKE $1 ESCAPE '\\'"
    )


def test_translation_is_cached_per_statement() -> None:
    """The same SQL string is translated once and then served from the cache."""
    sql = "SELECT position FROM events WHERE tenant = ? AND stream = ? -- cache probe"
    first = translate(sql)
    hits = translate.cache_info().hits
    assert translate(sql) is first
    assert translate.cache_info().hits == hits + 1


# -- the backend against a real server ---------------------------------------------------------


async def test_schema_creation_races_safely(pg_url: str) -> None:
    """Several processes creating the schema at once all succeed, with BIGINT positions."""
    backends = [PostgresBackend(pg_url) for _ in range(4)]
    for b in backends:
        await b.open()
    try:
        await asyncio.gather(*(b.ensure_schema(all_statements()) for b in backends))
        await backends[0].ensure_schema(all_statements())  # and once more, when up to date
        async with backends[0].read() as conn:
            row = await conn.fetchone(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'events' AND column_name = 'position'"
            )
            tables = await conn.fetchall(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
    finally:
        for b in backends:
            await b.close()
    assert row == ("bigint",)
    names = {t[0] for t in tables}
    assert {"events", "chain_heads", "jobs", "job_counts", "credit_usage", "api_keys"} <= names


async def test_unique_violation_is_a_store_conflict(backend: PostgresBackend) -> None:
    """A duplicate key raises StoreConflict, poisons the transaction and leaves nothing."""
    insert = "INSERT INTO ledger_meta (name, value) VALUES (?, ?)"
    with pytest.raises(StoreConflict):
        async with backend.write() as conn:
            await conn.execute(insert, ("probe", "1"))
            with pytest.raises(StoreConflict):
                await conn.executemany(insert, [("other", "2"), ("probe", "3")])
            with pytest.raises(StoreConflict):
                await conn.fetchone("SELECT value FROM ledger_meta WHERE name = ?", ("probe",))
            raise StoreConflict("the store gives up the batch")
    async with backend.read() as conn:
        rows = await conn.fetchall(
            "SELECT name FROM ledger_meta WHERE name IN (?, ?)", ("probe", "other")
        )
    assert rows == []


async def test_swallowed_conflict_never_commits(backend: PostgresBackend) -> None:
    """A transaction whose conflict was caught and ignored still fails instead of committing."""
    insert = "INSERT INTO ledger_meta (name, value) VALUES (?, ?)"
    with pytest.raises(StoreConflict):
        async with backend.write() as conn:
            await conn.execute(insert, ("kept?", "1"))
            try:
                await conn.execute(insert, ("kept?", "2"))
            except StoreConflict:
                pass
    async with backend.read() as conn:
        row = await conn.fetchone("SELECT count(*) FROM ledger_meta WHERE name = 'kept?'")
    assert row == (0,)


async def test_sums_come_back_as_ints(backend: PostgresBackend) -> None:
    """``sum()`` over BIGINT columns answers Python ints, as on SQLite."""
    async with backend.write() as conn:
        await conn.executemany(
            "INSERT INTO credit_grants (tenant, account, granted) VALUES (?, ?, ?)",
            [("acme", "a", 5 * 10**15), ("acme", "b", 7)],
        )
    async with backend.read() as conn:
        row = await conn.fetchone("SELECT sum(granted), count(*) FROM credit_grants")
    assert row == (5 * 10**15 + 7, 2)
    assert all(type(v) is int for v in row)


async def test_snapshot_reads_hold_one_view(backend: PostgresBackend) -> None:
    """A snapshot read sees the same rows throughout, while another connection commits."""
    count = "SELECT count(*) FROM ledger_meta WHERE name LIKE 'snap%'"
    async with backend.read(snapshot=True) as conn:
        before = await conn.fetchone(count)
        async with backend.write() as writer:
            await writer.execute("INSERT INTO ledger_meta (name, value) VALUES ('snap1', 'x')")
        during = await conn.fetchone(count)
    async with backend.read() as conn:
        after = await conn.fetchone(count)
    assert before == during == (0,)
    assert after == (1,)


async def test_signal_wakes_another_process(pg_url: str) -> None:
    """``signal()`` on one backend ends ``wait_for_signal`` on another backend's listener."""
    a, b = PostgresBackend(pg_url), PostgresBackend(pg_url)
    await a.open()
    await b.open()
    try:
        await b.wait_for_signal(0.01)  # connects the listener
        waiter = asyncio.create_task(b.wait_for_signal(600))
        await asyncio.sleep(0)
        await a.signal()
        await asyncio.wait_for(waiter, 60)
        assert waiter.done() and waiter.exception() is None
    finally:
        await a.close()
        await b.close()


@needs_pg
async def test_unreachable_server_is_one_clear_error() -> None:
    """A closed port, a missing database and a malformed URL each fail with one line."""
    base = pg_server_url()
    assert base is not None
    server = base.partition("://")[2].split("/", 1)[0]
    cases = {
        f"postgresql://postgres@127.0.0.1:{free_port()}/jobledger": "cannot reach PostgreSQL",
        f"postgresql://{server}/jl_no_such_database_here": "does not exist (create it first",
        "postgresql://postgres@127.0.0.1:notaport/x": "invalid PostgreSQL URL",
    }
    for url, words in cases.items():
        with pytest.raises(StoreUnavailable) as caught:
            await PostgresBackend(url).open()
        assert words in caught.value.message
        assert "\n" not in caught.value.message
    done = await acli("keys", "list", "--db", f"postgresql://127.0.0.1:{free_port()}/jobledger")
    assert done.code == 1
    assert done.err.startswith("jobledger: cannot reach PostgreSQL")
    assert len(done.err.strip().splitlines()) == 1 and "Traceback" not in done.err


# -- two server processes over one database ----------------------------------------------------


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as resp:
        text = await resp.text()
        assert resp.status == 201, f"POST {url}: {resp.status} {text}"
        answer: dict[str, Any] = json.loads(text)
        return answer


async def _events(http: aiohttp.ClientSession, base: str, after: int) -> dict[str, Any]:
    async with http.get(f"{base}/v1/events", params={"after": after, "limit": 50}) as resp:
        assert resp.status == 200, await resp.text()
        page: dict[str, Any] = await resp.json()
        return page


async def _writer(http: aiohttp.ClientSession, base: str, name: str, jobs: int) -> int:
    """Create, start and complete ``jobs`` jobs; the number of events appended."""
    for i in range(jobs):
        job_id = f"{name}-{i}"
        await _post(http, f"{base}/v1/jobs", {"id": job_id, "agent": "w/a", "account": name})
        await _post(http, f"{base}/v1/jobs/{job_id}/events", {"type": "job.started"})
        await _post(
            http,
            f"{base}/v1/jobs/{job_id}/events",
            {"type": "job.completed", "data": {"result": [i]}},
        )
    return 3 * jobs


@pytest.mark.slow
async def test_two_servers_append_while_a_reader_tails_the_feed(pg_url: str) -> None:
    """With two servers appending at once, a tailing reader sees every position once, in order."""
    async with served(pg_url) as a, served(pg_url) as b:
        key: Key = await acreate_key(pg_url, "acme")
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(headers=key.headers, timeout=timeout) as http:
            writers_done = asyncio.Event()
            seen: list[int] = []

            async def tail() -> None:
                after = 0
                while True:
                    finished = writers_done.is_set()
                    page = await _events(http, a.base, after)
                    positions = [e["position"] for e in page["events"]]
                    seen.extend(positions)
                    if positions:
                        after = page["next_after"]
                        assert after == positions[-1]
                    elif finished:
                        return
                    else:
                        await asyncio.sleep(0.005)

            reader = asyncio.create_task(tail())
            servers = itertools.cycle([a.base, b.base])
            counts = await asyncio.gather(
                *(_writer(http, next(servers), f"w{n}", 8) for n in range(8))
            )
            writers_done.set()
            await asyncio.wait_for(reader, 120)

            full: list[int] = []
            after = 0
            while page := (await _events(http, b.base, after))["events"]:
                full.extend(e["position"] for e in page)
                after = full[-1]

    appended = sum(counts) + 1  # and the key the CLI created
    assert full == list(range(1, appended + 1))
    assert seen == full


@pytest.mark.slow
async def test_long_poll_and_stream_wake_across_servers(pg_url: str) -> None:
    """A long poll and an event stream on server A answer an append made through server B."""
    async with served(pg_url) as a, served(pg_url) as b:
        key = await acreate_key(pg_url, "acme")
        timeout = aiohttp.ClientTimeout(total=90)
        sessions: dict[int, aiohttp.ClientSession] = {}
        async with (
            contextlib.AsyncExitStack() as stack,
            aiohttp.ClientSession(headers=key.headers, timeout=timeout) as http,
        ):
            job = await _post(http, f"{b.base}/v1/jobs", {"id": "poll", "agent": "w/a"})
            assert job["version"] == 1

            # each waiting request on a connection of its own, from a port we know, so that we
            # can see server A hold them
            poll_port, stream_port = free_port(), free_port()
            for port in (poll_port, stream_port):
                session = aiohttp.ClientSession(
                    headers=key.headers,
                    timeout=timeout,
                    connector=aiohttp.TCPConnector(local_addr=("127.0.0.1", port)),
                )
                stack.push_async_callback(session.close)
                sessions[port] = session

            async def long_poll() -> dict[str, Any]:
                url = f"{a.base}/v1/jobs/poll"
                params = {"wait": "60", "after_version": "1"}
                async with sessions[poll_port].get(url, params=params) as resp:
                    assert resp.status == 200
                    answer: dict[str, Any] = await resp.json()
                    return answer

            async def first_streamed(after: int) -> dict[str, Any]:
                url = f"{a.base}/v1/events/stream"
                async with sessions[stream_port].get(url, params={"after": str(after)}) as resp:
                    assert resp.status == 200
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if line.startswith("data:"):
                            event: dict[str, Any] = json.loads(line[5:])
                            return event
                raise AssertionError("the stream ended without an event")

            head = job_position = (await _events(http, a.base, 0))["next_after"]
            poll = asyncio.create_task(long_poll())
            stream = asyncio.create_task(first_streamed(head))
            await wait_until(
                lambda: a.has_read_request_from(poll_port) and a.has_read_request_from(stream_port),
                what="server A holds the poll and the stream",
            )
            assert not poll.done() and not stream.done()
            started = await _post(http, f"{b.base}/v1/jobs/poll/events", {"type": "job.started"})
            woke = await asyncio.wait_for(poll, 60)
            streamed = await asyncio.wait_for(stream, 60)
    assert woke["version"] == 2 and woke["status"] == "running"
    assert streamed["position"] == started["events"][0]["position"] > job_position
    assert streamed["type"] == "job.started"
