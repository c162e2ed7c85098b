"""Section 6: the event feed, paged and as Server-Sent Events, resumable and tenant-scoped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from api import feed
from tests.conftest import Api
from tests.serverproc import acli, acreate_key, served
from tests.waits import wait_until

MakeApi = Callable[..., Coroutine[Any, Any, Api]]
GUARD_SECONDS = 30.0  # a stream that stalls fails the test instead of hanging it


async def make_events(api: Api, n_jobs: int, prefix: str = "j") -> None:
    for i in range(n_jobs):
        await api.post("/v1/jobs", {"id": f"{prefix}{i}", "agent": f"agent/{i % 2}"})
        await api.post(f"/v1/jobs/{prefix}{i}/events", {"type": "job.started"})
        if i % 2:
            await api.post(f"/v1/jobs/{prefix}{i}/events", {"type": "job.completed"})


async def all_events(api: Api, after: int = 0) -> list[dict[str, Any]]:
    page = await api.get("/v1/events", params={"after": after, "limit": 1000})
    events: list[dict[str, Any]] = page["events"]
    return events


# -- GET /v1/events ------------------------------------------------------------------------------


async def test_events_page_with_after_and_next_after(api: Api) -> None:
    """Paging with ``after=next_after`` walks every event once, in position order."""
    await make_events(api, 7)
    everything = await all_events(api)
    assert len(everything) == 1 + 7 * 2 + 3  # the key, queued + started, 3 completions
    positions = [e["position"] for e in everything]
    assert positions == sorted(set(positions))
    walked: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await api.get("/v1/events", params={"after": after, "limit": 4})
        assert len(page["events"]) <= 4
        if not page["events"]:
            assert page["next_after"] == after
            break
        assert page["next_after"] == page["events"][-1]["position"]
        walked.extend(page["events"])
        after = page["next_after"]
    assert walked == everything
    tail = await api.get("/v1/events", params={"after": positions[-3]})
    assert [e["position"] for e in tail["events"]] == positions[-2:]
    default = await api.get("/v1/events")
    assert default["events"] == everything[:100]


async def test_events_have_the_contract_shape(api: Api) -> None:
    """An event carries position, ids, stream, version, type, times, actor, data and hashes."""
    await api.post("/v1/jobs", {"id": "one", "agent": "a", "params": {"x": 1}})
    event = (await api.get("/v1/events", params={"job_id": "one"}))["events"][0]
    assert set(event) == {
        "position",
        "event_id",
        "stream",
        "version",
        "type",
        "occurred_at",
        "recorded_at",
        "actor",
        "data",
        "data_hash",
        "prev_hash",
        "hash",
    }
    assert event["stream"] == "one" and event["version"] == 1 and event["type"] == "job.queued"
    assert event["data"]["params"] == {"x": 1} and event["actor"].startswith("key_")
    assert event["occurred_at"].endswith("Z") and event["recorded_at"].endswith("Z")
    assert all(len(event[k]) == 64 for k in ("data_hash", "prev_hash", "hash"))
    assert event == (await api.get("/v1/jobs/one/events"))["events"][0]


async def test_events_filter_by_types_and_job(api: Api) -> None:
    """``types`` (comma list) and ``job_id`` narrow the feed; ``next_after`` follows them."""
    await make_events(api, 5)
    everything = await all_events(api)
    started = await api.get("/v1/events", params={"types": "job.started"})
    assert [e["position"] for e in started["events"]] == [
        e["position"] for e in everything if e["type"] == "job.started"
    ]
    both = await api.get("/v1/events", params={"types": "job.completed, key.created"})
    assert {e["type"] for e in both["events"]} == {"job.completed", "key.created"}
    assert both["next_after"] == both["events"][-1]["position"]
    j3 = await api.get("/v1/events", params={"job_id": "j3"})
    assert [(e["stream"], e["version"]) for e in j3["events"]] == [("j3", 1), ("j3", 2), ("j3", 3)]
    j3_started = await api.get("/v1/events", params={"job_id": "j3", "types": "job.started"})
    assert [e["version"] for e in j3_started["events"]] == [2]
    nothing = await api.get("/v1/events", params={"job_id": "nope", "after": 5})
    assert nothing == {"events": [], "next_after": 5}
    paged = await api.get("/v1/events", params={"types": "job.started", "limit": 2})
    rest = await api.get(
        "/v1/events", params={"types": "job.started", "after": paged["next_after"]}
    )
    assert paged["events"] + rest["events"] == started["events"]


async def test_events_refuse_bad_paging(api: Api) -> None:
    """Out-of-range ``limit`` or ``after`` is 422, not a silent clamp."""
    for params in ({"limit": 0}, {"limit": 1001}, {"after": -1}, {"after": "x"}):
        body = await api.get("/v1/events", params=params, status=422)
        assert body["error"]["code"] == "invalid"


async def test_events_are_tenant_scoped(api: Api, make_api: MakeApi) -> None:
    """A tenant's feed holds only its own events; a reader may read it."""
    await make_events(api, 3)
    globex = await make_api(tenant="globex", role="reader")
    await (await make_api(tenant="globex")).post("/v1/jobs", {"id": "g", "agent": "a"})
    theirs = await all_events(globex)
    ours = await all_events(api)
    assert {e["event_id"] for e in theirs}.isdisjoint({e["event_id"] for e in ours})
    assert [e["stream"] for e in theirs if not e["stream"].startswith("$keys/")] == ["g"]
    assert (await globex.get("/v1/events", params={"job_id": "j1"}))["events"] == []
    await Api(api.client, None).get("/v1/events", status=401)


async def test_events_follow_the_project_scope(api: Api, make_api: MakeApi) -> None:
    """A key limited to a project, or X-Project-Id, sees only that project's jobs' events."""
    await api.post("/v1/jobs", {"id": "in", "agent": "a", "project": "p1"})
    await api.post("/v1/jobs", {"id": "out", "agent": "a", "project": "p2"})
    await api.post("/v1/jobs", {"id": "none", "agent": "a"})
    await api.post("/v1/jobs/in/events", {"type": "job.started"})
    await api.post("/v1/jobs/out/events", {"type": "job.started"})
    limited = await make_api(role="reader", project="p1")
    header = await make_api(role="admin", header_project="p1")
    for who in (limited, header):
        events = await all_events(who)
        assert [(e["stream"], e["version"]) for e in events] == [("in", 1), ("in", 2)]
        assert (await who.get("/v1/events", params={"job_id": "out"}))["events"] == []
        async with stream(who) as sse:
            assert await sse.events(2) == events
    exported = await header.get("/v1/audit/export")
    assert {json.loads(line)["stream"] for line in exported.splitlines()} == {"in"}


# -- Server-Sent Events --------------------------------------------------------------------------


class Stream:
    """One open ``/v1/events/stream`` response, parsed event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self) -> dict[str, str]:
        """The next event (``id``, ``event``, ``data``) or comment (``comment``)."""
        fields: dict[str, str] = {}
        while True:
            raw = await asyncio.wait_for(self.resp.content.readline(), GUARD_SECONDS)
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\r\n")
            if not line:
                if "id" in fields:
                    return fields
                fields = {}  # e.g. the opening ``retry:`` advice
                continue
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    async def events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` events (comments skipped), with ``data`` decoded."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            item = await self.next()
            if "comment" in item:
                continue
            data = json.loads(item["data"])
            assert item["id"] == str(data["position"]) and item["event"] == data["type"]
            out.append(data)
        return out


@asynccontextmanager
async def stream(
    api: Api, *, last_id: int | None = None, after: int | None = None
) -> AsyncIterator[Stream]:
    headers = dict(api.headers)
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    params = {} if after is None else {"after": str(after)}
    resp = await api.client.get("/v1/events/stream", headers=headers, params=params)
    try:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        yield Stream(resp)
    finally:
        resp.close()  # the client hangs up mid-stream


async def test_stream_replays_then_follows(api: Api) -> None:
    """Without a cursor the stream replays the tenant's history, then sends new events live."""
    await make_events(api, 2)
    history = await all_events(api)
    async with stream(api) as sse:
        assert await sse.events(len(history)) == history
        await api.post("/v1/jobs", {"id": "new", "agent": "a"})
        await api.post("/v1/jobs/new/events", {"type": "job.started"})
        live = await sse.events(2)
    assert [(e["stream"], e["type"]) for e in live] == [
        ("new", "job.queued"),
        ("new", "job.started"),
    ]
    assert live == (await all_events(api))[-2:]


async def test_stream_resumes_after_a_position(api: Api) -> None:
    """``after`` and ``Last-Event-ID`` start the stream right after that position."""
    await make_events(api, 3)
    history = await all_events(api)
    middle = history[3]["position"]
    async with stream(api, after=middle) as sse:
        assert await sse.events(len(history) - 4) == history[4:]
    async with stream(api, last_id=middle, after=0) as sse:  # the header wins
        assert (await sse.events(1))[0] == history[4]


async def test_stream_reconnects_without_gaps_or_repeats(api: Api, make_api: MakeApi) -> None:
    """Resuming with Last-Event-ID after hanging up, while a writer appends, skips nothing."""
    writer = await make_api(role="writer")
    globex = await make_api(tenant="globex")
    start = (await all_events(api))[-1]["position"]
    stop = asyncio.Event()

    async def append() -> None:
        i = 0
        while not stop.is_set():
            await writer.post("/v1/jobs", {"id": f"c{i}", "agent": "a"})
            await writer.post(f"/v1/jobs/c{i}/events", {"type": "job.started"})
            await globex.post("/v1/jobs", {"id": f"g{i}", "agent": "a"})  # not ours to see
            i += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(append())
    received: list[dict[str, Any]] = []
    try:
        cursor = start
        for connection in range(6):
            async with stream(api, last_id=cursor) as sse:
                received.extend(await sse.events(7 + connection))
            cursor = received[-1]["position"]
    finally:
        stop.set()
        await task
    expected = await all_events(api, after=start)
    async with stream(api, after=cursor) as sse:
        received.extend(await sse.events(len(expected) - len(received)))
    assert [e["position"] for e in received] == [e["position"] for e in expected]
    assert received == expected
    assert all(not e["stream"].startswith("g") for e in received)


async def test_stream_is_tenant_scoped(api: Api, make_api: MakeApi) -> None:
    """A tenant's stream never carries another tenant's events."""
    globex = await make_api(tenant="globex", role="reader")
    globex_writer = await make_api(tenant="globex", role="writer")
    seen = await all_events(globex)  # a reader sees no key events: globex shows none yet
    after = seen[-1]["position"] if seen else 0
    async with stream(globex, after=after) as sse:
        await make_events(api, 2)
        await globex_writer.post("/v1/jobs", {"id": "mine", "agent": "a"})
        first = (await sse.events(1))[0]
    assert first["stream"] == "mine"


async def test_stream_sends_heartbeats(api: Api) -> None:
    """An idle stream sends a comment line every ``HEARTBEAT_SECONDS``."""
    assert feed.HEARTBEAT_SECONDS == 15.0  # the contract's interval
    head = (await all_events(api))[-1]["position"]
    feed.HEARTBEAT_SECONDS = 0.05  # a config knob, set back below
    try:
        async with stream(api, after=head) as sse:
            assert "comment" in await sse.next()
            assert "comment" in await sse.next()
            await api.post("/v1/jobs", {"id": "beat", "agent": "a"})
            while "comment" in (item := await sse.next()):
                pass
            assert json.loads(item["data"])["stream"] == "beat"
    finally:
        feed.HEARTBEAT_SECONDS = 15.0


async def test_stream_refuses_bad_requests(api: Api) -> None:
    """No key is 401, a bad Last-Event-ID or after is 422, all in the JSON envelope."""
    await Api(api.client, None).get("/v1/events/stream", status=401)
    body = await api.get("/v1/events/stream", headers={"Last-Event-ID": "abc"}, status=422)
    assert body["error"]["code"] == "invalid"
    for odd in ("-1", "1_0", "\u0661", "9" * 30):  # int() read the first three
        headers = {**api.headers, "Last-Event-ID": odd}
        async with api.client.get("/v1/events/stream", headers=headers) as resp:
            assert resp.status == 422, odd  # (a stream that opened would answer 200 at once)
            assert (await resp.json())["error"]["field"] == "Last-Event-ID"
    await api.get("/v1/events/stream", params={"after": "-3"}, status=422)


async def test_stream_sees_events_of_another_process(db_url: str, api: Api) -> None:
    """An event appended by the CLI in another process reaches an open stream."""
    head = (await all_events(api))[-1]["position"]
    async with stream(api, after=head) as sse:
        done = await acli("keys", "create", "--db", db_url, "--tenant", "acme", "--role", "reader")
        assert done.code == 0, done.err
        event = (await sse.events(1))[0]
    assert event["type"] == "key.created" and event["actor"] == "cli"
    assert done.last_line not in json.dumps(event)  # the secret itself is never an event


async def test_a_client_that_drops_its_stream_is_no_error(db_url: str) -> None:
    """A client that closes an event stream or a long poll before its answer is no error in a
    real server's log: the stream is ``http.client_gone`` at info, no error line, no traceback,
    no 500."""
    async with served(db_url) as server:
        key = await acreate_key(db_url, "acme")
        async with aiohttp.ClientSession(server.base, headers=key.headers) as http:
            async with http.post("/v1/jobs", json={"id": "j", "agent": "a"}) as resp:
                assert resp.status == 201
            # (the request, the log line that says the server is done with it)
            for path, done in (
                ("/v1/events/stream", '"event":"http.client_gone"'),
                ("/v1/jobs/j?wait=30&after_version=1", '"path":"/v1/jobs/j","key_id"'),
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {key.secret}\r\n\r\n".encode()
                )
                await writer.drain()
                local_port = writer.get_extra_info("sockname")[1]
                if "stream" in path:
                    assert b"200 OK" in await reader.readuntil(b"retry: 1000")
                else:
                    await wait_until(
                        lambda port=local_port: server.has_read_request_from(port),
                        10.0,
                        "the long poll",
                    )
                writer.close()
                await writer.wait_closed()
                before = server.log_text().count(done)

                async def noticed(done: str = done, before: int = before) -> bool:
                    # every commit wakes the waiting request, which then writes to no one
                    async with http.post("/v1/jobs/j/events", json={"type": "job.progressed"}):
                        pass
                    return server.log_text().count(done) > before

                await wait_until(noticed, 20.0, f"the server done with {path}")
        log = server.log_text()  # the log goes with the server
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [e for e in lines if e.get("level") in ("error", "critical")] == []
    assert "Traceback" not in log
    assert [e for e in lines if e.get("status") == 500] == []
    gone = [e for e in lines if e.get("event") == "http.client_gone"]
    assert [(e["path"], e["level"]) for e in gone] == [("/v1/events/stream", "info")]
