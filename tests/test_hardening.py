"""Issue 11, the read side: bounded work per request, what logs and CSVs never hold, who sees
key events, and errors that are always the JSON envelope."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gc
import gzip
import io
import json
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp.test_utils import TestClient

from ledger import chain, commands, csvcells
from ledger.store import EventStore
from tests.bulkload import load_jobs
from tests.conftest import Api, assert_feed_hides, store_key
from tests.serverproc import Key, Server, served

MakeApi = Callable[..., Coroutine[Any, Any, Api]]
GUARD_SECONDS = 60.0  # a request that hangs fails the test instead of hanging it
# How long one turn of the event loop may keep the CPU while full lists stream. A page of 200
# jobs is about 5 ms of loop time; six lists at once measured 13-16 ms at worst on an idle
# machine, 20-27 ms beside three CPU-bound processes. A list built whole (``listing.PAGE`` set
# past the list's length: one read, one render, one encode) measured 175-497 ms idle and
# 318-400 ms beside the same load at ``LIST_JOBS``.
LOOP_TURN_CPU_SECONDS = 0.1
LIST_JOBS = 10_000


# -- item 6: one request never stalls the event loop -------------------------------------------


class _Row(msgspec.Struct):
    id: str | None = None
    job_id: str | None = None


class _FullList(msgspec.Struct):
    data: list[_Row] | None = None  # MCRIT
    jobs: list[_Row] | None = None  # Mindcase


_DECODE_LIST = msgspec.json.Decoder(_FullList).decode  # reads the ids only: 13 MB in ~0.1 s


def _distinct_jobs(raw: bytes) -> int:
    body = _DECODE_LIST(raw)
    rows = body.data if body.data is not None else body.jobs
    assert rows is not None
    ids = {r.job_id or r.id for r in rows}
    assert None not in ids and len(ids) == len(rows)
    return len(ids)


class LoopTurns:
    """The most CPU the event loop spent on other work between two turns of a task that wakes
    every millisecond: the longest any request's step kept the loop from everything else.

    It counts this thread's CPU time (``time.thread_time``), not the wall clock, so a busy
    machine that takes the CPU away from the process does not show as a stall, and a stall
    shows however fast the machine is. Garbage collection is held off while it runs: a full
    collection of a test worker's heap is itself ~0.1 s of one turn."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.turns = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def _watch(self) -> None:
        last = time.thread_time()
        while not self._stop:
            await asyncio.sleep(0.001)
            now = time.thread_time()
            self.worst, last = max(self.worst, now - last), now
            self.turns += 1

    async def __aenter__(self) -> LoopTurns:
        gc.collect()
        gc.disable()
        self._task = asyncio.ensure_future(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        try:
            assert self._task is not None
            await self._task
        finally:
            gc.enable()


async def test_six_full_lists_never_hold_the_event_loop(
    client: TestClient[Any, Any], store: EventStore, make_api: MakeApi, backend_name: str
) -> None:
    """Six full lists of a large tenant at once: every list is whole, and no turn of the
    server's event loop holds the CPU for more than a page's worth of work."""
    await load_jobs(store, "acme", LIST_JOBS)
    if backend_name == "postgres":
        # what autovacuum does a minute after a bulk load: without statistics PostgreSQL
        # plans each keyset page as a sort of every row before the cursor
        async with store.backend.write() as conn:
            await conn.execute("ANALYZE")
    reader = await make_api(role="reader")
    paths = ["/compat/mcrit/jobs", "/compat/mindcase/api/v1/jobs"] * 3

    async def full_list(path: str, **params: str) -> bytes:
        async with client.get(path, headers=reader.headers, params=params) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()  # parsed afterwards, outside the measured turns

    await full_list(paths[0], limit="1")  # what a first request does once is not a list's
    async with asyncio.timeout(GUARD_SECONDS), LoopTurns() as turns:
        bodies = await asyncio.gather(*(full_list(p) for p in paths))
    assert [_distinct_jobs(body) for body in bodies] == [LIST_JOBS] * 6  # every list was whole
    assert turns.turns > 0
    assert turns.worst < LOOP_TURN_CPU_SECONDS, (
        f"one turn of the event loop took {turns.worst * 1000:.0f} ms of CPU ({turns.turns} turns)"
    )


async def test_full_lists_are_whole_and_keep_their_shape(
    make_api: MakeApi, store: EventStore
) -> None:
    """A streamed full list holds every job once, in order, with MCRIT's start and limit."""
    await load_jobs(store, "acme", 1234)
    api = await make_api(role="reader")
    mindcase = await api.get("/compat/mindcase/api/v1/jobs")
    ids = [j["id"] for j in mindcase["jobs"]]
    assert len(ids) == len(set(ids)) == 1234
    mcrit = await api.get("/compat/mcrit/jobs")
    assert mcrit["status"] == "successful"
    assert [j["job_id"] for j in mcrit["data"]] == ids  # newest first, like the native list
    page = await api.get("/compat/mcrit/jobs", params={"start": 600, "limit": 700})
    assert [j["job_id"] for j in page["data"]] == ids[600:1234]
    empty = await api.get("/compat/mindcase/api/v1/jobs", headers={"X-Project-Id": "none"})
    assert empty == {"jobs": []}


async def test_as_of_replays_a_long_job_in_chunks(api: Api) -> None:
    """``as_of`` and the job's event list, for more events than one chunk, are exact."""
    await api.post("/v1/jobs", {"id": "long", "agent": "a"})
    await api.post("/v1/jobs/long/events", {"type": "job.started"})
    for round_ in range(3):
        batch = [
            {"type": "job.progressed", "data": {"row_count": round_ * 1000 + i}}
            for i in range(1, 1001)
        ]
        appended = await api.post("/v1/jobs/long/events", {"events": batch})
        if round_ == 1:
            middle = appended["events"][499]["position"]
    past = await api.get("/v1/jobs/long", params={"as_of": middle})
    assert past["row_count"] == 1500 and past["version"] == 2 + 1000 + 500
    now = await api.get("/v1/jobs/long", params={"as_of": 2**62})
    assert now["row_count"] == 3000 and now["version"] == 3002
    streamed = await api.get("/v1/jobs/long/events")  # written a chunk at a time
    assert [e["version"] for e in streamed["events"]] == list(range(1, 3003))


async def test_filtered_lists_and_feeds_answer_from_indexes(api: Api) -> None:
    """agent= and project= lists and a project-scoped feed return exactly their jobs."""
    for i in range(30):
        await api.post(
            "/v1/jobs", {"id": f"j{i}", "agent": f"agent/{i % 3}", "project": f"p{i % 2}"}
        )
    by_agent = await api.get("/v1/jobs", params={"agent": "agent/1", "limit": 100})
    assert sorted(j["id"] for j in by_agent["jobs"]) == sorted(f"j{i}" for i in range(1, 30, 3))
    by_project = await api.get("/v1/jobs", params={"project": "p1", "limit": 100})
    assert {j["id"] for j in by_project["jobs"]} == {f"j{i}" for i in range(1, 30, 2)}
    feed = await api.get("/v1/events", headers={"X-Project-Id": "p0"}, params={"limit": 1000})
    assert {e["stream"] for e in feed["events"]} == {f"j{i}" for i in range(0, 30, 2)}


# -- item 7: a revoked key's stream ends -------------------------------------------------------


async def test_revoked_key_ends_its_event_stream(
    client: TestClient[Any, Any], store: EventStore, make_api: MakeApi
) -> None:
    """An open SSE stream ends soon after its key is revoked, and sends nothing newer."""
    writer = await make_api(role="writer")
    made = await store.execute(
        lambda uow: commands.create_key(uow, "acme", "reader"), tenants=["acme"]
    )
    headers = {"Authorization": f"Bearer {made.secret}"}
    async with client.get("/v1/events/stream", headers=headers) as resp:
        assert resp.status == 200
        await writer.post("/v1/jobs", {"id": "before", "agent": "a"})
        received = b""
        async with asyncio.timeout(GUARD_SECONDS):
            while b"before" not in received:
                received += await resp.content.readany()
        await store.execute(
            lambda uow: commands.revoke_key(uow, "acme", made.key_id), tenants=["acme"]
        )
        async with asyncio.timeout(GUARD_SECONDS):  # the stream ends: EOF, not a hang
            while chunk := await resp.content.readany():
                received += chunk
    await writer.post("/v1/jobs", {"id": "after", "agent": "a"})
    assert b"revoked" in received and b"after" not in received
    async with client.get("/v1/events/stream", headers=headers) as again:
        assert again.status == 401


# -- item 17: key events are for admins ---------------------------------------------------------


async def test_readers_never_see_key_events(
    client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Key events (names, roles, secret hashes) reach admins, never readers or writers."""
    reader = await make_api(role="reader")
    writer = await make_api(role="writer")
    await writer.post("/v1/jobs", {"id": "seen", "agent": "a"})
    admin_types = [e["type"] for e in (await api.get("/v1/events"))["events"]]
    assert admin_types.count("key.created") == 3 and "job.queued" in admin_types
    for who in (reader, writer):
        await assert_feed_hides(
            client, who, ["key.created", "key.revoked"], [b"key.", b"secret_sha256"]
        )
    export = await api.get("/v1/audit/export")  # the audit export keeps every event, for admins
    assert export.count('"key.created"') == 3
    await reader.get("/v1/audit/export", status=403)
    await writer.get("/v1/audit/export", status=403)


# -- item 12: CSV cells never run as formulas ---------------------------------------------------

FORMULAS = ('=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3", "\tx")


async def test_csv_exports_neutralise_formulas(api: Api) -> None:
    """Statement and audit CSV cells that begin with = + - @ TAB start with a quote."""
    await api.post("/v1/prices", {"agent": FORMULAS[0], "per_job": 1})
    await api.post("/v1/jobs", {"id": "-job", "agent": FORMULAS[0], "account": "acc"})
    await api.post("/v1/jobs/-job/events", {"type": "job.started", "event_id": FORMULAS[2]})
    await api.post("/v1/jobs/-job/events", {"type": "job.completed", "event_id": FORMULAS[1]})
    statement = await api.get("/v1/credits/statement", params={"account": "acc", "format": "csv"})
    rows = list(csv.reader(io.StringIO(statement)))
    assert rows[1][:2] == ["'-job", "'" + FORMULAS[0]]
    assert all(not c.startswith(csvcells.TRIGGERS) for row in rows for c in row if c)
    audit = await api.get("/v1/audit/export", params={"format": "csv", "job_id": "-job"})
    events = list(csv.DictReader(io.StringIO(audit)))
    assert [e["event_id"][:1] for e in events[1:]] == ["'", "'"]
    for event in events:
        assert not any(v.startswith(csvcells.TRIGGERS) for v in event.values() if v)
        # a program recovers each exact value, so the chain still verifies from the CSV
        header: dict[str, Any] = {k: csvcells.original(event[k]) for k in chain.HEADER_FIELDS}
        header["position"], header["version"] = int(header["position"]), int(header["version"])
        assert chain.header_hash(event["prev_hash"], header) == event["hash"]


def test_csv_cells_are_reversible() -> None:
    """``original`` gives back exactly what ``cell`` was given, quotes included."""
    for value in ("=1", "'=1", "''@x", "'", "", "plain", "-", "a=b", "\r\n", "'plain"):
        assert csvcells.original(csvcells.cell(value)) == value
        assert not str(csvcells.cell(value)).startswith(csvcells.TRIGGERS)
    assert csvcells.cell(-5) == -5  # numbers stay numbers


# -- item 14: project header and unaddressable ids ----------------------------------------------


async def test_project_header_has_the_body_field_limit(api: Api) -> None:
    """X-Project-Id of 201 characters is 422 in the envelope; 200 is accepted."""
    answer = await api.get("/v1/jobs", headers={"X-Project-Id": "p" * 201}, status=422)
    assert answer["error"]["code"] == "invalid"
    assert answer["error"]["field"] == "X-Project-Id"
    await api.post("/v1/jobs", {"id": "ok", "agent": "a"}, headers={"X-Project-Id": "p" * 200})
    listed = await api.get("/v1/jobs", headers={"X-Project-Id": "p" * 200})
    assert [j["id"] for j in listed["jobs"]] == ["ok"]


async def test_dot_job_ids_are_refused(api: Api) -> None:
    """Job ids ``.`` and ``..`` (which URLs cannot address) are 422 at creation."""
    for job_id in (".", ".."):
        answer = await api.post("/v1/jobs", {"id": job_id, "agent": "a"}, status=422)
        assert answer["error"]["field"] == "id"
    await api.post("/v1/jobs", {"id": "...", "agent": "a"})  # three dots are a fine path segment
    assert (await api.get("/v1/jobs/..."))["id"] == "..."


# -- items 11 and 15: protocol-level errors ------------------------------------------------------


async def _raw(server: Server, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client would send them); the status, headers and body."""
    host, port = server.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(GUARD_SECONDS):
            raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head_text, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, payload


def _is_envelope(status: int, headers: dict[str, str], body: bytes, expected: int) -> str:
    assert status == expected, (status, body[:300])
    assert headers["Content-Type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"}
    return str(error["code"])


async def _logged(server: Server, text: str) -> str:
    """The server's log once ``text`` is in it (the server writes its log every 200 ms)."""
    async with asyncio.timeout(GUARD_SECONDS):
        while True:
            log = server.log_text()
            if text in log:
                return log
            await asyncio.sleep(0.05)


async def test_key_secrets_never_reach_the_log(db_url: str, tmp_path: Path) -> None:
    """A key sent with a trailing NUL or in a header over 8190 bytes is in no log line."""
    key: Key = await store_key(db_url, "acme", "admin")
    secret = key.secret.encode()
    async with served(db_url, log_dir=tmp_path) as server:
        for header in (b"Bearer " + secret + b"\x00", b"Bearer " + secret + b"A" * 9000):
            status, headers, body = await _raw(
                server, b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: " + header
            )
            assert _is_envelope(status, headers, body, 400) == "bad_request"
            assert secret not in body
        async with aiohttp.ClientSession(server.base) as http, http.get("/healthz") as resp:
            assert resp.status == 200
        log = await _logged(server, '"LineTooLong"')
    assert log.count('"http.protocol_error"') == 2
    assert key.secret not in log and key.secret.removeprefix("jl_") not in log
    for line in log.splitlines():
        if line and not line.startswith("jobledger: "):  # the CLI's own announcements
            json.loads(line)  # every log line is structured: no plain-text traceback


async def test_protocol_errors_are_the_json_envelope(db_url: str, tmp_path: Path) -> None:
    """Over-long request lines, bad headers and bodies that cannot be decoded answer the
    envelope with a 4xx, never text/plain and never a 500."""
    key = await store_key(db_url, "acme", "admin")
    auth = b"Authorization: Bearer " + key.secret.encode()
    post = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
    job = json.dumps({"agent": "a"}).encode()
    cases: list[tuple[bytes, bytes, int, str]] = [
        (b"GET /v1/jobs?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x", b"", 400, "bad_request"),
        (b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nBad Header: y", b"", 400, "bad_request"),
        (
            post + b"\r\nContent-Encoding: br\r\nContent-Length: 5",
            b"hello",
            415,
            "unsupported_media_type",
        ),
        (
            post + b"\r\nContent-Encoding: gzip\r\nContent-Length: 5",
            b"hello",
            400,
            "bad_request",
        ),
    ]
    async with served(db_url, log_dir=tmp_path) as server:
        for head, body, expected, code in cases:
            status, headers, payload = await _raw(server, head, body)
            assert _is_envelope(status, headers, payload, expected) == code
        packed = gzip.compress(job)  # a real gzip body still works
        status, _, payload = await _raw(
            server,
            post + b"\r\nContent-Encoding: gzip\r\nContent-Length: %d" % len(packed),
            packed,
        )
        assert status == 201, payload
