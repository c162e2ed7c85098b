"""useapi.net dialect (seed 001): running agent jobs grouped by account, its 401 body."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from tests.conftest import Api

PATH = "/compat/useapi/v1/minimax/agent/jobs"
ELAPSED = re.compile(r"^(\d{2,}):([0-5]\d)$")
MakeApi = Callable[..., Coroutine[Any, Any, Api]]

# The seed's job ids, by account, in the order they started.
SEED_JOBS = {
    "67890": ["p123456789-u12345-a67890-bot:minimax", "p987654321-u12345-a67890-bot:minimax"],
    "54321": ["p456789123-u12345-a54321-bot:minimax"],
}


def ago(seconds: int) -> str:
    return datetime.fromtimestamp(time.time() - seconds, UTC).isoformat()


async def start(api: Api, job_id: str, account: str, started_ago: int) -> None:
    await api.post(
        "/v1/jobs",
        {
            "id": job_id,
            "agent": "minimax/agent",
            "account": account,
            "occurred_at": ago(started_ago + 60),
        },
    )
    await api.post(
        f"/v1/jobs/{job_id}/events", {"type": "job.started", "occurred_at": ago(started_ago)}
    )


async def seed_history(api: Api) -> None:
    """The seed's three running jobs, started hours ago, and one finished job."""
    for account, ids in SEED_JOBS.items():
        for n, job_id in enumerate(ids):
            await start(api, job_id, account, 7200 - 60 * n)
    await api.post("/v1/jobs", {"id": "done", "agent": "minimax/agent", "account": "54321"})
    await api.post("/v1/jobs/done/events", {"type": "job.completed"})


async def test_running_jobs_answer_the_seed_shape(api: Api) -> None:
    """Accounts, summary.{acct}.executing and executing.{acct}[] of jobId/elapsed, as the seed."""
    await seed_history(api)
    body = await api.get(PATH)
    assert set(body) == {"accounts", "summary", "executing"}
    assert sorted(body["accounts"]) == sorted(SEED_JOBS)
    assert body["summary"] == {"67890": {"executing": 2}, "54321": {"executing": 1}}
    assert set(body["executing"]) == set(SEED_JOBS)
    for account, ids in SEED_JOBS.items():
        rows = body["executing"][account]
        assert [r["jobId"] for r in rows] == ids
        for row in rows:
            assert set(row) == {"jobId", "elapsed"}
            match = ELAPSED.match(row["elapsed"])
            assert match is not None and int(match.group(1)) >= 118  # minutes pass 59


async def test_finished_jobs_leave_the_list(api: Api) -> None:
    """A job that completes or is cancelled is no longer executing."""
    await seed_history(api)
    await api.post("/v1/jobs/p456789123-u12345-a54321-bot:minimax/cancel", {}, status=200)
    body = await api.get(PATH)
    assert body["summary"]["54321"] == {"executing": 0}
    assert body["executing"]["54321"] == []
    assert "done" not in [r["jobId"] for rows in body["executing"].values() for r in rows]


async def test_bad_or_missing_token_is_exactly_unauthorized(api: Api) -> None:
    """A missing, malformed or unknown token answers 401 {"error": "Unauthorized"} exactly."""
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        async with api.client.get(PATH, headers=headers) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/json"
            assert await resp.json() == {"error": "Unauthorized"}


async def test_other_errors_use_the_same_shape(make_api: MakeApi) -> None:
    """Errors past authentication answer {"error": "<text>"} too: a key bound elsewhere is 403."""
    bound = await make_api(project="p1", header_project="p2")
    body = await bound.get(PATH, status=403)
    assert set(body) == {"error"} and isinstance(body["error"], str) and "p1" in body["error"]


async def test_other_tenants_jobs_are_invisible(api: Api, make_api: MakeApi) -> None:
    """Another tenant sees none of the seed's accounts or jobs."""
    await seed_history(api)
    other = await make_api(tenant="globex")
    assert await other.get(PATH) == {"accounts": [], "summary": {}, "executing": {}}


async def test_one_job_running_or_finished(api: Api) -> None:
    """GET agent/{jobId} answers one job, finished ones too (the seed's promise)."""
    await seed_history(api)
    job_id = SEED_JOBS["67890"][0]
    running = await api.get(f"/compat/useapi/v1/minimax/agent/{job_id}")
    assert running["jobId"] == job_id and running["status"] == "started"
    assert running["account"] == "67890" and ELAPSED.match(running["elapsed"])
    done = await api.get("/compat/useapi/v1/minimax/agent/done")
    assert done["status"] == "completed" and "elapsed" not in done
    missing = await api.get("/compat/useapi/v1/minimax/agent/nope", status=404)
    assert missing == {"error": "no job nope"}
