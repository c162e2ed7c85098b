"""Property tests: whatever the history, the live read models equal a replay of the events."""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.http import ENCODE
from api.schemas import job_view
from ledger.jobs import JobState
from ledger.rebuild import rebuild
from ledger.records import Batch, Change
from ledger.store import EventStore
from projections import jobs
from tests.conftest import Api

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

EXECUTION_IDS = st.sampled_from(["e1", "e2", "e3"])
JOB_EVENTS = st.one_of(
    st.just({"type": "job.started"}),
    st.builds(lambda n: {"type": "job.progressed", "data": {"row_count": n}}, st.integers(0, 50)),
    st.builds(lambda n: {"type": "job.completed", "data": {"row_count": n}}, st.integers(0, 50)),
    st.just({"type": "job.completed", "data": {"result": [1, 2, 3]}}),
    st.just({"type": "job.failed", "data": {"error": {"code": "x", "message": "y"}}}),
    st.just({"type": "job.cancelled"}),
    st.just({"type": "job.archived"}),
    st.just({"type": "job.pr_linked", "data": {"pr_link": "https://x/1"}}),
    st.builds(
        lambda n: {"type": "job.executions_planned", "data": {"total": n}}, st.integers(1, 3)
    ),
    st.builds(
        lambda kind, eid: {"type": f"job.execution_{kind}", "data": {"execution_id": eid}},
        st.sampled_from(["retrying", "succeeded", "failed"]),
        EXECUTION_IDS,
    ),
)


def _counter() -> Any:
    n = 0

    def nxt() -> int:
        nonlocal n
        n += 1
        return n

    return nxt


@SETTINGS
@given(events=st.lists(JOB_EVENTS, max_size=12), executions=st.integers(0, 3))
async def test_live_state_equals_replay(
    api: Api, store: EventStore, events: list[dict[str, Any]], executions: int
) -> None:
    """Events applied one by one through the API fold to the state a replay gives."""
    job = await api.post("/v1/jobs", {"agent": "p", "executions_total": executions})
    for body in events:
        await api.call("POST", f"/v1/jobs/{job['id']}/events", json=body)
    live = await api.get(f"/v1/jobs/{job['id']}")
    replayed = await store.load_job("acme", job["id"])
    assert replayed is not None
    assert json.loads(ENCODE(job_view(replayed))) == live


async def test_rebuild_equals_live_models(api: Api, store: EventStore) -> None:
    """A rebuild after a varied history finds every read model identical."""
    for i, body in enumerate(
        [
            {"type": "job.started"},
            {"type": "job.completed"},
            {"type": "job.failed"},
            {"type": "job.cancelled"},
        ]
    ):
        await api.post("/v1/jobs", {"agent": f"a{i % 2}", "id": f"r{i}", "account": f"x{i}"})
        await api.post(f"/v1/jobs/r{i}/events", body)
    await api.post("/v1/prices", {"agent": "a0", "per_row": 3})
    await api.post("/v1/credits/grants", {"account": "x0", "amount": 4})
    report = await rebuild(store.backend, store.projectors, verify=True)
    assert report.difference is None and report.events > 8


# -- an independent fold of the raw events, written for this test only --------------------


def _us(text: str) -> int:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def independent_balances(events: list[dict[str, Any]]) -> dict[str, Decimal]:
    """Balance per account from price.set, credits.granted and job events alone."""
    prices: dict[str, dict[str, Decimal]] = {}
    granted: dict[str, Decimal] = {}
    jobs: dict[str, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["position"]):
        data = e["data"] or {}
        if e["type"] == "price.set":
            prices[data["agent"]] = {k: Decimal(v) for k, v in data["price"].items()}
        elif e["type"] == "credits.granted":
            granted[data["account"]] = granted.get(data["account"], Decimal(0)) + Decimal(
                str(data["amount"])
            )
        elif e["type"] == "job.queued":
            price = prices.get(
                data["agent"],
                {
                    "per_job": Decimal(0),
                    "per_row": Decimal(1),
                    "per_execution": Decimal(0),
                    "per_second": Decimal(0),
                },
            )
            jobs[e["stream"]] = {
                "account": data["account"],
                "price": price,
                "rows": 0,
                "status": "queued",
                "ok": 0,
                "start": None,
                "end": None,
            }
        elif e["stream"] in jobs:
            job = jobs[e["stream"]]
            if e["type"] == "job.started":
                job["status"], job["start"] = "running", _us(e["occurred_at"])
            elif e["type"] == "job.progressed" and data.get("row_count") is not None:
                job["rows"] = data["row_count"]
            elif e["type"] == "job.completed":
                if data.get("row_count") is not None:
                    job["rows"] = data["row_count"]
                job["status"], job["end"] = "completed", _us(e["occurred_at"])
            elif e["type"] in ("job.failed", "job.cancelled"):
                job["status"] = "unpaid"
    used: dict[str, Decimal] = {}
    for job in jobs.values():
        if job["status"] != "completed":
            continue
        p = job["price"]
        seconds = 0
        if job["start"] is not None and job["end"] > job["start"]:
            seconds = math.ceil((job["end"] - job["start"]) / 1_000_000)
        cost = p["per_job"] + p["per_row"] * job["rows"] + p["per_second"] * seconds
        used[job["account"]] = used.get(job["account"], Decimal(0)) + cost
    return {
        a: granted.get(a, Decimal(0)) - used.get(a, Decimal(0)) for a in set(granted) | set(used)
    }


AMOUNTS = st.decimals(min_value=0, max_value=20, places=2)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("price"), st.sampled_from(["a", "b"]), AMOUNTS, AMOUNTS),
        st.tuples(
            st.just("grant"),
            st.sampled_from(["x", "y"]),
            st.decimals(min_value=-5, max_value=50, places=3),
        ),
        st.tuples(
            st.just("job"),
            st.sampled_from(["a", "b"]),
            st.sampled_from(["x", "y"]),
            st.integers(0, 9),
            st.sampled_from(["completed", "failed", "cancelled", "open", "deleted"]),
        ),
    ),
    max_size=15,
)


@SETTINGS
@given(steps=STEPS)
async def test_balances_equal_an_independent_fold(api: Api, steps: list[tuple[Any, ...]]) -> None:
    """For any history of prices, grants and jobs, balances equal a fold of the raw events."""
    counter = _counter()
    tag = f"h{uuid.uuid4().hex[:8]}-"  # examples share one app; names keep them apart
    for step in steps:
        if step[0] == "price":
            await api.post(
                "/v1/prices",
                {"agent": tag + step[1], "per_job": str(step[2]), "per_row": str(step[3])},
            )
        elif step[0] == "grant":
            await api.post("/v1/credits/grants", {"account": tag + step[1], "amount": str(step[2])})
        else:
            _, agent, account, rows, outcome = step
            job_id = f"{tag}{counter()}"
            await api.post(
                "/v1/jobs", {"agent": tag + agent, "account": tag + account, "id": job_id}
            )
            await api.post(f"/v1/jobs/{job_id}/events", {"type": "job.started"})
            await api.post(
                f"/v1/jobs/{job_id}/events", {"type": "job.progressed", "data": {"row_count": rows}}
            )
            if outcome in ("completed", "deleted"):
                await api.post(f"/v1/jobs/{job_id}/events", {"type": "job.completed"})
            elif outcome in ("failed", "cancelled"):
                await api.post(f"/v1/jobs/{job_id}/events", {"type": f"job.{outcome}"})
            if outcome == "deleted":
                await api.delete(f"/v1/jobs/{job_id}")
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await api.get("/v1/events", params={"after": after, "limit": 1000})
        events.extend(e for e in page["events"] if e["stream"].startswith(("$", tag)))
        if not page["events"]:
            break
        after = page["next_after"]
    expected = {a: b for a, b in independent_balances(events).items() if a.startswith(tag)}
    for account, balance in expected.items():
        live = await api.get("/v1/credits", params={"account": account})
        assert Decimal(str(live["balance"])) == balance, account


STATUSES = ("queued", "running", "completed", "failed", "cancelled")
JOB_ROWS = st.lists(
    st.builds(
        lambda status, agent, account, project, created, finished, archived, deleted: (
            status,
            agent,
            account,
            project,
            created,
            finished if status in ("completed", "failed", "cancelled") else None,
            archived,
            deleted,
        ),
        st.sampled_from(STATUSES),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["x", "y"]),
        st.sampled_from([None, "p"]),
        st.integers(1, 6),
        st.integers(1, 6),
        st.booleans(),
        st.booleans(),
    ),
    max_size=12,
)


def _sometimes(*values: Any) -> st.SearchStrategy[Any]:
    """Mostly no filter: a query with every filter set matches nothing worth comparing."""
    return st.one_of(st.none(), st.none(), st.none(), st.sampled_from(values))


LIST_QUERIES = st.builds(
    jobs.ListQuery,
    statuses=st.one_of(
        st.just(()), st.lists(st.sampled_from(STATUSES), min_size=1, max_size=2, unique=True)
    ).map(tuple),
    agent=_sometimes("a", "b"),
    account=_sometimes("x"),
    project=_sometimes("p"),
    created_after=_sometimes(2, 4),
    created_before=_sometimes(3, 5),
    finished_before=_sometimes(2, 5),
    archived=_sometimes(True, False),
    ids=_sometimes((), ("j0", "j3", "j5")),
)


@settings(SETTINGS, max_examples=60)
@given(rows=JOB_ROWS, queries=st.lists(LIST_QUERIES, min_size=1, max_size=8))
async def test_matches_agrees_with_the_list_query(
    store: EventStore, rows: list[tuple[Any, ...]], queries: list[jobs.ListQuery]
) -> None:
    """A bulk delete checks each job again with ``jobs.matches``: it must select exactly the
    jobs the SQL filter of the same query selects, whatever the jobs and the filters."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    states = []
    for i, (status, agent, account, project, created, finished, archived, deleted) in enumerate(
        rows
    ):
        states.append(
            JobState(
                id=f"j{i}",
                status=status,
                agent=agent,
                account=account,
                project=project,
                created_at=created,
                finished_at=finished,
                archived_at=1 if archived else None,
                deleted=deleted,
                queued_position=i + 1,
            )
        )
    batch = Batch()
    for state in states:
        batch.changes[(tenant, state.id)] = Change(tenant, None, state)
    async with store.backend.write() as conn:
        await jobs.JobsProjector().apply(conn, batch)
    for query in queries:
        async with store.backend.read() as conn:
            found = await jobs.ids_matching(conn, tenant, query)
        assert sorted(found) == sorted(s.id for s in states if jobs.matches(s, query)), query
