"""``jobledger import``: restores an export into an empty database, on either backend."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import create_app
from api.settings import Settings
from ledger import chain
from ledger.backends import backend_for
from ledger.store import EventStore
from projections import all_projectors
from tests.conftest import Api, create_pg_database, drop_pg_database, pg_server_url
from tests.history import RICH_JOB_IDS
from tests.serverproc import acli
from tests.test_rebuild import snapshot

AiohttpClient = Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]]


@pytest.fixture
async def other_db(db_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database on the other backend (PostgreSQL for SQLite and back), when it can."""
    if db_url.startswith("postgres") or pg_server_url() is None:
        yield str(tmp_path / "restored.db")
        return
    url = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(url)


async def counts(db: str) -> tuple[int, int, int]:
    """Events, chain heads and jobs rows of ``db``."""
    store = EventStore(backend_for(db), all_projectors())
    async with store.running(writer=False):
        async with store.backend.read() as conn:
            found = []
            for table in ("events", "chain_heads", "jobs"):
                row = await conn.fetchone(f"SELECT count(*) FROM {table}")
                found.append(int(row[0]) if row else -1)
    return found[0], found[1], found[2]


async def export(db: str, out: Path, *tenant: str) -> bytes:
    args = ("--tenant", tenant[0]) if tenant else ()
    done = await acli("export", "--db", db, *args, "--out", str(out))
    assert done.code == 0, done.err
    return await asyncio.to_thread(out.read_bytes)


@pytest.mark.rich_history
async def test_export_import_export_is_byte_identical(
    db_url: str,
    other_db: str,
    client: TestClient[Any, Any],
    api: Api,
    app: web.Application,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    """SQLite to PostgreSQL (and back): the export of the import is the export, byte for byte."""
    job_ids = list(RICH_JOB_IDS)
    before = await snapshot(api, job_ids)
    await client.close()
    every = await export(db_url, tmp_path / "all.ndjson")
    acme = await export(db_url, tmp_path / "acme.ndjson", "acme")
    lines = every.decode().splitlines()
    assert {json.loads(line)["tenant"] for line in lines} == {"acme", "globex"}
    assert '"tenant"' not in acme.decode()  # a one-tenant export is exactly the chain

    done = await acli("import", "--db", other_db, str(tmp_path / "all.ndjson"))
    assert done.code == 0, done.err
    summary = json.loads(done.last_line)
    assert summary["events"] == len(lines) and summary["tenants"] == 2
    assert await export(other_db, tmp_path / "again.ndjson") == every
    assert await export(other_db, tmp_path / "acme-again.ndjson", "acme") == acme
    verified = await acli("verify", "--db", other_db)
    assert verified.code == 0, verified.err
    chains = [line.split() for line in verified.out.splitlines()]  # OK <count> <head> <tenant>
    assert {c[3] for c in chains} == {"acme", "globex"} and all(c[0] == "OK" for c in chains)
    assert sum(int(c[1]) for c in chains) == len(lines)
    replayed = await acli("rebuild", "--db", other_db, "--verify")
    assert replayed.code == 0 and json.loads(replayed.last_line)["identical"] is True

    restored = Api(await aiohttp_client(create_app(Settings(db_url=other_db))), None)
    restored.headers = dict(api.headers)  # the keys came along: the same secret works
    after = await snapshot(restored, job_ids)
    # result payloads are not events: an export does not carry them
    assert {k: v for k, v in before.items() if not k.startswith("results ")} == {
        k: v for k, v in after.items() if not k.startswith("results ")
    }


async def test_one_tenant_export_imports_under_a_named_tenant(
    db_url: str, client: TestClient[Any, Any], api: Api, app: web.Application, tmp_path: Path
) -> None:
    """A one-tenant export names no tenant: ``--tenant`` gives it, and it is required."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/j1/events", {"type": "job.completed", "data": {"row_count": 2}})
    await client.close()
    acme = await export(db_url, tmp_path / "acme.ndjson", "acme")
    target = str(tmp_path / "target.db")
    missing = await acli("import", "--db", target, str(tmp_path / "acme.ndjson"))
    assert missing.code == 1 and "give the tenant" in missing.err
    assert "Traceback" not in missing.err
    assert await counts(target) == (0, 0, 0)
    done = await acli("import", "--db", target, "--tenant", "acme", str(tmp_path / "acme.ndjson"))
    assert done.code == 0, done.err
    assert await export(target, tmp_path / "again.ndjson", "acme") == acme
    assert (await counts(target))[2] == 1


def _tampered(lines: list[str], index: int, change: Callable[[dict[str, Any]], None]) -> str:
    events = [json.loads(line) for line in lines]
    change(events[index])
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)


@pytest.mark.rich_history
@pytest.mark.parametrize("how", ["data", "header", "deleted", "swapped", "hash"])
async def test_a_broken_chain_is_refused_with_its_position(
    db_url: str,
    other_db: str,
    client: TestClient[Any, Any],
    api: Api,
    app: web.Application,
    tmp_path: Path,
    how: str,
) -> None:
    """An edited, deleted or moved event is refused at its position; nothing is imported."""
    await client.close()
    lines = (await export(db_url, tmp_path / "all.ndjson")).decode().splitlines()
    victim = len(lines) // 2
    while json.loads(lines[victim])["data"] is None:
        victim += 1
    position = json.loads(lines[victim])["position"]
    if how == "data":
        text = _tampered(lines, victim, lambda e: e["data"].update(evil=True))
    elif how == "header":
        text = _tampered(lines, victim, lambda e: e.update(actor="key_evil"))
    elif how == "hash":
        text = _tampered(lines, victim, lambda e: e.update(hash="0" * 64))
    elif how == "deleted":
        tenant = json.loads(lines[victim])["tenant"]
        position = next(
            json.loads(line)["position"]
            for line in lines[victim + 1 :]
            if json.loads(line)["tenant"] == tenant
        )
        text = "".join(line + "\n" for i, line in enumerate(lines) if i != victim)
    else:  # two events trade places
        lines[victim], lines[victim + 1] = lines[victim + 1], lines[victim]
        position = json.loads(lines[victim])["position"]
        text = "".join(line + "\n" for line in lines)
    bad = tmp_path / "bad.ndjson"
    bad.write_text(text, encoding="utf-8")

    done = await acli("import", "--db", other_db, str(bad))
    assert done.code == 1
    assert done.out == ""
    assert len(done.err.strip().splitlines()) == 1 and "Traceback" not in done.err
    assert f"import refused at position {position}:" in done.err, done.err
    assert await counts(other_db) == (0, 0, 0)  # nothing half-imported
    # and the intact export still imports into the same (still empty) database
    good = await acli("import", "--db", other_db, str(tmp_path / "all.ndjson"))
    assert good.code == 0, good.err


async def test_import_refuses_a_database_with_events(
    db_url: str, client: TestClient[Any, Any], api: Api, tmp_path: Path
) -> None:
    """Import restores into an empty database only; one with events is left as it was."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await client.close()
    await export(db_url, tmp_path / "all.ndjson")
    before = await counts(db_url)
    done = await acli("import", "--db", db_url, str(tmp_path / "all.ndjson"))
    assert done.code == 1 and "already holds events" in done.err
    assert await counts(db_url) == before


async def test_import_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    """A line that is not an exported event is named by its number; a missing file, plainly."""
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"position": 1}\n', encoding="utf-8")
    db = str(tmp_path / "ledger.db")
    done = await acli("import", "--db", db, "--tenant", "t", str(bad))
    assert done.code == 1 and "import refused at line 1:" in done.err
    gone = await acli("import", "--db", db, str(tmp_path / "nope.ndjson"))
    assert gone.code == 1 and "cannot read" in gone.err
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    conn.close()


def _rechained(events: list[dict[str, Any]]) -> str:
    """``events`` as an export again, every tenant's chain recomputed (a forger's file)."""
    prev: dict[str, str] = {}
    out = []
    for e in events:
        e["prev_hash"] = prev.get(e["tenant"], chain.GENESIS)
        e["hash"] = chain.header_hash(e["prev_hash"], {k: e[k] for k in chain.HEADER_FIELDS})
        prev[e["tenant"]] = e["hash"]
        out.append(json.dumps(e, ensure_ascii=False) + "\n")
    return "".join(out)


async def test_two_events_with_one_event_id_are_refused(
    db_url: str, other_db: str, client: TestClient[Any, Any], api: Api, tmp_path: Path
) -> None:
    """Event ids are unique (their index is built after the load): a whole, well-chained
    file that repeats one is refused, and nothing is imported."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/j1/events", {"type": "job.started"})
    await api.post("/v1/jobs/j1/events", {"type": "job.completed", "data": {"row_count": 2}})
    await client.close()
    lines = (await export(db_url, tmp_path / "all.ndjson")).decode().splitlines()
    events = [json.loads(line) for line in lines]
    events[-1]["event_id"] = events[-2]["event_id"]
    bad = tmp_path / "bad.ndjson"
    bad.write_text(_rechained(events), encoding="utf-8")
    assert (await acli("verify", "--file", str(bad))).code == 0  # every hash holds

    done = await acli("import", "--db", other_db, str(bad))
    assert done.code == 1 and "share an event id" in done.err, done.err
    assert "Traceback" not in done.err
    assert await counts(other_db) == (0, 0, 0)
    good = await acli("import", "--db", other_db, str(tmp_path / "all.ndjson"))
    assert good.code == 0, good.err
    assert await counts(other_db) == (len(lines), len({e["tenant"] for e in events}), 1)


def _forged(lines: list[str], index: int, raw: str, *, hash_raw: bool) -> str:
    """The export with event ``index``'s data replaced by the text ``raw``, written as is; its
    ``data_hash`` over ``raw``'s own bytes (``hash_raw``) or over its canonical form, and
    every tenant's chain recomputed (a forger's file)."""
    events = [json.loads(line) for line in lines]
    victim = events[index]
    data_hash = chain.sha256_hex(raw.encode() if hash_raw else chain.canonical(json.loads(raw)))
    victim["data"] = "RAW-DATA-HERE"
    victim["data_hash"] = data_hash
    text = _rechained(events)
    return text.replace('"RAW-DATA-HERE"', raw, 1)


def _canonical_text(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


NON_CANONICAL: dict[str, Callable[[dict[str, Any]], str]] = {
    # a repeated key: a verifier (and the fold) keeps the last value, 1000 times the rows
    "repeated key": lambda d: _canonical_text(d)[:-1] + f',"row_count":{d["row_count"] * 1000}}}',
    "spaces": lambda d: json.dumps(d, sort_keys=True),
    "an escape": lambda d: _canonical_text(d).replace('"row_count"', '"\\u0072ow_count"'),
}


@pytest.mark.parametrize("how", sorted(NON_CANONICAL))
async def test_non_canonical_data_hashed_as_it_is_written_is_refused(
    db_url: str, other_db: str, client: TestClient[Any, Any], api: Api, tmp_path: Path, how: str
) -> None:
    """Data whose own bytes hash to ``data_hash`` but which is not canonical: ``verify --file``
    and ``import`` refuse it at the same position, and nothing is imported."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/j1/events", {"type": "job.started"})
    await api.post("/v1/jobs/j1/events", {"type": "job.completed", "data": {"row_count": 5}})
    await api.post("/v1/jobs", {"id": "j2", "agent": "a", "account": "x"})
    await client.close()
    lines = (await export(db_url, tmp_path / "all.ndjson")).decode().splitlines()
    index = next(i for i, line in enumerate(lines) if '"job.completed"' in line)
    data = json.loads(lines[index])["data"]
    assert data["row_count"] == 5
    position = json.loads(lines[index])["position"]
    raw = NON_CANONICAL[how](data)
    assert raw != _canonical_text(data) and json.loads(raw)["row_count"] in (5, 5000)
    bad = tmp_path / "bad.ndjson"
    bad.write_text(_forged(lines, index, raw, hash_raw=True), encoding="utf-8")
    assert f'"data": {raw}' in bad.read_text(encoding="utf-8")

    verified = await acli("verify", "--file", str(bad))
    assert verified.code == 1 and verified.out.split()[:2] == ["FAILED", str(position)]
    assert "data does not match data_hash" in verified.out
    done = await acli("import", "--db", other_db, str(bad))
    assert done.code == 1 and "Traceback" not in done.err
    assert f"import refused at position {position}: data does not match data_hash" in done.err
    assert await counts(other_db) == (0, 0, 0)


async def test_non_canonical_data_that_verifies_is_stored_canonical(
    db_url: str, other_db: str, client: TestClient[Any, Any], api: Api, tmp_path: Path
) -> None:
    """Data written non-canonically but hashed canonically verifies, so it imports: as its
    canonical text (the export of the import is the original export), which verify --db
    accepts."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/j1/events", {"type": "job.completed", "data": {"row_count": 5}})
    await client.close()
    original = await export(db_url, tmp_path / "all.ndjson")
    lines = original.decode().splitlines()
    index = next(i for i, line in enumerate(lines) if '"job.completed"' in line)
    data = json.loads(lines[index])["data"]
    raw = '{"row_count": 7, ' + json.dumps(data)[1:]  # spaces, unsorted, a repeated key
    assert chain.canonical(json.loads(raw)).decode() == _canonical_text(data) != raw
    forged = tmp_path / "spaced.ndjson"
    forged.write_text(_forged(lines, index, raw, hash_raw=False), encoding="utf-8")
    assert (await acli("verify", "--file", str(forged))).code == 0

    done = await acli("import", "--db", other_db, str(forged))
    assert done.code == 0, done.err
    assert await export(other_db, tmp_path / "again.ndjson") == original
    assert (await acli("verify", "--db", other_db)).code == 0


def _journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    conn.close()
    return mode


async def test_sqlite_import_ends_in_wal_mode_whether_it_succeeds_or_not(
    db_url: str, client: TestClient[Any, Any], api: Api, tmp_path: Path
) -> None:
    """SQLite loads through a rollback journal; afterwards, and after a refusal, the file is
    in WAL mode again, with no journal left, and a server serves it."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await client.close()
    await export(db_url, tmp_path / "all.ndjson")
    lines = (tmp_path / "all.ndjson").read_text(encoding="utf-8").splitlines()
    broken = tmp_path / "broken.ndjson"
    broken.write_text("\n".join([*lines[:-1], lines[-1].replace('"hash":"', '"hash":"0')]))
    target = tmp_path / "target.db"

    refused = await acli("import", "--db", str(target), str(broken))
    assert refused.code == 1 and "import refused at position" in refused.err
    assert _journal_mode(target) == "wal"
    assert not (tmp_path / "target.db-journal").exists()
    assert await counts(str(target)) == (0, 0, 0)

    done = await acli("import", "--db", str(target), str(tmp_path / "all.ndjson"))
    assert done.code == 0, done.err
    assert _journal_mode(target) == "wal"
    assert not (tmp_path / "target.db-journal").exists()
    tenants = {json.loads(line)["tenant"] for line in lines}
    assert await counts(str(target)) == (len(lines), len(tenants), 1)


async def test_sqlite_import_beside_another_open_connection_stays_in_wal(
    db_url: str, client: TestClient[Any, Any], api: Api, tmp_path: Path
) -> None:
    """Another process holding the file open keeps it in WAL mode: the import still loads
    everything, in one transaction, only without the cheaper journal."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await client.close()
    await export(db_url, tmp_path / "all.ndjson")
    target = tmp_path / "target.db"
    assert await counts(str(target)) == (0, 0, 0)  # creates the (empty) schema
    holder = sqlite3.connect(target)
    try:
        holder.execute("SELECT count(*) FROM events").fetchone()
        done = await acli("import", "--db", str(target), str(tmp_path / "all.ndjson"))
        assert done.code == 0, done.err
        assert holder.execute("SELECT count(*) FROM events").fetchone()[0] > 0
        assert _journal_mode(target) == "wal"
    finally:
        holder.close()
    assert (await counts(str(target)))[2] == 1


async def _verified_but_refused(bad: Path, db: str, position: int, said: str) -> None:
    """The forged export ``bad`` verifies (its chain holds), and ``import`` into ``db`` refuses
    it in one line naming ``position`` and saying ``said``, importing nothing."""
    assert (await acli("verify", "--file", str(bad))).code == 0
    done = await acli("import", "--db", db, str(bad))
    assert done.code == 1 and "Traceback" not in done.err, done.err
    assert f"import refused at position {position}: " in done.err, done.err
    assert said in done.err, done.err
    assert await counts(db) == (0, 0, 0)


OUT_OF_BOUNDS = {
    # the event's type, its data as a forger rewrites it, and what the import then says
    "price": ("price.set", {"per_job": "-1e30"}, "per_job is too large"),
    "grant": ("credits.granted", {"amount": "2000000000"}, "amount is too large"),
    "fraction": ("credits.granted", {"amount": "1.00001"}, "amount has more than 4 fractional"),
    "queued at": ("job.queued", {"per_job": "-1"}, "per_job must not be negative"),
}


@pytest.mark.parametrize("what", sorted(OUT_OF_BOUNDS))
async def test_a_price_or_grant_the_api_refuses_is_refused_with_its_position(
    db_url: str, other_db: str, client: TestClient[Any, Any], api: Api, tmp_path: Path, what: str
) -> None:
    """A forged export whose chain holds, with a price (set, or a job's) or a grant out of the
    API's bounds (which reads and charges would then fail on): ``import`` names the event's
    position and the field, and imports nothing."""
    await api.post("/v1/prices", {"agent": "ag", "per_job": 1})
    await api.post("/v1/credits/grants", {"account": "a1", "amount": 5})
    await api.post("/v1/jobs", {"id": "j1", "agent": "ag", "account": "a1"})
    await client.close()
    lines = (await export(db_url, tmp_path / "all.ndjson")).decode().splitlines()
    type_, change, said = OUT_OF_BOUNDS[what]
    index = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == type_)
    event = json.loads(lines[index])
    data = event["data"]
    if type_ == "credits.granted":
        data.update(change)
    else:  # a price set, or the price a job was queued at
        data["price"] = {**data.get("price", {}), **change}
    bad = tmp_path / "bad.ndjson"
    bad.write_text(_forged(lines, index, _canonical_text(data), hash_raw=False), encoding="utf-8")
    await _verified_but_refused(bad, other_db, event["position"], said)


def _appended(events: list[dict[str, Any]], like: dict[str, Any], stream: str) -> None:
    """A copy of the event ``like`` appended to ``stream`` as its next version, with a new
    event id, the next position and the last event's times (hashes are ``_rechained``'s)."""
    version = 1 + max((e["version"] for e in events if e["stream"] == stream), default=0)
    events.append(
        {
            **like,
            "stream": stream,
            "version": version,
            "position": events[-1]["position"] + 1,
            "event_id": f"evt_{len(events):026d}",
            "occurred_at": events[-1]["occurred_at"],
            "recorded_at": events[-1]["recorded_at"],
        }
    )


def _forge_after_cancel(events: list[dict[str, Any]]) -> None:
    completed = next(e for e in events if e["type"] == "job.completed")
    _appended(events, completed, "j2")  # j2 was cancelled: now charged as completed


def _forge_twice(events: list[dict[str, Any]]) -> None:
    completed = next(e for e in events if e["type"] == "job.completed")
    _appended(events, completed, "j1")  # j1 completed again: charged again


def _forge_keys_stream(events: list[dict[str, Any]]) -> None:
    started = next(e for e in events if e["type"] == "job.started")
    key_stream = next(e["stream"] for e in events if e["stream"].startswith("$keys/"))
    _appended(events, started, key_stream)


def _forge_reserved_id(events: list[dict[str, Any]]) -> None:
    queued = next(e for e in events if e["type"] == "job.queued")
    _appended(events, queued, "running")  # a job the API could never address


def _forge_tenant_event_on_a_job(events: list[dict[str, Any]]) -> None:
    created = next(e for e in events if e["stream"].startswith("$keys/"))
    _appended(events, created, "j1")


def _forge_nul(events: list[dict[str, Any]]) -> None:
    events[-1]["actor"] += "\x00"


LIFECYCLE_FORGERIES: dict[str, tuple[Callable[[list[dict[str, Any]]], None], str]] = {
    "completed after cancelled": (_forge_after_cancel, "job j2 is cancelled"),
    "completed twice": (_forge_twice, "job j1 is completed"),
    "a job event on a key's stream": (_forge_keys_stream, "which is not a job id"),
    "a NUL in a header": (_forge_nul, "a header field holds a NUL character"),
    "a reserved job id": (_forge_reserved_id, "which is not a job id"),
    "a key's event on a job's stream": (_forge_tenant_event_on_a_job, "a job's stream"),
}


@pytest.mark.parametrize("how", sorted(LIFECYCLE_FORGERIES))
async def test_a_history_the_write_path_would_refuse_is_refused(
    db_url: str, other_db: str, client: TestClient[Any, Any], api: Api, tmp_path: Path, how: str
) -> None:
    """A forged export whose chain holds but whose events the write path would have refused
    (a lifecycle step a finished job cannot take, a job event on a stream that is no job, a
    NUL that one backend would store and the other refuse): refused at its position, on both
    backends alike, and nothing is imported."""
    await api.post("/v1/jobs", {"id": "j1", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/j1/events", {"type": "job.started"})
    await api.post("/v1/jobs/j1/events", {"type": "job.completed", "data": {"row_count": 2}})
    await api.post("/v1/jobs", {"id": "j2", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/j2/cancel", {}, status=200)
    await client.close()
    lines = (await export(db_url, tmp_path / "all.ndjson")).decode().splitlines()
    events = [json.loads(line) for line in lines]
    forge, said = LIFECYCLE_FORGERIES[how]
    forge(events)
    bad = tmp_path / "bad.ndjson"
    bad.write_text(_rechained(events), encoding="utf-8")
    await _verified_but_refused(bad, other_db, events[-1]["position"], said)
