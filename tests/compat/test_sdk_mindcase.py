"""Mindcase's official SDK (``mindcase`` 0.3.0 from PyPI), unchanged, against the dialect.

The SDK runs in its own environment as a subprocess, pointed at a real ``jobledger serve`` with
a key made by ``jobledger keys create --secret-prefix mk_live_``. While it runs, this test plays
the worker that executes agents: it picks up queued jobs through ``/v1`` and reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest

from tests.sdkenv import run_driver, sdk_python
from tests.serverproc import Key, acli, served

REQUIREMENT = "mindcase==0.3.0"
AGENT = "instagram/profiles"
ROWS = {
    "nike": {"username": "nike", "followersCount": 306000000},
    "puma": {"username": "puma", "followersCount": 13000000},
}
SCHEMA = {
    "type": "object",
    "properties": {
        "usernames": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "title": "Usernames",
            "description": "Profiles to collect",
        },
        "limit": {"type": "integer", "minimum": 1, "default": 10},
    },
    "required": ["usernames"],
}

DRIVER = r"""
import json, os
from mindcase import (
    Mindcase, AuthenticationError, InsufficientCreditsError, MindcaseError, NotFoundError,
    ValidationError,
)

out = {}
client = Mindcase(api_key=os.environ["KEY"], base_url=os.environ["BASE"], poll_interval=0.1,
                  run_timeout=60)

def job(j):
    return {k: getattr(j, k) for k in (
        "job_id", "agent", "status", "row_count", "credits_used", "error", "started_at",
        "completed_at", "created_at", "expires_at")}

def failure(call):
    try:
        call()
    except MindcaseError as exc:
        return {"class": type(exc).__name__, "message": str(exc.message),
                "status": exc.status_code}
    return None

out["credits_before"] = client.credits()
out["agents_all"] = [(a.path, a.name, a.description, a.credits_per_row)
                     for a in client.agents.list()]
out["agents_group"] = [a.path for a in client.agents.list("instagram")]
agent = client.agents.get("instagram/profiles")
out["agent"] = {"name": agent.name, "group": agent.group, "slug": agent.slug,
                "credits_per_row": agent.credits_per_row,
                "required": sorted(agent.required_params),
                "optional": sorted(agent.optional_params),
                "usernames": [agent.parameters["usernames"].name,
                              agent.parameters["usernames"].type,
                              agent.parameters["usernames"].description]}

results = client.run("instagram/profiles", params={"usernames": ["nike", "puma"]})
out["run"] = {"status": results.status, "row_count": results.row_count, "data": results.data,
              "columns": results.columns, "len": len(results),
              "followers": results.to_list("followersCount")}
out["run_failed"] = failure(lambda: client.run("instagram/profiles",
                                                params={"usernames": ["private"]}))
queued = client.run_async("instagram/profiles", params={"usernames": ["later"]})
out["run_async"] = job(queued)
out["run_async_id"] = queued.id
out["cancel"] = job(client.jobs.cancel(queued.id))
out["cancelled"] = job(client.jobs.get(queued.id))
out["invalid"] = failure(lambda: client.run_async("instagram/profiles", params={}))
out["unknown_agent"] = failure(lambda: client.agents.get("instagram/stories"))
out["unknown_run"] = failure(lambda: client.run_async("instagram/stories", params={}))
out["unknown_job"] = failure(lambda: client.jobs.get("job_nope"))

out["list"] = [job(j) for j in client.jobs.list()]
out["list_limit"] = [j.id for j in client.jobs.list(limit=2)]
out["list_completed"] = [j.id for j in client.jobs.list(status="completed")]
out["list_cancelled"] = [j.id for j in client.jobs.list(status="cancelled")]
partial = os.environ["PARTIAL"]
out["partial"] = job(client.jobs.get(partial))
r = client.jobs.results(partial)
out["partial_results"] = {"status": r.status, "row_count": r.row_count, "data": r.data}
out["running_results"] = failure(lambda: client.jobs.results(os.environ["RUNNING"]))
out["credits_after"] = client.credits()

out["bad_key"] = failure(lambda: Mindcase(api_key="mk_live_not_a_key",
                                          base_url=os.environ["BASE"]).jobs.list())
out["wrong_prefix"] = None
try:
    Mindcase(api_key=os.environ["JL_KEY"], base_url=os.environ["BASE"])
except ValueError as exc:
    out["wrong_prefix"] = str(exc)
broke = Mindcase(api_key=os.environ["BROKE_KEY"], base_url=os.environ["BASE"])
out["broke_credits"] = broke.credits()
out["broke_run"] = failure(lambda: broke.run_async("instagram/profiles",
                                                   params={"usernames": ["nike"]}))
out["other_tenant_jobs"] = [j.id for j in broke.jobs.list()]
out["other_tenant_job"] = failure(lambda: broke.jobs.get(os.environ["RUNNING"]))
print(json.dumps(out))
"""


async def _key(db: str, tenant: str, *extra: str) -> Key:
    done = await acli("keys", "create", "--db", db, "--tenant", tenant, *extra)
    assert done.code == 0, done.err
    key_id = next(w for w in done.out.split() if w.startswith("key_"))
    return Key(key_id=key_id, secret=done.last_line.strip())


async def _work(http: aiohttp.ClientSession, stop: asyncio.Event) -> list[str]:
    """The worker: runs each queued job of the agent ("private" profiles fail), until stopped."""
    done: list[str] = []
    params = {"status": "queued", "agent": AGENT, "order": "asc"}
    while not stop.is_set():
        async with http.get("/v1/jobs", params=params) as resp:
            assert resp.status == 200
            queued = (await resp.json())["jobs"]
        for job in queued:
            names = job["params"].get("usernames", [])
            if names == ["later"]:
                continue  # the driver cancels this one itself
            if "private" in names:
                outcome = {
                    "type": "job.failed",
                    "data": {"error": {"code": "private", "message": "the profile is private"}},
                }
            else:
                outcome = {"type": "job.completed", "data": {"result": [ROWS[n] for n in names]}}
            events = {"events": [{"type": "job.started"}, outcome]}
            async with http.post(f"/v1/jobs/{job['id']}/events", json=events) as resp:
                assert resp.status in (201, 409), await resp.text()
            done.append(job["id"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return done


async def _seed(http: aiohttp.ClientSession) -> dict[str, str]:
    """The catalog, credits, and two jobs made natively: one partial_failed, one running."""

    async def post(path: str, body: dict[str, Any]) -> None:
        async with http.post(path, json=body) as resp:
            assert resp.status == 201, await resp.text()

    await post(
        "/v1/agents",
        {
            "agent": AGENT,
            "title": "Instagram Profiles",
            "description": "Public profile data",
            "params_schema": SCHEMA,
            "price": {"per_row": 2},
        },
    )
    await post("/v1/agents", {"agent": "linkedin/company", "description": "Companies"})
    await post("/v1/credits/grants", {"account": "default", "amount": 100})
    await post("/v1/jobs", {"id": "partial-1", "agent": AGENT, "executions_total": 2})
    await post(
        "/v1/jobs/partial-1/events",
        {
            "events": [
                {"type": "job.execution_succeeded", "data": {"execution_id": "a"}},
                {"type": "job.execution_failed", "data": {"execution_id": "b"}},
            ]
        },
    )
    await post("/v1/jobs", {"id": "running-1", "agent": "linkedin/company"})
    await post("/v1/jobs/running-1/events", {"type": "job.started"})
    return {"PARTIAL": "partial-1", "RUNNING": "running-1"}


@pytest.mark.slow
async def test_the_mindcase_sdk_works_unchanged(db_url: str, tmp_path: Any) -> None:
    """Every jobs, results, credits and agents method of the SDK answers what the ledger holds."""
    python = await asyncio.to_thread(sdk_python, "mindcase", REQUIREMENT)
    admin = await _key(db_url, "acme", "--role", "admin", "--secret-prefix", "mk_live_")
    assert admin.secret.startswith("mk_live_")
    native = await _key(db_url, "acme", "--role", "reader")
    broke = await _key(db_url, "broke", "--role", "admin", "--secret-prefix", "mk_live_")
    async with (
        served(db_url, "--enforce-credits", log_dir=tmp_path) as server,
        aiohttp.ClientSession(server.base, headers=admin.headers) as http,
    ):
        ids = await _seed(http)
        async with http.post(
            "/v1/agents", json={"agent": AGENT}, headers=broke.headers
        ) as resp:  # the other tenant has the agent too, but no credits
            assert resp.status == 201
        stop = asyncio.Event()
        worker = asyncio.create_task(_work(http, stop))
        env = {
            "BASE": f"{server.base}/compat/mindcase/api/v1",
            "KEY": admin.secret,
            "JL_KEY": native.secret,
            "BROKE_KEY": broke.secret,
            **ids,
        }
        try:
            out = await run_driver(python, DRIVER, env)
        finally:
            stop.set()
            worked = await worker
    assert len(worked) == 2  # the two runs the SDK waited for

    assert out["credits_before"] == 100.0
    assert out["agents_all"] == [
        ["instagram/profiles", "Instagram Profiles", "Public profile data", 2],
        ["linkedin/company", "company", "Companies", 1],
    ]
    assert out["agents_group"] == ["instagram/profiles"]
    assert out["agent"] == {
        "name": "Instagram Profiles",
        "group": "instagram",
        "slug": "profiles",
        "credits_per_row": 2,
        "required": ["usernames"],
        "optional": ["limit"],
        "usernames": ["Usernames", "array", "Profiles to collect"],
    }
    assert out["run"] == {
        "status": "completed",
        "row_count": 2,
        "data": [ROWS["nike"], ROWS["puma"]],
        "columns": ["username", "followersCount"],
        "len": 2,
        "followers": [306000000, 13000000],
    }
    assert out["run_failed"] == {
        "class": "MindcaseError",
        "message": "Job failed: the profile is private",
        "status": None,
    }
    queued = out["run_async"]
    assert queued["status"] == "queued" and queued["agent"] == AGENT
    assert queued["job_id"] == out["run_async_id"] and queued["created_at"].endswith("Z")
    assert out["cancel"]["job_id"] == queued["job_id"] and out["cancel"]["status"] == "cancelled"
    assert out["cancelled"]["status"] == "cancelled"
    assert out["cancelled"]["error"] == "Job has been cancelled."
    invalid = out["invalid"]
    assert invalid["class"] == "ValidationError" and invalid["status"] == 422
    assert "params.usernames" in invalid["message"]
    assert out["unknown_agent"] == {
        "class": "NotFoundError",
        "message": "no agent instagram/stories",
        "status": 404,
    }
    assert out["unknown_run"]["class"] == "NotFoundError"
    assert out["unknown_job"]["class"] == "NotFoundError"

    listed = out["list"]  # newest first
    assert [j["job_id"] for j in listed][-2:] == ["running-1", "partial-1"]
    by_id = {j["job_id"]: j for j in listed}
    assert len(listed) == 5 and set(by_id) >= {"partial-1", "running-1", queued["job_id"]}
    failed = [j for j in listed if j["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "the profile is private"
    assert failed[0]["started_at"] is not None and failed[0]["credits_used"] == 0
    completed = [j for j in listed if j["status"] == "completed"]
    assert len(completed) == 2  # the run, and partial_failed shown as completed
    ran = next(j for j in completed if j["job_id"] != "partial-1")
    assert ran["row_count"] == 2 and ran["credits_used"] == 4  # 2 rows at 2 credits a row
    assert ran["started_at"] and ran["completed_at"] and ran["expires_at"] is None
    assert by_id["running-1"]["status"] == "running" and by_id["running-1"]["started_at"]
    assert out["list_limit"] == [j["job_id"] for j in listed[:2]]
    assert sorted(out["list_completed"]) == sorted(j["job_id"] for j in completed)
    assert out["list_cancelled"] == [queued["job_id"]]
    assert out["partial"]["status"] == "completed"
    assert out["partial_results"] == {"status": "completed", "row_count": 0, "data": []}
    assert out["running_results"]["class"] == "NotFoundError"
    assert out["credits_after"] == 96.0  # the run's 2 rows; partial-1 collected none

    assert out["bad_key"]["class"] == "AuthenticationError" and out["bad_key"]["status"] == 401
    assert out["wrong_prefix"] == "API key must start with 'mk_live_'"
    assert out["broke_credits"] == 0.0
    assert out["broke_run"]["class"] == "InsufficientCreditsError"
    assert out["broke_run"]["status"] == 402
    assert out["other_tenant_jobs"] == []
    assert out["other_tenant_job"]["class"] == "NotFoundError"
