"""What the attacker's probe found, each as a regression test, on SQLite and PostgreSQL.

One tenant floods bad input while another appends; numbers, times and text outside the
ledger's ranges answer 422; erasure is complete; project scopes do not leak.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ledger import commands
from ledger.backends.sqlite import WRITER_BUSY_SECONDS
from ledger.errors import CommitFailed, StoreUnavailable
from ledger.events import CreditsGranted
from ledger.store import WATCH_SECONDS, EventStore
from ledger.store.tables import IDEMPOTENCY_WINDOW_US
from tests.conftest import Api
from tests.waits import wait_until

MakeApi = Callable[..., Coroutine[Any, Any, Api]]

BAD_JOBS: list[dict[str, Any]] = [
    {"agent": "a", "account": "x\u0000y"},
    {"agent": "a\u0000"},
    {"agent": "a", "project": "p\u0001"},
    {"agent": "a", "occurred_at": "0001-01-01T00:00:00Z"},
    {"agent": "a", "occurred_at": "0001-01-01T00:00:00+01:00"},
    {"agent": "a", "occurred_at": "9999-12-31T23:59:59-01:00"},
    {"agent": "a", "id": "."},
    {"agent": "a", "id": ".."},
    {"agent": "a", "executions_total": -1},
]
BAD_EVENTS: list[dict[str, Any]] = [
    {"type": "job.progressed", "data": {"row_count": -1000000}},
    {"type": "job.completed", "data": {"row_count": -1}},
    {"type": "job.completed", "data": {"row_count": 2**62}},
    {"type": "job.completed", "data": {"row_count": 922337203685477}},
    {"type": "job.progressed", "data": {"message": "a\u0000b"}},
    {"type": "job.failed", "data": {"error": {"code": "x\u0000", "message": "m"}}},
    {"type": "job.started", "occurred_at": "0999-12-31T23:59:59Z"},
    {"type": "job.pr_linked", "data": {"pr_link": "\u0000"}},
    {"type": "job.execution_succeeded", "data": {"execution_id": "e\u0000"}},
]


async def test_one_tenants_bad_input_costs_another_nothing(make_api: MakeApi) -> None:
    """Tenant B floods bad input while tenant A appends: every A write lands, every B is 4xx."""
    good = await make_api("tenant-a", "writer")
    bad = await make_api("tenant-b", "admin")
    jobs = [(await good.post("/v1/jobs", {"agent": "scraper"}))["id"] for _ in range(4)]
    victim = (await bad.post("/v1/jobs", {"agent": "x"}))["id"]

    async def good_writes() -> list[tuple[str, int]]:
        done = []
        for round_ in range(6):
            calls = [
                good.call(
                    "POST",
                    f"/v1/jobs/{job}/events",
                    json={"type": "job.progressed", "data": {"row_count": round_}},
                )
                for job in jobs
            ]
            for job, answer in zip(jobs, await asyncio.gather(*calls), strict=True):
                done.append((job, answer["job"]["version"]))
        return done

    async def bad_writes() -> list[Any]:
        calls: list[Any] = []
        for body in BAD_JOBS:
            calls.append(bad.call("POST", "/v1/jobs", json=body))
        for body in BAD_EVENTS:
            calls.append(bad.call("POST", f"/v1/jobs/{victim}/events", json=body))
        for amount in ("1e999999999", "-1e999999999", "1e10", "0.00001"):
            calls.append(
                bad.call("POST", "/v1/credits/grants", json={"account": "a", "amount": amount})
            )
            calls.append(bad.call("POST", "/v1/prices", json={"agent": "a", "per_row": amount}))
        calls.append(
            bad.call("POST", "/v1/credits/grants", json={"account": "x\u0000y", "amount": 1})
        )
        return list(await asyncio.gather(*calls))

    done, refused = await asyncio.gather(good_writes(), bad_writes())
    for answer in refused:
        assert isinstance(answer, dict) and "error" in answer, answer
        assert answer["error"]["code"] in ("invalid", "bad_request"), answer
    for job in jobs:
        events = (await good.get(f"/v1/jobs/{job}/events"))["events"]
        assert len(events) == 1 + 6
        assert [e["data"]["row_count"] for e in events[1:]] == list(range(6))
    assert len(done) == 24
    untouched = await bad.get(f"/v1/jobs/{victim}")
    assert untouched["version"] == 1 and untouched["status"] == "queued"
    assert (await bad.get("/v1/jobs"))["jobs"] == [untouched]
    assert (await bad.get("/v1/credits"))["granted"] == 0
    assert (await bad.get("/v1/prices"))["prices"] == []


async def test_a_negative_row_count_mints_no_credits(api: Api) -> None:
    """Counts are non-negative: -1000000 rows is 422 and the balance does not move."""
    await api.post("/v1/credits/grants", {"account": "acme", "amount": 10})
    job = await api.post("/v1/jobs", {"agent": "a", "account": "acme"})
    answer = await api.post(
        f"/v1/jobs/{job['id']}/events",
        {"type": "job.completed", "data": {"row_count": -1000000}},
        status=422,
    )
    assert answer["error"]["field"] == "data.row_count"
    credits = await api.get("/v1/credits", params={"account": "acme"})
    assert credits["balance"] == 10 and credits["used"] == 0


async def test_a_charge_beyond_the_ledgers_range_is_refused(api: Api) -> None:
    """A price times a count that would overflow a total answers 422; nothing is charged."""
    await api.post("/v1/prices", {"agent": "big", "per_row": 1000000000})
    job = await api.post("/v1/jobs", {"agent": "big"})
    answer = await api.post(
        f"/v1/jobs/{job['id']}/events",
        {"type": "job.completed", "data": {"row_count": 1000000000}},
        status=422,
    )
    assert "limit" in answer["error"]["message"]
    assert (await api.get(f"/v1/jobs/{job['id']}"))["status"] == "queued"
    assert (await api.get("/v1/jobs/stats"))["credits_used"] == 0


async def test_times_outside_four_digit_years_are_422(api: Api) -> None:
    """Years below 1000 or above 9999 (after normalising) answer 422 naming the field."""
    for when in ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        answer = await api.post("/v1/jobs", {"agent": "a", "occurred_at": when}, status=422)
        assert answer["error"]["field"] == "occurred_at"
    job = await api.post("/v1/jobs", {"agent": "a", "occurred_at": "1000-01-01T00:00:00Z"})
    assert job["created_at"] == "1000-01-01T00:00:00Z"


async def test_completing_at_the_end_of_time_clamps_the_expiry(api: Api) -> None:
    """A completion at 9999-12-31 keeps its results until the last representable instant."""
    job = await api.post("/v1/jobs", {"agent": "a", "occurred_at": "9999-12-30T00:00:00Z"})
    done = await api.post(
        f"/v1/jobs/{job['id']}/events",
        {"type": "job.completed", "occurred_at": "9999-12-31T00:00:00Z", "data": {"result": [1]}},
    )
    assert done["job"]["expires_at"] == "9999-12-31T23:59:59.999999Z"


async def test_out_of_range_query_values_are_422(api: Api) -> None:
    """A cursor past 64 bits, a NUL in any filter: 422, never a 500, on every backend."""
    cursor = base64.urlsafe_b64encode(b"99999999999999999999999:1").decode().rstrip("=")
    assert (await api.get("/v1/jobs", status=422, params={"cursor": cursor}))["error"]
    for name in ("agent", "account", "q", "project", "status"):
        answer = await api.get("/v1/jobs", status=422, params={name: "x\u0000y"})
        assert answer["error"]["field"] == name
    answer = await api.get("/v1/events", status=422, params={"types": "job.started\u0000"})
    assert answer["error"]["field"] == "types"
    answer = await api.get("/v1/results/r\u0000x", status=422)
    assert answer["error"]["code"] == "invalid"


async def test_erasure_keeps_no_free_text(api: Api, store: EventStore) -> None:
    """After a redaction the snapshot keeps no repository, model, PR link or error code."""
    job = await api.post(
        "/v1/jobs",
        {
            "agent": "a",
            "source": {"repository": "zzpriv-repo", "ref": "main"},
            "model": "zzpriv-model",
        },
    )
    job_id = job["id"]
    await api.post(
        f"/v1/jobs/{job_id}/events", {"type": "job.pr_linked", "data": {"pr_link": "zzpriv-pr"}}
    )
    await api.post(
        f"/v1/jobs/{job_id}/events",
        {"type": "job.failed", "data": {"error": {"code": "zzpriv-code", "message": "m"}}},
    )
    await api.post(f"/v1/jobs/{job_id}/redact", {"reason": "gdpr"}, status=200)
    shown = await api.get(f"/v1/jobs/{job_id}")
    events = await api.get(f"/v1/jobs/{job_id}/events")
    export = await api.get("/v1/audit/export")
    for text in (str(shown), str(events), export):
        assert "zzpriv" not in text


async def test_replaying_a_create_after_erasure_creates_nothing(api: Api) -> None:
    """The create's Idempotency-Key still names the erased job: no new job holds the data."""
    headers = {"Idempotency-Key": "create-1"}
    body = {"agent": "a", "params": {"email": "person@example.com"}}
    job = await api.post("/v1/jobs", body, headers=headers)
    await api.post(f"/v1/jobs/{job['id']}/redact", {}, status=200)
    again = await api.post("/v1/jobs", body, headers=headers)
    assert again["id"] == job["id"]
    assert again["params"] == {}
    assert len((await api.get("/v1/jobs"))["jobs"]) == 1


async def test_idempotency_keys_are_scoped_to_the_project(make_api: MakeApi) -> None:
    """A p2 writer replaying p1's key with p1's body gets a job of its own, in p2."""
    p1 = await make_api("acme", "writer", project="p1")
    p2 = await make_api("acme", "writer", project="p2")
    headers = {"Idempotency-Key": "same"}
    first = await p1.post("/v1/jobs", {"agent": "a"}, headers=headers)
    second = await p2.post("/v1/jobs", {"agent": "a"}, headers=headers)
    assert second["id"] != first["id"]
    assert second["project"] == "p2"


async def test_another_projects_job_is_404_for_every_write(make_api: MakeApi) -> None:
    """Appends, cancels and archives of another project's job answer 404, naming nothing."""
    p1 = await make_api("acme", "writer", project="p1")
    p2 = await make_api("acme", "writer", project="p2")
    job = await p1.post("/v1/jobs", {"agent": "a"})
    for body in (
        {"type": "job.started"},
        {"type": "job.started", "expected_version": 7},
        {"type": "job.archived"},
    ):
        answer = await p2.post(f"/v1/jobs/{job['id']}/events", body, status=404)
        assert "version" not in str(answer) and "queued" not in str(answer)
    await p2.post(f"/v1/jobs/{job['id']}/cancel", {}, status=404)
    assert (await p1.get(f"/v1/jobs/{job['id']}"))["version"] == 1


async def test_idempotency_answers_are_compact_and_purged(api: Api, store: EventStore) -> None:
    """Answers are stored compressed, and the sweep drops those past the 24 h window."""
    job = await api.post("/v1/jobs", {"agent": "a"})
    batch = {"events": [{"type": "job.progressed", "data": {"message": "x" * 200}}] * 200}
    await api.post(f"/v1/jobs/{job['id']}/events", batch, headers={"Idempotency-Key": "k"})
    async with store.backend.read() as conn:
        row = await conn.fetchone("SELECT length(body) FROM idempotency")
    assert row is not None and row[0] < 20_000  # the answer itself is over 100 kB
    async with store.backend.write() as conn:
        await conn.execute(
            "UPDATE idempotency SET created_us = created_us - ?", (IDEMPOTENCY_WINDOW_US + 1,)
        )
    assert await store.sweep() == (0, 1)
    async with store.backend.read() as conn:
        assert await conn.fetchone("SELECT count(*) FROM idempotency") == (0,)


class _CommitFails:
    """Fault injection: while ``fail`` is set, every write transaction's COMMIT fails."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        async with self._inner.write() as conn:
            yield _FailingCommit(conn, self)
            if self.fail:  # raised inside: the real transaction rolls back
                raise CommitFailed("injected: the COMMIT failed")


class _FailingCommit:
    """The write connection, but a ``sync(last=True)`` (the writes sent with the COMMIT,
    PostgreSQL) fails as a failed COMMIT would, before anything is sent."""

    def __init__(self, inner: Any, faults: _CommitFails) -> None:
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def sync(self, *, last: bool = False) -> None:
        if last and self._faults.fail:
            raise CommitFailed("injected: the COMMIT failed")
        await self._inner.sync(last=last)


async def test_a_failed_commit_answers_503_and_records_nothing(db_url: str) -> None:
    """When the COMMIT fails, every command of the batch is refused and nothing is kept."""
    from ledger.backends import backend_for
    from projections import new_store

    backend = _CommitFails(backend_for(db_url))
    store = new_store(backend)  # type: ignore[arg-type]

    def grant(tenant: str) -> Any:
        event = CreditsGranted(account="a", amount=Decimal(1))
        return lambda uow: commands.grant(uow, tenant, event, actor="t")

    async with store.running():
        await store.execute(grant("t1"), tenants=["t1"])
        backend.fail = True
        outcomes = await asyncio.gather(  # queued together: one batch, one failed COMMIT
            store.execute(grant("t1"), tenants=["t1"]),
            store.execute(grant("t2"), tenants=["t2"]),
            return_exceptions=True,
        )
        backend.fail = False
        for outcome in outcomes:
            assert isinstance(outcome, StoreUnavailable), outcome
            assert outcome.code == "unavailable"
        kept = await store.events("t1")
        assert len(kept) == 1 and await store.events("t2") == []
        after = await store.execute(grant("t1"), tenants=["t1"])  # the cache forgot the batch
        assert after.recorded.prev_hash == kept[0].hash  # the chain goes on from what committed
        assert after.recorded.position > kept[0].position and after.totals.granted == 2 * 10_000
        if store.backend.dialect == "sqlite":  # one writer: positions stay dense
            assert after.recorded.position == 2


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
async def test_erasure_beside_an_open_snapshot_leaves_no_residue(
    api: Api, make_api: MakeApi, db_url: str
) -> None:
    """A redaction while a reader holds an old snapshot still leaves no bytes in the WAL, and
    holds nobody's writes back meanwhile.

    The checkpoint that erases the WAL cannot finish past that reader. It used to wait for it
    on the writer's connection, in SQLite's busy handler (up to the writer's 10 s busy
    timeout), holding the write lock: the redaction's answer and every tenant's writes waited
    with it. Now it gives up at once and is retried in the background.
    """
    marker = "residue-marker-" + "q" * 20
    job = await api.post("/v1/jobs", {"agent": "a", "params": {"m": marker}})
    other = await make_api("globex", "admin")
    reader = sqlite3.connect(db_url, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchone()  # holds the snapshot
    try:
        # a liveness bound, half the busy timeout the old code waited out: not a speed figure
        await asyncio.wait_for(
            asyncio.gather(
                api.post(f"/v1/jobs/{job['id']}/redact", {}, status=200),
                other.post("/v1/jobs", {"agent": "b"}, status=201),
            ),
            WRITER_BUSY_SECONDS / 2,
        )
        assert reader.in_transaction  # all of it answered while the snapshot was held
    finally:
        reader.execute("COMMIT")
        reader.close()

    def residue() -> bool:
        return any(
            marker.encode() in Path(db_url + suffix).read_bytes()
            for suffix in ("", "-wal")
            if Path(db_url + suffix).exists()
        )

    await wait_until(lambda: not residue(), 10, "the erased bytes to leave the database files")


async def test_a_project_key_cannot_read_the_tenants_chain_head(make_api: MakeApi) -> None:
    """The chain head covers every project: a project-scoped admin gets 403."""
    scoped = await make_api("acme", "admin", project="p1")
    answer = await scoped.get("/v1/audit/head", status=403)
    assert answer["error"]["code"] == "forbidden"


class _StuckBackend:
    """Fault injection: the watcher's wait swallows cancellation (Python 3.11's wait_for race)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.released = asyncio.Event()
        self.entered = asyncio.Event()
        self.waiter: asyncio.Task[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def wait_for_signal(self, seconds: float) -> None:
        self.waiter = asyncio.current_task()
        self.entered.set()
        while not self.released.is_set():
            try:
                await self.released.wait()
            except asyncio.CancelledError:
                continue  # the lost cancellation, until the test lets go
        raise asyncio.CancelledError


async def test_stop_returns_even_when_the_watcher_ignores_cancellation(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping a store ends within seconds even if its watcher never honours a cancel."""
    from ledger.backends import backend_for
    from projections import new_store

    monkeypatch.setattr("ledger.store.STOP_WATCHER_SECONDS", 0.25)  # each of its two waits: 2 s

    stuck = _StuckBackend(backend_for(db_url))
    store = new_store(stuck)  # type: ignore[arg-type]
    await store.start()
    await stuck.entered.wait()  # the watcher is waiting now
    try:
        await asyncio.wait_for(store.stop(), 30)  # before: stop() waited for the watcher forever
    finally:
        stuck.released.set()
        if stuck.waiter is not None:
            await asyncio.wait({stuck.waiter}, timeout=5)


async def test_a_commit_during_a_read_still_wakes_the_waiter(api: Api, store: EventStore) -> None:
    """A waiter gives the change count it saw before reading: a commit since wakes it at once.

    Without the token, a commit that lands between a long poll's read and its wait would wake
    nobody, and the poll would sleep through it to its timeout.
    """
    seen = store.changes
    await api.post("/v1/jobs", {"agent": "a"})  # commits while "the caller reads"
    assert store.changes != seen
    waiter = store.wait_for_change(60.0, seen=seen)
    with pytest.raises(StopIteration):  # it returned without waiting for anything
        waiter.send(None)


async def test_a_tenants_commits_wake_its_waiters_and_not_the_others(
    api: Api, make_api: Callable[..., Coroutine[Any, Any, Api]], store: EventStore
) -> None:
    """A stream or long poll of one tenant is not woken by every commit of another.

    Each commit through this process moves the tokens of its own tenants; the other tenants'
    move only when the watcher sees the event count change (every ``WATCH_SECONDS`` at most),
    as they must for commits of other processes, whose tenants this one does not learn.
    """
    other = await make_api(tenant="quiet")
    await other.post("/v1/jobs", {"id": "q", "agent": "a"})
    seen = store.change_token("acme")
    quiet = store.change_token("quiet")
    waiter = asyncio.ensure_future(store.wait_for_change(60.0, seen=seen, tenant="acme"))
    started = time.monotonic()
    for i in range(60):
        await api.post("/v1/jobs", {"id": f"j{i}", "agent": "a"})
    elapsed = time.monotonic() - started
    assert store.change_token("acme") - seen >= 60
    await asyncio.wait_for(waiter, 10)  # its tenant's first commit woke it
    # the watcher's looks (with a margin of two) are all that moved the quiet tenant's token
    assert store.change_token("quiet") - quiet <= elapsed / WATCH_SECONDS + 2, elapsed
    quiet = store.change_token("quiet")
    sleeper = asyncio.ensure_future(store.wait_for_change(60.0, seen=quiet, tenant="quiet"))
    await other.post("/v1/jobs/q/events", {"type": "job.started"})
    await asyncio.wait_for(sleeper, 10)  # and its own commit wakes it at once


async def test_another_process_commit_wakes_every_tenants_waiter(db_url: str) -> None:
    """A commit of another process (its tenants unknown here) wakes the waiters of every
    tenant: the watcher sees the event count move (SQLite) or the NOTIFY (PostgreSQL)."""
    from ledger.backends import backend_for
    from projections import new_store

    async with (
        new_store(backend_for(db_url)).running() as here,
        new_store(backend_for(db_url)).running() as elsewhere,
    ):
        seen = here.change_token("anyone")
        waiter = asyncio.ensure_future(here.wait_for_change(60.0, seen=seen, tenant="anyone"))
        await elsewhere.execute(
            lambda uow: commands.create_key(uow, "someone-else", "admin"), tenants=["someone-else"]
        )
        await asyncio.wait_for(waiter, 30)
        assert here.change_token("anyone") != seen
