"""Mintlify dialect (seed 004): agent jobs with source, model, prLink and archivedAt."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

from tests.conftest import Api

PROJECT = "proj_docs"
BASE = f"/compat/mintlify/v2/agent/{PROJECT}/job"
SECONDS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MakeApi = Callable[..., Coroutine[Any, Any, Api]]

# The seed's example; its "<string>" placeholders are filled in by the history below.
SEED_JOB = {
    "id": "agent_job_1",
    "status": "active",
    "source": {"repository": "https://github.com/acme/docs", "ref": "main"},
    "model": "claude-sonnet",
    "prLink": None,
    "createdAt": "2023-11-07T05:31:56Z",
    "archivedAt": None,
}


async def seed_history(api: Api, job_id: str = "agent_job_1", **fields: Any) -> None:
    await api.post(
        "/v1/jobs",
        {
            "id": job_id,
            "agent": "mintlify/agent",
            "project": PROJECT,
            "source": {"repository": "https://github.com/acme/docs", "ref": "main"},
            "model": "claude-sonnet",
            "occurred_at": "2023-11-07T05:31:56.789Z",
            **fields,
        },
    )


async def test_job_answers_the_seed_shape(api: Api) -> None:
    """An active job answers the seed's fields, nesting and time format exactly."""
    await seed_history(api)
    assert await api.get(f"{BASE}/agent_job_1") == SEED_JOB


async def test_lifecycle_fills_pr_link_and_archived_at(api: Api) -> None:
    """Active while running, prLink once linked, completed, then archived with archivedAt."""
    await seed_history(api)
    await api.post(
        "/v1/jobs/agent_job_1/events",
        {
            "events": [
                {"type": "job.started", "occurred_at": "2023-11-07T05:32:00Z"},
                {
                    "type": "job.pr_linked",
                    "data": {"pr_link": "https://github.com/acme/docs/pull/7"},
                    "occurred_at": "2023-11-07T05:40:00Z",
                },
            ]
        },
    )
    body = await api.get(f"{BASE}/agent_job_1")
    assert body["status"] == "active"
    assert body["prLink"] == "https://github.com/acme/docs/pull/7"
    await api.post(
        "/v1/jobs/agent_job_1/events",
        {"type": "job.completed", "occurred_at": "2023-11-07T05:45:00Z"},
    )
    assert (await api.get(f"{BASE}/agent_job_1"))["status"] == "completed"
    await api.post("/v1/jobs/agent_job_1/archive", status=200)
    body = await api.get(f"{BASE}/agent_job_1")
    assert body["status"] == "archived" and SECONDS_Z.match(body["archivedAt"])
    assert set(body) == set(SEED_JOB) and set(body["source"]) == {"repository", "ref"}


async def test_failed_and_cancelled_show_as_failed(api: Api) -> None:
    """A failed or cancelled job shows as failed; a job with no source still has the object."""
    await api.post("/v1/jobs", {"id": "f1", "agent": "a", "project": PROJECT})
    await api.post(
        "/v1/jobs/f1/events",
        {"type": "job.failed", "data": {"error": {"code": "x", "message": "y"}}},
    )
    await api.post("/v1/jobs", {"id": "c1", "agent": "a", "project": PROJECT})
    await api.post("/v1/jobs/c1/cancel", status=200)
    for job_id in ("f1", "c1"):
        body = await api.get(f"{BASE}/{job_id}")
        assert body["status"] == "failed"
        assert body["source"] == {"repository": None, "ref": None}
        assert body["model"] is None and SECONDS_Z.match(body["createdAt"])


async def test_job_of_another_project_is_404(api: Api) -> None:
    """A job outside the path's project, or with no project, is 404."""
    await seed_history(api)
    await api.post("/v1/jobs", {"id": "loose", "agent": "a"})
    body = await api.get("/compat/mintlify/v2/agent/other/job/agent_job_1", status=404)
    assert body["error"]["code"] == "not_found"
    await api.get(f"{BASE}/loose", status=404)
    await api.get(f"{BASE}/missing", status=404)


async def test_auth_failures(api: Api, make_api: MakeApi) -> None:
    """A missing or bad key is 401 in the native envelope; a reader may read."""
    await seed_history(api)
    for secret in (None, "mint_nope"):
        body = await Api(api.client, secret).get(f"{BASE}/agent_job_1", status=401)
        assert body["error"]["code"] == "unauthorized"
    reader = await make_api(role="reader")
    assert (await reader.get(f"{BASE}/agent_job_1"))["id"] == "agent_job_1"


async def test_other_tenants_jobs_are_invisible(api: Api, make_api: MakeApi) -> None:
    """Another tenant's job is 404 even under the right project."""
    await seed_history(api)
    other = await make_api(tenant="globex")
    await other.get(f"{BASE}/agent_job_1", status=404)
