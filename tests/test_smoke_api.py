"""The walking skeleton, end to end through HTTP."""

from __future__ import annotations

from tests.conftest import Api


async def test_create_run_complete(api: Api) -> None:
    """A job created, started and completed answers its result and counts in stats."""
    job = await api.post("/v1/jobs", {"agent": "a/b", "account": "67890", "id": "j1"})
    assert job["status"] == "queued" and job["version"] == 1
    await api.post("/v1/jobs/j1/events", {"type": "job.started"})
    done = await api.post(
        "/v1/jobs/j1/events", {"type": "job.completed", "data": {"result": [1, 2, 3]}}
    )
    assert done["job"]["status"] == "completed"
    assert done["job"]["row_count"] == 3
    result = await api.get("/v1/jobs/j1/results")
    assert result["data"] == [1, 2, 3]
    stats = await api.get("/v1/jobs/stats")
    assert stats["by_status"]["completed"] == 1
