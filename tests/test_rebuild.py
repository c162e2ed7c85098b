"""Rebuilding read models: every answer is the same after a replay, also under load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app
from api.context import STORE
from api.settings import Settings
from ledger import rebuild as rebuild_module
from ledger.rebuild import rebuild
from ledger.store import tables
from projections import counts as counts_model
from projections import jobs as jobs_model
from tests import rawdb
from tests.conftest import Api
from tests.history import RICH_JOB_IDS, job
from tests.serverproc import acli

AiohttpClient = Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]]


# -- every read-model answer ---------------------------------------------------------------------


async def answer(api: Api, path: str, **params: Any) -> tuple[int, Any]:
    async with api.client.get(path, params=params, headers=api.headers) as resp:
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, json.loads(body)
        return resp.status, body.decode()


def steady(running: dict[str, Any]) -> dict[str, Any]:
    """The running answer without ``elapsed``, which moves with the clock."""
    for jobs in running["executing"].values():
        for entry in jobs:
            assert ":" in entry.pop("elapsed")
    return running


async def snapshot(api: Api, job_ids: list[str]) -> dict[str, Any]:
    """Every answer a read model serves, keyed by what was asked."""
    seen: dict[str, Any] = {}
    for order in ("desc", "asc"):
        cursor: str | None = None
        for page in range(20):
            params: dict[str, Any] = {"limit": 4, "order": order}
            if cursor:
                params["cursor"] = cursor
            status, body = await answer(api, "/v1/jobs", **params)
            seen[f"jobs {order} page {page}"] = (status, body)
            cursor = body["next_cursor"]
            if not cursor:
                break
    for filters in (
        {"status": "running,queued"},
        {"status": "completed"},
        {"archived": "true"},
        {"archived": "false", "account": "acct-1"},
        {"agent": "exec/b"},
        {"project": "p1"},
        {"q": "plain0"},
        {"created_after": "2025-01-05T00:00:00Z", "created_before": "2025-01-08T00:00:00Z"},
    ):
        seen[f"jobs {filters}"] = await answer(api, "/v1/jobs", limit=1000, **filters)
    for job_id in job_ids:
        seen[f"job {job_id}"] = await answer(api, f"/v1/jobs/{job_id}")
        seen[f"results {job_id}"] = await answer(api, f"/v1/jobs/{job_id}/results")
    status, running = await answer(api, "/v1/jobs/running")
    seen["running"] = (status, steady(running))
    seen["stats"] = await answer(api, "/v1/jobs/stats")
    seen["accounts"] = await answer(api, "/v1/accounts")
    for account in ("acct-0", "acct-1", "acct-2", "acct-3", "nobody"):
        seen[f"account {account}"] = await answer(api, f"/v1/accounts/{account}")
        seen[f"credits {account}"] = await answer(api, "/v1/credits", account=account)
        seen[f"statement {account}"] = await answer(api, "/v1/credits/statement", account=account)
        seen[f"statement csv {account}"] = await answer(
            api, "/v1/credits/statement", account=account, format="csv"
        )
    seen["credits"] = await answer(api, "/v1/credits")
    seen["prices"] = await answer(api, "/v1/prices")
    project = Api(api.client, None)
    project.headers = {**api.headers, "X-Project-Id": "p1"}
    seen["p1 stats"] = await answer(project, "/v1/jobs/stats")
    seen["p1 jobs"] = await answer(project, "/v1/jobs")
    seen["p1 accounts"] = await answer(project, "/v1/accounts")
    seen["p1 credits"] = await answer(project, "/v1/credits")
    status, running = await answer(project, "/v1/jobs/running")
    seen["p1 running"] = (status, steady(running))
    return seen


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key] == after[key], key


def check_history(seen: dict[str, Any]) -> None:
    """The history really holds what the rebuild has to reproduce."""
    stats = seen["stats"][1]
    assert all(stats["by_status"][s] > 0 for s in stats["by_status"]), stats
    assert stats["archived"] == 2
    assert seen["job deleted"][0] == 404 and seen["job bulk1"][0] == 404
    assert seen["job done"][1]["credits_used"] == 3.13  # 1.5 + 4 × 0.25 + 63 s × 0.01
    assert seen["job done2"][1]["credits_used"] == 3 + 5
    assert seen["job partial"][1]["status"] == "partial_failed"
    assert seen["job partial"][1]["credits_used"] == 1 + 2 * 2
    assert seen["job secret"][1]["params"] == {} and seen["results secret"][0] == 410
    assert seen["credits acct-3"][1]["used"] == 3  # a deleted job stays charged
    assert seen["account acct-1"][1]["credits"]["granted"] == 480


# -- the rebuilds --------------------------------------------------------------------------------


@pytest.mark.rich_history
async def test_rebuild_reproduces_every_answer(
    db_url: str,
    client: TestClient[Any, Any],
    app: web.Application,
    api: Api,
    aiohttp_client: AiohttpClient,
) -> None:
    """In process and through the CLI, a rebuild leaves every read-model answer identical."""
    db = db_url
    store = app[STORE]
    job_ids = list(RICH_JOB_IDS)
    before = await snapshot(api, job_ids)
    check_history(before)
    async with store.backend.read() as conn:
        events, _ = await tables.event_count(conn)  # positions need not be dense (PostgreSQL)

    report = await rebuild(store.backend, store.projectors)
    assert report.events == events and report.difference is None
    assert_same(before, await snapshot(api, job_ids))
    verified = await rebuild(store.backend, store.projectors, verify=True)
    assert verified.difference is None

    await client.close()
    done = await acli("rebuild", "--db", db)
    assert done.code == 0, done.err
    summary = json.loads(done.last_line)
    assert summary["events"] == events
    assert summary["seconds"] >= 0 and summary["events_per_second"] > 0
    check = await acli("rebuild", "--db", db, "--verify")
    assert check.code == 0, check.err
    assert json.loads(check.last_line)["events"] == events
    keys = await acli("keys", "list", "--db", db)
    assert sum("revoked" in line.split() for line in keys.out.splitlines()) == 1

    restarted = Api(await aiohttp_client(create_app(Settings(db_url=db))), None)
    restarted.headers = dict(api.headers)
    assert_same(before, await snapshot(restarted, job_ids))


@pytest.mark.rich_history
async def test_verify_names_a_tampered_row(
    db_url: str, client: TestClient[Any, Any], api: Api, app: web.Application
) -> None:
    """``rebuild --verify`` exits 1 naming a tampered read model; a rebuild repairs it."""
    db = db_url
    await client.close()
    await rawdb.tamper(db, ("UPDATE job_counts SET n = n + 1 WHERE status = 'failed'", ()))

    done = await acli("rebuild", "--db", db, "--verify")
    assert done.code == 1
    assert "job_counts" in done.err and "failed" in done.err
    assert "Traceback" not in done.err
    summary = json.loads(done.last_line)
    assert summary["events"] > 0 and summary["identical"] is False
    again = await acli("rebuild", "--db", db, "--verify")
    assert again.code == 1  # verifying never repairs

    assert (await acli("rebuild", "--db", db)).code == 0
    fixed = await acli("rebuild", "--db", db, "--verify")
    assert fixed.code == 0 and json.loads(fixed.last_line)["identical"] is True


@pytest.mark.rich_history
@pytest.mark.parametrize(
    ("table", "tamper"),
    [
        ("jobs", "UPDATE jobs SET status = 'running' WHERE id = 'failed'"),
        ("credit_usage", "UPDATE credit_usage SET used = used + 1"),
        ("credit_grants", "DELETE FROM credit_grants WHERE account = 'acct-2'"),
        ("prices", "UPDATE prices SET per_row = '9'"),
        ("api_keys", "UPDATE api_keys SET role = 'admin'"),
    ],
)
async def test_verify_covers_every_read_model(
    db_url: str,
    client: TestClient[Any, Any],
    api: Api,
    app: web.Application,
    table: str,
    tamper: str,
) -> None:
    """Each read model's table is compared by ``rebuild --verify``."""
    db = db_url
    await client.close()
    assert (await rawdb.tamper(db, (tamper, ())))[0] > 0
    done = await acli("rebuild", "--db", db, "--verify")
    assert done.code == 1 and done.err.split()[1].startswith(f"{table}:"), done.err


@pytest.mark.rich_history
async def test_projection_option_rebuilds_only_one(
    db_url: str, client: TestClient[Any, Any], api: Api, app: web.Application
) -> None:
    """``--projection NAME`` replays and swaps that read model alone."""
    db = db_url
    await client.close()
    await rawdb.tamper(
        db,
        ("UPDATE job_counts SET n = n + 1", ()),
        ("UPDATE jobs SET version = version + 100 WHERE id = 'done'", ()),
    )

    jobs_only = await acli("rebuild", "--db", db, "--projection", "jobs", "--verify")
    assert jobs_only.code == 1 and "jobs:" in jobs_only.err and "job_counts" not in jobs_only.err
    assert (await acli("rebuild", "--db", db, "--projection", "jobs")).code == 0
    assert (await acli("rebuild", "--db", db, "--projection", "jobs", "--verify")).code == 0
    counts = await acli("rebuild", "--db", db, "--verify")
    assert counts.code == 1 and "job_counts" in counts.err  # untouched by the jobs rebuild
    assert (await acli("rebuild", "--db", db, "--projection", "counts")).code == 0
    assert (await acli("rebuild", "--db", db, "--verify")).code == 0
    bad = await acli("rebuild", "--db", db, "--projection", "nope")
    assert bad.code == 2


@pytest.mark.rich_history
async def test_rebuild_while_appending_loses_nothing(
    db_url: str, api: Api, app: web.Application
) -> None:
    """A rebuild racing appends through the API keeps every append; lists never shrink."""
    store = app[STORE]
    for i in range(150):
        await job(api, f"pre{i:03d}", "load/agent", f"acct-{i % 4}", "2025-02-01T00:00:00Z")
    listed_before = len((await api.get("/v1/jobs", params={"limit": 1000}))["jobs"])
    done = asyncio.Event()
    # each chunk the rebuild replays lets the appender and the reader go once more: many
    # interleavings, without their loops starving the rebuild they are meant to race
    ticks = {"appender": asyncio.Event(), "reader": asyncio.Event()}
    during: list[int] = []
    appended: list[str] = []
    counts_seen: list[int] = []

    def progress(position: int, total: int) -> None:
        for tick in ticks.values():
            tick.set()

    async def next_chunk(name: str) -> None:
        await ticks[name].wait()
        ticks[name].clear()

    async def appender() -> None:
        i = 0
        while not done.is_set() or i < 5:
            if not done.is_set():
                await next_chunk("appender")
            job_id = f"live{i:03d}"
            await api.post("/v1/jobs", {"id": job_id, "agent": "live/agent", "account": "a"})
            await api.post(f"/v1/jobs/{job_id}/events", {"type": "job.started"})
            await api.post(
                f"/v1/jobs/{job_id}/events", {"type": "job.completed", "data": {"row_count": 2}}
            )
            await api.post("/v1/credits/grants", {"account": "a", "amount": 1})
            await api.post("/v1/prices", {"agent": f"price/{i:03d}", "per_row": 1})
            appended.append(job_id)
            if not done.is_set():
                during.append(i)
            i += 1

    async def reader() -> None:
        while True:
            await next_chunk("reader")
            if done.is_set():
                return
            page = await api.get("/v1/jobs", params={"limit": 1000})
            counts_seen.append(len(page["jobs"]))
            stats = await api.get("/v1/jobs/stats")
            assert stats["total_jobs"] >= listed_before

    old_read, old_write = rebuild_module.READ_CHUNK, rebuild_module.WRITE_CHUNK
    rebuild_module.READ_CHUNK = rebuild_module.WRITE_CHUNK = 5  # many batches, many interleavings
    try:
        tasks = [asyncio.create_task(appender()), asyncio.create_task(reader())]
        report = await rebuild(store.backend, store.projectors, progress=progress)
        done.set()
        progress(0, 0)  # wakes the loops to see it
        await asyncio.gather(*tasks)
    finally:
        rebuild_module.READ_CHUNK, rebuild_module.WRITE_CHUNK = old_read, old_write

    assert report.difference is None
    assert len(during) >= 2, "appends hardly ran while the rebuild did"
    assert counts_seen and min(counts_seen) >= listed_before
    verified = await rebuild(store.backend, store.projectors, verify=True)
    assert verified.difference is None
    live = [
        j
        for j in (await api.get("/v1/jobs", params={"limit": 1000}))["jobs"]
        if j["agent"] == "live/agent"
    ]
    assert sorted(j["id"] for j in live) == sorted(appended)
    assert all(j["status"] == "completed" and j["credits_used"] == 2 for j in live)
    credits = await api.get("/v1/credits", params={"account": "a"})
    assert credits["granted"] == len(live) and credits["used"] == 2 * len(live)
    prices = [p for p in (await api.get("/v1/prices"))["prices"] if p["agent"].startswith("price/")]
    assert len(prices) == len(appended)
    assert all(p["updated_at"] and p["updated_at"].endswith("Z") for p in prices)


@pytest.mark.rich_history
async def test_cli_rebuild_beside_a_running_server(
    db_url: str, api: Api, app: web.Application, tmp_path: Path
) -> None:
    """``jobledger rebuild`` in another process, while this server appends, loses nothing."""
    db = db_url
    for i in range(300):
        await job(api, f"pre{i:03d}", "load/agent", "acct-1", "2025-02-01T00:00:00Z")
    stop = asyncio.Event()
    appended: list[str] = []

    async def appender() -> None:
        i = 0
        while not stop.is_set():
            job_id = f"live{i:03d}"
            await api.post("/v1/jobs", {"id": job_id, "agent": "live/agent", "account": "b"})
            await api.post(
                f"/v1/jobs/{job_id}/events", {"type": "job.completed", "data": {"row_count": 1}}
            )
            appended.append(job_id)
            i += 1

    totals: list[int] = []

    async def reader() -> None:
        while not stop.is_set():
            stats = await api.get("/v1/jobs/stats")  # never a 500, never a half-built model
            totals.append(stats["total_jobs"])
            page = await api.get("/v1/jobs", params={"agent": "load/agent", "limit": 1000})
            assert len(page["jobs"]) == 300

    tasks = [asyncio.create_task(appender()), asyncio.create_task(reader())]
    try:
        done = await acli("rebuild", "--db", db)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert done.code == 0, done.err
    assert totals == sorted(totals)  # appends only add jobs: the count never goes back
    check = await acli("rebuild", "--db", db, "--verify")
    assert check.code == 0, check.err
    stats = await api.get("/v1/jobs/stats")
    assert stats["by_agent"]["live/agent"]["total"] == len(appended)
    assert (await api.get("/v1/credits", params={"account": "b"}))["used"] == len(appended)


@pytest.mark.rich_history
async def test_a_reader_with_an_older_snapshot_sees_the_old_models_whole(
    db_url: str, api: Api, app: web.Application
) -> None:
    """A snapshot taken before a swap reads the old read models, not the new ones half seen.

    On PostgreSQL a table swapped in by rename would be read through the reader's older
    snapshot, which cannot see the rows of the transactions that filled it: its jobs vanish.
    """
    store = app[STORE]
    before = await api.get("/v1/jobs/stats")
    async with store.backend.read(snapshot=True, bulk=True) as conn:
        # the snapshot starts here, touching only the events (no lock on the read models)
        top = await conn.fetchone("SELECT max(position) FROM events")
        assert top is not None and top[0] > 0
        await api.post("/v1/jobs", {"id": "late", "agent": "late/agent", "account": "z"})
        for _ in range(2):  # shadows filled and swapped after the snapshot, twice
            report = await rebuild(store.backend, store.projectors)
            assert report.difference is None
        seen = await counts_model.stats(conn, "acme")
        by_account = await counts_model.by_account(conn, "acme")
        job = await jobs_model.get(conn, "acme", "done")
    assert seen.total_jobs == before["total_jobs"]
    assert seen.by_status == before["by_status"]
    assert sum(sum(s.values()) for s in by_account.values()) == before["total_jobs"]
    assert job is not None and job.status == "completed"
    after = await api.get("/v1/jobs/stats")
    assert after["total_jobs"] == before["total_jobs"] + 1
