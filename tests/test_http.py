"""Section 3 of the contract: auth, roles, tenancy, projects, errors, limits, OpenAPI."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app
from api.auth import KEY_CACHE_SECONDS
from api.settings import Settings
from ledger import commands
from ledger.store import EventStore
from tests.conftest import Api, new_key
from tests.waits import wait_until

MakeApi = Callable[..., Coroutine[Any, Any, Api]]


async def test_healthz_needs_no_key(client: TestClient[Any, Any]) -> None:
    """/healthz answers ok without a key."""
    async with client.get("/healthz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_missing_bad_and_revoked_keys_are_401(
    client: TestClient[Any, Any], store: EventStore
) -> None:
    """No key, a wrong key and a revoked key all answer 401 in the envelope."""
    assert (await Api(client, None).get("/v1/jobs", status=401))["error"]["code"] == (
        "unauthorized"
    )
    await Api(client, "jl_wrong").get("/v1/jobs", status=401)
    made = await store.execute(
        lambda uow: commands.create_key(uow, "acme", "reader"), tenants=["acme"]
    )
    reader = Api(client, made.secret)
    await reader.get("/v1/jobs")
    await store.execute(lambda uow: commands.revoke_key(uow, "acme", made.key_id), tenants=["acme"])

    async def refused() -> bool:
        return (await reader.call("GET", "/v1/jobs")).get("error", {}).get("code") == (
            "unauthorized"
        )

    await wait_until(refused, KEY_CACHE_SECONDS + 10, "the revoked key is refused")
    body = await reader.get("/v1/jobs", status=401)
    assert "revoked" in body["error"]["message"]


async def test_roles(make_api: MakeApi) -> None:
    """Readers only read; writers write jobs; admin alone sets prices and exports."""
    reader, writer = await make_api(role="reader"), await make_api(role="writer")
    assert (await reader.post("/v1/jobs", {"agent": "a"}, status=403))["error"]["code"] == (
        "forbidden"
    )
    await writer.post("/v1/jobs", {"agent": "a", "id": "j"})
    await reader.get("/v1/jobs/j")
    await writer.post("/v1/prices", {"agent": "a", "per_row": 2}, status=403)
    await writer.post("/v1/credits/grants", {"account": "x", "amount": 5}, status=403)
    await writer.get("/v1/audit/head", status=403)
    await reader.post("/v1/jobs/j/cancel", status=403)


TENANT_ROUTES = [
    ("GET", "/v1/jobs/j"),
    ("GET", "/v1/jobs/j/events"),
    ("POST", "/v1/jobs/j/events"),
    ("POST", "/v1/jobs/j/cancel"),
    ("POST", "/v1/jobs/j/archive"),
    ("DELETE", "/v1/jobs/j"),
    ("GET", "/v1/jobs/j/results"),
    ("GET", "/v1/results/RID"),
    ("GET", "/v1/results/RID/job"),
    ("POST", "/v1/jobs/j/redact"),
    ("GET", "/v1/accounts/acct"),
]


async def test_another_tenant_sees_nothing(api: Api, make_api: MakeApi) -> None:
    """Every job route answers 404 to another tenant; lists, stats and credits are empty."""
    await api.post("/v1/jobs", {"agent": "a", "id": "j", "account": "acct"})
    done = await api.post(
        "/v1/jobs/j/events", {"type": "job.completed", "data": {"result": [1, 2]}}
    )
    rid = done["job"]["result_id"]
    await api.post("/v1/credits/grants", {"account": "acct", "amount": 10})
    other = await make_api(tenant="globex")
    for method, path in TENANT_ROUTES:
        body = await other.call(
            method,
            path.replace("RID", rid),
            status=404,
            json={"type": "job.archived"} if method == "POST" else None,
        )
        assert body["error"]["code"] == "not_found", (method, path)
    assert (await other.get("/v1/jobs"))["jobs"] == []
    assert (await other.get("/v1/jobs/stats"))["total_jobs"] == 0
    assert (await other.get("/v1/accounts"))["accounts"] == []
    assert (await other.get("/v1/credits"))["granted"] == 0
    assert all(e["stream"] != "j" for e in (await other.get("/v1/events"))["events"])
    assert (await other.get("/v1/jobs/running"))["accounts"] == []
    await other.post("/v1/jobs", {"agent": "a", "id": "j"})  # ids are per tenant


async def test_project_header_scopes_reads_and_stamps_writes(make_api: MakeApi) -> None:
    """X-Project-Id stamps created jobs and hides other projects' jobs."""
    alpha = await make_api(header_project="alpha")
    beta = await make_api(header_project="beta")
    everyone = await make_api()
    job = await alpha.post("/v1/jobs", {"agent": "a", "id": "pa"})
    assert job["project"] == "alpha"
    await beta.post("/v1/jobs", {"agent": "a", "id": "pb"})
    await beta.get("/v1/jobs/pa", status=404)
    assert [j["id"] for j in (await alpha.get("/v1/jobs"))["jobs"]] == ["pa"]
    assert (await beta.get("/v1/jobs/stats"))["total_jobs"] == 1
    assert (await everyone.get("/v1/jobs/stats"))["total_jobs"] == 2
    body = await alpha.post("/v1/jobs", {"agent": "a", "project": "beta"}, status=422)
    assert body["error"]["field"] == "project"


async def test_project_bound_key(make_api: MakeApi) -> None:
    """A key created for a project is confined to it."""
    bound = await make_api(project="p1")
    job = await bound.post("/v1/jobs", {"agent": "a"})
    assert job["project"] == "p1"
    await bound.get("/v1/jobs", headers={"X-Project-Id": "p2"}, status=403)


async def test_malformed_bodies(api: Api) -> None:
    """Bad JSON is 400, bad UTF-8 is 400, deep nesting and huge numbers are 422."""
    body = await api.call("POST", "/v1/jobs", data=b"{not json", status=400)
    assert body["error"]["code"] == "bad_request"
    await api.call("POST", "/v1/jobs", data=b'{"agent": "\xff\xfe"}', status=400)
    await api.call("POST", "/v1/jobs", data=b"", status=400)
    await api.call("POST", "/v1/jobs", data=b"[1, 2]", status=422)
    deep = '{"agent": "a", "params": ' + '{"a": ' * 200 + "1" + "}" * 200 + "}"
    await api.call("POST", "/v1/jobs", data=deep.encode(), status=422)
    huge = b'{"agent": "a", "params": {"n": 1e400}}'
    await api.call("POST", "/v1/jobs", data=huge, status=422)
    big_int = b'{"agent": "a", "params": {"n": 123456789012345678901234567890}}'
    await api.call("POST", "/v1/jobs", data=big_int, status=422)
    typo = await api.post("/v1/jobs", {"agent": "a", "acount": "x"}, status=422)
    assert typo["error"]["code"] == "invalid"
    missing = await api.post("/v1/jobs", {"account": "x"}, status=422)
    assert missing["error"]["field"] == "agent"
    long_agent = await api.post("/v1/jobs", {"agent": "x" * 201}, status=422)
    assert long_agent["error"]["field"] == "agent"
    assert typo["error"]["field"] == "acount"


async def test_oversized_body_is_413(
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
    db_url: str,
) -> None:
    """A body over --max-body answers 413 too_large in the envelope."""
    app = create_app(Settings(db_url=db_url, max_body=1024))
    client = await aiohttp_client(app)
    from api.context import STORE

    api = Api(client, await new_key(app[STORE], "acme"))
    body = await api.post("/v1/jobs", {"agent": "a", "params": {"x": "y" * 4096}}, status=413)
    assert body["error"]["code"] == "too_large"
    await api.post("/v1/jobs", {"agent": "a"})


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    """Unknown routes are 404 and wrong methods 405, both in the JSON envelope."""
    body = await api.get("/v1/nothing-here", status=404)
    assert body["error"]["code"] == "not_found"
    body = await api.call("PUT", "/v1/jobs", status=405)
    assert body["error"]["code"] == "method_not_allowed"
    body = await api.get("/not-even-v1", status=404)
    assert body["error"]["code"] == "not_found"


async def test_rate_limit_headers_and_429(
    aiohttp_client: Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]],
    db_url: str,
) -> None:
    """--rate-limit caps requests per key with X-RateLimit-* headers, then 429 + Retry-After."""
    app = create_app(Settings(db_url=db_url, rate_limit=3))
    client = await aiohttp_client(app)
    from api.context import STORE

    # The window is the wall-clock minute: should it turn between these four requests, the
    # count starts over, so the attempt is repeated with a fresh key (never twice in a row).
    for _attempt in range(3):
        secret = await new_key(app[STORE], "acme")
        headers = {"Authorization": f"Bearer {secret}"}
        answers = []
        for _ in range(4):
            async with client.get("/v1/jobs", headers=headers) as resp:
                answers.append((resp.status, resp.headers.copy(), await resp.json()))
        if len({h["X-RateLimit-Reset"] for _, h, _ in answers}) == 1:
            break
    else:
        raise AssertionError("a minute boundary split each of three attempts")
    assert [status for status, _, _ in answers] == [200, 200, 200, 429]
    assert [h["X-RateLimit-Remaining"] for _, h, _ in answers] == ["2", "1", "0", "0"]
    assert all(h["X-RateLimit-Limit"] == "3" for _, h, _ in answers)
    assert int(answers[0][1]["X-RateLimit-Reset"]) % 60 == 0
    _, limited, body = answers[3]
    assert int(limited["Retry-After"]) >= 1
    assert body["error"]["code"] == "rate_limited"
    other = await new_key(app[STORE], "acme")
    async with client.get("/v1/jobs", headers={"Authorization": f"Bearer {other}"}) as resp:
        assert resp.status == 200


async def test_openapi_covers_every_route(client: TestClient[Any, Any]) -> None:
    """The OpenAPI 3.1 document names every /v1 route with its schemas."""
    async with client.get("/v1/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    expected = {
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs"),
        ("delete", "/v1/jobs"),
        ("get", "/v1/jobs/{id}"),
        ("get", "/v1/jobs/{id}/events"),
        ("post", "/v1/jobs/{id}/events"),
        ("post", "/v1/jobs/{id}/cancel"),
        ("post", "/v1/jobs/{id}/archive"),
        ("delete", "/v1/jobs/{id}"),
        ("get", "/v1/jobs/{id}/results"),
        ("get", "/v1/results/{result_id}"),
        ("get", "/v1/results/{result_id}/job"),
        ("get", "/v1/jobs/stats"),
        ("get", "/v1/jobs/running"),
        ("get", "/v1/accounts"),
        ("get", "/v1/accounts/{account}"),
        ("post", "/v1/prices"),
        ("get", "/v1/prices"),
        ("post", "/v1/credits/grants"),
        ("get", "/v1/credits"),
        ("get", "/v1/credits/statement"),
        ("get", "/v1/events"),
        ("get", "/v1/events/stream"),
        ("get", "/v1/audit/export"),
        ("get", "/v1/audit/head"),
        ("post", "/v1/jobs/{id}/redact"),
    }
    present = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert expected <= present
    create = doc["paths"]["/v1/jobs"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
    assert "agent" in doc["components"]["schemas"]["CreateJob"]["required"]
    json.dumps(doc)


async def test_request_id_is_echoed(api: Api, client: TestClient[Any, Any]) -> None:
    """Every answer carries the request id it was logged under."""
    async with client.get("/healthz", headers={"X-Request-Id": "abc-123"}) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
