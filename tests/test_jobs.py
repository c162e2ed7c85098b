"""Section 4 of the contract: jobs, their lifecycle, lists, results, stats and running jobs."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest

from ledger import commands
from ledger.events import ExecutionRetrying
from ledger.limits import MAX_COUNT, MAX_EXECUTIONS
from ledger.rebuild import rebuild
from ledger.store import EventStore
from projections import jobs
from tests.conftest import Api, requests_started
from tests.waits import wait_until

JOB_FIELDS = {
    "id",
    "status",
    "agent",
    "account",
    "project",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "archived_at",
    "expires_at",
    "row_count",
    "credits_used",
    "executions",
    "error",
    "source",
    "model",
    "pr_link",
    "created_by",
    "params",
    "result_id",
    "version",
}


async def new_job(api: Api, job_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body = {"agent": "instagram/profile-scraper", **fields}
    if job_id is not None:
        body["id"] = job_id
    job: dict[str, Any] = await api.post("/v1/jobs", body)
    return job


async def event(api: Api, job_id: str, type_: str, status: int = 201, **kw: Any) -> Any:
    return await api.post(f"/v1/jobs/{job_id}/events", {"type": type_, **kw}, status=status)


async def test_created_job_has_every_contract_field(api: Api) -> None:
    """A new job answers 201 with exactly the contract's fields, queued at version 1."""
    job = await new_job(
        api,
        account="67890",
        params={"url": "x"},
        source={"repository": "o/r", "ref": "main"},
        model="m",
        created_by={"id": "u1", "email": "a@b.c", "first_name": "A", "last_name": "B"},
    )
    assert set(job) == JOB_FIELDS
    assert job["status"] == "queued" and job["version"] == 1
    assert job["id"].startswith("job_") and len(job["id"]) == 30
    assert job["created_at"].endswith("Z") and job["params"] == {"url": "x"}
    assert job["source"] == {"repository": "o/r", "ref": "main"}
    assert job["created_by"]["first_name"] == "A"
    assert job["executions"] == {
        "total": 0,
        "pending": 0,
        "retrying": 0,
        "succeeded": 0,
        "failed": 0,
    }


async def test_server_ids_are_time_ordered(api: Api) -> None:
    """Ids the server makes sort in creation order."""
    ids = [(await new_job(api))["id"] for _ in range(5)]
    assert ids == sorted(ids)


async def test_existing_id_conflicts_and_reserved_ids_are_invalid(api: Api) -> None:
    """Creating an id twice is 409; `stats`, `running` and bad characters are 422."""
    await new_job(api, "dup")
    body = await api.post("/v1/jobs", {"agent": "a", "id": "dup"}, status=409)
    assert body["error"]["code"] == "conflict"
    for bad in ("stats", "running", "a b", "x" * 129, "evil\r\nSet-Cookie: a=b"):
        body = await api.post("/v1/jobs", {"agent": "a", "id": bad}, status=422)
        assert body["error"]["field"] == "id"


async def test_lifecycle_and_timestamps(api: Api) -> None:
    """started/completed set status and times from the producer's occurred_at."""
    await new_job(api, "j", occurred_at="2026-03-30T10:15:00Z")
    await event(api, "j", "job.started", occurred_at="2026-03-30T10:15:02Z")
    await event(
        api,
        "j",
        "job.progressed",
        data={"row_count": 4, "message": "half"},
        occurred_at="2026-03-30T10:15:30Z",
    )
    done = await event(
        api,
        "j",
        "job.completed",
        occurred_at="2026-03-30T10:16:00Z",
        data={"result": [{"a": 1}, {"a": 2}]},
    )
    job = done["job"]
    assert job["status"] == "completed" and job["version"] == 4
    assert job["created_at"] == "2026-03-30T10:15:00Z"
    assert job["started_at"] == "2026-03-30T10:15:02Z"
    assert job["finished_at"] == "2026-03-30T10:16:00Z"
    assert job["expires_at"] == "2026-04-06T10:16:00Z"
    assert job["row_count"] == 2 and job["credits_used"] == 2
    assert len(job["result_id"]) == 24 and int(job["result_id"], 16) >= 0
    stored = done["events"][0]
    assert stored["type"] == "job.completed" and "result" not in stored["data"]
    assert stored["data"]["result_size"] > 0 and len(stored["data"]["result_sha256"]) == 64


async def test_occurred_at_may_not_go_backwards(api: Api) -> None:
    """An event dated before the job's previous event is 422 on occurred_at."""
    await new_job(api, "j", occurred_at="2026-03-30T10:15:00Z")
    body = await event(api, "j", "job.started", status=422, occurred_at="2026-03-30T10:14:00Z")
    assert body["error"]["field"] == "occurred_at"


@pytest.mark.parametrize("final", ["job.completed", "job.failed", "job.cancelled"])
async def test_finished_jobs_refuse_lifecycle_events(api: Api, final: str) -> None:
    """After a final status only archive, pr_linked and delete are allowed."""
    await new_job(api, "j")
    await event(api, "j", "job.started")
    await event(api, "j", final)
    for type_ in ("job.started", "job.completed", "job.failed", "job.cancelled", "job.progressed"):
        body = await event(api, "j", type_, status=409)
        assert body["error"]["code"] == "invalid_transition"
    await event(api, "j", "job.pr_linked", data={"pr_link": "https://x/pr/1"})
    archived = await api.post("/v1/jobs/j/archive", status=200)
    assert archived["archived_at"] is not None and archived["status"] != "archived"
    assert archived["pr_link"] == "https://x/pr/1"


async def test_cancel_and_archive_rules(api: Api) -> None:
    """Cancel works from queued/running only; archive only from a finished status."""
    await new_job(api, "q")
    body = await api.post("/v1/jobs/q/archive", status=409)
    assert body["error"]["code"] == "invalid_transition"
    cancelled = await api.post("/v1/jobs/q/cancel", {"reason": "user asked"}, status=200)
    assert cancelled["status"] == "cancelled" and cancelled["credits_used"] == 0
    again = await api.post("/v1/jobs/q/cancel", status=409)
    assert again["error"]["code"] == "invalid_transition"


async def test_executions_derive_partial_failed(api: Api) -> None:
    """Planned executions derive completed, failed or partial_failed when all are done."""
    await new_job(api, "m", executions_total=2)
    first = await event(api, "m", "job.execution_succeeded", data={"execution_id": "e1"})
    assert first["job"]["status"] == "running"
    repeat = await event(api, "m", "job.execution_succeeded", data={"execution_id": "e1"})
    assert repeat["job"]["executions"]["succeeded"] == 1
    last = await event(api, "m", "job.execution_failed", data={"execution_id": "e2"})
    assert last["job"]["status"] == "partial_failed"
    assert last["job"]["executions"] == {
        "total": 2,
        "pending": 0,
        "retrying": 0,
        "succeeded": 1,
        "failed": 1,
    }
    await new_job(api, "f")
    await event(api, "f", "job.executions_planned", data={"total": 2})
    await event(api, "f", "job.execution_retrying", data={"execution_id": "a"})
    mid = await event(api, "f", "job.execution_failed", data={"execution_id": "a"})
    assert mid["job"]["executions"]["retrying"] == 0 and mid["job"]["status"] == "running"
    end = await event(api, "f", "job.execution_failed", data={"execution_id": "b"})
    assert end["job"]["status"] == "failed"


async def test_batch_is_all_or_nothing(api: Api) -> None:
    """A batch with one forbidden event appends none of its events."""
    await new_job(api, "b")
    body = await api.post(
        "/v1/jobs/b/events",
        {"events": [{"type": "job.started"}, {"type": "job.completed"}, {"type": "job.started"}]},
        status=409,
    )
    assert body["error"]["code"] == "invalid_transition"
    job = await api.get("/v1/jobs/b")
    assert job["version"] == 1 and job["status"] == "queued"
    ok = await api.post(
        "/v1/jobs/b/events",
        {"events": [{"type": "job.started"}, {"type": "job.completed", "data": {"row_count": 3}}]},
    )
    assert [e["version"] for e in ok["events"]] == [2, 3]


async def test_planned_executions_stay_within_max_count(api: Api) -> None:
    """``job.executions_planned`` cannot bring a job's planned total past ``MAX_COUNT``:
    ``422`` naming ``data.total``, nothing written; up to the limit it is accepted."""
    await new_job(api, "p", executions_total=1_000_000)
    await event(api, "p", "job.executions_planned", data={"total": MAX_COUNT - 1_000_001})
    before = await api.get("/v1/jobs/p")
    assert before["executions"]["total"] == MAX_COUNT - 1
    for total in (2, MAX_COUNT):
        body = await event(api, "p", "job.executions_planned", status=422, data={"total": total})
        assert body["error"]["field"] == "data.total", body
    body = await api.post(
        "/v1/jobs/p/events",
        {"events": [{"type": "job.executions_planned", "data": {"total": 1}}] * 2},
        status=422,
    )
    assert body["error"]["field"] == "data.total", body
    assert await api.get("/v1/jobs/p") == before
    await event(api, "p", "job.executions_planned", data={"total": 1})
    assert (await api.get("/v1/jobs/p"))["executions"]["total"] == MAX_COUNT


async def test_a_job_holds_at_most_max_executions(api: Api, store: EventStore) -> None:
    """A job tracks at most ``MAX_EXECUTIONS`` distinct execution ids: one more is ``422``
    naming ``data.execution_id`` and writes nothing; known ids still move."""
    await new_job(api, "e", executions_total=MAX_EXECUTIONS + 5)
    for start in range(0, MAX_EXECUTIONS, 1000):  # through the store's commands: no HTTP
        items = [
            commands.NewEvent(ExecutionRetrying(execution_id=f"x{i}"))
            for i in range(start, min(start + 1000, MAX_EXECUTIONS))
        ]
        await store.execute(
            lambda uow, items=items: commands.append_events(
                uow, "acme", "e", items, actor="test", retention_s=60
            ),
            tenants=["acme"],
        )
    before = await api.get("/v1/jobs/e")
    assert before["executions"]["retrying"] == MAX_EXECUTIONS
    body = await event(
        api, "e", "job.execution_succeeded", status=422, data={"execution_id": "one-more"}
    )
    assert body["error"]["field"] == "data.execution_id", body
    assert await api.get("/v1/jobs/e") == before
    await event(api, "e", "job.execution_succeeded", data={"execution_id": "x0"})
    after = await api.get("/v1/jobs/e")
    assert after["executions"]["succeeded"] == 1 and after["version"] == before["version"] + 1


async def test_a_refused_batch_leaves_the_job_as_it_was(api: Api, store: EventStore) -> None:
    """A batch's events fold into a state the command owns (in place, executions included);
    a batch refused at its last event leaves the job, its executions and the history as they
    were, and the read models equal a replay."""
    await new_job(api, "b", executions_total=3)
    await event(api, "b", "job.execution_retrying", data={"execution_id": "x0"})
    before = await api.get("/v1/jobs/b")
    batch = [
        {"type": "job.execution_succeeded", "data": {"execution_id": "x0"}},
        {"type": "job.execution_retrying", "data": {"execution_id": "x1"}},
        {"type": "job.execution_failed", "data": {"execution_id": "x1"}},
        {"type": "job.queued", "data": {"agent": "again"}},  # refused: already queued
    ]
    await api.post("/v1/jobs/b/events", {"events": batch}, status=409)
    assert await api.get("/v1/jobs/b") == before
    await api.post("/v1/jobs/b/events", {"events": batch[:3]})
    after = await api.get("/v1/jobs/b")
    assert after["version"] == before["version"] + 3
    assert after["executions"] == {
        "total": 3,
        "pending": 1,
        "retrying": 0,
        "succeeded": 1,
        "failed": 1,
    }
    report = await rebuild(store.backend, store.projectors, verify=True)
    assert report.difference is None, report.difference


async def test_event_id_appends_once(api: Api) -> None:
    """A repeated event_id appends nothing and answers the stored event."""
    await new_job(api, "e")
    first = await event(api, "e", "job.started", event_id="evt-1")
    again = await event(api, "e", "job.started", event_id="evt-1")
    assert again["events"][0]["position"] == first["events"][0]["position"]
    assert again["job"]["version"] == 2
    assert len((await api.get("/v1/jobs/e/events"))["events"]) == 2


async def test_expected_version(api: Api) -> None:
    """A stale expected_version is 409 version_conflict; the current one appends."""
    await new_job(api, "v")
    body = await event(api, "v", "job.started", status=409, expected_version=0)
    assert body["error"]["code"] == "version_conflict"
    await event(api, "v", "job.started", expected_version=1)


async def test_concurrent_expected_version_lets_one_win(api: Api) -> None:
    """Twenty appends racing on one expected_version: exactly one 201, the rest 409."""
    await new_job(api, "race")
    calls = [
        api.call(
            "POST",
            "/v1/jobs/race/events",
            json={"type": "job.progressed", "data": {"row_count": i}, "expected_version": 1},
        )
        for i in range(20)
    ]
    answers = await asyncio.gather(*calls)
    created = [a for a in answers if "job" in a]
    conflicts = [a for a in answers if a.get("error", {}).get("code") == "version_conflict"]
    assert len(created) == 1 and len(conflicts) == 19


async def test_unknown_type_and_bad_data_are_422(api: Api) -> None:
    """Unknown event types and mistyped data answer 422 naming the field."""
    await new_job(api, "x")
    body = await event(api, "x", "job.exploded", status=422)
    assert body["error"]["field"] == "type"
    body = await event(api, "x", "job.progressed", status=422, data={"row_count": "many"})
    assert body["error"]["field"] == "data.row_count"
    body = await event(api, "x", "job.failed", status=422, data={"error": "nope"})
    assert body["error"]["field"].startswith("data.error")
    body = await event(api, "x", "job.queued", status=409)
    assert body["error"]["code"] == "invalid_transition"


async def test_idempotency_key(api: Api) -> None:
    """Same key and body replays the first answer; another body is 409."""
    headers = {"Idempotency-Key": "k-1"}
    first = await api.post("/v1/jobs", {"agent": "a"}, headers=headers)
    again = await api.post("/v1/jobs", {"agent": "a"}, headers=headers)
    assert again == first
    other = await api.post("/v1/jobs", {"agent": "b"}, headers=headers, status=409)
    assert other["error"]["code"] == "conflict"
    assert (await api.get("/v1/jobs/stats"))["total_jobs"] == 1


async def test_concurrent_idempotent_creates_make_one_job(api: Api) -> None:
    """Ten concurrent creates with one Idempotency-Key make exactly one job."""
    calls = [
        api.post("/v1/jobs", {"agent": "a"}, headers={"Idempotency-Key": "same"}) for _ in range(10)
    ]
    answers = await asyncio.gather(*calls)
    assert len({a["id"] for a in answers}) == 1
    assert (await api.get("/v1/jobs/stats"))["total_jobs"] == 1


async def test_results_not_ready_none_and_expired(api: Api) -> None:
    """Results are 404 not ready while open, 404 none when absent, 410 once expired."""
    await new_job(api, "r")
    body = await api.get("/v1/jobs/r/results", status=404)
    assert body["error"]["code"] == "results_not_ready"
    await event(api, "r", "job.failed", data={"error": {"code": "boom", "message": "x"}})
    body = await api.get("/v1/jobs/r/results", status=404)
    assert body["error"]["code"] == "no_results"
    await new_job(api, "old", occurred_at="2020-01-01T00:00:00Z")
    await event(
        api, "old", "job.completed", occurred_at="2020-01-01T00:00:01Z", data={"result": [1]}
    )
    body = await api.get("/v1/jobs/old/results", status=410)
    assert body["error"]["code"] == "results_expired"


async def test_results_by_id_and_compact(api: Api) -> None:
    """Results answer by job and by result id; compact leaves the data out."""
    await new_job(api, "r")
    done = await event(api, "r", "job.completed", data={"result": {"k": "v"}, "row_count": 7})
    rid = done["job"]["result_id"]
    full = await api.get("/v1/jobs/r/results")
    assert full == {
        "job_id": "r",
        "result_id": rid,
        "status": "completed",
        "row_count": 7,
        "data": {"k": "v"},
        "expires_at": done["job"]["expires_at"],
    }
    assert await api.get(f"/v1/results/{rid}") == full
    compact = await api.get("/v1/jobs/r/results", params={"compact": "true"})
    assert "data" not in compact
    assert (await api.get(f"/v1/results/{rid}/job"))["id"] == "r"
    await api.get("/v1/results/ffffffffffffffffffffffff", status=404)


async def test_list_filters_and_order(api: Api) -> None:
    """Lists filter by status, agent, account, archived, q and time; newest first."""
    await new_job(api, "a1", agent="alpha", account="x", occurred_at="2026-01-01T00:00:00Z")
    await new_job(api, "a2", agent="alpha", account="y", occurred_at="2026-01-02T00:00:00Z")
    await new_job(api, "b1", agent="beta", account="x", occurred_at="2026-01-03T00:00:00Z")
    await event(api, "b1", "job.completed")
    await api.post("/v1/jobs/b1/archive", status=200)

    async def ids(**params: Any) -> list[str]:
        page = await api.get("/v1/jobs", params=params)
        return [j["id"] for j in page["jobs"]]

    assert await ids() == ["b1", "a2", "a1"]
    assert await ids(order="asc") == ["a1", "a2", "b1"]
    assert await ids(status="queued") == ["a2", "a1"]
    assert await ids(status="completed,queued") == ["b1", "a2", "a1"]
    assert await ids(agent="alpha", account="x") == ["a1"]
    assert await ids(archived="true") == ["b1"]
    assert await ids(archived="false") == ["a2", "a1"]
    assert await ids(q="bet") == ["b1"]
    assert await ids(
        created_after="2026-01-01T12:00:00Z", created_before="2026-01-02T12:00:00Z"
    ) == ["a2"]
    body = await api.get("/v1/jobs", params={"status": "weird"}, status=422)
    assert body["error"]["field"] == "status"
    await api.get("/v1/jobs", params={"limit": "0"}, status=422)
    await api.get("/v1/jobs", params={"limit": "1001"}, status=422)


async def test_cursor_never_repeats_or_skips_while_jobs_are_created(api: Api) -> None:
    """Paging with the cursor sees every earlier job once while new ones arrive."""
    for i in range(25):
        await new_job(api, f"p{i:02d}")
    seen: list[str] = []
    cursor = None
    extra = 0
    while True:
        params: dict[str, Any] = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = await api.get("/v1/jobs", params=params)
        seen.extend(j["id"] for j in page["jobs"])
        await new_job(api, f"new{extra}")  # a concurrent creator
        extra += 1
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen))
    assert [s for s in seen if s.startswith("p")] == [f"p{i:02d}" for i in reversed(range(25))]


async def test_long_poll_wakes_on_a_new_version(api: Api) -> None:
    """GET with wait and after_version answers as soon as the job moves past it."""
    await new_job(api, "w")
    started = requests_started(api.client)
    poll = asyncio.create_task(api.get("/v1/jobs/w", params={"wait": 10, "after_version": 1}))
    await wait_until(lambda: requests_started(api.client) > started, what="the poll arrives")
    assert not poll.done()
    await event(api, "w", "job.started")
    job = await asyncio.wait_for(poll, 5)
    assert job["version"] == 2 and job["status"] == "running"
    quick = await api.get("/v1/jobs/w", params={"wait": 0.2, "after_version": 5})
    assert quick["version"] == 2


async def test_delete_tombstones_the_job(api: Api) -> None:
    """A deleted job is 404 and leaves lists and stats, but its events stay in the feed."""
    await new_job(api, "d")
    await event(api, "d", "job.completed", data={"row_count": 5})
    assert await api.delete("/v1/jobs/d") == {"deleted": 1}
    await api.get("/v1/jobs/d", status=404)
    await api.get("/v1/jobs/d/events", status=404)
    await api.delete("/v1/jobs/d", status=404)
    await api.post("/v1/jobs/d/events", {"type": "job.archived"}, status=404)
    assert (await api.get("/v1/jobs"))["jobs"] == []
    stats = await api.get("/v1/jobs/stats")
    assert stats["total_jobs"] == 0 and stats["by_status"]["completed"] == 0
    feed = await api.get("/v1/events", params={"job_id": "d"})
    assert [e["type"] for e in feed["events"]] == ["job.queued", "job.completed", "job.deleted"]
    credits = await api.get("/v1/credits")
    assert credits["used"] == 5


async def test_bulk_delete_needs_a_filter_and_admin(api: Api, make_api: Any) -> None:
    """DELETE /v1/jobs needs one filter (400) and the admin role (403)."""
    await new_job(api, "k1", agent="keep")
    await new_job(api, "g1", agent="gone")
    await new_job(api, "g2", agent="gone")
    body = await api.delete("/v1/jobs", status=400)
    assert body["error"]["code"] == "bad_request"
    writer = await make_api(role="writer")
    await writer.delete("/v1/jobs", params={"agent": "gone"}, status=403)
    assert await api.delete("/v1/jobs", params={"agent": "gone"}) == {"deleted": 2}
    assert [j["id"] for j in (await api.get("/v1/jobs"))["jobs"]] == ["k1"]


async def test_a_bulk_delete_spares_a_job_that_no_longer_matches(
    api: Api, store: EventStore
) -> None:
    """The ids are read before the delete's write transaction; a job that changed in between
    (here completed while ``status=queued`` was asked for) is checked again and kept."""
    await new_job(api, "q1", agent="sweep")
    await new_job(api, "q2", agent="sweep")
    query = jobs.ListQuery(statuses=("queued",), agent="sweep")
    async with store.backend.read() as conn:
        ids = await jobs.ids_matching(conn, "acme", query)
    assert sorted(ids) == ["q1", "q2"]
    await event(api, "q2", "job.completed", data={"row_count": 1})  # between read and write
    deleted = await store.execute(
        lambda uow: commands.delete_many(
            uow, "acme", ids, actor="test", still=partial(jobs.matches, query=query)
        ),
        tenants=["acme"],
    )
    assert deleted == 1
    await api.get("/v1/jobs/q1", status=404)
    assert (await api.get("/v1/jobs/q2"))["status"] == "completed"
    # and through the API, what matches now is what goes
    assert await api.delete("/v1/jobs", params={"status": "completed"}) == {"deleted": 1}


async def test_stats_count_by_status_and_agent(api: Api) -> None:
    """Stats count every status and agent, archived jobs, credits and the position."""
    await new_job(api, "s1", agent="a")
    await new_job(api, "s2", agent="b")
    done = await event(api, "s2", "job.completed", data={"row_count": 3})
    await api.post("/v1/jobs/s2/archive", status=200)
    stats = await api.get("/v1/jobs/stats")
    assert stats["total_jobs"] == 2 and stats["archived"] == 1
    assert stats["by_status"] == {
        "queued": 1,
        "running": 0,
        "completed": 1,
        "partial_failed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert stats["by_agent"]["b"] == {
        "total": 1,
        "by_status": {
            "queued": 0,
            "running": 0,
            "completed": 1,
            "partial_failed": 0,
            "failed": 0,
            "cancelled": 0,
        },
    }
    assert stats["credits_used"] == 3
    assert stats["position"] > done["events"][0]["position"]


async def test_running_groups_by_account(api: Api) -> None:
    """Running jobs group by account with mm:ss elapsed; every account is listed."""
    await new_job(api, "r1", account="67890", occurred_at="2020-01-01T00:00:00Z")
    await event(api, "r1", "job.started", occurred_at="2020-01-01T00:00:00Z")
    await new_job(api, "q1", account="54321")
    running = await api.get("/v1/jobs/running")
    assert running["accounts"] == ["54321", "67890"]
    assert running["summary"] == {"54321": {"executing": 0}, "67890": {"executing": 1}}
    entry = running["executing"]["67890"][0]
    assert entry["job_id"] == "r1" and entry["agent"] == "instagram/profile-scraper"
    minutes, seconds = entry["elapsed"].split(":")
    assert int(minutes) > 59 and 0 <= int(seconds) < 60


async def test_accounts_summaries(api: Api) -> None:
    """Accounts summarise jobs by status, executing jobs and credits."""
    await new_job(api, "a1", account="acct")
    await event(api, "a1", "job.started")
    await new_job(api, "a2", account="acct")
    await event(api, "a2", "job.completed", data={"row_count": 2})
    one = await api.get("/v1/accounts/acct")
    assert one["account"] == "acct" and one["executing"] == 1
    assert one["jobs"]["total"] == 2 and one["jobs"]["by_status"]["completed"] == 1
    assert one["credits"] == {"granted": 0, "used": 2, "balance": -2}
    listing = await api.get("/v1/accounts")
    assert [a["account"] for a in listing["accounts"]] == ["acct"]
    await api.get("/v1/accounts/nobody", status=404)


async def test_time_travel(api: Api) -> None:
    """as_of answers the job as it stood after that position."""
    created = await new_job(api, "t")
    started = await event(api, "t", "job.started")
    await event(api, "t", "job.completed")
    position = started["events"][0]["position"]
    past = await api.get("/v1/jobs/t", params={"as_of": position})
    assert past["status"] == "running" and past["version"] == 2
    assert created["version"] == 1
    await api.get("/v1/jobs/t", params={"as_of": 1}, status=404)
