"""The served OpenAPI document is one a generator can trust.

A client generated from it with openapi-python-client (a standard generator, from the package
index) calls a real ``jobledger serve``: typed models parse the real answers, amounts included,
and events decode as the union over ``type``. The other suites validate every answer they
receive against the same document (``tests/openapi_check.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import Api
from tests.serverproc import create_key, env, running

pytestmark = pytest.mark.slow

PACKAGE = "jobledger_client"


def fetch_document(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/v1/openapi.json", timeout=10) as resp:
        document: dict[str, Any] = json.load(resp)
    return document


def test_document_speaks_the_wire(tmp_path: Path) -> None:
    """Amounts are numbers, times date-times, statuses an enum, events a union over ``type``."""
    db = str(tmp_path / "ledger.db")
    create_key(db, "acme")
    with running(db, log_dir=tmp_path) as server:
        doc = fetch_document(server.base)
    schemas = doc["components"]["schemas"]
    job = schemas["JobView"]["properties"]
    assert job["credits_used"]["type"] == "number"
    assert job["status"]["enum"] == [
        "queued",
        "running",
        "completed",
        "partial_failed",
        "failed",
        "cancelled",
    ]
    assert job["created_at"]["format"] == "date-time"
    for body in ("PriceBody", "GrantBody"):  # requests take the same numbers
        for name, prop in schemas[body]["properties"].items():
            if name not in ("agent", "account", "reason"):
                assert prop["type"] == "number", (body, name)
    assert "decimal" not in json.dumps(
        {k: v for k, v in schemas.items() if not k.endswith("Event")} | {"paths": doc["paths"]}
    ).replace('"format": "decimal"', "").replace("exact decimal", "")
    events = schemas["EventRecord"]
    assert events["discriminator"]["propertyName"] == "type"
    assert set(events["discriminator"]["mapping"]) >= {"job.queued", "job.completed", "price.set"}
    completed = schemas["JobCompletedEvent"]["properties"]
    assert completed["type"] == {"const": "job.completed"}
    ids = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    assert {"createJob", "listJobs", "getJob", "appendEvents", "cancelJob"} <= ids
    assert len(ids) == sum(len(item) for item in doc["paths"].values())  # unique
    cancel = doc["paths"]["/v1/jobs/{id}/cancel"]["post"]
    assert cancel["requestBody"]["required"] is False
    create = doc["paths"]["/v1/jobs"]["post"]
    headers = {p["name"] for p in create["parameters"] if p["in"] == "header"}
    assert headers == {"Idempotency-Key", "X-Project-Id"}
    stream = doc["paths"]["/v1/events/stream"]["get"]
    assert "Last-Event-ID" in {p["name"] for p in stream["parameters"]}
    answer = create["responses"]["201"]["headers"]
    assert {"X-Request-Id", "X-RateLimit-Limit", "X-RateLimit-Remaining"} <= set(answer)
    assert "Retry-After" in create["responses"]["429"]["headers"]


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[tuple[ModuleType, str, str]]:
    """A client generated from the served document, a running server and an admin secret."""
    db = str(tmp_path / "ledger.db")
    key = create_key(db, "acme")
    with running(db, log_dir=tmp_path) as server:
        spec = tmp_path / "openapi.json"
        spec.write_text(json.dumps(fetch_document(server.base)))
        out = tmp_path / "gen" / PACKAGE
        environment = env()
        environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "openapi-python-client"),
                "generate",
                "--path",
                str(spec),
                "--meta",
                "none",
                "--output-path",
                str(out),
            ],
            capture_output=True,
            text=True,
            env=environment,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
        sys.path.insert(0, str(out.parent))
        try:
            yield importlib.import_module(PACKAGE), server.base, key.secret
        finally:
            sys.path.remove(str(out.parent))
            for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
                del sys.modules[name]


def test_generated_client_calls_the_server(generated: tuple[ModuleType, str, str]) -> None:
    """createJob, appendEvents, getJob, listJobEvents and getCredits through generated code."""
    package, base, secret = generated
    api = importlib.import_module(f"{PACKAGE}.api")
    models = importlib.import_module(f"{PACKAGE}.models")
    set_price = importlib.import_module(f"{PACKAGE}.api.credits_.set_price")
    create_job = importlib.import_module(f"{PACKAGE}.api.jobs.create_job")
    append_events = importlib.import_module(f"{PACKAGE}.api.jobs.append_events")
    get_job = importlib.import_module(f"{PACKAGE}.api.jobs.get_job")
    list_job_events = importlib.import_module(f"{PACKAGE}.api.jobs.list_job_events")
    assert api is not None
    client = package.AuthenticatedClient(
        base_url=base, token=secret, raise_on_unexpected_status=True
    )
    with client:
        price = set_price.sync(
            client=client, body=models.PriceBody(agent="gen/agent", per_job=1, per_row=0.25)
        )
        assert isinstance(price, models.PriceView) and price.per_row == 0.25

        job = create_job.sync(
            client=client,
            body=models.CreateJob(agent="gen/agent", account="acct-gen"),
            idempotency_key="gen-create-1",
        )
        assert isinstance(job, models.JobView), job
        assert job.status == models.JobViewStatus.QUEUED
        again = create_job.sync(
            client=client,
            body=models.CreateJob(agent="gen/agent", account="acct-gen"),
            idempotency_key="gen-create-1",
        )
        assert isinstance(again, models.JobView) and again.id == job.id  # replayed, not a new job

        for body in (
            models.AppendEvent(type_="job.started"),
            models.AppendEvent(
                type_="job.completed",
                data=models.AppendEventData.from_dict({"row_count": 2, "result": [1, 2]}),
            ),
        ):
            appended = append_events.sync(id=job.id, client=client, body=body)
            assert isinstance(appended, models.Appended), appended

        done = get_job.sync(id=job.id, client=client)
        assert isinstance(done, models.JobView)
        assert done.status == models.JobViewStatus.COMPLETED
        assert done.credits_used == 1.5 and done.row_count == 2  # a fractional amount parses

        events = list_job_events.sync(id=job.id, client=client)
        assert isinstance(events, models.JobEvents)
        kinds = [type(e).__name__ for e in events.events]
        assert kinds == ["JobQueuedEvent", "JobStartedEvent", "JobCompletedEvent"]
        queued = events.events[0]
        assert queued.data.agent == "gen/agent"
        assert queued.data.price.per_row == "0.25"  # event data keeps decimal strings
        assert events.events[2].data.row_count == 2


@pytest.mark.parametrize("backend_name", ["sqlite"], indirect=True)
async def test_the_answer_checker_names_every_drift(api: Api) -> None:
    """The check every in-process answer goes through (``tests/openapi_check.py``) passes real
    answers and names each way a drifted one differs: status, content type, a missing or
    mistyped field, a bad date-time, header values. ``/v1/jobs/stats`` is its own operation,
    not ``/v1/jobs/{id}``."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a"})
    job = await api.get("/v1/jobs/j1")
    stats = await api.get("/v1/jobs/stats")
    check = (await api._checker()).errors
    ok = {"Content-Type": "application/json; charset=utf-8", "X-RateLimit-Limit": "60"}
    assert check("GET", "/v1/jobs/j1", 200, ok, json.dumps(job).encode()) == []
    assert check("GET", "/v1/jobs/stats", 200, ok, json.dumps(stats).encode()) == []
    assert check("GET", "/compat/mcrit/jobs", 200, ok, b"anything") == []  # not documented

    def drifted(**change: Any) -> bytes:
        return json.dumps({**job, **change}).encode()

    without_status = {k: v for k, v in job.items() if k != "status"}
    cases = [
        (418, ok, json.dumps(job).encode(), "status 418 is not documented"),
        (200, {"Content-Type": "text/plain"}, b"hi", "content type 'text/plain'"),
        (200, ok, json.dumps(without_status).encode(), '"status" is a required property'),
        (200, ok, drifted(row_count="many"), "body at /row_count"),
        (200, ok, drifted(created_at="yesterday"), 'is not a "date-time"'),
        (200, ok, b"", "the body is empty"),
        (200, ok, b"{", "the body is not JSON"),
        (200, {**ok, "X-RateLimit-Limit": "many"}, json.dumps(job).encode(), "not an integer"),
    ]
    for status, headers, body, named in cases:
        errors = check("GET", "/v1/jobs/j1", status, headers, body)
        assert any(named in error for error in errors), (named, errors)
    assert any(  # a documented required header: Retry-After on a 429
        "Retry-After is required" in error
        for error in check(
            "GET",
            "/v1/jobs/j1",
            429,
            ok,
            json.dumps({"error": {"code": "c", "message": "m"}}).encode(),
        )
    )
    negative = check(
        "POST", "/v1/jobs", 201, {**ok, "X-Ledger-Position": "-1"}, json.dumps(job).encode()
    )
    assert any("X-Ledger-Position" in error for error in negative), negative
