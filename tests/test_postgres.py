"""The PostgreSQL backend: what is specific to it, and several servers over one database.

The backend contract both backends keep is tests/test_backends.py, and the rest of the suite
runs on PostgreSQL too through the ``db_url`` fixture; these tests cover what only PostgreSQL
does: the translation of the shared SQL, a transaction aborted by its first conflict,
wake-ups across processes (LISTEN/NOTIFY), and two ``jobledger serve`` processes appending at
once while a reader tails the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import pytest

from ledger.backends import postgres
from ledger.backends.postgres import CHANNEL, NOTIFY_SECONDS, PostgresBackend, translate
from ledger.errors import CommitFailed, StoreConflict
from tests.conftest import store_key
from tests.serverproc import Key, free_port, served
from tests.waits import wait_until

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


async def test_a_conflict_aborts_the_whole_transaction(pg_backend: PostgresBackend) -> None:
    """After a duplicate key every later statement of the transaction raises StoreConflict."""
    insert = "INSERT INTO ledger_meta (name, value) VALUES (?, ?)"
    with pytest.raises(StoreConflict):
        async with pg_backend.write() as conn:
            await conn.execute(insert, ("probe", "1"))
            with pytest.raises(StoreConflict):
                await conn.executemany(insert, [("other", "2"), ("probe", "3")])
            with pytest.raises(StoreConflict):
                await conn.fetchone("SELECT value FROM ledger_meta WHERE name = ?", ("probe",))
            raise StoreConflict("the store gives up the batch")
    async with pg_backend.read() as conn:
        rows = await conn.fetchall(
            "SELECT name FROM ledger_meta WHERE name IN (?, ?)", ("probe", "other")
        )
    assert rows == []


async def test_swallowed_conflict_never_commits(pg_backend: PostgresBackend) -> None:
    """A transaction whose conflict was caught and ignored still fails instead of committing."""
    insert = "INSERT INTO ledger_meta (name, value) VALUES (?, ?)"
    with pytest.raises(CommitFailed):
        async with pg_backend.write() as conn:
            await conn.execute(insert, ("kept?", "1"))
            try:
                await conn.execute(insert, ("kept?", "2"))
            except StoreConflict:
                pass
    async with pg_backend.read() as conn:
        row = await conn.fetchone("SELECT count(*) FROM ledger_meta WHERE name = 'kept?'")
    assert row == (0,)


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
        assert waiter.result() is True
    finally:
        await a.close()
        await b.close()


async def test_own_signal_does_not_wake_own_listener(pg_url: str) -> None:
    """A process's NOTIFY carries its token: its own watcher is not woken (it woke its waiters
    when it committed), another process's is."""
    a, b = PostgresBackend(pg_url), PostgresBackend(pg_url)
    await a.open()
    await b.open()
    try:
        await a.wait_for_signal(0.01)  # connect both listeners
        await b.wait_for_signal(0.01)
        other = asyncio.create_task(b.wait_for_signal(600))
        await a.signal()
        assert await asyncio.wait_for(other, 60) is True
        assert await a.wait_for_signal(0.5) is False  # our own NOTIFY came back: ignored
    finally:
        await a.close()
        await b.close()


async def test_signals_collapse_into_few_notifies(pg_url: str) -> None:
    """Signals while a NOTIFY is pending, or within NOTIFY_SECONDS of the last, collapse: a
    burst of commits costs the database a few notifying transactions, not one per commit."""
    heard: list[str] = []
    listener = await asyncpg.connect(pg_url)
    backend = PostgresBackend(pg_url)
    await backend.open()

    async def settled() -> int:
        task = backend._notify_task
        assert task is not None
        await asyncio.wait_for(task, 60)
        await listener.execute("SELECT 1")  # what was sent before it has been delivered
        return len(heard)

    try:
        await listener.add_listener(CHANNEL, lambda *args: heard.append(args[3]))
        for _ in range(50):  # all before the NOTIFY task first runs: one NOTIFY
            await backend.signal()
        assert await settled() == 1
        started = time.monotonic()
        for _ in range(50):
            await backend.signal()
            await asyncio.sleep(0.002)
        sent = await settled() - 1
        elapsed = time.monotonic() - started
        # NOTIFYs start at least NOTIFY_SECONDS apart: at most one per period, plus the first.
        assert 1 <= sent <= elapsed / (NOTIFY_SECONDS * 0.95) + 1
        assert set(heard) == {backend._token}
    finally:
        await listener.close()
        await backend.close()


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
async def test_prepare_refused_for_a_passing_reason_is_tried_again(pg_url: str) -> None:
    """A write statement PREPARE refuses because its table is missing yet is PREPAREd once
    the table exists; one whose parameter types cannot be inferred is sent as text for good."""
    later = translate("INSERT INTO later_table (a) VALUES (?)")
    untyped = translate("UPDATE later_table SET a = a WHERE ? IS NULL")
    names = [postgres._statement_name(later), postgres._statement_name(untyped)]
    conn = await asyncpg.connect(pg_url)
    try:
        await postgres._prepare_known(conn)  # neither can be prepared: no table yet
        assert later not in postgres._UNPREPARABLE and untyped not in postgres._UNPREPARABLE
        await conn.execute("CREATE TABLE later_table (a bigint)")
        await postgres._prepare_known(conn)
        assert later not in postgres._UNPREPARABLE
        assert untyped in postgres._UNPREPARABLE  # "could not determine data type": never
        prepared = {r[0] for r in await conn.fetch("SELECT name FROM pg_prepared_statements")}
        assert names[0] in prepared and names[1] not in prepared
        await conn.execute(f"EXECUTE {names[0]}(7)")
        assert await conn.fetchval("SELECT a FROM later_table") == 7
    finally:
        await conn.close()
        for statement in (later, untyped):  # other tests' connections need not meet them
            postgres._NAMES.pop(statement, None)
            postgres._REFUSALS.pop(statement, None)
            postgres._UNPREPARABLE.discard(statement)


async def test_two_servers_append_while_a_reader_tails_the_feed(pg_url: str) -> None:
    """With two servers appending at once, a tailing reader sees every position once, in order."""
    async with served(pg_url) as a, served(pg_url) as b:
        key: Key = await store_key(pg_url, "acme")
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
    # positions are unique and increasing, not dense (a batch reserves a few more than it uses)
    assert len(full) == appended and full == sorted(set(full))
    assert seen == full


@pytest.mark.slow
async def test_long_poll_and_stream_wake_across_servers(pg_url: str) -> None:
    """A long poll and an event stream on server A answer an append made through server B."""
    async with served(pg_url) as a, served(pg_url) as b:
        key = await store_key(pg_url, "acme")
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


async def test_terminated_connections_answer_503_and_lose_no_write(pg_url: str) -> None:
    """pg_terminate_backend of every connection of a serving process, three times under
    concurrent writers and readers: each answer is 2xx or 503 (never 500), every acknowledged
    write is there afterwards, and the server recovers."""
    from tests.conftest import pg_server_url

    database = pg_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_server_url())
    acked: list[str] = []
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    try:
        async with served(pg_url) as server:
            key = await store_key(pg_url, "acme")
            stop = asyncio.Event()

            async def worker(http: aiohttp.ClientSession, n: int) -> None:
                for i in itertools.count():
                    if stop.is_set():
                        return
                    job = f"w{n}-{i}"
                    for method, path, body in (
                        ("POST", "/v1/jobs", {"id": job, "agent": "a"}),
                        ("GET", "/v1/jobs?limit=5", None),
                    ):
                        async with http.request(method, path, json=body) as resp:
                            statuses[resp.status] += 1
                            text = await resp.text()
                            if resp.status not in (200, 201, 503):
                                bad.append(f"{method} {path}: {resp.status} {text[:200]}")
                            elif resp.status == 503:
                                assert json.loads(text)["error"]["code"] == "unavailable", text
                            elif method == "POST":
                                acked.append(job)

            async with aiohttp.ClientSession(server.base, headers=key.headers) as http:
                workers = [asyncio.create_task(worker(http, n)) for n in range(12)]
                try:
                    for _ in range(3):
                        before = len(acked)
                        await wait_until(lambda b=before: len(acked) > b + 20, 30.0, "writes")
                        killed = await admin.fetchval(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid()",
                            database,
                        )
                        assert killed > 0
                    before = len(acked)
                    await wait_until(lambda: len(acked) > before + 20, 30.0, "recovery")
                finally:
                    stop.set()
                    await asyncio.gather(*workers)
                assert bad == [], bad[:5]
                for job in acked:  # every acknowledged write survived
                    async with http.get(f"/v1/jobs/{job}") as resp:
                        assert resp.status == 200, (job, resp.status)
            log = server.log_text()
        # (a lost connection is logged, as ledger.batch_failed or a task's warning; no request
        # is an unhandled error)
        failures = [
            line for line in log.splitlines() if '"status":500' in line or "http.unhandled" in line
        ]
        assert failures == [], failures[:3]
    finally:
        await admin.close()
    assert statuses[201] == len(acked) > 0
