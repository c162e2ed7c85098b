"""Signed webhooks: a real aiohttp receiver verifies every delivery with ``standardwebhooks``.

The receiver runs in the test process; the ledger is the real app (in process, or real
``jobledger serve`` processes where restarts and several processes matter). Retry schedules are
short, so no test waits for real minutes; every wait is on a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks import Webhook, WebhookVerificationError

from api.app import create_app
from api.delivery import WEBHOOKS
from api.settings import Settings
from ledger.clock import parse_us
from tests.conftest import Api, assert_feed_hides, new_key, store_key
from tests.serverproc import Server, free_port, served

MakeApi = Callable[..., Coroutine[Any, Any, Api]]
DEADLINE = 30.0
# short delays: a retry follows in tens of milliseconds, and there are many of them
FAST_SCHEDULE = (0.0, *([0.05] * 400))
FAST_CLI_SCHEDULE = "0,0.1*300"


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(db_url=db_url, webhook_retry_schedule=FAST_SCHEDULE, webhook_timeout_s=3.0)


# -- the receiver -----------------------------------------------------------------------------


class Receiver:
    """Endpoints ``/hooks/<name>`` that verify, record and misbehave on request."""

    def __init__(self) -> None:
        self.secrets: dict[str, list[str]] = {}  # each of these must verify every delivery
        self.got: dict[str, list[dict[str, Any]]] = defaultdict(list)  # verified, accepted
        self.headers: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.hits: Counter[str] = Counter()
        self.fail_first: dict[str, int] = {}
        self.status: dict[str, int] = {}  # answer this status (after verifying)
        self.extra_headers: dict[str, dict[str, str]] = {}
        self.answer: dict[str, bytes] = {}  # answer this body (``echo``: the request's)
        self.hang: dict[str, asyncio.Event] = {}
        self.hanging: Counter[str] = Counter()
        self.bad: list[str] = []  # verification failures
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{name}"

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        self.hits[name] += 1
        if name in self.hang:
            self.hanging[name] += 1
            try:
                await self.hang[name].wait()
            finally:
                self.hanging[name] -= 1
        for secret in self.secrets.get(name, []):
            try:
                Webhook(secret).verify(body, dict(request.headers))
            except WebhookVerificationError as exc:
                self.bad.append(f"{name}: {exc}")
                return web.Response(status=400, text=str(exc))
        if self.hits[name] <= self.fail_first.get(name, 0):
            return web.Response(status=500, text="not yet")
        if name in self.answer and self.answer[name] == b"echo" and self.status.get(name) == 500:
            return web.Response(status=500, body=body)
        status = self.status.get(name, 204)
        if 200 <= status < 300:
            self.got[name].append(json.loads(body))
            self.headers[name].append(dict(request.headers))
        answer = self.answer.get(name)
        return web.Response(
            status=status,
            headers=self.extra_headers.get(name),
            body=body if answer == b"echo" else answer,
        )

    async def start(self, port: int = 0) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks/{name}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for event in self.hang.values():
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


async def until(check: Callable[[], Any], what: str, seconds: float = DEADLINE) -> Any:
    """Wait (polling) until ``check()`` is truthy; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def first_seen(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event once, where it first arrived (a receiver may see a retried one twice)."""
    seen: dict[str, dict[str, Any]] = {}
    for event in events:
        seen.setdefault(event["event_id"], event)
    return list(seen.values())


async def register(api: Api, receiver: Receiver, name: str, **fields: Any) -> dict[str, Any]:
    hook: dict[str, Any] = await api.post("/v1/webhooks", {"url": receiver.url(name), **fields})
    receiver.secrets[name] = [hook["secret"]]
    return hook


async def caught_up(api: Api, hook_id: str, position: int) -> None:
    """Wait until the endpoint's cursor has recorded ``position`` (the receiver answers
    before the ledger records its answer)."""

    async def there() -> bool:
        state = (await api.get(f"/v1/webhooks/{hook_id}"))["delivery"]
        return bool(state["position"] is not None and state["position"] >= position)

    await until(there, f"the cursor at {position}")


async def job_events(api: Api, after: int = 0) -> list[dict[str, Any]]:
    page = await api.get("/v1/events", params={"after": after, "limit": 1000})
    return [e for e in page["events"] if e["type"].startswith("job.")]


async def make_jobs(api: Api, n: int, prefix: str = "j", **fields: Any) -> None:
    for i in range(n):
        await api.post("/v1/jobs", {"id": f"{prefix}{i}", "agent": "a", **fields})
        await api.post(f"/v1/jobs/{prefix}{i}/events", {"type": "job.started"})
        await api.post(
            f"/v1/jobs/{prefix}{i}/events", {"type": "job.completed", "data": {"result": [i]}}
        )


# -- registration -----------------------------------------------------------------------------


async def test_register_answers_the_secret_once_and_no_event_holds_it(api: Api) -> None:
    """The secret is ``whsec_`` + base64, answered once; events and reads carry only its hash."""
    hook = await api.post(
        "/v1/webhooks",
        {"url": "https://example.com/hook", "event_types": ["job.completed"], "description": "d"},
    )
    assert hook["id"].startswith("wh_")
    assert hook["secret"].startswith("whsec_")
    Webhook(hook["secret"])  # the reference implementation accepts it
    assert hook["enabled"] is True and hook["event_types"] == ["job.completed"]
    got = await api.get(f"/v1/webhooks/{hook['id']}")
    assert "secret" not in got and got["url"] == "https://example.com/hook"
    listing = await api.get("/v1/webhooks")
    assert [w["id"] for w in listing["webhooks"]] == [hook["id"]]
    export = await api.get("/v1/audit/export")
    assert hook["secret"] not in export
    assert hook["secret"][6:] not in export
    events = (await api.get("/v1/events", params={"types": "webhook.registered"}))["events"]
    assert len(events) == 1
    assert events[0]["stream"] == f"$webhooks/{hook['id']}"
    assert len(events[0]["data"]["secret_sha256"]) == 64


async def test_readers_and_writers_never_see_webhook_events(
    client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Webhook events (URLs, filters, secret hashes) reach admins' feeds, never readers' or
    writers', paged or streamed; the admin-only audit export keeps them."""
    hook = await api.post("/v1/webhooks", {"url": "https://example.com/hook"})
    await api.call("PATCH", f"/v1/webhooks/{hook['id']}", json={"description": "d"})
    await api.post(f"/v1/webhooks/{hook['id']}/rotate", status=200)
    await api.delete(f"/v1/webhooks/{hook['id']}")
    reader = await make_api(role="reader")
    writer = await make_api(role="writer")
    await writer.post("/v1/jobs", {"id": "seen", "agent": "a"})
    admin_types = {e["type"] for e in (await api.get("/v1/events"))["events"]}
    webhook_types = {
        "webhook.registered",
        "webhook.updated",
        "webhook.secret_rotated",
        "webhook.deleted",
    }
    assert webhook_types <= admin_types
    for who in (reader, writer):
        await assert_feed_hides(client, who, sorted(webhook_types), [b"webhook.", b"example.com"])
    export = await api.get("/v1/audit/export")
    assert all(f'"{t}"' in export for t in webhook_types)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "http://example.com/hook"}, "url"),
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "https://"}, "url"),
        ({"url": "https://example.com/a b"}, "url"),
        ({"url": "https://example.com/", "event_types": ["job.nope"]}, "event_types[0]"),
        ({"url": "https://example.com/", "event_types": ["key.created"]}, "event_types[0]"),
        ({"url": "https://example.com/", "event_types": []}, "event_types"),
        ({"url": "https://example.com/", "colour": "red"}, "colour"),
    ],
)
async def test_bad_registrations_are_422(api: Api, body: dict[str, Any], field: str) -> None:
    """A plain-http, odd-scheme or unknown-type registration is refused, naming the field."""
    answer = await api.post("/v1/webhooks", body, status=422)
    assert answer["error"]["field"] == field


async def test_roles_unknown_ids_and_empty_changes(api: Api, make_api: MakeApi) -> None:
    """Writers cannot manage webhooks, unknown ids are 404, an empty PATCH is 422."""
    writer = await make_api(role="writer")
    await writer.post("/v1/webhooks", {"url": "https://example.com/"}, status=403)
    await api.get("/v1/webhooks/wh_nope", status=404)
    await api.call("PATCH", "/v1/webhooks/wh_nope", json={"description": "x"}, status=404)
    await api.post("/v1/webhooks/wh_nope/rotate", status=404)
    await api.post("/v1/webhooks/wh_nope/recover", {"since": 1}, status=404)
    hook = await api.post("/v1/webhooks", {"url": "https://example.com/"})
    await api.call("PATCH", f"/v1/webhooks/{hook['id']}", json={}, status=422)
    bad = await api.post(f"/v1/webhooks/{hook['id']}/recover", {"since": "soon"}, status=422)
    assert bad["error"]["field"] == "since"
    other = await make_api(tenant="other")
    await other.get(f"/v1/webhooks/{hook['id']}", status=404)
    await other.get(f"/v1/webhooks/{hook['id']}/deliveries", status=404)
    await other.call("PATCH", f"/v1/webhooks/{hook['id']}", json={}, status=404)
    await other.post(f"/v1/webhooks/{hook['id']}/rotate", status=404)
    await other.post(f"/v1/webhooks/{hook['id']}/recover", status=404)
    await other.delete(f"/v1/webhooks/{hook['id']}", status=404)
    assert (await other.get("/v1/webhooks"))["webhooks"] == []
    await api.delete(f"/v1/webhooks/{hook['id']}")
    await api.get(f"/v1/webhooks/{hook['id']}", status=404)
    await api.delete(f"/v1/webhooks/{hook['id']}", status=404)


async def test_openapi_documents_the_webhook_routes(api: Api) -> None:
    """Every webhook route is in /v1/openapi.json."""
    doc = await api.get("/v1/openapi.json")
    paths = doc["paths"]
    assert set(paths["/v1/webhooks"]) == {"get", "post"}
    assert set(paths["/v1/webhooks/{id}"]) == {"get", "patch", "delete"}
    for tail in ("rotate", "recover"):
        assert "post" in paths[f"/v1/webhooks/{{id}}/{tail}"]
    assert "get" in paths["/v1/webhooks/{id}/deliveries"]


# -- delivery ---------------------------------------------------------------------------------


async def test_every_job_event_arrives_signed_and_in_order(api: Api, receiver: Receiver) -> None:
    """Each job event arrives once, in position order, as the feed shows it, signed."""
    hook = await register(api, receiver, "all")
    await make_jobs(api, 4)
    expected = await job_events(api, after=0)
    await until(lambda: len(receiver.got["all"]) >= len(expected), "every job event")
    assert receiver.got["all"] == expected
    assert not receiver.bad
    for headers, event in zip(receiver.headers["all"], expected, strict=True):
        assert headers["webhook-id"] == event["event_id"]
        assert headers["webhook-signature"].startswith("v1,")
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300
    await caught_up(api, hook["id"], expected[-1]["position"])
    log = await api.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": 1000})
    assert {d["outcome"] for d in log["deliveries"]} == {"delivered"}
    assert sorted(d["position"] for d in log["deliveries"]) == [e["position"] for e in expected]
    assert log["delivery"]["position"] == expected[-1]["position"]


async def test_event_type_and_project_filters(
    api: Api, make_api: MakeApi, receiver: Receiver
) -> None:
    """An endpoint gets only the types and the project it asked for; other tenants' never."""
    await register(api, receiver, "done", event_types=["job.completed"])
    await register(api, receiver, "p1", project="p1")
    await register(api, receiver, "started", event_types=["job.started", "credits.*"])
    other = await make_api(tenant="other")
    await make_jobs(other, 2, prefix="o")
    await make_jobs(api, 2, prefix="a", project="p1")
    await make_jobs(api, 2, prefix="b", project="p2")
    await api.post("/v1/credits/grants", {"account": "default", "amount": 5})
    everything = await job_events(api)
    p1 = [e for e in everything if e["stream"].startswith("a")]
    completed = [e for e in everything if e["type"] == "job.completed"]
    await until(lambda: len(receiver.got["p1"]) >= len(p1), "project p1's events")
    await until(lambda: len(receiver.got["done"]) >= len(completed), "completions")
    await until(lambda: len(receiver.got["started"]) >= 5, "starts and the grant")
    assert receiver.got["p1"] == p1
    assert receiver.got["done"] == completed
    types = [e["type"] for e in receiver.got["started"]]
    assert types == ["job.started"] * 4 + ["credits.granted"]
    assert not any(e["stream"].startswith("o") for got in receiver.got.values() for e in got)


async def test_failing_receiver_gets_each_event_once_after_retries(
    api: Api, receiver: Receiver
) -> None:
    """A receiver failing the first 3 times gets the event once; the log shows every attempt."""
    receiver.fail_first["flaky"] = 3
    hook = await register(api, receiver, "flaky")
    await api.post("/v1/jobs", {"id": "f1", "agent": "a"})
    await api.post("/v1/jobs/f1/events", {"type": "job.started"})
    expected = await job_events(api)
    await until(lambda: len(receiver.got["flaky"]) >= 2, "both events")
    assert receiver.got["flaky"] == expected
    assert receiver.hits["flaky"] == 5
    await caught_up(api, hook["id"], expected[-1]["position"])
    log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries"))["deliveries"]
    first = sorted(
        (d for d in log if d["position"] == expected[0]["position"]), key=lambda d: d["attempt"]
    )
    assert [d["attempt"] for d in first] == [1, 2, 3, 4]
    assert [d["outcome"] for d in first] == ["failed"] * 3 + ["delivered"]
    assert [d["response_status"] for d in first] == [500, 500, 500, 204]
    assert all(d["next_retry_at"] is not None for d in first[:3])
    assert first[0]["response_body"] == "not yet"
    assert all(d["latency_ms"] >= 0 for d in first)
    after = await api.get(f"/v1/webhooks/{hook['id']}")
    assert after["delivery"]["failing_since"] is None and after["delivery"]["attempt"] == 0


async def test_retry_after_is_honoured(api: Api, receiver: Receiver) -> None:
    """A 503 with ``Retry-After: 2`` schedules the next attempt at least 2 s later."""
    hook = await register(api, receiver, "busy")
    receiver.status["busy"] = 503
    receiver.extra_headers["busy"] = {"Retry-After": "2"}
    await api.post("/v1/jobs", {"id": "r1", "agent": "a"})
    log: list[dict[str, Any]] = []

    async def failed_once() -> bool:
        nonlocal log
        log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries"))["deliveries"]
        return any(d["outcome"] == "failed" and d["response_status"] == 503 for d in log)

    await until(failed_once, "a 503")
    first = next(d for d in log if d["response_status"] == 503)
    wait = parse_us(first["next_retry_at"], field="t") - parse_us(first["attempted_at"], field="t")
    assert wait >= 2_000_000
    receiver.status["busy"] = 204
    receiver.extra_headers["busy"] = {}
    await until(lambda: len(receiver.got["busy"]) == 1, "the delivery after Retry-After")


async def test_410_gone_disables_and_reenabling_resumes(api: Api, receiver: Receiver) -> None:
    """410 disables the endpoint with an event; re-enabling it delivers what was waiting."""
    receiver.status["gone"] = 410
    hook = await register(api, receiver, "gone")
    await api.post("/v1/jobs", {"id": "g1", "agent": "a"})

    async def disabled() -> bool:
        got = await api.get(f"/v1/webhooks/{hook['id']}")
        return got["enabled"] is False

    await until(disabled, "the endpoint disabled")
    got = await api.get(f"/v1/webhooks/{hook['id']}")
    assert "410" in got["disabled_reason"]
    events = (await api.get("/v1/events", params={"types": "webhook.disabled"}))["events"]
    assert [e["data"]["code"] for e in events] == ["gone"]
    assert events[0]["actor"] == "system:webhooks"
    assert receiver.hits["gone"] == 1
    receiver.status["gone"] = 204
    await api.call("PATCH", f"/v1/webhooks/{hook['id']}", json={"enabled": True}, status=200)
    await until(lambda: len(receiver.got["gone"]) == 1, "the waiting event")
    assert receiver.got["gone"][0]["stream"] == "g1"


async def test_an_endpoint_failing_too_long_is_disabled(
    db_url: str,
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
    receiver: Receiver,
) -> None:
    """Past ``webhook_disable_after_s`` of failures the endpoint is disabled, saying why."""
    app = create_app(
        Settings(db_url=db_url, webhook_retry_schedule=FAST_SCHEDULE, webhook_disable_after_s=0.3)
    )
    client = await aiohttp_client(app)
    from api.context import STORE

    api = Api(client, await new_key(app[STORE], "acme"))
    receiver.status["down"] = 500
    hook = await register(api, receiver, "down")
    await api.post("/v1/jobs", {"id": "d1", "agent": "a"})

    async def disabled() -> bool:
        return (await api.get(f"/v1/webhooks/{hook['id']}"))["enabled"] is False

    await until(disabled, "the endpoint disabled")
    events = (await api.get("/v1/events", params={"types": "webhook.disabled"}))["events"]
    assert [e["data"]["code"] for e in events] == ["failing"]
    assert "failed for" in events[0]["data"]["reason"]
    assert app[WEBHOOKS].stats.disabled == 1
    assert app[WEBHOOKS].stats.failed >= 2


async def test_a_schedule_spent_gives_the_event_up_and_moves_on(
    db_url: str,
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
    receiver: Receiver,
) -> None:
    """Once every scheduled attempt failed the event is given up and the next one goes out."""
    app = create_app(Settings(db_url=db_url, webhook_retry_schedule=(0.0, 0.01, 0.01)))
    client = await aiohttp_client(app)
    from api.context import STORE

    api = Api(client, await new_key(app[STORE], "acme"))
    receiver.fail_first["spent"] = 3
    hook = await register(api, receiver, "spent")
    await api.post("/v1/jobs", {"id": "s1", "agent": "a"})
    await api.post("/v1/jobs/s1/events", {"type": "job.started"})
    await until(lambda: len(receiver.got["spent"]) == 1, "the second event")
    assert receiver.got["spent"][0]["type"] == "job.started"
    await caught_up(api, hook["id"], receiver.got["spent"][0]["position"])
    log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries"))["deliveries"]
    assert [d["outcome"] for d in reversed(log)] == ["failed", "failed", "gave_up", "delivered"]
    assert app[WEBHOOKS].stats.gave_up == 1


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    api: Api, receiver: Receiver
) -> None:
    """After a rotation each delivery verifies with the old secret and with the new one."""
    hook = await register(api, receiver, "rot")
    old = hook["secret"]
    rotated = await api.post(f"/v1/webhooks/{hook['id']}/rotate", status=200)
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old
    expires = parse_us(rotated["previous_secret_expires_at"], field="t")
    assert expires - time.time_ns() // 1000 > 23 * 3600 * 1_000_000
    receiver.secrets["rot"] = [old, new]  # each one alone must verify
    await api.post("/v1/jobs", {"id": "x1", "agent": "a"})
    await until(lambda: len(receiver.got["rot"]) == 1, "the delivery")
    assert not receiver.bad
    assert len(receiver.headers["rot"][0]["webhook-signature"].split(" ")) == 2
    events = (await api.get("/v1/events", params={"types": "webhook.secret_rotated"}))["events"]
    assert len(events) == 1 and new not in json.dumps(events)


async def test_the_old_secret_stops_signing_after_the_overlap(api: Api, store: Any) -> None:
    """24 h after a rotation only the new secret signs."""
    from ledger import webhooks as hooks
    from ledger.clock import now_us

    hook = await api.post("/v1/webhooks", {"url": "https://example.com/"})
    rotated = await api.post(f"/v1/webhooks/{hook['id']}/rotate", status=200)
    tenant = "acme"
    async with store.backend.read() as conn:
        now = await hooks.signing_secrets(conn, tenant, hook["id"], now_us())
        later = await hooks.signing_secrets(
            conn, tenant, hook["id"], now_us() + hooks.ROTATION_OVERLAP_US + 1_000_000
        )
    assert now == [rotated["secret"], hook["secret"]]
    assert later == [rotated["secret"]]


async def test_idempotent_registration_and_deletion_forgets_the_answer(api: Api) -> None:
    """A repeated Idempotency-Key answers the same endpoint; deleting it forgets that answer."""
    headers = {"Idempotency-Key": "reg-1"}
    body = {"url": "https://example.com/"}
    first = await api.post("/v1/webhooks", body, headers=headers)
    again = await api.post("/v1/webhooks", body, headers=headers)
    assert again == first
    assert len((await api.get("/v1/webhooks"))["webhooks"]) == 1
    await api.delete(f"/v1/webhooks/{first['id']}")
    fresh = await api.post("/v1/webhooks", body, headers=headers)
    assert fresh["id"] != first["id"] and fresh["secret"] != first["secret"]


async def test_recover_sends_again_from_a_position_or_a_time(api: Api, receiver: Receiver) -> None:
    """Recovery re-sends every matching event from the position (or time) given, re-signed."""
    hook = await register(api, receiver, "rec")
    await make_jobs(api, 2)
    expected = await job_events(api)
    await until(lambda: len(receiver.got["rec"]) == len(expected), "the first round")
    await caught_up(api, hook["id"], expected[-1]["position"])
    since = expected[2]["position"]
    answer = await api.post(f"/v1/webhooks/{hook['id']}/recover", {"since": since}, status=202)
    assert answer["from_position"] == since - 1
    total = len(expected) + len(expected[2:])
    await until(lambda: len(receiver.got["rec"]) == total, "the recovery")
    assert receiver.got["rec"][len(expected) :] == expected[2:]
    assert not receiver.bad
    await api.post(
        f"/v1/webhooks/{hook['id']}/recover", {"since": expected[0]["occurred_at"]}, status=202
    )
    await until(lambda: len(receiver.got["rec"]) == total + len(expected), "the recovery by time")
    assert receiver.got["rec"][total:] == expected


async def test_erasure_applies_to_events_waiting_for_delivery(api: Api, receiver: Receiver) -> None:
    """A job redacted while its events wait for delivery goes out erased."""
    receiver.status["slow"] = 503
    hook = await register(api, receiver, "slow")
    await api.post("/v1/jobs", {"id": "pii", "agent": "a", "params": {"email": "ann@example.com"}})
    await until(lambda: receiver.hits["slow"] >= 1, "a failed attempt")
    await api.post("/v1/jobs/pii/redact", {"reason": "gdpr"}, status=200)
    receiver.status["slow"] = 204
    await until(lambda: len(receiver.got["slow"]) == 2, "the queued and redacted events")
    queued, redacted = receiver.got["slow"]
    assert queued["type"] == "job.queued" and queued["data"] is None and queued["redacted"]
    assert redacted["type"] == "job.redacted"
    assert "ann@example.com" not in json.dumps(receiver.got["slow"])
    await caught_up(api, hook["id"], redacted["position"])
    log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries"))["deliveries"]
    assert any(d["response_status"] == 503 for d in log)


async def test_redirects_are_not_followed_and_answers_are_read_bounded(
    api: Api, receiver: Receiver
) -> None:
    """A 3xx is a failed attempt (its target never called); a huge answer is logged cut short."""
    receiver.status["moved"] = 302
    receiver.extra_headers["moved"] = {"Location": receiver.url("target")}
    receiver.status["big"] = 500
    receiver.answer["big"] = b"x" * 5_000_000
    moved = await register(api, receiver, "moved")
    big = await register(api, receiver, "big")
    await api.post("/v1/jobs", {"id": "m1", "agent": "a"})
    logs: dict[str, list[dict[str, Any]]] = {}

    async def attempted() -> bool:
        for hook in (moved, big):
            logs[hook["id"]] = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries"))[
                "deliveries"
            ]
        return all(logs.values())

    await until(attempted, "an attempt at each")
    assert logs[moved["id"]][-1]["response_status"] == 302
    assert logs[moved["id"]][-1]["outcome"] == "failed"
    assert receiver.hits["target"] == 0
    assert logs[big["id"]][-1]["response_status"] == 500
    assert logs[big["id"]][-1]["response_body"] == "x" * 1024


async def test_redaction_erases_what_receivers_echoed(api: Api, receiver: Receiver) -> None:
    """A receiver's answer that echoed a job's data leaves the delivery log on redaction."""
    receiver.status["echo"] = 500
    receiver.answer["echo"] = b"echo"
    hook = await register(api, receiver, "echo")
    await api.post("/v1/jobs", {"id": "e1", "agent": "a", "params": {"email": "bo@example.com"}})

    async def echoed() -> bool:
        log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries"))["deliveries"]
        return any("bo@example.com" in (d["response_body"] or "") for d in log)

    await until(echoed, "an echoed answer")
    await api.post("/v1/jobs/e1/redact", {"reason": "gdpr"}, status=200)
    log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries"))["deliveries"]
    old = [d for d in log if d["event_type"] == "job.queued"]
    assert old and all("bo@example.com" not in (d["response_body"] or "") for d in old)
    await api.delete(f"/v1/webhooks/{hook['id']}")  # stop the retries


async def test_allowed_hosts_may_use_plain_http(
    db_url: str,
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
) -> None:
    """``--webhook-allow-host`` lets named hosts use http; others still need https."""
    app = create_app(Settings(db_url=db_url, webhook_allow_hosts=("receiver.internal",)))
    client = await aiohttp_client(app)
    from api.context import STORE

    api = Api(client, await new_key(app[STORE], "acme"))
    await api.post("/v1/webhooks", {"url": "http://receiver.internal:8000/hook"})
    await api.post("/v1/webhooks", {"url": "http://localhost:9/hook"})
    await api.post("/v1/webhooks", {"url": "http://[::1]:9/hook"})
    await api.post("/v1/webhooks", {"url": "http://other.internal/hook"}, status=422)
    hook = await api.post("/v1/webhooks", {"url": "https://example.com/"})
    await api.call(
        "PATCH", f"/v1/webhooks/{hook['id']}", json={"url": "http://x.example/"}, status=422
    )


async def test_private_addresses_are_refused_unless_allowed(
    db_url: str,
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
) -> None:
    """No delivery to the operator's internal network: private, link-local (the cloud metadata
    service), unspecified and IPv4-mapped private addresses are 422 unless allowed by name."""
    app = create_app(Settings(db_url=db_url, webhook_allow_hosts=("10.9.9.9",)))
    client = await aiohttp_client(app)
    from api.context import STORE

    api = Api(client, await new_key(app[STORE], "acme"))
    for url in (
        "https://10.1.2.3/hook",
        "https://192.168.0.7/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::ffff:192.168.1.1]/hook",
        "https://[fe80::1]/hook",
        "https://0.0.0.0/hook",
        "https://100.64.0.1/hook",
    ):
        got = await api.post("/v1/webhooks", {"url": url}, status=422)
        assert got["error"]["field"] == "url" and "private" in got["error"]["message"], url
    await api.post("/v1/webhooks", {"url": "https://10.9.9.9/hook"})  # named by the operator
    await api.post("/v1/webhooks", {"url": "https://127.0.0.1:9/hook"})  # loopback by name


async def _refused_as_private(api: Api, webhook_id: str, urls: Sequence[str]) -> None:
    """Each of ``urls`` is 422 on ``url`` as an address deliveries may not reach, both when
    registering an endpoint and when changing endpoint ``webhook_id`` to it."""
    for url in urls:
        got = await api.post("/v1/webhooks", {"url": url}, status=422)
        assert got["error"]["field"] == "url" and "private" in got["error"]["message"], url
        got = await api.call("PATCH", f"/v1/webhooks/{webhook_id}", json={"url": url}, status=422)
        assert got["error"]["field"] == "url", url


# Hosts that are names to a URL parser but IP addresses on the wire: IDNA folds full-width and
# circled digits and ideographic full stops (NFKC), and aiohttp connects to what it gets.
UNICODE_INTERNAL_URLS = (
    "https://\uff11\uff19\uff12.\uff11\uff16\uff18.\uff10.\uff17/hook",  # 192.168.0.7
    "https://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/",
    "https://10\u30020\u30020\u30021/hook",  # ideographic full stops: 10.0.0.1
    "https://\u2460\u24ea.0.0.1/hook",  # circled digits: 10.0.0.1
)


async def test_hosts_that_are_internal_addresses_on_the_wire_are_refused(api: Api) -> None:
    """A host in full-width or circled digits, or with ideographic full stops, is judged as the
    IP address it becomes on the wire: 422 at registration and on PATCH. The same host of a
    public address is accepted."""
    hook = await api.post("/v1/webhooks", {"url": "https://example.com/hook"})
    await _refused_as_private(api, hook["id"], UNICODE_INTERNAL_URLS)
    assert [w["id"] for w in (await api.get("/v1/webhooks"))["webhooks"]] == [hook["id"]]
    public = "https://\uff18.\uff18.\uff18.\uff18/hook"  # 8.8.8.8
    assert (await api.post("/v1/webhooks", {"url": public}))["url"] == public


def test_the_ledger_judges_a_host_in_its_ascii_form() -> None:
    """``check_url`` folds an internationalized host as IDNA does before judging it."""
    from ledger.errors import Invalid
    from ledger.webhooks import check_url

    for url in UNICODE_INTERNAL_URLS:
        with pytest.raises(Invalid, match="private"):
            check_url(url)
    for url in ("https://127.1/", "https://2130706433/", "https://10.0.0.1./"):
        with pytest.raises(Invalid, match="written like an IPv4 address"):
            check_url(url)  # what a resolver, or aiohttp itself, takes for an address
    rtl = "https://\u0627\u0661\u0662\u0663.com/"  # valid in IDNA 2008, not in Python's 2003
    assert check_url(rtl) == rtl


def test_every_attempt_checks_the_url_as_aiohttp_sends_it() -> None:
    """Before each attempt the URL is checked as given and in yarl's normalised form, whose
    host aiohttp connects to without asking the resolver when it is an IP address."""
    from api.delivery import check_target
    from ledger.errors import Invalid

    for url in UNICODE_INTERNAL_URLS:
        with pytest.raises(Invalid, match="private"):
            check_target(url, ())
    with pytest.raises(Invalid, match="not a valid URL"):
        check_target("https://10.0.0.1:443\uff03@example.com/", ())
    with pytest.raises(Invalid, match="not a valid URL"):
        check_target("https://" + "\u00e9" * 64 + ".example/", ())  # a label over 63
    rtl = "https://\u0627\u0661\u0662\u0663.com/"  # sent as xn--mgb0jde.com
    assert check_target(rtl, ()) == rtl
    assert check_target("https://\uff45xample.com/hook", ()) == "https://\uff45xample.com/hook"
    allowed = "https://\uff11\uff10.\uff10.\uff10.\uff11/hook"
    assert check_target(allowed, ("10.0.0.1",)) == allowed  # allowed by the operator, by name


EMBEDDED_IPV4_URLS = (
    "https://[64:ff9b::a00:1]/hook",
    "https://[64:ff9b::a9fe:a9fe]/hook",
    "https://[64:ff9b:1::a00:1]/hook",
    "https://[2002:a9fe:a9fe::1]/hook",
    "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook",
    "https://[::a9fe:a9fe]/hook",
    "https://[fec0::1]/hook",
)


async def test_ipv6_that_reaches_internal_ipv4_is_refused(api: Api) -> None:
    """NAT64, 6to4, Teredo, IPv4-compatible and site-local addresses are 422 at registration
    and on PATCH; an endpoint's URL keeps its last allowed value."""
    hook = await api.post("/v1/webhooks", {"url": "https://example.com/hook"})
    await _refused_as_private(api, hook["id"], EMBEDDED_IPV4_URLS)
    assert (await api.get(f"/v1/webhooks/{hook['id']}"))["url"] == "https://example.com/hook"
    assert [w["id"] for w in (await api.get("/v1/webhooks"))["webhooks"]] == [hook["id"]]
    await api.post("/v1/webhooks", {"url": "https://[64:ff9b::808:808]/hook"})  # public behind


@pytest.mark.parametrize(
    ("host", "address", "allowed"),
    [
        ("example.com", "93.184.215.14", True),
        ("example.com", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("example.com", "127.0.0.1", False),  # a public name rebound to loopback
        ("localhost", "127.0.0.1", True),
        ("localhost", "::1", True),
        ("example.com", "10.0.0.1", False),
        ("example.com", "172.16.5.4", False),
        ("example.com", "169.254.169.254", False),
        ("example.com", "::ffff:10.0.0.1", False),
        ("example.com", "fd00::1", False),
        ("example.com", "224.0.0.1", False),
        ("example.com", "not an address", False),
        ("hooks.internal", "10.0.0.1", True),  # allowed by name
        # IPv6 that reaches IPv4: judged by the IPv4 address behind it
        ("example.com", "64:ff9b::a00:1", False),  # NAT64 to 10.0.0.1
        ("example.com", "64:ff9b::a9fe:a9fe", False),  # NAT64 to the metadata service
        ("example.com", "64:ff9b::7f00:1", False),  # NAT64 to loopback
        ("example.com", "64:ff9b::808:808", True),  # NAT64 to a public address
        ("example.com", "64:ff9b:1::808:808", False),  # local-use NAT64: the operator's own
        ("example.com", "2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("example.com", "2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("example.com", "2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("example.com", "::a9fe:a9fe", False),  # IPv4-compatible 169.254.169.254
        ("example.com", "::a00:1", False),  # IPv4-compatible 10.0.0.1
        ("example.com", "fec0::1", False),  # site-local (deprecated, still routed inside)
        ("example.com", "fec0:1::a", False),
        ("hooks.internal", "64:ff9b::a00:1", True),  # allowed by name
    ],
)
def test_the_address_rule(host: str, address: str, allowed: bool) -> None:
    from ledger.webhooks import address_allowed

    assert address_allowed(host, address, ("hooks.internal",)) is allowed


async def test_names_that_resolve_to_internal_addresses_are_not_connected() -> None:
    """The rule runs on the resolved addresses the connection would use: ``127.1`` is no IP
    literal to a URL parser but resolves to 127.0.0.1, and is refused; ``localhost`` is not."""
    from api.delivery import GuardedResolver

    resolver = GuardedResolver(())
    try:
        assert {r["host"] for r in await resolver.resolve("localhost", 443)} <= {
            "127.0.0.1",
            "::1",
        }
        with pytest.raises(OSError, match="private, link-local or reserved"):
            await resolver.resolve("127.1", 443)
    finally:
        await resolver.close()


def test_serve_takes_the_webhook_options() -> None:
    """``serve`` parses the webhook flags into the settings; a bad schedule is a usage error."""
    from api.cli import _webhook_settings, build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "--webhook-allow-host",
            "a.internal",
            "--webhook-allow-host",
            "b.internal",
            "--webhook-retry-schedule",
            "0,500ms,5s*2,1m",
            "--webhook-disable-after",
            "2d",
            "--webhook-timeout",
            "5",
        ]
    )
    assert _webhook_settings(args) == {
        "webhook_allow_hosts": ("a.internal", "b.internal"),
        "webhook_retry_schedule": (0.0, 0.5, 5.0, 5.0, 60.0),
        "webhook_disable_after_s": 172800.0,
        "webhook_timeout_s": 5.0,
    }
    assert _webhook_settings(parser.parse_args(["serve"])) == {}
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["serve", "--webhook-retry-schedule", "soon"])
    assert exc.value.code == 2


async def test_rebuild_reproduces_the_webhooks_read_model(
    api: Api, receiver: Receiver, db_url: str, store: Any
) -> None:
    """``rebuild --verify`` folds the webhook events into the same read model, and notices
    a tampered one."""
    from tests.serverproc import acli

    receiver.status["g"] = 410
    gone = await register(api, receiver, "g", event_types=["job.*"], project="p")
    kept = await register(api, receiver, "k", description="kept")
    await api.call("PATCH", f"/v1/webhooks/{kept['id']}", json={"description": "x"}, status=200)
    await api.post(f"/v1/webhooks/{kept['id']}/rotate", status=200)
    dropped = await register(api, receiver, "d")
    await api.delete(f"/v1/webhooks/{dropped['id']}")
    await api.post("/v1/jobs", {"id": "q1", "agent": "a", "project": "p"})

    async def disabled() -> bool:
        return (await api.get(f"/v1/webhooks/{gone['id']}"))["enabled"] is False

    await until(disabled, "the 410 to disable")
    done = await acli("rebuild", "--db", db_url, "--projection", "webhooks", "--verify")
    assert done.code == 0, done.err
    assert json.loads(done.last_line)["identical"] is True

    async def tamper(uow: Any) -> None:
        await uow.conn.execute("UPDATE webhooks SET url = 'https://evil.example/'")

    await store.execute(tamper, tenants=())
    bad = await acli("rebuild", "--db", db_url, "--projection", "webhooks", "--verify")
    assert bad.code == 1 and "webhooks" in bad.err


async def test_a_hanging_receiver_does_not_delay_the_api_or_other_endpoints(
    api: Api, receiver: Receiver
) -> None:
    """While one receiver hangs, the API answers and another endpoint gets its events."""
    receiver.hang["hang"] = asyncio.Event()
    hang = await register(api, receiver, "hang")
    await register(api, receiver, "ok")
    await api.post("/v1/jobs", {"id": "h0", "agent": "a"})
    await until(lambda: receiver.hanging["hang"] == 1, "the hanging request")
    await make_jobs(api, 3)  # the API answers while the request hangs
    expected = await job_events(api)
    await until(lambda: len(receiver.got["ok"]) == len(expected), "the healthy endpoint")
    assert receiver.hanging["hang"] == 1  # still hanging all along
    assert receiver.got["ok"] == expected

    async def timed_out() -> bool:
        log = (await api.get(f"/v1/webhooks/{hang['id']}/deliveries"))["deliveries"]
        return any(d["error"] == "timed out" for d in log)

    await until(timed_out, "the attempt to time out")
    receiver.hang.pop("hang").set()
    # at least once: the receiver may still process the request the ledger gave up waiting for
    await until(lambda: len(first_seen(receiver.got["hang"])) == len(expected), "the rest")
    assert first_seen(receiver.got["hang"]) == expected


async def test_deleting_erases_the_secret_and_stops_delivery(
    api: Api, receiver: Receiver, store: Any
) -> None:
    """A deleted endpoint gets nothing more and its secret is gone from the database."""
    hook = await register(api, receiver, "del")
    await api.delete(f"/v1/webhooks/{hook['id']}")
    async with store.backend.read() as conn:
        rows = await conn.fetchall("SELECT secret FROM webhook_secrets")
    assert rows == []
    await api.post("/v1/jobs", {"id": "z1", "agent": "a"})
    other = await register(api, receiver, "after")
    await api.post("/v1/jobs", {"id": "z2", "agent": "a"})
    await until(lambda: len(receiver.got["after"]) == 1, "the other endpoint")
    assert receiver.hits["del"] == 0
    assert other["id"] != hook["id"]


# -- real server processes --------------------------------------------------------------------


async def _post(http: aiohttp.ClientSession, path: str, body: Any) -> Any:
    async with http.post(path, json=body) as resp:
        assert resp.status in (200, 201), f"{path}: {resp.status} {await resp.text()}"
        return await resp.json()


async def _events(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with http.get("/v1/events", params={"limit": "1000"}) as resp:
        assert resp.status == 200
        events: list[dict[str, Any]] = (await resp.json())["events"]
    return [e for e in events if e["type"].startswith("job.")]


@pytest.mark.slow
async def test_a_receiver_down_across_a_restart_loses_nothing(db_url: str, tmp_path: Any) -> None:
    """Events waiting for a dead receiver survive a server restart and go out from the cursor."""
    key = await store_key(db_url, "acme")
    port = free_port()
    receiver = Receiver()
    server = Server(db_url, "--webhook-retry-schedule", FAST_CLI_SCHEDULE, log_dir=tmp_path)
    try:
        await server.astart()
        async with aiohttp.ClientSession(server.base, headers=key.headers) as http:
            hook = await _post(http, "/v1/webhooks", {"url": f"http://127.0.0.1:{port}/hooks/r"})
            receiver.secrets["r"] = [hook["secret"]]
            for i in range(3):
                await _post(http, "/v1/jobs", {"id": f"before{i}", "agent": "a"})

            async def failing() -> bool:
                async with http.get(f"/v1/webhooks/{hook['id']}/deliveries") as resp:
                    log = (await resp.json())["deliveries"]
                return any(d["outcome"] == "failed" for d in log)

            await until(failing, "a failed attempt")
        assert await server.terminate() == 0
        await server.astart()
        async with aiohttp.ClientSession(server.base, headers=key.headers) as http:
            for i in range(3):
                await _post(http, "/v1/jobs", {"id": f"after{i}", "agent": "a"})
            expected = await _events(http)
            await receiver.start(port)
            await until(lambda: len(receiver.got["r"]) >= len(expected), "every event")
            assert receiver.got["r"] == expected
            assert not receiver.bad

            async def at_head() -> bool:
                async with http.get(f"/v1/webhooks/{hook['id']}") as resp:
                    state = (await resp.json())["delivery"]
                return bool(state["position"] == expected[-1]["position"])

            await until(at_head, "the cursor at the head")
        assert hook["secret"] not in server.log_text()
        assert hook["secret"][6:] not in server.log_text()
    finally:
        server.stop()
        await receiver.stop()


@pytest.mark.slow
async def test_two_processes_deliver_each_event_once(db_url: str, receiver: Receiver) -> None:
    """Two servers over one database share the deliveries: each event arrives once, in order."""
    key = await store_key(db_url, "acme")
    async with (
        served(db_url, "--webhook-retry-schedule", FAST_CLI_SCHEDULE) as one,
        served(db_url, "--webhook-retry-schedule", FAST_CLI_SCHEDULE) as two,
        aiohttp.ClientSession(one.base, headers=key.headers) as http1,
        aiohttp.ClientSession(two.base, headers=key.headers) as http2,
    ):
        for name in ("a", "b", "c"):
            hook = await _post(http1, "/v1/webhooks", {"url": receiver.url(name)})
            receiver.secrets[name] = [hook["secret"]]

        async def writer(http: aiohttp.ClientSession, prefix: str) -> None:
            for i in range(15):
                await _post(http, "/v1/jobs", {"id": f"{prefix}{i}", "agent": "a"})
                await _post(http, f"/v1/jobs/{prefix}{i}/events", {"type": "job.started"})

        await asyncio.gather(writer(http1, "x"), writer(http2, "y"))
        expected = await _events(http1)
        assert len(expected) == 60
        for name in ("a", "b", "c"):
            await until(lambda n=name: len(receiver.got[n]) >= len(expected), f"endpoint {name}")
        for name in ("a", "b", "c"):
            assert receiver.got[name] == expected  # once each, in position order
            assert receiver.hits[name] == len(expected)
        assert not receiver.bad


async def test_metrics_count_deliveries(api: Api, receiver: Receiver, client: Any) -> None:
    """``/metrics`` shows this process's deliveries, failures and each endpoint's lag."""
    from prometheus_client.parser import text_string_to_metric_families

    receiver.fail_first["m"] = 1
    hook = await register(api, receiver, "m")
    await make_jobs(api, 1)
    expected = await job_events(api, after=0)
    await until(lambda: len(first_seen(receiver.got["m"])) >= len(expected), "the deliveries")
    await caught_up(api, hook["id"], expected[-1]["position"])

    async def scrape() -> dict[str, float]:
        async with client.get("/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return {
            sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    samples = await scrape()
    assert samples["jobledger_webhook_delivered_total[]"] >= len(expected)
    assert samples["jobledger_webhook_failed_total[]"] >= 1
    labels = sorted({"tenant": "acme", "webhook_id": hook["id"]}.items())
    assert f"jobledger_webhook_lag_events{labels}" in samples
