"""MCRIT dialect (seed 002): jobs, stats, deletes and results in MCRIT's envelope."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from tests.conftest import Api

BASE = "/compat/mcrit"
NAIVE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
ROW_KEYS = {"job_id", "method", "state", "created", "finished"}
# The fields of MCRIT's own job document, which its client's ``Job`` class reads.
DOC_KEYS = {
    "_id",
    "payload",
    "username",
    "priority",
    "attempts_left",
    "all_dependencies",
    "unfinished_dependencies",
    "created_at",
    "started_at",
    "finished_at",
    "locked_by",
    "locked_at",
    "last_error",
    "result",
    "progress",
    "terminated",
}
HEX = "507f1f77bcf86cd7994390"
MakeApi = Callable[..., Coroutine[Any, Any, Api]]

# The seed's examples, verbatim.
SEED_ROW = {
    "job_id": "507f1f77bcf86cd799439011",
    "method": "addBinarySample",
    "state": "finished",
    "created": "2024-01-15T10:30:00",
    "finished": "2024-01-15T10:31:00",
}


async def job(
    api: Api, job_id: str, method: str, created: str, *events: dict[str, Any], **fields: Any
) -> None:
    await api.post("/v1/jobs", {"id": job_id, "agent": method, "occurred_at": created, **fields})
    if events:
        await api.post(f"/v1/jobs/{job_id}/events", {"events": list(events)})


def at(type_: str, when: str, **data: Any) -> dict[str, Any]:
    return {"type": type_, "occurred_at": when, "data": data}


async def seed_history(api: Api) -> None:
    """The seed's finished job and one job in every other status, a minute apart."""
    await job(
        api,
        "507f1f77bcf86cd799439011",
        "addBinarySample",
        "2024-01-15T10:30:00Z",
        at("job.started", "2024-01-15T10:30:05Z"),
        at("job.completed", "2024-01-15T10:31:00.750Z", row_count=1),
        params={"sample": "a.exe"},
    )
    await job(api, HEX + "12", "query", "2024-01-15T10:32:00Z")
    await job(
        api, HEX + "13", "query", "2024-01-15T10:33:00Z", at("job.started", "2024-01-15T10:33:01Z")
    )
    await job(
        api,
        HEX + "14",
        "addBinarySample",
        "2024-01-15T10:34:00Z",
        at("job.failed", "2024-01-15T10:34:30Z", error={"code": "x", "message": "y"}),
    )
    await job(
        api,
        HEX + "15",
        "query",
        "2024-01-15T10:35:00Z",
        at("job.cancelled", "2024-01-15T10:35:10Z"),
    )
    await job(
        api,
        HEX + "16",
        "addBinarySample",
        "2024-01-15T10:36:00Z",
        at("job.executions_planned", "2024-01-15T10:36:00Z", total=2),
        at("job.execution_succeeded", "2024-01-15T10:36:20Z", execution_id="a"),
        at("job.execution_failed", "2024-01-15T10:36:40Z", execution_id="b"),
    )


def ids(body: dict[str, Any]) -> list[str]:
    return [row["job_id"][-2:] for row in body["data"]]


async def test_list_answers_the_seed_shape(api: Api) -> None:
    """GET /jobs answers the seed's row, its five keys, naive seconds and MCRIT's state words."""
    await seed_history(api)
    body = await api.get(f"{BASE}/jobs")
    assert set(body) == {"status", "data"} and body["status"] == "successful"
    rows = body["data"]
    assert {k: rows[-1][k] for k in ROW_KEYS} == SEED_ROW
    for row in rows:
        assert set(row) == ROW_KEYS | DOC_KEYS
        assert row["_id"] == row["job_id"] and row["payload"]["method"] == row["method"]
        assert NAIVE.match(row["created"])
        assert row["finished"] is None or NAIVE.match(row["finished"])
    states = {row["job_id"][-2:]: row["state"] for row in rows}
    assert states == {
        "11": "finished",
        "12": "queued",
        "13": "processing",
        "14": "failed",
        "15": "failed",
        "16": "failed",
    }


async def test_list_parameters(api: Api) -> None:
    """start, limit (0 = all), ascending, method, state and filter select and page the rows."""
    await seed_history(api)
    assert ids(await api.get(f"{BASE}/jobs")) == ["16", "15", "14", "13", "12", "11"]
    assert ids(await api.get(f"{BASE}/jobs", params={"limit": 0})) == ids(
        await api.get(f"{BASE}/jobs")
    )
    page = await api.get(f"{BASE}/jobs", params={"start": 1, "limit": 2})
    assert ids(page) == ["15", "14"]
    asc = await api.get(f"{BASE}/jobs", params={"ascending": "true", "start": 4})
    assert ids(asc) == ["15", "16"]
    assert ids(await api.get(f"{BASE}/jobs", params={"method": "query"})) == ["15", "13", "12"]
    assert ids(await api.get(f"{BASE}/jobs", params={"state": "failed"})) == ["16", "15", "14"]
    assert ids(await api.get(f"{BASE}/jobs", params={"state": "processing"})) == ["13"]
    # filter applies before paging: the first page of matches is full.
    body = await api.get(f"{BASE}/jobs", params={"filter": "Binary", "limit": 2})
    assert ids(body) == ["16", "14"]
    bad = await api.get(f"{BASE}/jobs", params={"state": "sleeping"}, status=422)
    assert bad["status"] == "failed" and isinstance(bad["data"]["message"], str)


async def test_stats(api: Api) -> None:
    """GET /jobs/stats answers total_jobs and a count per MCRIT state; with_refresh is accepted."""
    await seed_history(api)
    expected = {
        "status": "successful",
        "data": {"total_jobs": 6, "queued": 1, "processing": 1, "finished": 1, "failed": 3},
    }
    assert await api.get(f"{BASE}/jobs/stats") == expected
    assert await api.get(f"{BASE}/jobs/stats", params={"with_refresh": "true"}) == expected


async def test_get_job_adds_parameters_and_result_id(api: Api) -> None:
    """GET /jobs/{id} answers the row plus parameters and result_id, as in the seed."""
    await job(
        api,
        "507f1f77bcf86cd799439011",
        "addBinarySample",
        "2024-01-15T10:30:00Z",
        params={"sample": "a.exe"},
    )
    await api.post(
        "/v1/jobs/507f1f77bcf86cd799439011/events",
        {
            "events": [
                {"type": "job.started"},
                {"type": "job.completed", "data": {"result": {"matches": 3}}},
            ]
        },
    )
    body = await api.get(f"{BASE}/jobs/507f1f77bcf86cd799439011")
    assert body["status"] == "successful"
    data = body["data"]
    assert set(data) == ROW_KEYS | DOC_KEYS | {"parameters", "result_id"}
    assert data["result"] == data["result_id"] and data["finished_at"]["$date"].endswith("Z")
    assert json.loads(data["payload"]["params"]) == {"sample": "a.exe"}
    assert data["parameters"] == {"sample": "a.exe"} and data["state"] == "finished"
    assert re.match(r"^[0-9a-f]{24}$", data["result_id"])
    assert NAIVE.match(data["created"]) and NAIVE.match(data["finished"])
    result = await api.get(f"{BASE}/jobs/507f1f77bcf86cd799439011/result")
    assert result == {"status": "successful", "data": {"matches": 3}}
    compact = await api.get(
        f"{BASE}/jobs/507f1f77bcf86cd799439011/result", params={"compact": "true"}
    )
    assert compact == result
    by_id = await api.get(f"{BASE}/results/{data['result_id']}", params={"compact": "false"})
    assert by_id == result
    producer = await api.get(f"{BASE}/results/{data['result_id']}/job")
    assert producer == body


async def test_result_of_unfinished_job_fails_in_envelope(api: Api) -> None:
    """A result that is not ready, or an unknown result id, is 404 in the failed envelope."""
    await job(api, HEX + "12", "query", "2024-01-15T10:32:00Z")
    body = await api.get(f"{BASE}/jobs/{HEX}12/result", status=404)
    assert body["status"] == "failed" and "not ready" in body["data"]["message"]
    body = await api.get(f"{BASE}/results/507f191e810c19729de860ea", status=404)
    assert body["status"] == "failed" and isinstance(body["data"]["message"], str)
    body = await api.get(f"{BASE}/results/507f191e810c19729de860ea/job", status=404)
    assert body["status"] == "failed"


async def test_delete_one(api: Api) -> None:
    """DELETE /jobs/{id} answers num_deleted 1; the job is then 404 and leaves list and stats."""
    await seed_history(api)
    body = await api.delete(f"{BASE}/jobs/{HEX}12")
    assert body == {"status": "successful", "data": {"num_deleted": 1}}
    gone = await api.get(f"{BASE}/jobs/{HEX}12", status=404)
    assert gone == {"status": "failed", "data": {"message": f"no job {HEX}12"}}
    assert "12" not in ids(await api.get(f"{BASE}/jobs"))
    assert (await api.get(f"{BASE}/jobs/stats"))["data"]["total_jobs"] == 5
    await api.delete(f"{BASE}/jobs/{HEX}12", status=404)


async def test_delete_many_by_method_and_times(api: Api) -> None:
    """DELETE /jobs deletes by method, created_before and finished_before, combined."""
    await seed_history(api)
    body = await api.delete(
        f"{BASE}/jobs", params={"method": "query", "created_before": "2024-01-15T10:33:00"}
    )
    assert body == {"status": "successful", "data": {"num_deleted": 1}}
    assert ids(await api.get(f"{BASE}/jobs")) == ["16", "15", "14", "13", "11"]
    body = await api.delete(f"{BASE}/jobs", params={"finished_before": "2024-01-15T10:35:00"})
    assert body["data"] == {"num_deleted": 2}
    body = await api.delete(f"{BASE}/jobs", params={"created_before": "2024-01-16"})
    assert body["data"] == {"num_deleted": 3}
    assert await api.get(f"{BASE}/jobs") == {"status": "successful", "data": []}


async def test_delete_many_needs_a_filter_and_admin(api: Api, make_api: MakeApi) -> None:
    """DELETE /jobs without a filter is 400 and for a writer 403, both in the failed envelope."""
    await seed_history(api)
    body = await api.delete(f"{BASE}/jobs", status=400)
    assert body["status"] == "failed" and "filter" in body["data"]["message"]
    writer = await make_api(role="writer")
    body = await writer.delete(f"{BASE}/jobs", params={"method": "query"}, status=403)
    assert body["status"] == "failed" and isinstance(body["data"]["message"], str)
    assert len((await api.get(f"{BASE}/jobs"))["data"]) == 6


async def test_auth_failures_in_envelope(api: Api) -> None:
    """A missing or bad key is 401 {"status": "failed", "data": {"message": "<text>"}}."""
    for headers in ({}, {"Authorization": "Bearer nope"}, {"apitoken": "nope"}):
        async with api.client.get(f"{BASE}/jobs", headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert set(body) == {"status", "data"} and body["status"] == "failed"
            assert isinstance(body["data"]["message"], str) and body["data"]["message"]


async def test_other_tenants_jobs_are_invisible(api: Api, make_api: MakeApi) -> None:
    """Another tenant's jobs are 404, absent from list and stats, and its deletes touch none."""
    await seed_history(api)
    other = await make_api(tenant="globex")
    assert await other.get(f"{BASE}/jobs") == {"status": "successful", "data": []}
    stats = await other.get(f"{BASE}/jobs/stats")
    assert stats["data"]["total_jobs"] == 0
    body = await other.get(f"{BASE}/jobs/507f1f77bcf86cd799439011", status=404)
    assert body["status"] == "failed"
    await other.delete(f"{BASE}/jobs/507f1f77bcf86cd799439011", status=404)
    many = await other.delete(f"{BASE}/jobs", params={"created_before": "2030-01-01"})
    assert many["data"] == {"num_deleted": 0}
    assert len((await api.get(f"{BASE}/jobs"))["data"]) == 6


async def test_apitoken_header_and_trailing_slashes(api: Api) -> None:
    """MCRIT's client sends apitoken and calls /jobs/ and /jobs/stats/: both are answered."""
    await seed_history(api)
    token = api.headers["Authorization"].removeprefix("Bearer ")
    async with api.client.get(f"{BASE}/jobs/", headers={"apitoken": token}) as resp:
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 6
    async with api.client.get(f"{BASE}/jobs/stats/", headers={"apitoken": token}) as resp:
        assert (await resp.json())["data"]["total_jobs"] == 6
    body = await api.delete(f"{BASE}/jobs/", params={"method": "query"})
    assert body["data"] == {"num_deleted": 3}
    unknown = await api.get(f"{BASE}/nothing/here", status=404)
    assert unknown["status"] == "failed" and unknown["data"]["message"]


async def test_count_selects_as_the_list_does(api: Api) -> None:
    """GET /jobs/count answers {"count"} for the same method, state, filter and job_ids."""
    await seed_history(api)
    assert (await api.get(f"{BASE}/jobs/count"))["data"] == {"count": 6}
    assert (await api.get(f"{BASE}/jobs/count", params={"state": "failed"}))["data"] == {"count": 3}
    by_method = await api.get(f"{BASE}/jobs/count", params={"method": "query"})
    assert by_method["data"]["count"] == 3
    two = f"{HEX}12,{HEX}13"
    assert (await api.get(f"{BASE}/jobs/count", params={"job_ids": two}))["data"]["count"] == 2
    assert ids(await api.get(f"{BASE}/jobs", params={"job_ids": two})) == ["13", "12"]
    refused = await api.get(f"{BASE}/jobs", params={"username": "x"}, status=400)
    assert "username" in refused["data"]["message"]


async def test_ids_that_are_not_object_ids_are_400(api: Api) -> None:
    """A job or result id that is not 24 hex characters is 400, as in MCRIT."""
    await seed_history(api)
    for path in ("/jobs/abc", "/jobs/abc/result", "/results/abc", "/results/abc/job"):
        body = await api.get(BASE + path, status=400)
        assert body["data"]["message"].startswith("Valid ")
    await api.delete(f"{BASE}/jobs/abc", status=400)
    upper = await api.get(f"{BASE}/jobs/{HEX.upper()}12")  # read in lower case, as MCRIT does
    assert upper["data"]["job_id"] == f"{HEX}12"


async def test_job_documents_follow_the_state(api: Api) -> None:
    """MCRIT's document fields say what MCRIT's Job class asks: failed, terminated, result."""
    await seed_history(api)
    docs = {row["job_id"][-2:]: row for row in (await api.get(f"{BASE}/jobs"))["data"]}
    assert docs["11"]["result"] is None and docs["11"]["progress"] == 1.0
    assert docs["11"]["finished_at"] == {"$date": "2024-01-15T10:31:00.750Z"}
    assert docs["12"]["attempts_left"] == 1 and docs["12"]["started_at"] is None
    assert docs["13"]["locked_by"] == "default" and docs["13"]["finished_at"] is None
    assert docs["14"]["attempts_left"] == 0 and docs["14"]["last_error"] == "y"
    assert docs["15"]["terminated"] is True
    assert docs["16"]["attempts_left"] == 0 and docs["16"]["progress"] == 1.0
