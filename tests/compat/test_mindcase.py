"""Mindcase dialect (seed 000): the seed's example answers, rebuilt from native history."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

from tests.conftest import Api

BASE = "/compat/mindcase/api/v1"
ROW_KEYS = {"id", "status", "agent", "row_count", "credits_used", "created_at", "completed_at"}
SDK_KEYS = {"started_at", "error"}  # what Mindcase's SDK reads beyond the seed's example
SECONDS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MakeApi = Callable[..., Coroutine[Any, Any, Api]]

# The seed's examples, verbatim.
SEED_LIST = {
    "jobs": [
        {
            "id": "job_7f3a2b1c",
            "status": "completed",
            "agent": "instagram/profile-scraper",
            "row_count": 3,
            "credits_used": 3,
            "created_at": "2026-03-30T10:15:00Z",
            "completed_at": "2026-03-30T10:15:32Z",
        },
        {
            "id": "job_9e2d4a5b",
            "status": "running",
            "agent": "linkedin/company-employees",
            "row_count": 0,
            "credits_used": 0,
            "created_at": "2026-03-30T10:12:00Z",
            "completed_at": None,
        },
    ]
}
SEED_ROWS = [
    {
        "username": "nike",
        "fullName": "Nike",
        "followersCount": 306000000,
        "verified": True,
        "biography": "Just Do It.",
    },
    {
        "username": "adidas",
        "fullName": "adidas",
        "followersCount": 28000000,
        "verified": True,
        "biography": "Impossible is nothing.",
    },
    {
        "username": "puma",
        "fullName": "PUMA",
        "followersCount": 13000000,
        "verified": True,
        "biography": "Forever Faster.",
    },
]


async def seed_history(api: Api) -> None:
    """The two jobs of the seed's list example, made through the native API."""
    await api.post(
        "/v1/jobs",
        {
            "id": "job_9e2d4a5b",
            "agent": "linkedin/company-employees",
            "occurred_at": "2026-03-30T10:12:00Z",
        },
    )
    await api.post(
        "/v1/jobs/job_9e2d4a5b/events",
        {"type": "job.started", "occurred_at": "2026-03-30T10:12:01Z"},
    )
    await api.post(
        "/v1/jobs",
        {
            "id": "job_7f3a2b1c",
            "agent": "instagram/profile-scraper",
            "occurred_at": "2026-03-30T10:15:00Z",
        },
    )
    await api.post(
        "/v1/jobs/job_7f3a2b1c/events",
        {
            "events": [
                {"type": "job.started", "occurred_at": "2026-03-30T10:15:02.250Z"},
                {
                    "type": "job.completed",
                    "data": {"row_count": 3},
                    "occurred_at": "2026-03-30T10:15:32.999Z",
                },
            ]
        },
    )


async def test_list_answers_the_seed_example(api: Api) -> None:
    """GET /jobs answers the seed's example: newest first, its seven fields, plus started_at."""
    await seed_history(api)
    body = await api.get(f"{BASE}/jobs")
    assert set(body) == {"jobs"}
    assert [{k: j[k] for k in ROW_KEYS} for j in body["jobs"]] == SEED_LIST["jobs"]
    assert [set(j) for j in body["jobs"]] == [ROW_KEYS | SDK_KEYS] * 2
    assert [j["started_at"] for j in body["jobs"]] == [
        "2026-03-30T10:15:02Z",
        "2026-03-30T10:12:01Z",
    ]
    assert [j["error"] for j in body["jobs"]] == [None, None]


async def test_get_adds_expires_at(api: Api) -> None:
    """GET /jobs/{id} answers the list fields plus expires_at, in the seed's time format."""
    await seed_history(api)
    job = await api.get(f"{BASE}/jobs/job_7f3a2b1c")
    assert set(job) == ROW_KEYS | SDK_KEYS | {"expires_at"}
    assert {k: job[k] for k in ROW_KEYS} == SEED_LIST["jobs"][0]
    assert SECONDS_Z.match(job["expires_at"])
    native = await api.get("/v1/jobs/job_7f3a2b1c")
    assert native["expires_at"].startswith(job["expires_at"][:-1])
    running = await api.get(f"{BASE}/jobs/job_9e2d4a5b")
    assert running["expires_at"] is None and running["completed_at"] is None


async def test_results_answer_seed_shape_and_404_while_running(api: Api) -> None:
    """Results are 404 while the job runs, then status, row_count and data as in the seed."""
    await api.post("/v1/jobs", {"id": "r1", "agent": "instagram/profile-scraper"})
    await api.post("/v1/jobs/r1/events", {"type": "job.started"})
    body = await api.get(f"{BASE}/jobs/r1/results", status=404)
    assert body["error"]["code"] == "results_not_ready"
    await api.post("/v1/jobs/r1/events", {"type": "job.completed", "data": {"result": SEED_ROWS}})
    result = await api.get(f"{BASE}/jobs/r1/results")
    assert result == {"status": "completed", "row_count": 3, "data": SEED_ROWS}


async def test_partial_failed_shows_as_completed(api: Api) -> None:
    """A partial_failed job shows as completed in the list, the job and its results."""
    await api.post("/v1/jobs", {"id": "p1", "agent": "a/b", "executions_total": 2})
    await api.post(
        "/v1/jobs/p1/events",
        {
            "events": [
                {"type": "job.execution_succeeded", "data": {"execution_id": "e1"}},
                {"type": "job.execution_failed", "data": {"execution_id": "e2"}},
            ]
        },
    )
    assert (await api.get("/v1/jobs/p1"))["status"] == "partial_failed"
    assert (await api.get(f"{BASE}/jobs/p1"))["status"] == "completed"
    listed = await api.get(f"{BASE}/jobs")
    assert [j["status"] for j in listed["jobs"]] == ["completed"]


async def test_delete_cancels_with_the_seed_answer(api: Api) -> None:
    """DELETE /jobs/{id} cancels a running job and answers the seed's message; no credits."""
    await api.post("/v1/jobs", {"id": "job_9e2d4a5b", "agent": "linkedin/company-employees"})
    await api.post("/v1/jobs/job_9e2d4a5b/events", {"type": "job.started"})
    answer = await api.delete(f"{BASE}/jobs/job_9e2d4a5b")
    assert answer == {
        "job_id": "job_9e2d4a5b",
        "status": "cancelled",
        "message": "Job has been cancelled.",
    }
    native = await api.get("/v1/jobs/job_9e2d4a5b")
    assert native["status"] == "cancelled" and native["credits_used"] == 0
    assert (await api.get(f"{BASE}/jobs/job_9e2d4a5b"))["status"] == "cancelled"
    again = await api.delete(f"{BASE}/jobs/job_9e2d4a5b", status=409)
    assert again["error"]["code"] == "invalid_transition"


async def test_credits_remaining(api: Api) -> None:
    """GET /credits answers credits_remaining: granted minus what finished jobs used."""
    assert await api.get(f"{BASE}/credits") == {"credits_remaining": 0}
    await api.post("/v1/credits/grants", {"account": "default", "amount": "100"})
    await seed_history(api)
    assert await api.get(f"{BASE}/credits") == {"credits_remaining": 97}


async def test_auth_failures(api: Api, make_api: MakeApi) -> None:
    """A missing or bad key is 401 and a reader may not cancel (403), in the native envelope."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a/b"})
    anonymous = Api(api.client, None)
    body = await anonymous.get(f"{BASE}/jobs", status=401)
    assert body["error"]["code"] == "unauthorized"
    bad = Api(api.client, "not-a-key")
    assert (await bad.get(f"{BASE}/jobs/j1", status=401))["error"]["code"] == "unauthorized"
    reader = await make_api(role="reader")
    assert (await reader.get(f"{BASE}/jobs/j1"))["status"] == "queued"
    body = await reader.delete(f"{BASE}/jobs/j1", status=403)
    assert body["error"]["code"] == "forbidden"


async def test_other_tenants_jobs_are_invisible(api: Api, make_api: MakeApi) -> None:
    """Another tenant's job is 404 in every route and absent from the list."""
    await seed_history(api)
    other = await make_api(tenant="globex")
    assert await other.get(f"{BASE}/jobs") == {"jobs": []}
    assert await other.get(f"{BASE}/agents/all") == {"agents": []}
    for path in ("/jobs/job_7f3a2b1c", "/jobs/job_7f3a2b1c/results"):
        assert (await other.get(BASE + path, status=404))["error"]["code"] == "not_found"
    await other.delete(f"{BASE}/jobs/job_9e2d4a5b", status=404)
    assert (await api.get(f"{BASE}/jobs/job_9e2d4a5b"))["status"] == "running"


AGENT_SCHEMA = {
    "type": "object",
    "properties": {"usernames": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
    "required": ["usernames"],
}


async def test_list_takes_status_and_limit(api: Api) -> None:
    """status filters by Mindcase's words (completed takes partial_failed); limit caps."""
    await seed_history(api)
    await api.post("/v1/jobs", {"id": "p1", "agent": "a/b", "executions_total": 2})
    await api.post(
        "/v1/jobs/p1/events",
        {
            "events": [
                {"type": "job.execution_succeeded", "data": {"execution_id": "e1"}},
                {"type": "job.execution_failed", "data": {"execution_id": "e2"}},
            ]
        },
    )
    done = await api.get(f"{BASE}/jobs", params={"status": "completed"})
    assert [j["id"] for j in done["jobs"]] == ["p1", "job_7f3a2b1c"]
    running = await api.get(f"{BASE}/jobs", params={"status": "running", "limit": 20})
    assert [j["id"] for j in running["jobs"]] == ["job_9e2d4a5b"]
    newest = await api.get(f"{BASE}/jobs", params={"limit": 2})
    assert [j["id"] for j in newest["jobs"]] == ["p1", "job_7f3a2b1c"]
    bad = await api.get(f"{BASE}/jobs", params={"status": "partial_failed"}, status=422)
    assert bad["error"]["field"] == "status" and "partial_failed" in bad["detail"]
    await api.get(f"{BASE}/jobs", params={"limit": 0}, status=422)
    results = await api.get(f"{BASE}/jobs/p1/results")  # completed to Mindcase: it has results
    assert results == {"status": "completed", "row_count": 0, "data": []}


async def test_failed_and_cancelled_jobs_carry_an_error(api: Api) -> None:
    """A failed job's error is its message; a cancelled one says it was cancelled."""
    await api.post("/v1/jobs", {"id": "f1", "agent": "a/b"})
    await api.post("/v1/jobs/f1/events", {"type": "job.started"})
    await api.post(
        "/v1/jobs/f1/events",
        {"type": "job.failed", "data": {"error": {"code": "blocked", "message": "rate limited"}}},
    )
    failed = await api.get(f"{BASE}/jobs/f1")
    assert failed["status"] == "failed" and failed["error"] == "rate limited"
    assert failed["started_at"] is not None
    await api.post("/v1/jobs", {"id": "c1", "agent": "a/b"})
    await api.delete(f"{BASE}/jobs/c1")
    cancelled = await api.get(f"{BASE}/jobs/c1")
    assert cancelled["error"] == "Job has been cancelled." and cancelled["started_at"] is None


async def test_agents_read_the_catalog(api: Api) -> None:
    """agents/all, agents/{group} and agents/{group}/{slug} answer the /v1 catalog."""
    await api.post(
        "/v1/agents",
        {
            "agent": "instagram/profiles",
            "title": "Instagram Profiles",
            "description": "Profiles",
            "params_schema": AGENT_SCHEMA,
            "price": {"per_row": 2},
        },
    )
    await api.post("/v1/agents", {"agent": "linkedin/company"})
    every = await api.get(f"{BASE}/agents/all")
    assert every["agents"] == [
        {
            "group": "instagram",
            "slug": "profiles",
            "name": "Instagram Profiles",
            "description": "Profiles",
            "credits_per_row": 2,
        },
        {
            "group": "linkedin",
            "slug": "company",
            "name": "company",
            "description": "",
            "credits_per_row": 1,
        },
    ]
    group = await api.get(f"{BASE}/agents/linkedin")
    assert [a["slug"] for a in group["agents"]] == ["company"]
    agent = await api.get(f"{BASE}/agents/instagram/profiles")
    assert agent["parameters"]["usernames"]["required"] is True
    assert agent["parameters"]["usernames"]["type"] == "array"
    missing = await api.get(f"{BASE}/agents/instagram/stories", status=404)
    assert missing["detail"] == "no agent instagram/stories"


async def test_run_queues_a_job_with_checked_params(api: Api, make_api: MakeApi) -> None:
    """run appends job.queued with the agent and params; bad params are 422 naming the field."""
    await api.post("/v1/agents", {"agent": "instagram/profiles", "params_schema": AGENT_SCHEMA})
    run = f"{BASE}/agents/instagram/profiles/run"
    started = await api.post(run, {"params": {"usernames": ["nike"]}})
    assert started["job_id"] == started["id"] and started["status"] == "queued"
    assert started["agent"] == "instagram/profiles" and SECONDS_Z.match(started["created_at"])
    native = await api.get(f"/v1/jobs/{started['job_id']}")
    assert native["params"] == {"usernames": ["nike"]} and native["status"] == "queued"
    events = await api.get(f"/v1/jobs/{started['job_id']}/events")
    assert [e["type"] for e in events["events"]] == ["job.queued"]
    bad = await api.post(run, {"params": {"usernames": []}}, status=422)
    assert bad["error"]["field"] == "params.usernames" and bad["detail"]
    await api.post(f"{BASE}/agents/instagram/stories/run", {"params": {}}, status=404)
    reader = await make_api(role="reader")
    await reader.post(run, {"params": {"usernames": ["nike"]}}, status=403)
    listed = await api.get(f"{BASE}/jobs")
    assert [j["id"] for j in listed["jobs"]] == [started["job_id"]]
