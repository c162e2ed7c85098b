"""A rich history (every status, prices, grants, deletions, archive, redaction, links), built
through the API once per worker and backend, and copied into each test's database that asks.

A test marked ``@pytest.mark.rich_history`` that takes ``db_url`` (directly or through ``app``,
``client``, ``api``) starts on its own copy of that history: a SQLite file copied with SQLite's
backup, a PostgreSQL database created from a template. Building it through the API costs about
as much CPU as the rest of such a test; the copy costs a few milliseconds. The test's own keys
(``api``, ``make_api``) are made on its copy, after the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from api.context import STORE
from api.settings import Settings
from ledger import commands
from ledger.store import EventStore
from tests.conftest import Api, create_pg_database, drop_pg_database, new_key

MakeApi = Callable[..., Coroutine[Any, Any, Api]]

RICH_JOB_IDS = (
    "done", "done2", "queued", "run", "failed", "cancel-q", "cancel-r", "partial",
    "all-ok", "all-bad", "retrying", "archived", "deleted", "bulk0", "bulk1", "bulk2",
    "secret", *(f"plain{i:02d}" for i in range(12)), "nope",
)  # fmt: skip
"""Every job id ever created in tenant acme by ``build_rich_history``."""


async def event(api: Api, job: str, type_: str, at: str | None = None, **data: Any) -> None:
    body: dict[str, Any] = {"type": type_, "data": data}
    if at is not None:
        body["occurred_at"] = at
    await api.post(f"/v1/jobs/{job}/events", body)


async def job(api: Api, job_id: str, agent: str, account: str, at: str, **extra: Any) -> None:
    await api.post(
        "/v1/jobs", {"id": job_id, "agent": agent, "account": account, "occurred_at": at, **extra}
    )


async def build_rich_history(api: Api, store: EventStore, make_api: MakeApi) -> list[str]:
    """Every status, prices and price changes, grants, deletions, archive, redaction, links.

    Returns every job id ever created in tenant acme.
    """
    await api.post(
        "/v1/prices",
        {"agent": "scraper/a", "per_job": "1.5", "per_row": "0.25", "per_second": "0.01"},
    )
    await api.post("/v1/prices", {"agent": "exec/b", "per_execution": 2, "per_job": 1})
    await api.post("/v1/credits/grants", {"account": "acct-1", "amount": 500, "reason": "plan"})
    await api.post("/v1/credits/grants", {"account": "acct-2", "amount": "12.3456"})
    await api.post("/v1/credits/grants", {"account": "acct-1", "amount": -20, "reason": "fix"})

    # completed with a result, charged by job, rows and seconds
    await job(api, "done", "scraper/a", "acct-1", "2025-01-01T10:00:00Z", params={"q": "x"})
    await event(api, "done", "job.started", "2025-01-01T10:00:01Z")
    await event(api, "done", "job.progressed", "2025-01-01T10:00:02Z", row_count=1, message="m")
    await event(api, "done", "job.completed", "2025-01-01T10:01:03.5Z", result=[1, 2, 3, 4])
    # the price changes: later jobs pay the new one, the earlier one keeps its charge
    await api.post("/v1/prices", {"agent": "scraper/a", "per_job": 3, "per_row": 1})
    await job(api, "done2", "scraper/a", "acct-1", "2025-01-02T00:00:00Z", project="p1")
    await event(api, "done2", "job.completed", "2025-01-02T00:00:09Z", row_count=5)
    # still queued, running, progressing
    await job(api, "queued", "scraper/a", "acct-2", "2025-01-03T00:00:00Z")
    await job(api, "run", "scraper/a", "acct-2", "2025-01-03T00:00:01Z", project="p1")
    await event(api, "run", "job.started", "2025-01-03T00:00:02Z")
    await event(api, "run", "job.progressed", "2025-01-03T00:00:03Z", row_count=9)
    # failed, cancelled from queued and from running
    await job(api, "failed", "scraper/c", "acct-2", "2025-01-04T00:00:00Z")
    await event(api, "failed", "job.started", "2025-01-04T00:00:01Z")
    await event(
        api, "failed", "job.failed", "2025-01-04T00:00:02Z", error={"code": "x", "message": "y"}
    )
    await job(api, "cancel-q", "scraper/c", "acct-1", "2025-01-05T00:00:00Z")
    await api.post("/v1/jobs/cancel-q/cancel", {"reason": "dup"}, status=200)
    await job(api, "cancel-r", "scraper/c", "acct-1", "2025-01-05T00:00:01Z")
    await event(api, "cancel-r", "job.started", "2025-01-05T00:00:02Z")
    await api.post("/v1/jobs/cancel-r/cancel", status=200)
    # executions: partial_failed, all succeeded, all failed, one still retrying
    await job(api, "partial", "exec/b", "acct-1", "2025-01-06T00:00:00Z", executions_total=3)
    await event(api, "partial", "job.execution_succeeded", "2025-01-06T00:00:01Z", execution_id="1")
    await event(api, "partial", "job.execution_retrying", "2025-01-06T00:00:02Z", execution_id="2")
    await event(api, "partial", "job.execution_failed", "2025-01-06T00:00:03Z", execution_id="2")
    await event(api, "partial", "job.execution_succeeded", "2025-01-06T00:00:04Z", execution_id="3")
    await job(api, "all-ok", "exec/b", "acct-2", "2025-01-06T01:00:00Z")
    await event(api, "all-ok", "job.executions_planned", "2025-01-06T01:00:01Z", total=2)
    await event(api, "all-ok", "job.execution_succeeded", "2025-01-06T01:00:02Z", execution_id="a")
    await event(api, "all-ok", "job.execution_succeeded", "2025-01-06T01:00:03Z", execution_id="b")
    await job(api, "all-bad", "exec/b", "acct-2", "2025-01-06T02:00:00Z", executions_total=1)
    await event(api, "all-bad", "job.execution_failed", "2025-01-06T02:00:01Z", execution_id="z")
    await job(api, "retrying", "exec/b", "acct-1", "2025-01-06T03:00:00Z", executions_total=2)
    await event(api, "retrying", "job.execution_retrying", "2025-01-06T03:00:01Z", execution_id="r")
    # archive, pr link, deletion (single and bulk), redaction
    await job(api, "archived", "docs/agent", "acct-1", "2025-01-07T00:00:00Z", project="p2")
    await event(api, "archived", "job.completed", "2025-01-07T00:00:01Z", row_count=2)
    await event(api, "archived", "job.pr_linked", None, pr_link="https://x/pr/1")
    await api.post("/v1/jobs/archived/archive", status=200)
    await job(api, "deleted", "scraper/a", "acct-1", "2025-01-08T00:00:00Z")
    await event(api, "deleted", "job.completed", "2025-01-08T00:00:01Z", row_count=7)
    await api.delete("/v1/jobs/deleted")
    for i in range(3):
        await job(api, f"bulk{i}", "bulk/agent", "acct-3", f"2025-01-09T00:00:0{i}Z")
    await event(api, "bulk1", "job.completed", "2025-01-09T00:01:00Z", row_count=3)
    assert (await api.delete("/v1/jobs", params={"agent": "bulk/agent"}))["deleted"] == 3
    await job(
        api,
        "secret",
        "scraper/a",
        "acct-2",
        "2025-01-10T00:00:00Z",
        params={"email": "a@b.c"},
        created_by={"email": "a@b.c", "first_name": "A"},
    )
    await event(api, "secret", "job.started", "2025-01-10T00:00:01Z")
    await event(api, "secret", "job.completed", "2025-01-10T00:00:05Z", result=[{"a": 1}])
    await api.post("/v1/jobs/secret/redact", {"reason": "erase"}, status=200)
    await api.post("/v1/jobs/secret/archive", status=200)
    # many plain jobs, so lists page
    for i in range(12):
        await job(api, f"plain{i:02d}", "plain/agent", f"acct-{i % 3}", "2025-01-11T00:00:00Z")
    # keys: one revoked; another tenant with its own jobs
    revoked = await store.execute(
        lambda uow: commands.create_key(uow, "acme", "reader"), tenants=["acme"]
    )
    await store.execute(
        lambda uow: commands.revoke_key(uow, "acme", revoked.key_id), tenants=["acme"]
    )
    globex = await make_api(tenant="globex")
    await globex.post("/v1/jobs", {"id": "done", "agent": "g/agent", "account": "acct-1"})
    await globex.post("/v1/jobs/done/events", {"type": "job.completed", "data": {"row_count": 1}})
    return list(RICH_JOB_IDS)


class Templates:
    """This worker's histories, built on first use: a SQLite file and a PostgreSQL database.

    A worker runs one test at a time, so no two tests build at once.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sqlite: str | None = None
        self.postgres_url: str | None = None

    async def copy_into(self, path: str) -> None:
        """Make the SQLite file ``path`` (not there yet) a copy of the history."""
        if self.sqlite is None:
            built = str(self.directory / "rich-history.db")
            await _build(built)
            self.sqlite = built
        await asyncio.to_thread(_sqlite_copy, self.sqlite, path)

    async def postgres(self) -> str:
        """The URL of the PostgreSQL database holding the history: a template to copy."""
        if self.postgres_url is None:
            url = await create_pg_database()
            await _build(url)
            self.postgres_url = url
        return self.postgres_url

    def drop(self) -> None:
        if self.postgres_url is not None:
            asyncio.run(drop_pg_database(self.postgres_url))


def _sqlite_copy(source: str, target: str) -> None:
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


async def _build(url: str) -> None:
    client = TestClient(TestServer(create_app(Settings(db_url=url))))
    await client.start_server()
    try:
        store = client.app[STORE]

        async def make_api(tenant: str = "acme", role: str = "admin") -> Api:
            return Api(client, await new_key(store, tenant, role), None)

        await build_rich_history(await make_api(), store, make_api)
    finally:
        await client.close()
