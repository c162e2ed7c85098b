"""Operators' read routes: /v1/me, /v1/credits/usage and POST /v1/audit/verify."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from tests.conftest import Api

MakeApi = Callable[..., Coroutine[Any, Any, Api]]


async def finish(api: Api, job_id: str, agent: str, account: str, day: str, **more: Any) -> None:
    """A job queued, started and completed on ``day`` (UTC)."""
    await api.post(
        "/v1/jobs",
        {
            "id": job_id,
            "agent": agent,
            "account": account,
            "occurred_at": f"{day}T08:00:00Z",
            **more,
        },
    )
    await api.post(
        f"/v1/jobs/{job_id}/events", {"type": "job.started", "occurred_at": f"{day}T09:00:00Z"}
    )
    await api.post(
        f"/v1/jobs/{job_id}/events",
        {"type": "job.completed", "data": {"row_count": 2}, "occurred_at": f"{day}T10:00:00Z"},
    )


async def test_me_names_the_calling_key(make_api: MakeApi) -> None:
    """/v1/me answers the key's tenant, role and project."""
    reader = await make_api("acme", role="reader", project="p1")
    me = await reader.get("/v1/me")
    assert (me["tenant"], me["role"], me["project"]) == ("acme", "reader", "p1")
    assert me["key_id"].startswith("key_")


async def test_usage_is_bucketed_by_finish_day_and_agent(api: Api, make_api: MakeApi) -> None:
    """Each UTC day holds the charges of the jobs finished that day; deleted jobs still count."""
    await api.post("/v1/prices", {"agent": "scraper", "per_job": "1", "per_row": "0.25"})
    await api.post("/v1/prices", {"agent": "writer", "per_job": "3"})
    await finish(api, "u1", "scraper", "a1", "2026-01-01")
    await finish(api, "u2", "scraper", "a2", "2026-01-03")
    await finish(api, "u3", "writer", "a1", "2026-01-03")
    await finish(api, "u4", "writer", "a1", "2025-12-01")  # outside the window
    await api.post("/v1/jobs", {"id": "u5", "agent": "scraper", "account": "a1"})  # never charged
    await api.delete("/v1/jobs/u3")

    usage = await api.get(
        "/v1/credits/usage", params={"days": "3", "until": "2026-01-03T12:00:00Z"}
    )
    assert usage["days"] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert usage["since"] == "2026-01-01T00:00:00Z" and usage["until"] == "2026-01-04T00:00:00Z"
    assert usage["by_agent"] == {"scraper": [1.5, 0, 1.5], "writer": [0, 0, 3]}
    assert usage["total"] == 6

    one = await api.get(
        "/v1/credits/usage",
        params={"days": "3", "until": "2026-01-03T00:00:00Z", "account": "a1"},
    )
    assert one["by_agent"] == {"scraper": [1.5, 0, 0], "writer": [0, 0, 3]}
    statement = await api.get(
        "/v1/credits/statement",
        params={"account": "a1", "since": "2026-01-01T00:00:00Z", "until": "2026-01-04T00:00:00Z"},
    )
    assert statement["total"] == one["total"] == 4.5

    other = await make_api("globex", role="reader")
    empty = await other.get("/v1/credits/usage", params={"days": "3", "until": "2026-01-03"})
    assert empty["by_agent"] == {} and empty["total"] == 0 and len(empty["days"]) == 3


async def test_usage_of_a_project_key_holds_that_project_only(api: Api, make_api: MakeApi) -> None:
    """A key limited to a project sees the usage of that project's jobs alone."""
    await api.post("/v1/prices", {"agent": "scraper", "per_job": "2"})
    await finish(api, "p-a", "scraper", "a1", "2026-02-01", project="alpha")
    await finish(api, "p-b", "scraper", "a1", "2026-02-01", project="beta")
    alpha = await make_api("acme", role="reader", project="alpha")
    usage = await alpha.get("/v1/credits/usage", params={"days": "1", "until": "2026-02-01"})
    assert usage["by_agent"] == {"scraper": [2]}
    everyone = await api.get("/v1/credits/usage", params={"days": "1", "until": "2026-02-01"})
    assert everyone["by_agent"] == {"scraper": [4]}


async def test_usage_refuses_bad_windows_with_the_field(api: Api) -> None:
    """Out-of-range days and unreadable or unnameable times are 422 naming the field."""
    for params, field in (
        ({"days": "0"}, "days"),
        ({"days": "367"}, "days"),
        ({"days": "x"}, "days"),
        ({"until": "yesterday"}, "until"),
        ({"until": "9999-12-31T00:00:00Z"}, "until"),
        ({"until": "1970-01-02T00:00:00Z", "days": "5"}, "until"),
    ):
        answer = await api.get("/v1/credits/usage", status=422, params=params)
        assert answer["error"]["field"] == field, (params, answer)


async def test_verify_answers_the_chain_of_the_callers_tenant(api: Api, make_api: MakeApi) -> None:
    """An admin's verify recomputes the tenant's chain and ends at its head; readers get 403."""
    await api.post("/v1/jobs", {"id": "v1", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/v1/events", {"type": "job.started"})
    other = await make_api("globex")
    await other.post("/v1/jobs", {"id": "g1", "agent": "a", "account": "x"})
    head = await api.get("/v1/audit/head")
    verdict = await api.post("/v1/audit/verify", status=200)
    assert verdict["ok"] is True and verdict["reason"] == ""
    assert (verdict["count"], verdict["head"]) == (head["count"], head["hash"])
    assert verdict["bad_position"] is None
    reader = await make_api("acme", role="reader")
    refused = await reader.post("/v1/audit/verify", status=403)
    assert refused["error"]["code"] == "forbidden"
