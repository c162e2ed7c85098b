"""Hostile input against a real ``jobledger serve``: schemathesis over ``/v1/openapi.json``, random
garbage to every route (dialects included), and the contract's answers to known-bad input; on
SQLite and on PostgreSQL.

Each part is bounded: a fixed number of examples per operation, a fixed number of garbage
requests, every request with a timeout. The random choices are seeded, so a failure reproduces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import compat
from tests.conftest import (
    Api,
    create_pg_database,
    drop_pg_database,
    pg_server_url,
    store_key,
)
from tests.serverproc import Key, Server, create_key, running, served

pytestmark = pytest.mark.slow

EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 6}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# An endless Server-Sent Events stream has no response to validate; the garbage test below
# reads it for a bounded moment instead.
SKIP = {("GET", "/v1/events/stream")}


def _databases(folder: Path, stack: contextlib.ExitStack) -> dict[str, str]:
    """A new SQLite file, and a new PostgreSQL database when one is configured (dropped when
    ``stack`` closes)."""
    found = {"sqlite": str(folder / "ledger.db")}
    if pg_server_url() is not None:
        url = asyncio.run(create_pg_database())
        stack.callback(lambda: asyncio.run(drop_pg_database(url)))
        found["postgres"] = url
    return found


def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path: Path) -> None:
    """Schemathesis cases for every documented operation get no 5xx and schema-true answers
    from a server on each backend.

    The cases are drawn once (derandomized, so they would be the same for every backend;
    drawing is two thirds of the work) and each is sent to both servers in turn, which
    therefore see the same requests in the same order.
    """
    failures: list[str] = []
    ran = 0
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[Server, Key]] = {}
        for name, db in _databases(tmp_path, stack).items():
            key = create_key(db, "acme")
            logs = tmp_path / name
            logs.mkdir()
            servers[name] = (stack.enter_context(running(db, log_dir=logs)), key)
        first = next(iter(servers.values()))[0]
        schema = schemathesis.openapi.from_url(f"{first.base}/v1/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()
            if (operation.method.upper(), operation.path) in SKIP:
                continue
            ran += 1
            for mode, examples in EXAMPLES.items():
                has_input = bool(operation.path_parameters or operation.query or operation.body)
                if mode is GenerationMode.NEGATIVE and not has_input:
                    continue  # nothing to make invalid

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: schemathesis.Case) -> None:
                    for name, (server, key) in servers.items():
                        response = case.call(base_url=server.base, headers=key.headers, timeout=15)
                        try:
                            case.validate_response(response, checks=CHECKS)
                        except Exception as exc:
                            raise AssertionError(f"on {name}: {exc}") from exc

                try:
                    check()
                except Exception as exc:  # every operation runs; all failures are reported
                    label = f"{operation.method.upper()} {operation.path} ({mode.value})"
                    failures.append(f"{label}: {exc}"[:2000])
        logs_text = {name: server.log_text() for name, (server, _) in servers.items()}
    assert ran >= 20, "the document lists every /v1 route"
    assert not failures, "\n\n".join(failures)
    for name, text in logs_text.items():
        assert '"http.unhandled"' not in text, name


# -- garbage ------------------------------------------------------------------------------------

GARBAGE_REQUESTS = 900
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
METHODS = [*HTTP_METHODS, "FOO", "get"]  # the last two are refused by the HTTP parser itself
WEIRD_IDS = [
    "",
    "a%0D%0AX-Injected:%201",
    "%0A",
    "..%2F..%2Fetc%2Fpasswd",
    "x" * 500,
    "%00",
    "%FF%FE",
    "stats",
    "running",
    "%F0%9F%92%A9",
    "-1",
    "99999999999999999999999999",
    "job_01JD3Q8Z6W9YB7K2N4M5P8R1ST",
    "a%20b",
    "%25",
]


def deep(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def garbage_body(rng: random.Random) -> tuple[bytes | None, dict[str, str]]:
    """A hostile body and the headers that go with it."""
    kind = rng.randrange(14)
    json_ct = {"Content-Type": "application/json"}
    if kind == 0:
        return None, {}
    if kind == 1:
        return rng.randbytes(rng.randrange(1, 2000)), {}
    if kind == 2:
        return b'{"agent": "\xff\xfe\xfa"}', json_ct  # invalid UTF-8
    if kind == 3:
        return deep(rng.choice([65, 200, 5000, 100_000])), json_ct
    if kind == 4:
        return b"[" * 50_000 + b"]" * 50_000, json_ct
    if kind == 5:
        big = rng.choice(["1" * 400, "1e999", "-1e999", "9" * 20, "1.5e308", "NaN", "-0"])
        field = rng.choice(["executions_total", "expected_version", "amount", "per_row"])
        return f'{{"agent": "a", "{field}": {big}, "type": "job.progressed"}}'.encode(), json_ct
    if kind == 6:
        return json.dumps({"agent": "a", "id": "x\r\nSet-Cookie: a=b"}).encode(), json_ct
    if kind == 7:
        return json.dumps({"type": "job.completed", "data": {"result": [{}] * 50}}).encode(), {}
    if kind == 8:
        return b"null", json_ct
    if kind == 9:
        return json.dumps(["agent", 1, None]).encode(), json_ct
    if kind == 10:
        return b'{"agent": "a"', json_ct  # truncated
    if kind == 11:
        return "\u0000\ud800".encode("utf-8", "surrogatepass"), {"Content-Type": "text/plain"}
    if kind == 12:
        events = [{"type": rng.choice(["job.started", "x", "", "job.completed"])}] * 3
        return json.dumps({"events": events}).encode(), json_ct
    return json.dumps({"reason": "r" * 5000, "agent": "\u202e" * 10}).encode(), json_ct


def garbage_headers(rng: random.Random, key: Key) -> dict[str, str]:
    headers = dict(key.headers) if rng.random() < 0.85 else {}
    if rng.random() < 0.3:
        headers["X-Project-Id"] = rng.choice(["", "p", "x" * 300, "ü", "a b"])
    if rng.random() < 0.2:
        headers["x-project-id"] = rng.choice(["p1", " ", "%0D"])
    if rng.random() < 0.2:
        headers["Idempotency-Key"] = rng.choice(["", "k", "k" * 300, "ü"])
    if rng.random() < 0.1:
        headers["Last-Event-ID"] = rng.choice(["-5", "x", "9" * 30, "1.5", ""])
    if rng.random() < 0.1:
        headers["Authorization"] = rng.choice(["Bearer", "Basic abc", "Bearer " + "x" * 5000])
    return headers


def templates(openapi: dict[str, Any]) -> list[str]:
    paths = set(openapi["paths"])
    paths.update(path for _, path in compat.paths())
    return sorted(paths)


def fill(template: str, rng: random.Random, real: dict[str, str]) -> str:
    path = template
    for name in ("id", "result_id", "account", "projectId", "group", "slug"):
        value = real[name] if rng.random() < 0.4 else rng.choice(WEIRD_IDS)
        path = path.replace(f"{{{name}}}", value)
    if rng.random() < 0.5:
        query = rng.choice(
            [
                "wait=0.1&after_version=1",
                "as_of=" + "9" * 30,
                "after=-1",
                "limit=0",
                "limit=1001&cursor=%FF",
                "status=bogus",
                "created_after=yesterday",
                "format=xml",
                "start=-1&limit=" + "9" * 25,
                "after=" + "9" * 25,
                "types=%00&job_id=%0D%0A",
                "compact=maybe",
                "q=" + "%25" * 50,
                "archived=perhaps&order=sideways",
                "account=" + "a" * 3000,
            ]
        )
        path += "?" + query
    return path


async def one_garbage_request(
    http: aiohttp.ClientSession, base: str, method: str, path: str, body: Any, headers: Any
) -> tuple[int, str, bytes]:
    async with http.request(
        method, base + path, data=body, headers=headers, skip_auto_headers={"Content-Type"}
    ) as resp:
        if resp.content_type == "text/event-stream":
            return resp.status, resp.content_type, b""  # drop the stream at once
        return resp.status, resp.content_type, await resp.read()


async def test_garbage_to_every_route_never_5xx(db_url: str, tmp_path: Path) -> None:
    """Random garbage to every route and dialect: no 5xx, errors in JSON, still healthy after."""
    db = db_url
    key = await store_key(db, "acme")
    rng = random.Random(20261123)
    async with (
        served(db, "--max-body", "256k", log_dir=tmp_path) as server,
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=20), headers={"Connection": "close"}
        ) as http,
    ):
        async with http.post(
            f"{server.base}/v1/jobs",
            json={"agent": "a", "project": "p1", "id": "real-1"},
            headers=key.headers,
        ) as resp:
            assert resp.status == 201
        async with http.post(
            f"{server.base}/v1/jobs/real-1/events",
            json={"type": "job.completed", "data": {"result": [1]}},
            headers=key.headers,
        ) as resp:
            result_id = (await resp.json())["job"]["result_id"]
        real = {
            "id": "real-1",
            "result_id": result_id,
            "account": "default",
            "projectId": "p1",
            "group": "a",
            "slug": "b",
        }
        async with http.get(f"{server.base}/v1/openapi.json") as resp:
            paths = templates(await resp.json())
        seen: dict[int, int] = {}
        bad: list[str] = []
        for _ in range(GARBAGE_REQUESTS):
            path = fill(rng.choice(paths), rng, real)
            method = rng.choice(METHODS)
            body, extra = garbage_body(rng)
            headers = {**garbage_headers(rng, key), **extra}
            try:
                status, ctype, answer = await one_garbage_request(
                    http, server.base, method, path, body, headers
                )
            except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
                bad.append(f"{method} {path}: broken answer {exc!r}")
                continue
            seen[status] = seen.get(status, 0) + 1
            if status >= 500:
                bad.append(f"{method} {path}: {status} {answer[:200]!r}")
            elif status == 400 and method not in HTTP_METHODS and ctype == "text/plain":
                pass  # the HTTP parser refused the request line: it never reached the app
            elif status >= 400 and method != "HEAD" and ctype != "application/json":
                bad.append(f"{method} {path}: {status} answered {ctype}, not JSON")
        async with http.get(f"{server.base}/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with http.get(f"{server.base}/v1/jobs/real-1", headers=key.headers) as resp:
            assert resp.status in (200, 404)  # garbage may have deleted it, never broken it
    assert not bad, "\n".join(bad[:40])
    assert sum(seen.values()) == GARBAGE_REQUESTS
    assert '"http.unhandled"' not in server.log_text()


# -- NUL bytes ----------------------------------------------------------------------------------

# Paths and filters that carry a NUL byte (``%00``) into a lookup. PostgreSQL refuses NUL in
# text, SQLite stores it; either way the answer is a 4xx or an empty answer, never a 5xx.
NUL_REQUESTS = [
    ("GET", "/v1/results/%00"),
    ("GET", "/v1/results/%00/job"),
    ("HEAD", "/v1/results/%00/job"),
    ("GET", "/v1/jobs/%00"),
    ("GET", "/v1/accounts/%00"),
    ("GET", "/v1/events?types=%00"),
    ("GET", "/v1/events?job_id=%00"),
    ("GET", "/v1/jobs?account=%00"),
    ("GET", "/v1/jobs?agent=%00"),
    ("GET", "/v1/credits?account=%00"),
    ("GET", "/v1/credits/statement?account=%00"),
    ("GET", "/v1/audit/export?job_id=%00"),
    ("GET", "/v1/audit/export?account=%00"),
    ("POST", "/v1/jobs/%00/cancel"),
    ("GET", "/compat/mcrit/jobs/%00"),
]


async def test_nul_bytes_in_ids_and_filters_never_5xx(api: Api) -> None:
    """A NUL byte in a path id or a query filter is answered 2xx or 4xx, never 5xx."""
    await api.post("/v1/jobs", {"id": "j", "agent": "a"})
    statuses: dict[str, int | str] = {}
    for method, path in NUL_REQUESTS:
        try:
            async with api.client.request(
                method, path, headers=api.headers, timeout=aiohttp.ClientTimeout(total=3)
            ) as resp:
                await resp.read()
                statuses[f"{method} {path}"] = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            statuses[f"{method} {path}"] = f"no whole answer: {exc!r}"
    assert {k: v for k, v in statuses.items() if not isinstance(v, int) or v >= 500} == {}
    assert statuses["GET /v1/jobs/%00"] == 422  # not a job id at all


# -- known-bad input, the contract's answers ---------------------------------------------------


CODES = {400: "bad_request", 413: "too_large", 422: "invalid"}


async def test_hostile_input_gets_the_contract_status(db_url: str, tmp_path: Path) -> None:
    """Oversized 413, deep nesting and huge numbers 422, bad UTF-8 400, CR/LF in ids 422."""
    db = db_url
    key = await store_key(db, "acme")
    json_ct = {**key.headers, "Content-Type": "application/json"}
    cases: list[tuple[str, str, bytes | None, dict[str, str], int]] = [
        ("POST", "/v1/jobs", b'{"agent": "' + b"x" * 70_000 + b'"}', json_ct, 413),
        ("POST", "/v1/jobs", deep(100), json_ct, 422),
        ("POST", "/v1/jobs", b"[" * 20_000 + b"]" * 20_000, json_ct, 422),
        ("POST", "/v1/jobs", b'{"agent": "a", "params": {"n": ' + b"9" * 40 + b"}}", json_ct, 422),
        ("POST", "/v1/jobs", b'{"agent": "a", "executions_total": 1e999}', json_ct, 422),
        ("POST", "/v1/jobs", b'{"agent": "\xff\xfe"}', json_ct, 400),
        ("POST", "/v1/jobs", b'{"agent": "a",', json_ct, 400),
        ("POST", "/v1/jobs", b'{"agent": "a", "id": "x\\r\\nX-Injected: 1"}', json_ct, 422),
        ("POST", "/v1/jobs", b'{"agent": "a", "id": "x\\u0000"}', json_ct, 422),
        ("GET", "/v1/jobs/a%0D%0AX-Injected:%201", None, key.headers, 422),
        ("GET", "/v1/jobs/a%0Ab/events", None, key.headers, 422),
        ("POST", "/v1/jobs/a%0D%0Ab/cancel", None, key.headers, 422),
        ("GET", "/compat/mcrit/jobs/a%0D%0Ab", None, key.headers, 400),  # MCRIT: not 24 hex
        ("GET", "/v1/jobs/x?as_of=" + "9" * 30, None, key.headers, 422),
        ("GET", "/v1/events?after=" + "9" * 30, None, key.headers, 422),
        ("POST", "/v1/prices", b'{"agent": "a", "per_row": 1e400}', json_ct, 422),
        ("POST", "/v1/jobs", b'{"agent": "a"}', {**json_ct, "Idempotency-Key": "k" * 300}, 422),
    ]
    async with (
        served(db, "--max-body", "64k", log_dir=tmp_path) as server,
        aiohttp.ClientSession(server.base) as http,
    ):
        for method, path, body, headers, expected in cases:
            async with http.request(method, path, data=body, headers=headers) as resp:
                answer = await resp.read()
                label = f"{method} {path[:60]} {(body or b'')[:40]!r}"
                assert resp.status == expected, f"{label}: {resp.status} {answer[:300]!r}"
                assert resp.content_type == "application/json", label
                if path.startswith("/compat/mcrit"):  # MCRIT's own failure envelope
                    assert json.loads(answer)["status"] == "failed", label
                    continue
                error = json.loads(answer)["error"]
                assert error["code"] == CODES[expected], label
        async with http.get("/v1/jobs", headers=key.headers) as resp:
            assert (await resp.json())["jobs"] == []  # none of it was stored
    assert '"http.unhandled"' not in server.log_text()
