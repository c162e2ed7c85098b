"""Faults and races: a SIGKILL under load, SIGTERM with requests in flight and mid-rebuild, and
two writers racing to finish one job. Each test runs on SQLite and (when configured) PostgreSQL.

The server is the real ``jobledger serve`` in a subprocess (``tests/serverproc.py``); clients
are aiohttp sessions over loopback. Every load loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from api.app import open_store
from ledger import commands
from ledger.backends import backend_for
from ledger.events import JobCompleted, JobQueued, JobStarted
from ledger.rebuild import SUFFIX
from ledger.store import UnitOfWork
from tests.conftest import Api, store_key
from tests.serverproc import Key, Server, acli, free_port, served, start, untrack
from tests.waits import wait_until

pytestmark = pytest.mark.slow

WRITERS = 16
KILL_AFTER_ACKS = 240  # SIGKILL once this many appends are acknowledged ...
MAX_APPENDS_PER_WRITER = 400  # ... and no writer sends more than this ...
LOAD_SECONDS = 60.0  # ... or keeps going longer than this
TIMEOUT = aiohttp.ClientTimeout(total=30)


async def post_json(http: aiohttp.ClientSession, path: str, body: Any) -> tuple[int, Any]:
    async with http.post(path, json=body) as resp:
        return resp.status, await resp.json()


async def get_json(http: aiohttp.ClientSession, path: str, **params: str) -> Any:
    async with http.get(path, params=params) as resp:
        assert resp.status == 200, f"GET {path}: {resp.status} {await resp.text()}"
        return await resp.json()


async def job_events(http: aiohttp.ClientSession, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await get_json(http, f"/v1/jobs/{job_id}/events"))["events"]
    return events


async def all_events(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """The tenant's whole feed, page by page (bounded by the pages it takes)."""
    found: list[dict[str, Any]] = []
    after = 0
    for _ in range(10_000):
        page = await get_json(http, "/v1/events", after=str(after), limit="1000")
        if not page["events"]:
            return found
        found.extend(page["events"])
        after = page["next_after"]
    raise AssertionError("the feed did not end")


async def make_jobs(http: aiohttp.ClientSession, n: int, prefix: str) -> list[str]:
    ids = []
    for i in range(n):
        status, job = await post_json(
            http, "/v1/jobs", {"agent": "crash/test", "id": f"{prefix}{i}"}
        )
        assert status == 201, job
        status, answer = await post_json(
            http, f"/v1/jobs/{job['id']}/events", {"type": "job.started"}
        )
        assert status == 201, answer
        ids.append(job["id"])
    return ids


async def verify_offline(db: str) -> None:
    """``jobledger verify`` and ``jobledger rebuild --verify`` both pass on ``db``."""
    verified = await acli("verify", "--db", db)
    assert verified.code == 0 and verified.last_line.startswith("OK "), verified
    rebuilt = await acli("rebuild", "--verify", "--db", db)
    assert rebuilt.code == 0 and '"identical": true' in rebuilt.last_line, rebuilt


async def test_acknowledged_appends_survive_sigkill(db_url: str, tmp_path: Path) -> None:
    """Every append acknowledged with 201 before a SIGKILL is stored after the restart."""
    key = await store_key(db_url, "acme")
    server = Server(db_url, log_dir=tmp_path)
    acked: dict[str, tuple[str, int]] = {}  # event_id -> (job_id, position)
    sent: dict[str, str] = {}  # every event_id a writer sent -> job_id
    enough = asyncio.Event()
    try:
        await server.astart()
        connector = aiohttp.TCPConnector(limit=WRITERS)
        async with aiohttp.ClientSession(
            server.base, headers=key.headers, connector=connector, timeout=TIMEOUT
        ) as http:
            job_ids = await make_jobs(http, WRITERS, "crash-")
            deadline = time.monotonic() + LOAD_SECONDS

            async def writer(n: int, job_id: str) -> None:
                for i in range(MAX_APPENDS_PER_WRITER):
                    if time.monotonic() > deadline:
                        return
                    event_id = f"w{n}-{i}"
                    sent[event_id] = job_id
                    body = {
                        "type": "job.progressed",
                        "data": {"row_count": i},
                        "event_id": event_id,
                    }
                    try:
                        status, answer = await post_json(http, f"/v1/jobs/{job_id}/events", body)
                    except (aiohttp.ClientError, TimeoutError):
                        return  # the server is gone: this append was never acknowledged
                    assert status == 201, answer
                    acked[event_id] = (job_id, answer["events"][0]["position"])
                    if len(acked) >= KILL_AFTER_ACKS:
                        enough.set()

            writers = [asyncio.create_task(writer(n, job_id)) for n, job_id in enumerate(job_ids)]
            kill_point = asyncio.create_task(enough.wait())
            await asyncio.wait(
                [kill_point, *writers], return_when=asyncio.FIRST_COMPLETED, timeout=LOAD_SECONDS
            )
            kill_point.cancel()
            assert enough.is_set(), "the load never reached the kill point"
            assert server.kill() == -signal.SIGKILL  # mid-load: the writers are still sending
            await asyncio.gather(*writers)

        await server.astart()  # the same database, a new process
        async with aiohttp.ClientSession(server.base, headers=key.headers) as http:
            stored: dict[str, tuple[str, int]] = {}
            for job_id in job_ids:
                events = await job_events(http, job_id)
                assert [e["version"] for e in events] == list(range(1, len(events) + 1))
                stored.update({e["event_id"]: (job_id, e["position"]) for e in events})
            feed = await all_events(http)
        lost = {eid: where for eid, where in acked.items() if stored.get(eid) != where}
        assert not lost, f"{len(lost)} acknowledged appends are missing after SIGKILL: {lost}"
        ghosts = [e for e in stored if e.startswith("w") and e not in sent]
        assert not ghosts  # nothing appears that no client sent
        # at most the one append each writer had in flight may be stored unacknowledged
        unacked = [e for e in stored if e.startswith("w") and e not in acked]
        assert len(unacked) <= WRITERS
        positions = [e["position"] for e in feed]
        assert positions == sorted(set(positions))  # strictly increasing, none repeated
        assert set(acked) <= {e["event_id"] for e in feed}
    finally:
        server.stop()
    await verify_offline(db_url)


async def finish_race(api: Api, job_id: str, *, cancel_first: bool) -> tuple[str, dict[str, Any]]:
    """Cancel and complete ``job_id`` at the same time; the winner and the loser's answer."""

    async def call(path: str, body: Any) -> tuple[int, Any]:
        async with api.client.post(path, json=body, headers=api.headers) as resp:
            return resp.status, await resp.json()

    racers = [
        call(f"/v1/jobs/{job_id}/cancel", {"reason": "race"}),
        call(
            f"/v1/jobs/{job_id}/events",
            {"type": "job.completed", "data": {"row_count": 3, "result": [1, 2, 3]}},
        ),
    ]
    answers = await asyncio.gather(*(racers if cancel_first else racers[::-1]))
    (cancel, cancelled), (complete, completed) = answers if cancel_first else answers[::-1]
    if cancel == 200:
        assert complete == 409, f"both won: {cancelled} {completed}"
        return "cancelled", completed
    assert cancel == 409 and complete == 201, f"{cancel} {cancelled} / {complete} {completed}"
    return "completed", cancelled


async def test_cancel_racing_complete_has_one_winner(api: Api) -> None:
    """Cancel and complete racing on one job: one wins, the other is 409, credits follow."""
    winners: dict[str, str] = {}
    for i in range(12):
        job = await api.post("/v1/jobs", {"agent": "race/agent", "id": f"race-{i}"})
        if i % 2:
            await api.post(f"/v1/jobs/{job['id']}/events", {"type": "job.started"})
        winner, loser = await finish_race(api, job["id"], cancel_first=i % 4 < 2)
        assert loser["error"]["code"] == "invalid_transition", loser
        final = await api.get(f"/v1/jobs/{job['id']}")
        assert final["status"] == winner
        assert final["credits_used"] == (3 if winner == "completed" else 0)
        winners[job["id"]] = winner
    completed = sum(1 for w in winners.values() if w == "completed")
    credits = await api.get("/v1/credits")
    assert credits["used"] == 3 * completed
    assert credits["by_agent"].get("race/agent", 0) == 3 * completed
    stats = await api.get("/v1/jobs/stats")
    assert stats["by_status"]["completed"] == completed
    assert stats["by_status"]["cancelled"] == len(winners) - completed


async def test_sigterm_lets_in_flight_requests_finish(db_url: str, tmp_path: Path) -> None:
    """SIGTERM answers a held long poll, finishes in-flight appends, stores them, exits 0."""
    key = await store_key(db_url, "acme")
    server = Server(db_url, log_dir=tmp_path)
    try:
        await server.astart()
        connector = aiohttp.TCPConnector(limit=32)
        async with (
            contextlib.AsyncExitStack() as stack,
            aiohttp.ClientSession(
                server.base, headers=key.headers, connector=connector, timeout=TIMEOUT
            ) as http,
        ):
            (polled, target) = await make_jobs(http, 2, "term-")
            version = (await get_json(http, f"/v1/jobs/{polled}"))["version"]
            port = free_port()  # the poll's own connection, to see the server hold it
            poller = aiohttp.ClientSession(
                server.base,
                headers=key.headers,
                connector=aiohttp.TCPConnector(local_addr=("127.0.0.1", port)),
                timeout=TIMEOUT,
            )
            stack.push_async_callback(poller.close)
            poll = asyncio.create_task(
                # the longest wait there is: longer than serve's 30 s shutdown timeout
                get_json(poller, f"/v1/jobs/{polled}", wait="60", after_version=str(version))
            )
            await wait_until(lambda: server.has_read_request_from(port), what="the held poll")
            assert not poll.done()  # held: nothing changes the polled job
            first_ack = asyncio.Event()
            outcomes: dict[str, int | str] = {}

            async def append(i: int) -> None:
                body = {"type": "job.progressed", "data": {"row_count": i}, "event_id": f"t{i}"}
                try:
                    status, _ = await post_json(http, f"/v1/jobs/{target}/events", body)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes[f"t{i}"] = type(exc).__name__  # refused: never acknowledged
                    return
                outcomes[f"t{i}"] = status
                first_ack.set()

            burst = [asyncio.create_task(append(i)) for i in range(200)]
            await asyncio.wait_for(first_ack.wait(), 30)
            server.signal(signal.SIGTERM)
            await asyncio.gather(*burst)
            answered = await asyncio.wait_for(poll, 30)
            assert await server.wait() == 0
        assert answered["id"] == polled and answered["version"] == version
        statuses = {v for v in outcomes.values() if isinstance(v, int)}
        assert statuses == {201}, outcomes  # never a 5xx or 503 while stopping
        acked = {eid for eid, v in outcomes.items() if v == 201}

        await server.astart()
        async with aiohttp.ClientSession(server.base, headers=key.headers) as http:
            stored = {e["event_id"] for e in await job_events(http, target)}
        assert acked <= stored
        assert {e for e in stored if e.startswith("t")} == acked  # no write lost its answer
    finally:
        server.stop()
    assert server.returncodes[0] == 0
    log = server.log_text()
    assert '"store.closed"' in log and "Traceback" not in log


# 6,000 events: a rebuild of 0.1-0.3 s (PostgreSQL, SQLite), which the probe, asking every 5 ms
# whether its shadow tables exist, interrupts (tried up to five times; seeding is the cost)
SEED_JOBS = 2000


async def seed(db_url: str, tenant: str, jobs: int, chunk: int = 500) -> None:
    """Write ``jobs`` finished jobs through the real store and commands, ``chunk`` a batch."""
    store = open_store(db_url)
    await store.start()
    try:
        for first in range(0, jobs, chunk):

            async def write(uow: UnitOfWork, first: int = first) -> None:
                for i in range(first, min(first + chunk, jobs)):
                    job_id = f"seed-{i}"
                    queued = JobQueued(agent=f"agent-{i % 7}", account=f"acct-{i % 5}")
                    await commands.create_job(uow, tenant, job_id, queued, actor="seed")
                    finish = [
                        commands.NewEvent(JobStarted()),
                        commands.NewEvent(JobCompleted(row_count=i % 11)),
                    ]
                    await commands.append_events(
                        uow, tenant, job_id, finish, actor="seed", retention_s=86400
                    )

            await store.execute(write, tenants=[tenant])
    finally:
        await store.stop()


@contextlib.asynccontextmanager
async def table_probe(db_url: str, name: str) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """A probe for the block: does table ``name`` exist (committed) right now?"""
    backend = backend_for(db_url)
    await backend.open()
    sql = (
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
        if backend.dialect == "sqlite"
        else "SELECT count(*) FROM pg_tables WHERE tablename = ?"
    )

    async def probe() -> bool:
        async with backend.read() as conn:
            row = await conn.fetchone(sql, (name,))
        return bool(row and row[0])

    try:
        yield probe
    finally:
        await backend.close()


async def interrupt_rebuild(db_url: str, probe: Callable[[], Awaitable[bool]]) -> int | None:
    """Run ``jobledger rebuild`` and SIGTERM it once its shadow tables exist.

    The exit code, or ``None`` if the rebuild finished before it could be interrupted.
    """
    proc = start("rebuild", "--db", db_url)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if await probe():
                proc.send_signal(signal.SIGTERM)
                return await asyncio.to_thread(proc.wait, 30)
            await asyncio.sleep(0.005)
        await asyncio.to_thread(proc.wait, 60)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        untrack(proc)


async def test_sigterm_during_rebuild_keeps_old_read_models(db_url: str, tmp_path: Path) -> None:
    """A rebuild stopped by SIGTERM swaps nothing: the server answers as before, verify passes."""
    key: Key = await store_key(db_url, "acme")
    await seed(db_url, "acme", SEED_JOBS)
    async with (
        table_probe(db_url, f"jobs{SUFFIX}") as probe,
        served(db_url, log_dir=tmp_path) as server,
        aiohttp.ClientSession(server.base, headers=key.headers) as http,
    ):
        before = await get_json(http, "/v1/jobs/stats")
        page_before = await get_json(http, "/v1/jobs", limit="20")
        assert before["total_jobs"] == SEED_JOBS
        codes = []
        for _ in range(5):  # a rebuild may finish before the probe sees it; try again
            code = await interrupt_rebuild(db_url, probe)
            codes.append(code)
            if code is not None:
                break
        assert codes[-1] == -signal.SIGTERM, f"never interrupted a rebuild: {codes}"
        assert await get_json(http, "/v1/jobs/stats") == before
        assert await get_json(http, "/v1/jobs", limit="20") == page_before
        status, _ = await post_json(http, "/v1/jobs", {"agent": "after/rebuild"})
        assert status == 201  # the server still writes, too
        after = await get_json(http, "/v1/jobs/stats")
        assert after["total_jobs"] == SEED_JOBS + 1
    await verify_offline(db_url)
