"""Section 7 from outside: export, an independent chain verifier, tampering, erasure, as_of."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app
from api.context import STORE
from api.settings import Settings
from ledger.rebuild import rebuild
from tests import rawdb
from tests.conftest import Api
from tests.serverproc import Done, acli
from tests.waits import wait_until

MakeApi = Callable[..., Coroutine[Any, Any, Api]]
GENESIS = "0" * 64
MARKER = "zq-MARKER-7f3b91c2e5"


# -- an independent verifier: section 7 with hashlib and json, none of the project's code ------


def canon(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HEADER = (
    "position",
    "event_id",
    "stream",
    "version",
    "type",
    "occurred_at",
    "recorded_at",
    "actor",
    "data_hash",
)


def event_problem(event: dict[str, Any]) -> str | None:
    """Why one exported event does not match its own hashes, or ``None``."""
    if event["data"] is not None and sha256_hex(canon(event["data"])) != event["data_hash"]:
        return "data_hash"
    header = {k: event[k] for k in HEADER}
    expected = sha256_hex(event["prev_hash"].encode() + b"\n" + canon(header))
    return None if expected == event["hash"] else "hash"


def verify_chain(events: list[dict[str, Any]]) -> tuple[int, str]:
    """Check one tenant's whole chain from 64 zeros; ``(count, head hash)``."""
    prev = GENESIS
    for event in events:
        assert event["prev_hash"] == prev, f"position {event['position']} does not link"
        assert event_problem(event) is None, f"position {event['position']} is altered"
        prev = event["hash"]
    return len(events), prev


def parse_ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def parse_csv(text: str) -> list[dict[str, Any]]:
    events = []
    for row in csv.DictReader(io.StringIO(text)):
        event: dict[str, Any] = dict(row)
        event["position"] = int(row["position"])
        event["version"] = int(row["version"])
        event["data"] = json.loads(row["data"])
        events.append(event)
    return events


# -- a history to export -----------------------------------------------------------------------


async def build_history(api: Api) -> None:
    """Prices, grants and jobs in two accounts, with unicode, floats and nested params."""
    await api.post("/v1/prices", {"agent": "scraper/a", "per_job": 1, "per_row": "0.5"})
    await api.post("/v1/credits/grants", {"account": "acct-1", "amount": 100, "reason": "trial"})
    await api.post("/v1/credits/grants", {"account": "acct-2", "amount": "2.5"})
    params = {
        "city": "Zürich ✓ 😀",
        "z": {"b": [1, 2.5, -3.5e-7], "a": None},
        "quote": 'he said "hi"\n',
        "ratio": 0.1,
    }
    await api.post(
        "/v1/jobs",
        {
            "id": "j1",
            "agent": "scraper/a",
            "account": "acct-1",
            "params": params,
            "occurred_at": "2025-01-10T10:00:00Z",
        },
    )
    await api.post(
        "/v1/jobs/j1/events", {"type": "job.started", "occurred_at": "2025-01-10T10:00:01Z"}
    )
    await api.post(
        "/v1/jobs/j1/events",
        {
            "type": "job.completed",
            "data": {"result": [{"row": 1}, {"row": 2}]},
            "occurred_at": "2025-01-10T10:00:05Z",
        },
    )
    await api.post(
        "/v1/jobs",
        {
            "id": "j2",
            "agent": "scraper/b",
            "account": "acct-2",
            "occurred_at": "2025-02-10T00:00:00Z",
        },
    )
    await api.post(
        "/v1/jobs/j2/events",
        {
            "type": "job.failed",
            "data": {"error": {"code": "boom", "message": "it broke"}},
            "occurred_at": "2025-02-10T00:00:09Z",
        },
    )
    await api.post(
        "/v1/jobs",
        {
            "id": "j3",
            "agent": "scraper/a",
            "account": "acct-1",
            "occurred_at": "2025-03-10T00:00:00Z",
        },
    )
    await api.post("/v1/jobs/j3/cancel", {"reason": "no longer needed"}, status=200)


async def export(api: Api, **params: str) -> list[dict[str, Any]]:
    text = await api.get("/v1/audit/export", params=params)
    assert isinstance(text, str)
    return parse_ndjson(text)


# -- export and the independent verifier --------------------------------------------------------


async def test_export_verifies_independently(api: Api) -> None:
    """The NDJSON export of a tenant is one chain that a hashlib-and-json verifier accepts."""
    await build_history(api)
    events = await export(api)
    assert [e["position"] for e in events] == sorted({e["position"] for e in events})
    count, head = verify_chain(events)
    assert count == len(events) > 10
    first = events[0]
    assert set(first) == {
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
    queued = next(e for e in events if e["stream"] == "j1" and e["type"] == "job.queued")
    assert queued["data"]["params"]["city"] == "Zürich ✓ 😀"
    assert head == events[-1]["hash"]


async def test_export_is_utf8_without_ascii_escapes(api: Api) -> None:
    """Non-ASCII data is exported as UTF-8 text and hashed over exactly those bytes."""
    await build_history(api)
    async with api.client.get("/v1/audit/export", headers=api.headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        raw = await resp.read()
    assert "Zürich ✓ 😀".encode() in raw
    assert b"\\u00fc" not in raw


async def test_csv_export_matches_ndjson(api: Api) -> None:
    """The CSV export has the event fields as columns, data as JSON text, and the same chain."""
    await build_history(api)
    text = await api.get("/v1/audit/export", params={"format": "csv"})
    assert text.splitlines()[0] == (
        "position,event_id,stream,version,type,occurred_at,recorded_at,actor,data,"
        "data_hash,prev_hash,hash"
    )
    rows = parse_csv(text)
    assert rows == [{k: v for k, v in e.items() if k != "redacted"} for e in await export(api)]
    verify_chain(rows)


async def test_export_filters(api: Api) -> None:
    """since/until, job_id and account narrow the export; every event still matches its hash."""
    await build_history(api)
    everything = await export(api)

    window = await export(api, since="2025-02-01T00:00:00Z", until="2025-03-01T00:00:00Z")
    assert window and {e["stream"] for e in window} == {"j2"}
    assert window == [
        e for e in everything if "2025-02-01T00:00:00Z" <= e["occurred_at"] < "2025-03-01"
    ]

    since = await export(api, since="2025-03-01T00:00:00Z")
    assert since and all(e["occurred_at"] >= "2025-03-01" for e in since)
    until = await export(api, until="2025-01-11T00:00:00Z")
    assert {e["stream"] for e in until} == {"j1"}

    j1 = await export(api, job_id="j1")
    assert [e["type"] for e in j1] == ["job.queued", "job.started", "job.completed"]
    assert [e["version"] for e in j1] == [1, 2, 3]

    acct = await export(api, account="acct-1")
    assert {e["stream"] for e in acct} == {"j1", "j3", "$credits/acct-1"}
    assert acct == [e for e in everything if e["stream"] in {"j1", "j3", "$credits/acct-1"}]

    assert await export(api, job_id="no-such-job") == []
    for subset in (window, since, until, j1, acct):
        assert all(event_problem(e) is None for e in subset)
    await api.get("/v1/audit/export", params={"since": "yesterday"}, status=422)
    await api.get("/v1/audit/export", params={"format": "xml"}, status=422)


async def test_head_matches_last_exported_event(api: Api) -> None:
    """``/v1/audit/head`` names the position, hash and count of the export's last event."""
    empty = await api.get("/v1/audit/head")
    assert empty["count"] >= 1  # the key that calls is an event too
    await build_history(api)
    head = await api.get("/v1/audit/head")
    events = await export(api)
    assert head == {
        "position": events[-1]["position"],
        "hash": events[-1]["hash"],
        "count": len(events),
    }


async def test_audit_routes_are_admin_only(api: Api, make_api: MakeApi) -> None:
    """Writers and readers get 403 from export, head and redact; no key gets 401."""
    await build_history(api)
    for role in ("writer", "reader"):
        weak = await make_api(role=role)
        for path in ("/v1/audit/export", "/v1/audit/head"):
            body = await weak.get(path, status=403)
            assert body["error"]["code"] == "forbidden"
        await weak.post("/v1/jobs/j1/redact", {"reason": "x"}, status=403)
    nobody = Api(api.client, None)
    await nobody.get("/v1/audit/export", status=401)
    await nobody.get("/v1/audit/head", status=401)


async def test_tenants_have_separate_chains(api: Api, make_api: MakeApi) -> None:
    """Another tenant's export holds none of acme's events and is a chain of its own."""
    await build_history(api)
    globex = await make_api(tenant="globex")
    await globex.post("/v1/jobs", {"id": "g1", "agent": "x"})
    await globex.post("/v1/jobs/j1/events", {"type": "job.started"}, status=404)
    theirs = await export(globex)
    ours = await export(api)
    assert {e["event_id"] for e in theirs}.isdisjoint({e["event_id"] for e in ours})
    assert "j1" not in {e["stream"] for e in theirs}
    assert theirs[0]["prev_hash"] == GENESIS and ours[0]["prev_hash"] == GENESIS
    verify_chain(theirs)
    verify_chain(ours)
    assert (await globex.get("/v1/audit/head"))["count"] == len(theirs)
    await globex.post("/v1/jobs/j1/redact", {}, status=404)


# -- tampering with the stored rows, found by ``jobledger verify`` ------------------------------
#
# SQLite: plain sqlite3 edits the file; PostgreSQL: plain asyncpg UPDATEs and DELETEs the rows.


async def closed_history(client: TestClient[Any, Any], api: Api, make_api: MakeApi) -> None:
    """Two tenants' interleaved histories, then the server stops (its store closes)."""
    globex = await make_api(tenant="globex")
    await build_history(api)
    for i in range(3):
        await globex.post("/v1/jobs", {"id": f"g{i}", "agent": "x"})
        await api.post("/v1/jobs", {"id": f"late{i}", "agent": "y", "params": {"i": i}})
    await client.close()


async def positions(db: str, tenant: str | None = None, type_: str | None = None) -> list[int]:
    sql, args = "SELECT position FROM events WHERE 1 = 1", []
    if tenant is not None:
        sql += " AND tenant = ?"
        args.append(tenant)
    if type_ is not None:
        sql += " AND type = ?"
        args.append(type_)
    return [r[0] for r in await rawdb.rows(db, sql + " ORDER BY position", *args)]


def dense(db: str) -> bool:
    """Positions without gaps: SQLite's one writer (PostgreSQL reserves them per batch)."""
    return not db.startswith("postgres")


def expect_failure_at(done: Done, position: int) -> None:
    assert done.code == 1, (done.code, done.out, done.err)
    assert done.out.split()[:2] == ["FAILED", str(position)], done.out
    assert "Traceback" not in done.err
    assert len(done.err.strip().splitlines()) == 1 and str(position) in done.err


async def test_untouched_database_verifies(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """``jobledger verify`` prints ``OK <count> <head-hash>`` and exits 0 on an intact file."""
    db = db_url
    await closed_history(client, api, make_api)
    done = await acli("verify", "--db", db)
    assert done.code == 0, done.err
    tenants = sorted(r[0] for r in await rawdb.rows(db, "SELECT DISTINCT tenant FROM events"))
    assert len(tenants) > 1
    assert done.out.splitlines() == [  # one line per tenant: its count, its head, its name
        f"OK {len(await positions(db, t))} {await _last_hash(db, t)} {t}" for t in tenants
    ]
    acme = await acli("verify", "--db", db, "--tenant", "acme")
    assert acme.code == 0
    assert acme.out.splitlines() == [
        f"OK {len(await positions(db, 'acme'))} {await _last_hash(db, 'acme')}"
    ]


async def _last_hash(db: str, tenant: str | None = None) -> str:
    sql, args = "SELECT hash FROM events", ()
    if tenant is not None:
        sql, args = sql + " WHERE tenant = ?", (tenant,)
    found = await rawdb.rows(db, sql + " ORDER BY position DESC LIMIT 1", *args)
    return str(found[0][0])


async def test_verify_beside_a_server_that_appends(db_url: str, api: Api) -> None:
    """``jobledger verify`` passes while a running server keeps appending and redacting."""
    db = db_url
    await build_history(api)
    stop = asyncio.Event()
    rounds = 0

    async def append() -> None:
        nonlocal rounds
        while not stop.is_set():
            await api.post("/v1/jobs", {"id": f"busy{rounds}", "agent": "a", "params": {"p": 1}})
            await api.post(f"/v1/jobs/busy{rounds}/events", {"type": "job.started"})
            await api.post(f"/v1/jobs/busy{rounds}/redact", {}, status=200)
            rounds += 1

    task = asyncio.create_task(append())
    try:
        results = [await acli("verify", "--db", db) for _ in range(3)]
    finally:
        stop.set()
        await task
    assert rounds > 0
    for done in results:
        assert done.code == 0, done.out + done.err
        assert done.last_line.startswith("OK ")


async def test_edited_data_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Editing an event's stored data (hashes untouched) fails verify at that position."""
    db = db_url
    await closed_history(client, api, make_api)
    target = (await positions(db, "acme", "job.queued"))[1]
    await rawdb.tamper(
        db,
        (
            "UPDATE events SET data = replace(data, 'scraper', 'scrapex') WHERE position = ?",
            (target,),
        ),
    )
    expect_failure_at(await acli("verify", "--db", db), target)
    expect_failure_at(await acli("verify", "--db", db, "--tenant", "acme"), target)
    assert (await acli("verify", "--db", db, "--tenant", "globex")).code == 0


@pytest.mark.parametrize("how", ["repeated key", "spaces"])
async def test_stored_non_canonical_data_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi, how: str
) -> None:
    """Stored data that is not canonical text fails verify, even with ``data_hash`` taken over
    its own bytes and the chain and head recomputed: the hash is over the canonical form."""
    db = db_url
    await closed_history(client, api, make_api)
    target = (await positions(db, "acme"))[-1]
    (
        (stored, prev, event_id, stream, version, type_, occurred, recorded, actor),
    ) = await rawdb.rows(
        db,
        "SELECT data, prev_hash, event_id, stream, version, type, occurred_at, recorded_at, "
        "actor FROM events WHERE position = ?",
        target,
    )
    data = json.loads(stored)
    assert canon(data).decode() == stored and "agent" in data
    raw = stored[:-1] + ',"agent":"evil"}' if how == "repeated key" else json.dumps(data)
    data_hash = sha256_hex(raw.encode())
    header = {
        "position": target,
        "event_id": event_id,
        "stream": stream,
        "version": version,
        "type": type_,
        "occurred_at": occurred,
        "recorded_at": recorded,
        "actor": actor,
        "data_hash": data_hash,
    }
    digest = sha256_hex(prev.encode() + b"\n" + canon(header))
    await rawdb.tamper(
        db,
        (
            "UPDATE events SET data = ?, data_hash = ?, hash = ? WHERE position = ?",
            (raw, data_hash, digest, target),
        ),
        ("UPDATE chain_heads SET hash = ? WHERE tenant = 'acme'", (digest,)),
    )
    done = await acli("verify", "--db", db)
    expect_failure_at(done, target)
    assert "data does not match data_hash" in done.out
    assert (await acli("verify", "--db", db, "--tenant", "globex")).code == 0


@pytest.mark.parametrize("column", ["actor", "occurred_at", "type", "stream", "event_id"])
async def test_edited_header_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi, column: str
) -> None:
    """Editing any header column of a middle event fails verify at that position."""
    db = db_url
    await closed_history(client, api, make_api)
    target = (await positions(db, "acme", "job.started"))[0]
    new = {"type": "job.failed", "stream": "j9"}.get(column, "2020-01-01T00:00:00Z")
    await rawdb.tamper(db, (f"UPDATE events SET {column} = ? WHERE position = ?", (new, target)))
    expect_failure_at(await acli("verify", "--db", db), target)


async def test_edited_occurred_us_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """The stored microseconds behind occurred_at cannot drift from the hashed text unseen."""
    db = db_url
    await closed_history(client, api, make_api)
    target = (await positions(db, "acme", "job.completed"))[0]
    await rawdb.tamper(
        db,
        ("UPDATE events SET occurred_us = occurred_us + 3600000000 WHERE position = ?", (target,)),
    )
    expect_failure_at(await acli("verify", "--db", db), target)


async def test_nulled_data_without_redaction_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Data erased outside a redaction fails verify at that position."""
    db = db_url
    await closed_history(client, api, make_api)
    target = (await positions(db, "acme", "job.queued"))[0]
    await rawdb.tamper(
        db, ("UPDATE events SET data = NULL, redacted = 1 WHERE position = ?", (target,))
    )
    expect_failure_at(await acli("verify", "--db", db), target)


async def test_deleted_middle_row_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Deleting a middle event fails verify, naming the missing position."""
    db = db_url
    await closed_history(client, api, make_api)
    acme = await positions(db, "acme")
    target = acme[len(acme) // 2]
    await rawdb.tamper(db, ("DELETE FROM events WHERE position = ?", (target,)))
    done = await acli("verify", "--db", db)
    following = next(p for p in acme if p > target)
    expect_failure_at(done, target if dense(db) else following)
    assert str(following) in done.out  # the event whose link broke is named too
    if not dense(db):  # and the range the missing event was in
        assert str(acme[acme.index(target) - 1]) in done.out


async def test_deleted_interleaved_row_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Deleting a row of one tenant between another tenant's rows names the missing position."""
    db = db_url
    await closed_history(client, api, make_api)
    globex = await positions(db, "globex")
    target = globex[-2]
    await rawdb.tamper(db, ("DELETE FROM events WHERE position = ?", (target,)))
    named = target if dense(db) else globex[-1]  # gaps are normal there: the broken link
    expect_failure_at(await acli("verify", "--db", db), named)
    expect_failure_at(await acli("verify", "--db", db, "--tenant", "globex"), named)
    assert (await acli("verify", "--db", db, "--tenant", "acme")).code == 0


async def test_deleted_first_row_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Deleting the very first event fails verify at position 1."""
    db = db_url
    await closed_history(client, api, make_api)
    (tenant,) = (await rawdb.rows(db, "SELECT tenant FROM events WHERE position = 1"))[0]
    ours = await positions(db, tenant)
    await rawdb.tamper(db, ("DELETE FROM events WHERE position = 1", ()))
    # with gaps allowed (PostgreSQL) the tenant's next event is the first that does not link
    expect_failure_at(await acli("verify", "--db", db), 1 if dense(db) else ours[1])


async def test_deleted_last_row_is_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Deleting the newest event fails verify against the stored chain head."""
    db = db_url
    await closed_history(client, api, make_api)
    last = (await positions(db))[-1]
    await rawdb.tamper(db, ("DELETE FROM events WHERE position = ?", (last,)))
    expect_failure_at(await acli("verify", "--db", db), last)


async def test_deleted_last_rows_name_the_first_missing(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Deleting a tenant's last two events names the first of them."""
    db = db_url
    await closed_history(client, api, make_api)
    acme = await positions(db, "acme")
    await rawdb.tamper(
        db, ("DELETE FROM events WHERE position >= ? AND tenant = 'acme'", (acme[-2],))
    )
    # dense positions name the first missing; with gaps, the head's own position is the one
    # known to be missing (and the message names where the chain now ends)
    done = await acli("verify", "--db", db)
    expect_failure_at(done, acme[-2] if dense(db) else acme[-1])
    if not dense(db):
        assert str(acme[-3]) in done.out


async def test_swapped_rows_are_detected(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi
) -> None:
    """Swapping two events' positions fails verify at the first of them."""
    db = db_url
    await closed_history(client, api, make_api)
    a, b = (await positions(db, "acme"))[4:6]
    await rawdb.tamper(
        db,
        ("UPDATE events SET position = -1 WHERE position = ?", (a,)),
        ("UPDATE events SET position = ? WHERE position = ?", (a, b)),
        ("UPDATE events SET position = ? WHERE position = -1", (b,)),
    )
    expect_failure_at(await acli("verify", "--db", db), a)


async def test_verify_file(
    db_url: str, client: TestClient[Any, Any], api: Api, make_api: MakeApi, tmp_path: Path
) -> None:
    """``verify --file`` accepts an intact export and names the first bad line of an edited one."""
    db = db_url
    await closed_history(client, api, make_api)
    out = tmp_path / "export.ndjson"
    done = await acli("export", "--db", db, "--tenant", "acme", "--out", str(out))
    assert done.code == 0, done.err
    events = parse_ndjson(out.read_text())
    count, head = verify_chain(events)
    ok = await acli("verify", "--file", str(out))
    assert ok.code == 0 and ok.out.splitlines() == [f"OK {count} {head}"]

    every = tmp_path / "all.ndjson"
    assert (await acli("export", "--db", db, "--out", str(every))).code == 0
    assert (await acli("verify", "--file", str(every))).last_line.startswith("OK ")

    victim = events[3]
    edited = [dict(e) for e in events]
    edited[3]["data"] = {**victim["data"], "agent": "evil"}
    bad = tmp_path / "edited.ndjson"
    bad.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in edited))
    expect_failure_at(await acli("verify", "--file", str(bad)), victim["position"])

    missing = tmp_path / "missing.ndjson"
    missing.write_text("".join(json.dumps(e) + "\n" for i, e in enumerate(events) if i != 5))
    expect_failure_at(await acli("verify", "--file", str(missing)), events[6]["position"])

    header = [dict(e) for e in events]
    header[2]["actor"] = "key_evil"
    forged = tmp_path / "forged.ndjson"
    forged.write_text("".join(json.dumps(e) + "\n" for e in header))
    expect_failure_at(await acli("verify", "--file", str(forged)), events[2]["position"])


async def test_cli_export_matches_http_export(
    db_url: str, client: TestClient[Any, Any], api: Api, tmp_path: Path
) -> None:
    """``jobledger export`` writes the same NDJSON and CSV as the HTTP route, with filters."""
    db = db_url
    await build_history(api)
    http = await api.get("/v1/audit/export")
    http_csv = await api.get("/v1/audit/export", params={"format": "csv"})
    http_j1 = await api.get("/v1/audit/export", params={"job_id": "j1"})
    http_window = await api.get(
        "/v1/audit/export", params={"since": "2025-02-01T00:00:00Z", "until": "2025-03-01"}
    )
    done = await acli("export", "--db", db, "--tenant", "acme")
    assert done.code == 0 and done.out == http
    as_csv = await acli("export", "--db", db, "--tenant", "acme", "--format", "csv")
    assert as_csv.out == http_csv
    j1 = await acli("export", "--db", db, "--tenant", "acme", "--job", "j1")
    assert j1.out == http_j1
    window = await acli(
        "export",
        "--db",
        db,
        "--tenant",
        "acme",
        "--since",
        "2025-02-01T00:00:00Z",
        "--until",
        "2025-03-01",
    )
    assert window.out == http_window


# -- erasure -------------------------------------------------------------------------------------


async def test_redaction_erases_and_keeps_the_chain(
    db_url: str,
    client: TestClient[Any, Any],
    app: web.Application,
    api: Api,
    tmp_path: Path,
    aiohttp_client: Any,
) -> None:
    """A redacted job's data and result are gone from every file; chain and credits stay."""
    db = db_url
    await api.post("/v1/prices", {"agent": "pii/agent", "per_job": 2, "per_row": "0.25"})
    await api.post("/v1/credits/grants", {"account": "acct-9", "amount": 50})
    await api.post(
        "/v1/jobs",
        {
            "id": "pii",
            "agent": "pii/agent",
            "account": "acct-9",
            "params": {"email": f"{MARKER}@example.com", "note": MARKER, "blob": MARKER * 3000},
            "created_by": {"id": "u1", "email": f"{MARKER}@example.com", "first_name": "Ada"},
        },
        headers={"Idempotency-Key": "create-pii"},
    )
    await api.post("/v1/jobs/pii/events", {"type": "job.started"})
    await api.post(
        "/v1/jobs/pii/events", {"type": "job.progressed", "data": {"message": f"at {MARKER}"}}
    )
    await api.post(
        "/v1/jobs/pii/events",
        {"type": "job.completed", "data": {"result": [{"name": MARKER}, {"name": MARKER * 5000}]}},
        headers={"Idempotency-Key": "complete-pii"},
    )
    await api.post("/v1/jobs", {"id": "other", "agent": "pii/agent", "account": "acct-9"})
    assert MARKER.encode() in await rawdb.stored_bytes(db)  # the marker really was written

    job_before = await api.get("/v1/jobs/pii")
    account_before = await api.get("/v1/accounts/acct-9")
    credits_before = await api.get("/v1/credits", params={"account": "acct-9"})
    stats_before = await api.get("/v1/jobs/stats")
    assert job_before["credits_used"] == 2.5 and credits_before["used"] == 2.5
    head_before = await api.get("/v1/audit/head")

    redacted = await api.post("/v1/jobs/pii/redact", {"reason": "GDPR art. 17"}, status=200)
    assert redacted["credits_used"] == job_before["credits_used"]
    assert redacted["params"] == {} and redacted["created_by"] is None
    assert MARKER.encode() not in await rawdb.stored_bytes(db)  # while the server still runs
    if rawdb.is_postgres(db):  # dead row versions go too: every table that held the data
        residue = {"events", "results", "idempotency", "jobs"}  # "jobs": a read model's
        await wait_until(
            lambda: _vacuumed(db, residue), 60, "the tables that held erased data vacuumed"
        )

    events = (await api.get("/v1/jobs/pii/events"))["events"]
    assert [e["type"] for e in events][-1] == "job.redacted"
    for event in events[:-1]:
        assert event["data"] is None and event["redacted"] is True
    assert events[-1]["data"]["reason"] == "GDPR art. 17"
    snapshot = events[-1]["data"]["state"]  # in the API's units, as auditors read it
    assert snapshot["credits_used"] == "2.5" and job_before["credits_used"] == 2.5
    for name in ("created_at", "started_at", "finished_at", "updated_at", "expires_at"):
        assert snapshot[name] == job_before[name], name
    exported = await export(api)
    verify_chain(exported)
    assert MARKER not in json.dumps(exported)
    assert [e for e in exported if e["stream"] == "pii"][:-1] == events[:-1]
    head = await api.get("/v1/audit/head")
    assert head["count"] == head_before["count"] + 1
    as_csv = parse_csv(await api.get("/v1/audit/export", params={"format": "csv", "job_id": "pii"}))
    assert [e["data"] for e in as_csv[:-1]] == [None] * (len(as_csv) - 1)
    assert all(event_problem(e) is None for e in as_csv)

    result = await api.get("/v1/jobs/pii/results", status=410)
    assert result["error"]["code"] == "results_expired"
    await api.get(f"/v1/results/{job_before['result_id']}", status=410)
    for answer in (await api.get("/v1/jobs/pii"), await api.get("/v1/jobs/pii", params={})):
        assert answer["credits_used"] == job_before["credits_used"]
        assert answer["status"] == "completed" and answer["row_count"] == 2
    assert await api.get("/v1/accounts/acct-9") == account_before
    assert await api.get("/v1/credits", params={"account": "acct-9"}) == credits_before
    assert await api.get("/v1/jobs/stats") == {**stats_before, "position": head["position"]}

    # a replay (in process, then the CLI with the server stopped) charges exactly the same
    store = app[STORE]
    await rebuild(store.backend, store.projectors)
    assert (await api.get("/v1/jobs/pii"))["credits_used"] == job_before["credits_used"]
    assert await api.get("/v1/accounts/acct-9") == account_before
    await client.close()
    assert MARKER.encode() not in await rawdb.stored_bytes(db)  # and after the store closed
    assert (await acli("verify", "--db", db)).code == 0
    done = await acli("rebuild", "--db", db)
    assert done.code == 0, done.err
    assert (await acli("rebuild", "--db", db, "--verify")).code == 0
    assert MARKER.encode() not in await rawdb.stored_bytes(db)

    again = Api(await aiohttp_client(create_app(Settings(db_url=db))), None)
    again.headers = dict(api.headers)
    assert (await again.get("/v1/jobs/pii"))["credits_used"] == job_before["credits_used"]
    assert await again.get("/v1/accounts/acct-9") == account_before
    assert await again.get("/v1/credits", params={"account": "acct-9"}) == credits_before
    await again.get("/v1/jobs/pii/results", status=410)


async def _vacuumed(db: str, tables: set[str]) -> bool:
    return tables <= await rawdb.vacuumed(db)


async def test_redact_needs_a_live_job(api: Api) -> None:
    """Redacting an unknown or deleted job is 404; redacting twice keeps the job's credits."""
    await api.post("/v1/jobs/nope/redact", {}, status=404)
    await api.post("/v1/jobs", {"id": "d", "agent": "a"})
    await api.delete("/v1/jobs/d")
    await api.post("/v1/jobs/d/redact", {}, status=404)
    await api.post("/v1/jobs", {"id": "r", "agent": "a", "params": {"p": 1}})
    await api.post("/v1/jobs/r/events", {"type": "job.completed", "data": {"row_count": 4}})
    first = await api.post("/v1/jobs/r/redact", {}, status=200)
    second = await api.post("/v1/jobs/r/redact", {"reason": "again"}, status=200)
    assert first["credits_used"] == second["credits_used"] == 4
    await api.post("/v1/jobs/r/archive", status=200)
    verify_chain(await export(api))


async def test_a_second_redaction_keeps_the_first_ones_record(
    db_url: str, client: TestClient[Any, Any], api: Api
) -> None:
    """Redacting again erases nothing new of the first ``job.redacted``: both records stay,
    with their reasons and kept state, in the API, the export and after a rebuild."""
    await api.post("/v1/jobs", {"id": "r", "agent": "a", "params": {"note": MARKER}})
    await api.post("/v1/jobs/r/events", {"type": "job.completed", "data": {"row_count": 4}})
    await api.post("/v1/jobs/r/redact", {"reason": "first: ticket 123"}, status=200)
    await api.post(
        "/v1/jobs/r/events", {"type": "job.pr_linked", "data": {"pr_link": f"https://x/{MARKER}"}}
    )
    await api.post("/v1/jobs/r/redact", {"reason": "second"}, status=200)

    events = (await api.get("/v1/jobs/r/events"))["events"]
    types = [e["type"] for e in events]
    assert types == ["job.queued", "job.completed", "job.redacted", "job.pr_linked", "job.redacted"]
    first, second = events[2], events[4]
    assert "redacted" not in first and first["data"]["reason"] == "first: ticket 123"
    assert first["data"]["state"]["status"] == "completed"
    assert second["data"]["reason"] == "second"
    assert [e["data"] for e in (events[0], events[1], events[3])] == [None, None, None]
    assert MARKER not in json.dumps(events)
    exported = [e for e in await export(api) if e["stream"] == "r"]
    assert exported == events
    verify_chain(await export(api))
    await client.close()
    assert (await acli("verify", "--db", db_url)).code == 0
    done = await acli("rebuild", "--db", db_url, "--verify")
    assert done.code == 0, done.err


# -- time travel ---------------------------------------------------------------------------------


async def test_as_of_answers_the_past(api: Api) -> None:
    """``?as_of=P`` answers the job as it stood right after position P."""
    await api.post("/v1/jobs", {"id": "t", "agent": "a", "executions_total": 2})
    await api.post("/v1/jobs", {"id": "other", "agent": "a"})
    await api.post(
        "/v1/jobs/t/events", {"type": "job.execution_succeeded", "data": {"execution_id": "e1"}}
    )
    await api.post("/v1/jobs/t/events", {"type": "job.progressed", "data": {"row_count": 7}})
    await api.post(
        "/v1/jobs/t/events", {"type": "job.execution_failed", "data": {"execution_id": "e2"}}
    )
    await api.post("/v1/jobs/t/archive", status=200)
    stream = (await api.get("/v1/jobs/t/events"))["events"]
    seen = []
    for event in stream:
        past = await api.get("/v1/jobs/t", params={"as_of": event["position"]})
        assert past["version"] == event["version"]
        seen.append((past["status"], past["row_count"], past["archived_at"] is not None))
    assert seen == [
        ("queued", 0, False),
        ("running", 0, False),
        ("running", 7, False),
        ("partial_failed", 7, False),
        ("partial_failed", 7, True),
    ]
    between = await api.get("/v1/jobs/t", params={"as_of": stream[0]["position"] + 1})
    assert between["version"] == 1  # another job's event changes nothing of this one
    assert await api.get("/v1/jobs/t", params={"as_of": 10**9}) == await api.get("/v1/jobs/t")
    await api.get("/v1/jobs/t", params={"as_of": stream[0]["position"] - 1}, status=404)
    await api.get("/v1/jobs/t", params={"as_of": "x"}, status=422)


# -- the README's verifier -----------------------------------------------------------------------


def readme_verifier() -> str:
    """The Python block of docs/audit.md that verifies an NDJSON export."""
    text = (Path(__file__).parent.parent / "docs" / "audit.md").read_text()
    blocks = text.split("```python\n")[1:]
    code = [b.split("```", 1)[0] for b in blocks if "sys.argv[1]" in b]
    assert len(code) == 1
    assert len(code[0].strip().splitlines()) <= 20
    return code[0]


async def run_python(script: Path, *args: str) -> Done:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def test_readme_verifier_accepts_a_real_export(api: Api, tmp_path: Path) -> None:
    """The documented twenty-line verifier passes a real export and fails a tampered one."""
    script = tmp_path / "verify.py"
    script.write_text(readme_verifier())
    await build_history(api)
    await api.post("/v1/jobs/j1/redact", {"reason": "erase"}, status=200)
    text = await api.get("/v1/audit/export")
    good = tmp_path / "audit.ndjson"
    good.write_bytes(text.encode())
    head = await api.get("/v1/audit/head")
    done = await run_python(script, str(good))
    assert done.code == 0, done.err
    assert done.out.splitlines() == [f"OK {head['count']} {head['hash']}"]

    events = parse_ndjson(text)
    victim = next(e for e in events if e["type"] == "job.failed")
    victim["data"]["error"]["message"] = "it did not break"
    bad = tmp_path / "tampered.ndjson"
    bad.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events))
    failed = await run_python(script, str(bad))
    assert failed.code == 1 and f"FAILED {victim['position']}" in failed.err

    dropped = tmp_path / "dropped.ndjson"
    dropped.write_text("".join(line + "\n" for i, line in enumerate(text.splitlines()) if i != 2))
    assert (await run_python(script, str(dropped))).code == 1


async def test_docs_verifier_checks_every_tenants_chain(
    db_url: str, api: Api, make_api: MakeApi, tmp_path: Path
) -> None:
    """On an export of every tenant, the docs' verifier prints what ``verify --file`` prints:
    one line per tenant's chain, each ending at that tenant's head."""
    script = tmp_path / "verify.py"
    script.write_text(readme_verifier())
    globex = await make_api("globex")
    for caller in (api, globex, api):
        await caller.post("/v1/jobs", {"agent": "a"})
    every = tmp_path / "every.ndjson"
    assert (await acli("export", "--db", db_url, "--out", str(every))).code == 0
    by_script = await run_python(script, str(every))
    by_cli = await acli("verify", "--file", str(every))
    assert by_script.code == 0 and by_cli.code == 0, by_script.err + by_cli.err
    assert by_script.out == by_cli.out
    heads = [await caller.get("/v1/audit/head") for caller in (api, globex)]
    assert by_script.out.splitlines() == [f"OK {h['count']} {h['hash']}" for h in heads]
    per_tenant = await acli("verify", "--db", db_url)
    names = ["acme", "globex"]
    assert per_tenant.out.splitlines() == [
        f"OK {h['count']} {h['hash']} {name}" for h, name in zip(heads, names, strict=True)
    ]
