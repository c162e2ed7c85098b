"""The request path's shortcuts answer exactly what the long way would (both backends)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import pytest
import structlog

from api import logs
from ledger.backends.sqlite import INLINE_BUSY_MS, InlineConn, SqliteConn
from ledger.errors import StoreUnavailable
from ledger.ids import ulid
from ledger.sql import Conn
from projections import jobs as jobs_model
from tests.conftest import Api, store_key
from tests.serverproc import env, served


def test_every_column_of_the_jobs_table_is_indexed_or_listed_as_unindexed() -> None:
    """The narrow upsert sets only ``UNINDEXED``: an indexed column there would leave an index
    stale, and a new column left out of both would never be updated."""
    indexed: set[str] = set()
    for ddl in jobs_model.JobsProjector.index_ddl:
        columns = re.search(r"\(([^)]*)\)\s*$", ddl)
        assert columns is not None, ddl
        indexed |= {c.strip() for c in columns.group(1).split(",")}
    columns = set(jobs_model.COLUMNS.split(", "))
    assert not indexed & set(jobs_model.UNINDEXED)
    assert columns - {"tenant", "id"} - indexed == set(jobs_model.UNINDEXED)


async def _listed(api: Api, job_id: str, **params: str) -> dict[str, Any] | None:
    page = await api.get("/v1/jobs", params={"limit": "200", **params})
    found = [j for j in page["jobs"] if j["id"] == job_id]
    return found[0] if found else None


async def test_read_model_and_get_follow_every_change(api: Api) -> None:
    """Changes that keep the indexed columns (progress, archive) and ones that move them
    (start, complete) both reach the row, its lists, and GET, even right after a GET."""
    job = await api.post("/v1/jobs", {"id": "hp-1", "agent": "a/b", "account": "acct-1"})
    assert (await api.get("/v1/jobs/hp-1"))["version"] == job["version"] == 1
    await api.post("/v1/jobs/hp-1/events", {"type": "job.started"})
    got = await api.get("/v1/jobs/hp-1")
    assert (got["status"], got["version"]) == ("running", 2)
    for n in (3, 7):
        await api.post("/v1/jobs/hp-1/events", {"type": "job.progressed", "data": {"row_count": n}})
        got = await api.get("/v1/jobs/hp-1")
        assert (got["row_count"], got["version"]) == (n, 2 + (n > 3) + 1)
        listed = await _listed(api, "hp-1", status="running")
        assert listed is not None and listed["row_count"] == n
    await api.post("/v1/jobs/hp-1/events", {"type": "job.completed", "data": {"row_count": 9}})
    got = await api.get("/v1/jobs/hp-1")
    assert (got["status"], got["row_count"]) == ("completed", 9)
    assert await _listed(api, "hp-1", status="running") is None
    completed = await _listed(api, "hp-1", status="completed")
    assert completed is not None and completed == got
    assert await _listed(api, "hp-1", account="acct-1") == got
    await api.post("/v1/jobs/hp-1/events", {"type": "job.archived"})
    got = await api.get("/v1/jobs/hp-1")
    assert got["archived_at"] is not None
    assert await _listed(api, "hp-1", archived="true") == got
    assert await _listed(api, "hp-1", archived="false") is None


async def test_a_kept_answer_never_crosses_a_project_or_a_deletion(make_api: Any) -> None:
    admin = await make_api()
    await admin.post("/v1/jobs", {"id": "hp-p", "agent": "a/b", "project": "red"})
    assert (await admin.get("/v1/jobs/hp-p"))["project"] == "red"  # now kept
    blue = await make_api(project="blue")
    await blue.get("/v1/jobs/hp-p", status=404)
    red = await make_api(project="red")
    assert (await red.get("/v1/jobs/hp-p"))["id"] == "hp-p"
    await admin.delete("/v1/jobs/hp-p")
    await admin.get("/v1/jobs/hp-p", status=404)


def test_access_line_is_the_structlog_line() -> None:
    """``logs.access`` writes what ``log.info("http.request", ...)`` wrote through structlog."""
    stream = io.StringIO()
    try:
        logs.configure(stream)
        fields = logs.bind_request(request_id="r-1", method="GET", path="/v1/jobs/x")
        fields["tenant"] = "acme"
        logs.access(200, 1.25)
        structlog.get_logger("t").info("http.request", status=200, ms=1.25)
        fast, slow = (json.loads(line) for line in stream.getvalue().splitlines())
        fast.pop("timestamp")
        slow.pop("timestamp")
        assert list(fast.items()) == list(slow.items())
        assert fast["tenant"] == "acme" and fast["request_id"] == "r-1"
        logs.bind_request(request_id="r-2", method="POST", path="/")
        logs.access(201, 2.0)
        last = json.loads(stream.getvalue().splitlines()[-1])
        assert last["request_id"] == "r-2" and "tenant" not in last  # nothing carried over
    finally:
        logs.configure()


async def test_get_after_a_write_through_another_server_is_never_stale(
    db_url: str, tmp_path: Path
) -> None:
    """Two servers over one database: whatever one acknowledges, the other's next GET shows,
    although it answered the same job just before (from its kept body)."""
    key = await store_key(db_url, "acme")
    async with (
        served(db_url, log_dir=tmp_path) as reader,
        served(db_url, log_dir=tmp_path) as writer,
        aiohttp.ClientSession(headers=key.headers) as http,
    ):
        job = f"{writer.base}/v1/jobs/hp-x"
        seen = f"{reader.base}/v1/jobs/hp-x"
        async with http.post(f"{writer.base}/v1/jobs", json={"id": "hp-x", "agent": "a/b"}) as r:
            assert r.status == 201
        async with http.post(f"{job}/events", json={"type": "job.started"}) as r:
            assert r.status == 201
        for n in range(1, 21):
            for _ in range(2):  # the second answer comes from what the first kept
                async with http.get(seen) as r:
                    assert r.status == 200
                    assert (await r.json())["row_count"] == n - 1
            progressed = {"type": "job.progressed", "data": {"row_count": n}}
            async with http.post(f"{job}/events", json=progressed) as r:
                assert r.status == 201
                version = (await r.json())["job"]["version"]
            async with http.get(seen) as r:
                got = await r.json()
                assert (got["row_count"], got["version"]) == (n, version)
        async with http.delete(job) as r:
            assert r.status == 200
        async with http.get(seen) as r:
            assert r.status == 404


def _locked_elsewhere(path: Path) -> sqlite3.Connection:
    """A database in rollback-journal mode, with a row, locked by another connection."""
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("CREATE TABLE t (x)")
    setup.execute("INSERT INTO t VALUES (1)")
    setup.close()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (2)")
    return holder


async def test_an_inline_read_that_meets_a_lock_waits_on_a_reader_thread(tmp_path: Path) -> None:
    """SQLite: a point read on the loop's thread that finds the file locked gives up within
    INLINE_BUSY_MS and waits on a reader thread instead, so the loop runs on meanwhile (here,
    the task that releases the lock) and the read answers what was committed."""
    path = tmp_path / "locked.db"
    holder = _locked_elsewhere(path)
    inline = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    inline.execute(f"PRAGMA busy_timeout = {INLINE_BUSY_MS}")
    pooled = await aiosqlite.connect(path, isolation_level=None)
    await pooled.execute("PRAGMA busy_timeout = 30000")

    @contextlib.asynccontextmanager
    async def reader() -> AsyncIterator[Conn]:
        yield SqliteConn(pooled)

    async def release() -> None:
        holder.execute("COMMIT")

    try:
        # the read runs first, meets the lock and moves to the reader thread; then the loop
        # runs the task that releases the lock (it could not, were the loop held by the read)
        read = asyncio.create_task(InlineConn(inline, reader).fetchall("SELECT x FROM t"))
        released = asyncio.create_task(release())
        assert sorted(await read) == [(1,), (2,)]
        await released
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable):  # inside a snapshot there is nowhere to move
            await InlineConn(inline, None).fetchall("SELECT x FROM t")
        holder.execute("COMMIT")
    finally:
        await pooled.close()
        inline.close()
        holder.close()


def test_ulids_are_time_ordered_and_strictly_increasing() -> None:
    """Ids made back to back (many per millisecond, their shared characters reused) decode to
    their millisecond and count up strictly, also where the reused characters change."""
    digits = {c: i for i, c in enumerate("0123456789ABCDEFGHJKMNPQRSTVWXYZ")}
    before = time.time_ns() // 1_000_000
    made = [ulid() for _ in range(50_000)]
    after = time.time_ns() // 1_000_000
    values = []
    for text in made:
        assert len(text) == 26
        value = 0
        for c in text:
            value = value * 32 + digits[c]
        values.append(value)
    assert all(a < b for a, b in itertools.pairwise(values))
    assert before <= values[0] >> 80 and values[-1] >> 80 <= after
    assert len({v >> 10 for v in values}) > len({v >> 80 for v in values})  # heads changed in a ms


def test_processes_forked_after_import_draw_their_own_ids() -> None:
    """Children forked from one process (a pre-loading process manager; the suite's own
    zygote) must not repeat each other's ids: each draws its own random bits after the fork.
    A fresh interpreter forks three children that each make ids, and reports them."""
    probe = """
import os
from ledger.ids import ulid
ulid()  # the parent has drawn: its state and last id are what a child must not reuse
pipes = []
for _ in range(3):
    read, write = os.pipe()
    if os.fork() == 0:
        os.write(write, " ".join(ulid() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    pipes.append(read)
for read in pipes:
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    print(data.decode())
    os.wait()
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    children = [line.split() for line in done.stdout.splitlines()]
    assert [len(ids) for ids in children] == [100, 100, 100]
    assert len({id_ for ids in children for id_ in ids}) == 300
    # not only distinct: unrelated, as their random parts (after the 10 time characters) show
    assert len({ids[0][10:16] for ids in children}) == 3
