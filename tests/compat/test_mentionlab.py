"""Mentionlab dialect (seed 003): camelCase jobs with execution counts, scoped by x-project-id."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

from tests.conftest import Api

UUID = "01234567-89ab-cdef-0123-456789abcdef"
PATH = f"/compat/mentionlab/api/jobs/{UUID}"
MILLIS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MakeApi = Callable[..., Coroutine[Any, Any, Api]]

# The seed's example, verbatim.
SEED_JOB = {
    "id": UUID,
    "project": UUID,
    "totalExecutions": 100,
    "pendingExecutions": 10,
    "retryingExecutions": 2,
    "successExecutions": 80,
    "failedExecutions": 8,
    "status": "processing",
    "createdAt": "2026-06-08T12:00:00.000Z",
    "updatedAt": "2026-06-08T12:30:00.000Z",
    "createdBy": {
        "firstName": "Jane",
        "lastName": "Doe",
        "email": "jane.doe@example.com",
        "id": UUID,
    },
}
HEADERS = {"x-project-id": UUID}


def executions(type_: str, prefix: str, n: int, when: str) -> list[dict[str, Any]]:
    return [
        {"type": type_, "data": {"execution_id": f"{prefix}{i}"}, "occurred_at": when}
        for i in range(n)
    ]


async def seed_history(api: Api) -> None:
    """The seed's job: 100 executions, 80 succeeded, 8 failed, 2 retrying, 10 pending."""
    await api.post(
        "/v1/jobs",
        {
            "id": UUID,
            "agent": "mentions/crawl",
            "project": UUID,
            "executions_total": 100,
            "occurred_at": "2026-06-08T12:00:00Z",
            "created_by": {
                "id": UUID,
                "email": "jane.doe@example.com",
                "first_name": "Jane",
                "last_name": "Doe",
            },
        },
    )
    events = (
        executions("job.execution_succeeded", "s", 80, "2026-06-08T12:10:00Z")
        + executions("job.execution_failed", "f", 8, "2026-06-08T12:20:00Z")
        + executions("job.execution_retrying", "r", 2, "2026-06-08T12:30:00.000999Z")
    )
    await api.post(f"/v1/jobs/{UUID}/events", {"events": events})


async def test_job_answers_the_seed_example(api: Api) -> None:
    """GET /api/jobs/{id} answers the seed's example exactly, milliseconds included."""
    await seed_history(api)
    assert await api.get(PATH, headers=HEADERS) == SEED_JOB


async def test_status_words_follow_the_executions(api: Api) -> None:
    """pending, processing, completed, failed and partial_failed; cancelled shows as failed."""
    outcomes = {
        "q": ([], "pending"),
        "run": (
            executions("job.execution_succeeded", "s", 1, "2026-06-08T12:01:00Z"),
            "processing",
        ),
        "ok": (executions("job.execution_succeeded", "s", 2, "2026-06-08T12:01:00Z"), "completed"),
        "bad": (executions("job.execution_failed", "f", 2, "2026-06-08T12:01:00Z"), "failed"),
        "mixed": (
            executions("job.execution_succeeded", "s", 1, "2026-06-08T12:01:00Z")
            + executions("job.execution_failed", "f", 1, "2026-06-08T12:01:00Z"),
            "partial_failed",
        ),
        "stop": ([{"type": "job.cancelled"}], "failed"),
    }
    for job_id, (events, word) in outcomes.items():
        await api.post(
            "/v1/jobs",
            {
                "id": job_id,
                "agent": "a",
                "project": UUID,
                "executions_total": 2,
                "occurred_at": "2026-06-08T12:00:00.123456Z",
            },
        )
        if events:
            await api.post(f"/v1/jobs/{job_id}/events", {"events": events})
        body = await api.get(f"/compat/mentionlab/api/jobs/{job_id}", headers=HEADERS)
        assert body["status"] == word, job_id
        assert body["createdAt"] == "2026-06-08T12:00:00.123Z"
        assert MILLIS.match(body["updatedAt"]) and body["createdBy"] is None
        assert set(body) == set(SEED_JOB)


async def test_project_header_is_required_and_scopes(api: Api) -> None:
    """Without x-project-id the answer is 400; a job of another project is 404."""
    await seed_history(api)
    body = await api.get(PATH, status=400)
    assert body["error"]["code"] == "bad_request"
    body = await api.get(PATH, headers={"x-project-id": "another"}, status=404)
    assert body["error"]["code"] == "not_found"


async def test_auth_failures(api: Api, make_api: MakeApi) -> None:
    """A missing or bad key is 401 in the native envelope; a reader may read."""
    await seed_history(api)
    for secret in (None, "nope"):
        body = await Api(api.client, secret).get(PATH, headers=HEADERS, status=401)
        assert body["error"]["code"] == "unauthorized"
    reader = await make_api(role="reader")
    assert (await reader.get(PATH, headers=HEADERS))["id"] == UUID


async def test_other_tenants_jobs_are_invisible(api: Api, make_api: MakeApi) -> None:
    """Another tenant's job is 404 even with the right project."""
    await seed_history(api)
    other = await make_api(tenant="globex")
    assert (await other.get(PATH, headers=HEADERS, status=404))["error"]["code"] == "not_found"
