"""MCRIT's own client (``McritClient`` of ``mcrit`` 1.16.0 from PyPI), unchanged, on the dialect.

``mcrit`` needs Python >= 3.12: the SDK's environment is made with the first such interpreter
found (``tests/sdkenv.py``); without one the test skips and says why. The client sends the key
in MCRIT's ``apitoken`` header and wraps job documents in MCRIT's ``Job`` class.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import store_key
from tests.sdkenv import run_driver, sdk_python
from tests.serverproc import served

REQUIREMENT = "mcrit==1.16.0"
HEX = "507f1f77bcf86cd7994390"
DONE, QUEUED, RUNNING, FAILED, CANCELLED, PARTIAL = (
    HEX + n for n in ("11", "12", "13", "14", "15", "16")
)

DRIVER = r"""
import datetime, json, os
from mcrit.client.McritClient import (
    JobFailedError, JobTerminatedError, McritBadRequest, McritClient, McritNotFound,
    McritUnauthorized,
)

base, key = os.environ["BASE"], os.environ["KEY"]
ids = json.loads(os.environ["IDS"])
client = McritClient(mcrit_server=base, apitoken=key)
strict = McritClient(mcrit_server=base, apitoken=key, raise_client_errors=True,
                     raise_server_errors=True)
out = {}

def job(j):
    if j is None:
        return None
    return {"job_id": j.job_id, "method": j.method, "parameters": j.parameters,
            "arguments": j.arguments, "created_at": j.created_at, "started_at": j.started_at,
            "finished_at": j.finished_at, "is_finished": j.is_finished, "is_failed": j.is_failed,
            "is_terminated": j.is_terminated, "result": j.result, "progress": j.progress,
            "last_error": j.last_error, "attempts_left": j.attempts_left,
            "duration": None if j.duration is None else j.duration.total_seconds(),
            "username": j.username, "text": str(j)}

def failure(call):
    try:
        call()
    except Exception as exc:
        return {"class": type(exc).__name__, "status": getattr(exc, "status_code", None),
                "message": getattr(exc, "message", str(exc))}
    return None

out["queue"] = [job(j) for j in client.getQueueData()]
out["page"] = [j.job_id for j in client.getQueueData(start=1, limit=2)]
out["ascending"] = [j.job_id for j in client.getQueueData(ascending=True, limit=2)]
out["by_method"] = [j.job_id for j in client.getQueueData(method="query")]
out["by_state"] = [j.job_id for j in client.getQueueData(state="failed")]
out["by_filter"] = [j.job_id for j in client.getQueueData(filter="Binary", limit=2)]
out["by_ids"] = [j.job_id for j in client.getQueueData(job_ids=[ids["QUEUED"], ids["DONE"]])]
out["count"] = client.getQueueCount()
out["count_state"] = client.getQueueCount(state="processing")
out["count_method"] = client.getQueueCount(method="addBinarySample")
out["job_count"] = client.getJobCount()
out["stats"] = client.getQueueStatistics()
out["stats_refresh"] = client.getQueueStatistics(with_refresh=True)
out["done"] = job(client.getJobData(ids["DONE"]))
done = client.getJobData(ids["DONE"])
out["family"] = done.family
out["result_for_job"] = client.getResultForJob(ids["DONE"])
out["result_for_job_compact"] = client.getResultForJob(ids["DONE"], compact=True)
out["result"] = client.getResult(done.result)
out["job_for_result"] = job(client.getJobForResult(done.result))
out["await_done"] = client.awaitResult(ids["DONE"], sleep_time=0.05)
out["await_failed"] = failure(lambda: client.awaitResult(ids["FAILED"], sleep_time=0.05))
out["await_partial"] = failure(lambda: client.awaitResult(ids["PARTIAL"], sleep_time=0.05))
out["await_cancelled"] = failure(lambda: client.awaitResult(ids["CANCELLED"], sleep_time=0.05))
out["not_ready"] = client.getResultForJob(ids["RUNNING"])
out["not_ready_strict"] = failure(lambda: strict.getResultForJob(ids["RUNNING"]))
out["bad_id"] = client.getJobData("not-an-object-id")
out["bad_id_strict"] = failure(lambda: strict.getJobData("not-an-object-id"))
out["unknown_strict"] = failure(lambda: strict.getJobData("0" * 24))
out["bad_result_strict"] = failure(lambda: strict.getResult("xyz"))
out["unsupported_strict"] = failure(lambda: strict.getQueueData(username="alice"))

anonymous = McritClient(mcrit_server=base, apitoken="not-a-key")
out["anonymous"] = anonymous.getQueueData()
strict_anonymous = McritClient(mcrit_server=base, apitoken="not-a-key", raise_client_errors=True)
out["anonymous_strict"] = failure(lambda: strict_anonymous.getQueueStatistics())
other = McritClient(mcrit_server=base, apitoken=os.environ["OTHER_KEY"])
out["other_queue"] = [j.job_id for j in other.getQueueData()]
out["other_job"] = other.getJobData(ids["DONE"])
out["other_count"] = other.getQueueCount()
out["other_delete"] = other.deleteJob(ids["DONE"])

out["delete_one"] = client.deleteJob(ids["QUEUED"])
out["after_delete"] = client.getJobData(ids["QUEUED"])
out["delete_many"] = client.deleteQueueData(method="query",
                                            created_before=datetime.datetime(2030, 1, 1))
out["left"] = sorted(j.job_id for j in client.getQueueData())
print(json.dumps(out, default=str))
"""


async def _seed(http: aiohttp.ClientSession) -> None:
    """MCRIT-shaped history made natively: one job in every state, a minute apart."""

    async def job(
        job_id: str, method: str, minute: int, *events: dict[str, Any], **fields: Any
    ) -> None:
        created = f"2024-01-15T10:{minute:02d}:00Z"
        body = {"id": job_id, "agent": method, "occurred_at": created, **fields}
        async with http.post("/v1/jobs", json=body) as resp:
            assert resp.status == 201, await resp.text()
        if events:
            async with http.post(
                f"/v1/jobs/{job_id}/events", json={"events": list(events)}
            ) as resp:
                assert resp.status == 201, await resp.text()

    def at(type_: str, minute: int, second: int, **data: Any) -> dict[str, Any]:
        return {
            "type": type_,
            "occurred_at": f"2024-01-15T10:{minute:02d}:{second:02d}Z",
            "data": data,
        }

    await job(
        DONE,
        "addBinarySample",
        30,
        at("job.started", 30, 5),
        at("job.completed", 31, 0, result={"sample_info": {"sample_id": 7}}),
        params={"0": "a.exe", "1": "a.exe", "2": "wannacry"},
    )
    await job(QUEUED, "query", 32)
    await job(RUNNING, "query", 33, at("job.started", 33, 1))
    await job(
        FAILED,
        "addBinarySample",
        34,
        at("job.started", 34, 2),
        at("job.failed", 34, 30, error={"code": "parse", "message": "not a PE file"}),
    )
    await job(CANCELLED, "query", 35, at("job.cancelled", 35, 10))
    await job(
        PARTIAL,
        "getMatchesForSample",
        36,
        at("job.executions_planned", 36, 0, total=2),
        at("job.execution_succeeded", 36, 20, execution_id="a"),
        at("job.execution_failed", 36, 40, execution_id="b"),
    )


@pytest.mark.slow
async def test_the_mcrit_client_works_unchanged(db_url: str, tmp_path: Any) -> None:
    """Every queue, job and result method of McritClient answers what the ledger holds."""
    python = await asyncio.to_thread(sdk_python, "mcrit", REQUIREMENT, minimum=(3, 12))
    key = await store_key(db_url, "acme")
    other = await store_key(db_url, "globex")
    # the history is from 2024: keep its results for a century, so they have not expired
    async with served(db_url, "--result-retention", "36500d", log_dir=tmp_path) as server:
        async with aiohttp.ClientSession(server.base, headers=key.headers) as http:
            await _seed(http)
        ids = {
            "DONE": DONE,
            "QUEUED": QUEUED,
            "RUNNING": RUNNING,
            "FAILED": FAILED,
            "CANCELLED": CANCELLED,
            "PARTIAL": PARTIAL,
        }
        env = {
            "BASE": f"{server.base}/compat/mcrit",
            "KEY": key.secret,
            "OTHER_KEY": other.secret,
            "IDS": json.dumps(ids),
        }
        out = await run_driver(python, DRIVER, env)

    newest_first = [PARTIAL, CANCELLED, FAILED, RUNNING, QUEUED, DONE]
    queue = out["queue"]
    assert [j["job_id"] for j in queue] == newest_first
    jobs = {j["job_id"]: j for j in queue}
    done = jobs[DONE]
    assert done["method"] == "addBinarySample"
    assert done["arguments"] == ["a.exe", "a.exe", "wannacry"]
    assert done["parameters"] == "addBinarySample(a.exe, a.exe, wannacry)"
    assert out["family"] == "wannacry"
    assert done["created_at"] == "2024-01-15T10:30:00Z"
    assert done["started_at"] == "2024-01-15T10:30:05Z"
    assert done["finished_at"] == "2024-01-15T10:31:00Z"
    assert done["duration"] == 55.0 and done["is_finished"] and not done["is_failed"]
    assert done["progress"] == 1.0 and done["result"] and len(done["result"]) == 24
    assert done["job_id"] in done["text"]
    assert not jobs[QUEUED]["is_finished"] and jobs[QUEUED]["started_at"] is None
    assert jobs[RUNNING]["started_at"] == "2024-01-15T10:33:01Z"
    assert jobs[FAILED]["is_failed"] and jobs[FAILED]["last_error"] == "not a PE file"
    assert jobs[CANCELLED]["is_terminated"] and not jobs[CANCELLED]["is_failed"]
    assert jobs[PARTIAL]["is_failed"] and jobs[PARTIAL]["result"] is None

    assert out["page"] == newest_first[1:3]
    assert out["ascending"] == [DONE, QUEUED]
    assert out["by_method"] == [CANCELLED, RUNNING, QUEUED]
    assert out["by_state"] == [PARTIAL, CANCELLED, FAILED]
    assert out["by_filter"] == [FAILED, DONE]
    assert out["by_ids"] == [QUEUED, DONE]
    assert out["count"] == 6 and out["count_state"] == 1 and out["count_method"] == 2
    assert out["job_count"] == 6
    stats = {"total_jobs": 6, "queued": 1, "processing": 1, "finished": 1, "failed": 3}
    assert out["stats"] == stats and out["stats_refresh"] == stats

    assert out["done"]["result"] == done["result"]
    assert out["result_for_job"] == {"sample_info": {"sample_id": 7}}
    assert out["result_for_job_compact"] == out["result_for_job"]
    assert out["result"] == out["result_for_job"] and out["await_done"] == out["result"]
    assert out["job_for_result"]["job_id"] == DONE
    assert out["await_failed"] == {
        "class": "JobFailedError",
        "status": None,
        "message": f"job {FAILED} failed: not a PE file",
    }
    assert out["await_partial"]["class"] == "JobFailedError"
    assert "1 of 2 executions failed" in out["await_partial"]["message"]
    assert out["await_cancelled"]["class"] == "JobTerminatedError"
    assert out["not_ready"] is None
    assert out["not_ready_strict"]["class"] == "McritNotFound"
    assert "not ready" in out["not_ready_strict"]["message"]
    assert out["bad_id"] is None
    assert out["bad_id_strict"] == {
        "class": "McritBadRequest",
        "status": 400,
        "message": "Valid JobIDs are hexstrings with 24 characters.",
    }
    assert out["unknown_strict"]["class"] == "McritNotFound"
    assert out["bad_result_strict"]["message"].startswith("Valid ResultIDs")
    assert out["unsupported_strict"]["class"] == "McritBadRequest"

    assert out["anonymous"] is None
    assert out["anonymous_strict"]["class"] == "McritUnauthorized"
    assert out["anonymous_strict"]["message"] == "the API key is not valid"
    assert out["other_queue"] == [] and out["other_job"] is None and out["other_count"] == 0
    assert out["other_delete"] is None  # another tenant's job is 404 to it

    assert out["delete_one"] == {"num_deleted": 1} and out["after_delete"] is None
    assert out["delete_many"] == {"num_deleted": 2}  # RUNNING and CANCELLED were "query"
    assert out["left"] == sorted([DONE, FAILED, PARTIAL])
