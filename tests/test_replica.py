"""Read replicas: reads answered by a real streaming standby, read-your-writes, fallbacks.

The standby tests start a hot standby of the test PostgreSQL server (``tests/standby.py``) and
real ``jobledger serve --replica`` processes. What proves that a read was answered by the
standby: with the standby's replay paused, a job just created on the primary is missing from
the answers a reader gets (the primary has it). The header and key tests run on both backends.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Api, create_pg_database, drop_pg_database, pg_server_url
from tests.serverproc import Key, acreate_key, cli, free_port, served
from tests.standby import Standby, Unavailable, standby
from tests.waits import wait_until

POSITION = "X-Ledger-Position"
TIMEOUT = aiohttp.ClientTimeout(total=60)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hot_standby() -> Iterator[Standby]:
    """One standby of the test server for the module's tests (it replays every database)."""
    base = pg_server_url()
    if base is None:
        pytest.skip("JOBLEDGER_TEST_POSTGRES is not set: no PostgreSQL server")
    try:
        with standby(base) as made:
            yield made
    except Unavailable as exc:
        if os.environ.get("CI"):  # CI promises a standby: its absence is a failure there
            pytest.fail(f"no standby in CI: {exc}")
        pytest.skip(f"no PostgreSQL standby here: {exc}")


@pytest.fixture
async def pg_url(hot_standby: Standby) -> AsyncIterator[str]:
    """A fresh database of its own on the primary, once the standby has it too."""
    url = await create_pg_database()
    try:
        await hot_standby.wait_for_database(url)
        yield url
    finally:
        await drop_pg_database(url)


async def _replay(sb: Standby, db: str, *, paused: bool) -> None:
    """Pause or resume the standby's replay, and wait until it has."""
    await sb.sql(db, f"SELECT pg_wal_replay_{'pause' if paused else 'resume'}()")
    want = "paused" if paused else "not paused"
    await wait_until(lambda: _replay_state_is(sb, db, want), 30, f"the standby's replay is {want}")


async def _replay_state_is(sb: Standby, db: str, state: str) -> bool:
    return await sb.sql(db, "SELECT pg_get_wal_replay_pause_state()") == state


async def _metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"(jobledger_replica_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def _count(metrics: dict[str, float], name: str, label: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(name) and label in k)


async def _job_status(http: aiohttp.ClientSession, url: str, key: Key, **headers: str) -> int:
    async with http.get(url, headers={**key.headers, **headers}) as resp:
        await resp.read()
        return resp.status


# -- the standby ------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_reads_are_answered_by_the_standby_and_see_their_writes(
    hot_standby: Standby, pg_url: str
) -> None:
    writer = await acreate_key(pg_url, "acme")
    reader = await acreate_key(pg_url, "acme", role="reader")
    async with (
        served(pg_url, "--replica", hot_standby.replica_of(pg_url)) as server,
        aiohttp.ClientSession(server.base, timeout=TIMEOUT) as http,
    ):
        await _replay(hot_standby, pg_url, paused=True)
        try:
            async with http.post(
                "/v1/jobs", json={"agent": "a/b", "account": "1"}, headers=writer.headers
            ) as resp:
                assert resp.status == 201
                job = (await resp.json())["id"]
                position = resp.headers[POSITION]
            assert int(position) > 0
            url = f"/v1/jobs/{job}"

            # the standby answers the reader, and it has not replayed the job: not found,
            # in the job's page and in the list, though the primary holds it
            assert await _job_status(http, url, reader) == 404
            async with http.get("/v1/jobs", headers=reader.headers) as resp:
                assert job not in [j["id"] for j in (await resp.json())["jobs"]]
            before = await _metrics(http, server.base)

            # presenting the write's position: the standby is behind, the primary answers
            assert await _job_status(http, url, reader, **{POSITION: position}) == 200
            # the key that wrote needs no header: the server remembers its last write
            assert await _job_status(http, url, writer) == 200
            # a long poll reads the primary (its wake-up is the primary's NOTIFY)
            assert await _job_status(http, f"{url}?wait=5&after_version=0", reader) == 200
            after = await _metrics(http, server.base)
            behind = "jobledger_replica_fallbacks_total"
            assert _count(after, behind, 'reason="behind"') == (
                _count(before, behind, 'reason="behind"') + 2
            )
            replica_reads = 'jobledger_replica_reads_total{server="replica"}'
            assert after[replica_reads] == before[replica_reads]
        finally:
            await _replay(hot_standby, pg_url, paused=False)

        # once the standby has replayed it, the standby answers the same reads
        await wait_until(
            lambda: _job_status_is(http, url, reader, 200), 30, "the standby has the job"
        )
        before = await _metrics(http, server.base)
        assert await _job_status(http, url, reader, **{POSITION: position}) == 200
        assert await _job_status(http, url, writer) == 200
        after = await _metrics(http, server.base)
        assert after[replica_reads] == before[replica_reads] + 2
        assert _count(after, behind, "") == _count(before, behind, "")


async def _job_status_is(http: aiohttp.ClientSession, url: str, key: Key, status: int) -> bool:
    return await _job_status(http, url, key) == status


@pytest.mark.postgres
async def test_read_your_writes_holds_under_concurrent_appends(
    hot_standby: Standby, pg_url: str
) -> None:
    """Many clients append and at once read back, through two servers sharing one standby:
    every read presenting the write's position (or made by the key that wrote) sees it."""
    writer = await acreate_key(pg_url, "acme")
    reader = await acreate_key(pg_url, "acme", role="reader")
    replica = hot_standby.replica_of(pg_url)
    async with (
        served(pg_url, "--replica", replica) as a,
        served(pg_url, "--replica", replica) as b,
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
    ):

        async def client(n: int) -> None:
            base = (a, b)[n % 2].base
            async with http.post(
                f"{base}/v1/jobs", json={"agent": "a/b", "account": f"{n}"}, headers=writer.headers
            ) as resp:
                assert resp.status == 201
                job = (await resp.json())["id"]
            for step in range(12):
                kind = "job.started" if step == 0 else "job.progressed"
                body = {"type": kind, "data": {} if step == 0 else {"row_count": step}}
                async with http.post(
                    f"{base}/v1/jobs/{job}/events", json=body, headers=writer.headers
                ) as resp:
                    assert resp.status == 201, await resp.text()
                    position = resp.headers[POSITION]
                version = step + 2  # job.queued is version 1
                # another key, presenting the position, on the other server
                other = (a, b)[(n + 1) % 2].base
                async with http.get(
                    f"{other}/v1/jobs/{job}", headers={**reader.headers, POSITION: position}
                ) as resp:
                    assert resp.status == 200
                    seen = (await resp.json())["version"]
                assert seen >= version, f"{job}: read version {seen} after writing {version}"
                # the key that wrote, with no header, on the server it wrote through
                async with http.get(f"{base}/v1/jobs/{job}/events", headers=writer.headers) as r:
                    assert r.status == 200
                    assert len((await r.json())["events"]) >= version

        await asyncio.gather(*(client(n) for n in range(12)))
        answered = 0.0
        for server in (a, b):
            metrics = await _metrics(http, server.base)
            answered += metrics['jobledger_replica_reads_total{server="replica"}']
        assert answered > 0, "no read was answered by the standby"


@pytest.mark.postgres
async def test_a_replica_that_is_down_or_fails_leaves_reads_to_the_primary(
    hot_standby: Standby, pg_url: str
) -> None:
    key = await acreate_key(pg_url, "acme")
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"  # nothing listens there
    async with aiohttp.ClientSession(headers=key.headers, timeout=TIMEOUT) as http:
        async with served(pg_url, "--replica", dead) as server:
            async with http.post(
                f"{server.base}/v1/jobs", json={"agent": "a/b", "account": "1"}
            ) as resp:
                assert resp.status == 201
                url = f"{server.base}/v1/jobs/{(await resp.json())['id']}"
            statuses = await asyncio.gather(*(_job_status(http, url, key) for _ in range(20)))
            assert set(statuses) == {200}
            metrics = await _metrics(http, server.base)
            assert metrics['jobledger_replica_reads_total{server="replica"}'] == 0
            assert metrics['jobledger_replica_reads_total{server="primary"}'] == 20
            fallbacks = "jobledger_replica_fallbacks_total"
            assert _count(metrics, fallbacks, "down") + _count(metrics, fallbacks, "failed") == 20

        # the live standby loses every connection of ours while reads are in flight
        async with served(pg_url, "--replica", hot_standby.replica_of(pg_url)) as server:
            url = f"{server.base}{url[url.index('/v1/') :]}"

            async def reads(count: int) -> list[int]:
                return list(
                    await asyncio.gather(*(_job_status(http, url, key) for _ in range(count)))
                )

            async def cut() -> None:
                await hot_standby.sql(
                    pg_url,
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'jobledger-replica-read'",
                )

            async def fresh_reads(count: int) -> list[int]:
                """Reads that present a position just written: the server must ask the
                standby how far it has replayed, on connections the cut may have killed."""
                async with http.post(
                    f"{server.base}/v1/jobs", json={"agent": "a/b", "account": "1"}
                ) as resp:
                    assert resp.status == 201
                    position = resp.headers["X-Ledger-Position"]
                return list(
                    await asyncio.gather(
                        *(
                            _job_status(http, url, key, **{"X-Ledger-Position": position})
                            for _ in range(count)
                        )
                    )
                )

            assert set(await reads(20)) == {200}
            for _ in range(3):
                statuses, _ = await asyncio.gather(reads(40), cut())
                assert set(statuses) == {200}, server.log_tail(60)
                cut_task = asyncio.ensure_future(cut())
                await asyncio.sleep(0.001)  # a connection used just after the cut
                statuses = await fresh_reads(40)
                await cut_task
                assert set(statuses) == {200}, server.log_tail(60)
            assert set(await reads(20)) == {200}
            metrics = await _metrics(http, server.base)
            assert metrics['jobledger_replica_reads_total{server="replica"}'] > 0


# -- the header, on both backends --------------------------------------------------------------


async def test_writes_answer_the_position_they_committed(api: Api) -> None:
    client = api.client
    async with client.post(
        "/v1/jobs", json={"agent": "a/b", "account": "1"}, headers=api.headers
    ) as resp:
        assert resp.status == 201
        job = (await resp.json())["id"]
        created = int(resp.headers[POSITION])
    events = (await api.get(f"/v1/jobs/{job}/events"))["events"]
    assert created == events[-1]["position"]

    headers = {**api.headers, "Idempotency-Key": "start-1"}
    body: dict[str, Any] = {"type": "job.started"}
    async with client.post(f"/v1/jobs/{job}/events", json=body, headers=headers) as resp:
        assert resp.status == 201
        started = int(resp.headers[POSITION])
    events = (await api.get(f"/v1/jobs/{job}/events"))["events"]
    assert started == events[-1]["position"] > created

    # another write of the tenant, then the replay of the first: it answers the head now
    await api.post("/v1/credits/grants", {"account": "1", "amount": 5, "reason": "r"})
    head = (await api.get("/v1/audit/head"))["position"]
    async with client.post(f"/v1/jobs/{job}/events", json=body, headers=headers) as resp:
        assert resp.status == 201
        assert int(resp.headers[POSITION]) == head > started

    # a write that fails answers no position
    async with client.post(
        f"/v1/jobs/{job}/events", json={"type": "job.queued"}, headers=api.headers
    ) as resp:
        assert resp.status >= 400
        assert POSITION not in resp.headers


async def test_a_read_presenting_a_malformed_position_is_refused(api: Api) -> None:
    """Only ASCII digits are a position: ``422`` naming the header, never a 500."""
    for bad in ("abc", "-1", "1.5", str(2**63), "\u00b2", "\u0661\u0662", "1_0", "\uff11"):
        answer = await api.get("/v1/jobs", status=422, headers={POSITION: bad})
        assert answer["error"]["field"] == POSITION
    await api.get("/v1/jobs", headers={POSITION: "1"})  # any position: nothing to wait for


# -- the command line ---------------------------------------------------------------------------


def test_serve_refuses_replicas_over_sqlite(tmp_path: Any) -> None:
    done = cli(
        "serve",
        "--db",
        str(tmp_path / "ledger.db"),
        "--port",
        "0",
        "--replica",
        "postgresql://postgres@127.0.0.1:5432/ledger",
    )
    assert done.code == 1
    assert "--replica needs a PostgreSQL --db" in done.err
    assert not (tmp_path / "ledger.db").exists()


def test_serve_refuses_a_replica_that_is_not_a_postgres_url() -> None:
    done = cli(
        "serve",
        "--db",
        "postgresql://nobody@127.0.0.1:1/ledger",
        "--port",
        "0",
        "--replica",
        "./standby.db",
    )
    assert done.code == 1
    assert "a read replica must be a postgresql:// URL" in done.err
