"""Section 5 of the contract: credits computed from the event history."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app
from api.context import STORE
from api.settings import Settings
from ledger import commands
from ledger.credits import charge, from_units, to_units
from ledger.errors import Invalid
from ledger.events import JobCompleted, JobQueued, Price
from ledger.store import EventStore, UnitOfWork
from tests.conftest import Api, new_key
from tests.serverproc import acli

S = 1_000_000  # microseconds per second


@pytest.mark.parametrize(
    ("price", "rows", "succeeded", "seconds", "expected"),
    [
        (Price(), 10, 0, 0.0, Decimal(10)),
        (Price(per_row=Decimal(0)), 10, 0, 0.0, Decimal(0)),
        (Price(per_job=Decimal("0.1"), per_row=Decimal("0.2")), 1, 0, 0.0, Decimal("0.3")),
        (Price(per_row=Decimal(0), per_execution=Decimal("1.5")), 0, 3, 0.0, Decimal("4.5")),
        (Price(per_row=Decimal(0), per_second=Decimal("0.0001")), 0, 0, 1.5, Decimal("0.0002")),
        (Price(per_row=Decimal(0), per_second=Decimal(2)), 0, 0, 60.0, Decimal(120)),
        (Price(per_row=Decimal(0), per_second=Decimal(2)), 0, 0, 60.000001, Decimal(122)),
        (
            Price(
                per_job=Decimal(1),
                per_row=Decimal("0.25"),
                per_execution=Decimal(2),
                per_second=Decimal("0.5"),
            ),
            4,
            2,
            3.2,
            Decimal(8),
        ),
    ],
)
def test_charge_rule(
    price: Price, rows: int, succeeded: int, seconds: float, expected: Decimal
) -> None:
    """per_job + per_row*rows + per_execution*succeeded + per_second*ceil(seconds), exactly."""
    units = charge(
        price, row_count=rows, succeeded=succeeded, started_us=0, finished_us=round(seconds * S)
    )
    assert Decimal(from_units(units)) == expected


def test_amount_precision() -> None:
    """Amounts keep four fractional digits exactly and refuse a fifth."""
    assert to_units(Decimal("0.0001"), field="x") == 1
    assert from_units(
        to_units(Decimal("0.1"), field="x") + to_units(Decimal("0.2"), field="x")
    ) == Decimal("0.3")
    assert from_units(50_000) == 5 and isinstance(from_units(50_000), int)
    with pytest.raises(Invalid):
        to_units(Decimal("0.00001"), field="x")
    with pytest.raises(Invalid):
        to_units(Decimal(-1), field="x")


async def complete(
    api: Api,
    job_id: str,
    *,
    agent: str = "a",
    account: str = "acct",
    rows: int = 0,
    start: str | None = None,
    end: str | None = None,
) -> Any:
    await api.post(
        "/v1/jobs",
        {
            "agent": agent,
            "account": account,
            "id": job_id,
            **({"occurred_at": start} if start else {}),
        },
    )
    if start:
        await api.post(f"/v1/jobs/{job_id}/events", {"type": "job.started", "occurred_at": start})
    body: dict[str, Any] = {"type": "job.completed", "data": {"row_count": rows}}
    if end:
        body["occurred_at"] = end
    return (await api.post(f"/v1/jobs/{job_id}/events", body))["job"]


async def test_prices_are_set_and_listed(api: Api) -> None:
    """POST /v1/prices sets an agent's price; GET lists the ones in force."""
    set_ = await api.post("/v1/prices", {"agent": "a", "per_job": 1, "per_row": "0.5"})
    assert set_["agent"] == "a" and set_["per_job"] == 1 and set_["per_row"] == 0.5
    await api.post("/v1/prices", {"agent": "a", "per_row": 2})
    listed = await api.get("/v1/prices")
    assert [(p["agent"], p["per_job"], p["per_row"]) for p in listed["prices"]] == [("a", 0, 2)]


async def test_price_validation(api: Api) -> None:
    """More than four fractional digits or a negative price is 422 naming the field."""
    body = await api.post("/v1/prices", {"agent": "a", "per_row": 0.00001}, status=422)
    assert body["error"]["field"] == "per_row"
    body = await api.post("/v1/prices", {"agent": "a", "per_second": -1}, status=422)
    assert body["error"]["field"] == "per_second"
    await api.post("/v1/prices", {"agent": "a", "per_row": "NaN"}, status=422)


NOT_PLAIN = ["1_000", "\uff11", " 1", "1 ", "1E+3", "1e3", "+1", "1.", ".5", "\u0661", "0x10"]


async def test_amount_strings_are_plain_ascii_decimals(api: Api) -> None:
    """An amount sent as a string is plain ASCII decimal digits (a minus, a fraction): no
    underscores, spaces, exponent or other digits; ``422`` naming the field, nothing written."""
    for text in NOT_PLAIN:
        body = await api.post("/v1/prices", {"agent": "a", "per_row": text}, status=422)
        assert body["error"]["field"] == "per_row", (text, body)
        body = await api.post("/v1/credits/grants", {"account": "x", "amount": text}, status=422)
        assert body["error"]["field"] == "amount", (text, body)
        body = await api.post("/v1/agents", {"name": "demo/agent", "price": text}, status=422)
        assert body["error"]["field"] == "price", (text, body)
        body = await api.post(
            "/v1/agents", {"name": "demo/agent", "price": {"per_second": text}}, status=422
        )
        assert body["error"]["field"] == "price.per_second", (text, body)
    assert (await api.get("/v1/prices"))["prices"] == []
    assert (await api.get("/v1/credits", params={"account": "x"}))["granted"] == 0
    price = await api.post("/v1/prices", {"agent": "a", "per_row": "0.25", "per_job": "-0"})
    assert price["per_row"] == 0.25
    granted = await api.post("/v1/credits/grants", {"account": "x", "amount": "-12.5"})
    assert granted["amount"] == -12.5
    await api.post("/v1/prices", {"agent": "b", "per_row": 1e3})  # a JSON number is a number


async def test_price_in_force_at_queue_time_applies(api: Api) -> None:
    """A later price change never alters a job queued before it."""
    await api.post("/v1/prices", {"agent": "a", "per_row": 2})
    await api.post("/v1/jobs", {"agent": "a", "id": "early", "account": "acct"})
    await api.post("/v1/prices", {"agent": "a", "per_row": 5})
    early = await api.post(
        "/v1/jobs/early/events", {"type": "job.completed", "data": {"row_count": 3}}
    )
    assert early["job"]["credits_used"] == 6
    late = await complete(api, "late", rows=3)
    assert late["credits_used"] == 15


async def test_unpriced_agent_costs_one_per_row_and_decimals_are_exact(api: Api) -> None:
    """No price means 1 per row; 0.1 + 0.2 is 0.3 and integral sums are integers."""
    assert (await complete(api, "plain", agent="unpriced", rows=7))["credits_used"] == 7
    await api.post("/v1/prices", {"agent": "d", "per_job": "0.1", "per_row": 0})
    await complete(api, "d1", agent="d")
    await api.post("/v1/prices", {"agent": "d", "per_job": "0.2", "per_row": 0})
    await complete(api, "d2", agent="d")
    credits = await api.get("/v1/credits", params={"account": "acct"})
    assert credits["by_agent"] == {"unpriced": 7, "d": 0.3}
    assert credits["used"] == 7.3


async def test_per_second_rounds_up(api: Api) -> None:
    """per_second charges whole seconds, rounded up, from started_at to finished_at."""
    await api.post("/v1/prices", {"agent": "t", "per_row": 0, "per_second": 3})
    job = await complete(
        api, "t1", agent="t", start="2026-01-01T00:00:00Z", end="2026-01-01T00:00:01.5Z"
    )
    assert job["credits_used"] == 6


async def test_per_second_rounds_up_exactly_over_centuries(api: Api) -> None:
    """The seconds are rounded up exactly, in integers: one microsecond past whole seconds is
    one second more, even where the microseconds pass 2^53 (a float would lose it)."""
    await api.post("/v1/prices", {"agent": "t", "per_row": 0, "per_second": 1})
    start, end = datetime(1000, 1, 1, tzinfo=UTC), datetime(1999, 1, 1, tzinfo=UTC)
    whole = (end - start) // timedelta(seconds=1)
    assert whole * S > 2**53
    job = await complete(
        api, "t1", agent="t", start="1000-01-01T00:00:00Z", end="1999-01-01T00:00:00.000001Z"
    )
    assert job["credits_used"] == whole + 1
    job = await complete(
        api, "t2", agent="t", start="1000-01-01T00:00:00Z", end="1999-01-01T00:00:00Z"
    )
    assert job["credits_used"] == whole


async def test_failed_and_cancelled_jobs_are_free(api: Api) -> None:
    """Failed and cancelled jobs are never charged, whatever rows they reported."""
    await api.post("/v1/prices", {"agent": "a", "per_job": 10})
    await api.post("/v1/jobs", {"agent": "a", "id": "f"})
    await api.post("/v1/jobs/f/events", {"type": "job.progressed", "data": {"row_count": 9}})
    failed = await api.post("/v1/jobs/f/events", {"type": "job.failed"})
    assert failed["job"]["credits_used"] == 0
    await api.post("/v1/jobs", {"agent": "a", "id": "c"})
    assert (await api.post("/v1/jobs/c/cancel", status=200))["credits_used"] == 0
    assert (await api.get("/v1/credits"))["used"] == 0


async def test_partial_failed_charges_succeeded_executions(api: Api) -> None:
    """partial_failed jobs pay per succeeded execution."""
    await api.post("/v1/prices", {"agent": "m", "per_row": 0, "per_execution": "0.5"})
    await api.post("/v1/jobs", {"agent": "m", "id": "m", "executions_total": 3})
    for eid, outcome in (("1", "succeeded"), ("2", "succeeded"), ("3", "failed")):
        last = await api.post(
            "/v1/jobs/m/events", {"type": f"job.execution_{outcome}", "data": {"execution_id": eid}}
        )
    assert last["job"]["status"] == "partial_failed" and last["job"]["credits_used"] == 1


async def test_grants_balance_and_deleted_jobs_stay_charged(api: Api) -> None:
    """Grants add, negative grants adjust, and deleting a job never refunds it."""
    grant = await api.post(
        "/v1/credits/grants", {"account": "acct", "amount": 100, "reason": "welcome"}
    )
    assert grant["granted"] == 100 and grant["balance"] == 100
    await api.post("/v1/credits/grants", {"account": "acct", "amount": "-10.5"})
    await complete(api, "j", rows=20)
    await api.delete("/v1/jobs/j")
    credits = await api.get("/v1/credits", params={"account": "acct"})
    assert credits == {"granted": 89.5, "used": 20, "balance": 69.5, "by_agent": {"a": 20}}
    account = await api.get("/v1/accounts/acct")
    assert account["credits"] == {"granted": 89.5, "used": 20, "balance": 69.5}
    await api.post("/v1/credits/grants", {"account": "acct", "amount": "1.00001"}, status=422)


async def test_statement_json_and_csv(api: Api) -> None:
    """The statement lists jobs finished in the window with their charges and the total."""
    await complete(api, "s1", rows=2, start="2026-02-01T00:00:00Z", end="2026-02-01T01:00:00Z")
    await complete(api, "s2", rows=3, start="2026-02-10T00:00:00Z", end="2026-02-10T00:00:05Z")
    await complete(api, "s3", rows=4, start="2026-03-01T00:00:00Z", end="2026-03-01T00:00:01Z")
    params = {"account": "acct", "since": "2026-02-01T00:00:00Z", "until": "2026-03-01T00:00:00Z"}
    statement = await api.get("/v1/credits/statement", params=params)
    assert statement["lines"] == [
        {
            "job_id": "s1",
            "agent": "a",
            "finished_at": "2026-02-01T01:00:00Z",
            "row_count": 2,
            "credits": 2,
        },
        {
            "job_id": "s2",
            "agent": "a",
            "finished_at": "2026-02-10T00:00:05Z",
            "row_count": 3,
            "credits": 3,
        },
    ]
    assert statement["total"] == 5
    text = await api.get("/v1/credits/statement", params={**params, "format": "csv"})
    assert text.splitlines()[0] == "job_id,agent,finished_at,row_count,credits"
    assert text.splitlines()[1] == "s1,a,2026-02-01T01:00:00Z,2,2"
    assert text.splitlines()[-1] == "total,,,,5"


async def test_enforce_credits(
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
    db_url: str,
) -> None:
    """With --enforce-credits a job for an account without a positive balance is 402."""
    app = create_app(Settings(db_url=db_url, enforce_credits=True))
    api = Api(await aiohttp_client(app), None)
    api.headers["Authorization"] = f"Bearer {await new_key(app[STORE], 'acme')}"
    body = await api.post("/v1/jobs", {"agent": "a", "account": "poor"}, status=402)
    assert body["error"]["code"] == "insufficient_credits"
    assert body["error"]["credits_available"] == 0
    await api.post("/v1/credits/grants", {"account": "poor", "amount": 2})
    await complete(api, "j", account="poor", rows=2)
    body = await api.post("/v1/jobs", {"agent": "a", "account": "poor"}, status=402)
    assert body["error"]["credits_available"] == 0


async def test_readers_and_writers_cannot_grant(make_api: Any) -> None:
    """Only admins set prices and grant credits."""
    for role in ("reader", "writer"):
        other = await make_api(role=role)
        await other.post("/v1/prices", {"agent": "a"}, status=403)
        await other.post("/v1/credits/grants", {"account": "a", "amount": 1}, status=403)
        await other.get("/v1/credits")


async def _charged_jobs(store: EventStore, account: str, count: int, first: int = 0) -> None:
    """``count`` jobs of agent ``big`` in ``account``, each completed with 1,000 rows: through
    the store's commands, a few hundred a transaction (the API would take a request each)."""

    async def command(uow: UnitOfWork) -> None:
        for i in range(first, first + count):
            job_id = f"{account}-{i}"
            queued = JobQueued(agent="big", account=account)
            await commands.create_job(uow, "acme", job_id, queued, actor="test")
            done = [commands.NewEvent(JobCompleted(row_count=1000))]
            await commands.append_events(uow, "acme", job_id, done, actor="test", retention_s=60)

    await store.execute(command, tenants=["acme"])


async def test_tenant_totals_past_2_63_are_exact(db_url: str, api: Api, store: EventStore) -> None:
    """Totals summed over rows that each hold up to 2^62 units pass 2^63 exactly, on both
    backends, in every read that sums them: the API, the dialects and the CLI; one row's own
    bound is a 422 that names the total it would pass."""
    await api.post("/v1/prices", {"agent": "big", "per_row": 10**9})  # 10^12 credits per job
    per_account = 308  # 3.08e18 units per account, 9.24e18 in all: past 2^63 = 9.22e18
    for account in ("a0", "a1", "a2"):
        await _charged_jobs(store, account, per_account)
    expected = 3 * per_account * 10**12
    assert expected * 10**4 > 2**63
    stats = await api.get("/v1/jobs/stats")
    assert stats["total_jobs"] == 3 * per_account
    assert Decimal(str(stats["credits_used"])) == expected
    credits = await api.get("/v1/credits")
    assert Decimal(str(credits["used"])) == expected
    assert Decimal(str(credits["by_agent"]["big"])) == expected
    one = await api.get("/v1/credits", params={"account": "a0"})
    assert Decimal(str(one["used"])) == per_account * 10**12
    accounts = (await api.get("/v1/accounts"))["accounts"]
    assert [Decimal(str(a["credits"]["used"])) for a in accounts] == [per_account * 10**12] * 3
    mcrit = await api.get("/compat/mcrit/jobs/stats")
    assert mcrit["status"] == "successful" and mcrit["data"]["total_jobs"] == 3 * per_account
    mindcase = await api.get("/compat/mindcase/api/v1/credits")
    assert Decimal(str(mindcase["credits_remaining"])) == -expected
    done = await acli("credits", "--db", db_url, "--tenant", "acme", "--json")
    assert done.code == 0, done.err
    assert Decimal(str(json.loads(done.out)["totals"]["used"])) == expected
    # one row (account a0's completed jobs of agent big) holds at most 2^62 units: 461 jobs
    await _charged_jobs(store, "a0", 461 - per_account, first=per_account)
    await api.post("/v1/jobs", {"id": "a0-461", "agent": "big", "account": "a0"})
    refused = await api.post(
        "/v1/jobs/a0-461/events",
        {"type": "job.completed", "data": {"row_count": 1000}},
        status=422,
    )
    message = refused["error"]["message"]
    assert "2^62" in message and "one account" in message and "agent" in message, message
    assert (await api.get("/v1/jobs/a0-461"))["status"] == "queued"
    assert Decimal(str((await api.get("/v1/credits"))["used"])) == (3 * per_account + 153) * 10**12
