"""``GET /metrics``: scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.metrics import rebuild_exporter
from api.settings import Settings
from ledger.rebuild import rebuild
from ledger.store import EventStore, tables
from tests.conftest import Api, store_key
from tests.serverproc import acli, free_port, served
from tests.waits import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MakeClient = Callable[[web.Application], Coroutine[Any, Any, TestClient[Any, Any]]]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: TestClient[Any, Any], **headers: str) -> Samples:
    async with client.get("/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        return parse(await resp.text())


async def test_requests_are_counted_by_route_template_and_status(
    client: TestClient[Any, Any], api: Api
) -> None:
    """Requests count under their route template and status, with latency histograms."""
    await api.post("/v1/jobs", {"id": "m1", "agent": "a", "account": "x"})
    await api.post("/v1/jobs", {"id": "m2", "agent": "a", "account": "x"})
    await api.post("/v1/jobs/m1/events", {"type": "job.started"})
    await api.post("/v1/jobs/m2/events", {"type": "job.started"})
    await api.get("/v1/jobs/nope", status=404)
    await api.get("/no/such/path", status=404)
    await api.call("PROPFIND", "/no/such/path")
    m = await scrape(client)
    requests = "jobledger_http_requests_total"
    assert value(m, requests, method="POST", route="/v1/jobs", status="201") == 2
    assert value(m, requests, method="POST", route="/v1/jobs/{id}/events", status="201") == 2
    assert value(m, requests, method="GET", route="/v1/jobs/{id}", status="404") == 1
    assert value(m, requests, method="GET", route="unmatched", status="404") == 1
    assert (
        sum(v for (n, labels), v in m.items() if n == requests and ("method", "other") in labels)
        == 1
    )
    assert not any(("method", "PROPFIND") in labels for _, labels in m)
    assert not any("m1" in dict(labels).get("route", "") for _, labels in m)
    latency = "jobledger_http_request_duration_seconds"
    assert value(m, f"{latency}_count", method="POST", route="/v1/jobs") == 2
    assert value(m, f"{latency}_bucket", method="POST", route="/v1/jobs", le="+Inf") == 2
    assert value(m, f"{latency}_sum", method="POST", route="/v1/jobs") > 0


async def test_store_counters_follow_appends_and_group_commits(
    client: TestClient[Any, Any], api: Api
) -> None:
    """Events appended, batches, batch sizes and commit times grow with what was written."""
    before = await scrape(client)
    await api.post("/v1/jobs", {"id": "s1", "agent": "a", "account": "x"})
    await api.post(
        "/v1/jobs/s1/events", {"events": [{"type": "job.started"}, {"type": "job.completed"}]}
    )
    after = await scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("jobledger_events_appended_total") == 3
    assert grew("jobledger_commands_total") == 2
    batches = grew("jobledger_group_commit_batch_size_count")
    assert 1 <= batches <= 2
    assert grew("jobledger_group_commit_batch_size_sum") == 2  # two commands in all
    assert grew("jobledger_commit_seconds_count") == batches
    assert value(after, "jobledger_commit_seconds_bucket", le="+Inf") == value(
        after, "jobledger_commit_seconds_count"
    )
    assert value(after, "jobledger_writer_queue_depth") == 0
    assert value(after, "jobledger_feed_lag_events") == 0
    assert value(after, "jobledger_head_position") >= 3
    assert value(after, "process_cpu_seconds_total") > 0


async def test_open_event_streams_are_counted(client: TestClient[Any, Any], api: Api) -> None:
    """An open SSE stream counts while it is open and not after the client leaves."""
    async with client.get("/v1/events/stream", headers=api.headers) as stream:
        assert stream.status == 200
        assert await stream.content.readuntil(b"\n\n") == b"retry: 1000\n\n"
        assert value(await scrape(client), "jobledger_sse_streams_open") == 1

    async def closed() -> bool:  # noticed on the server's next write or wake
        await api.post("/v1/jobs", {"agent": "a", "account": "x"})
        return value(await scrape(client), "jobledger_sse_streams_open") == 0

    await wait_until(closed, 10, "the closed stream to leave the gauge")


async def test_a_metrics_token_is_required_when_configured(
    db_url: str, aiohttp_client: MakeClient
) -> None:
    """With --metrics-token, /metrics answers 401 without the token and 200 with it."""
    client = await aiohttp_client(create_app(Settings(db_url=db_url, metrics_token="s3cret")))
    async with client.get("/metrics") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"
    async with client.get("/metrics", headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    m = await scrape(client, Authorization="Bearer s3cret")
    assert value(m, "jobledger_http_requests_total", method="GET", route="/metrics", status="401")


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, a route is chosen
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_a_real_server_serves_loopback_only_without_a_token(db_url: str) -> None:
    """`jobledger serve` answers /metrics on loopback and refuses other clients (403)."""
    async with served(db_url, "--host", "0.0.0.0") as server:
        key = await store_key(db_url, "acme")
        async with aiohttp.ClientSession(headers=key.headers) as http:
            async with http.post(
                f"{server.base}/v1/jobs", json={"agent": "a", "account": "x"}
            ) as resp:
                assert resp.status == 201
            async with http.get(f"{server.base}/metrics") as resp:
                assert resp.status == 200
                m = parse(await resp.text())
            assert value(m, "jobledger_events_appended_total") >= 1
            assert (
                value(
                    m,
                    "jobledger_http_requests_total",
                    method="POST",
                    route="/v1/jobs",
                    status="201",
                )
                == 1
            )
            outside = _outside_address()
            if outside is None:
                pytest.skip("this machine has no non-loopback address to test the refusal from")
            async with http.get(f"http://{outside}:{server.port}/metrics") as resp:
                assert resp.status == 403
                assert "loopback" in (await resp.json())["error"]["message"]


def get_text(url: str) -> str:
    """A blocking GET: the exporter serves from its own thread, so the loop may wait on it."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text: str = resp.read().decode()
        return text


async def test_a_rebuild_exposes_its_progress_while_it_runs(api: Api, store: EventStore) -> None:
    """A rebuild with an exporter serves its position and target while it replays."""
    for n in range(5):
        await api.post("/v1/jobs", {"id": f"r{n}", "agent": "a", "account": "x"})
    head = await store.max_position()
    async with store.backend.read() as conn:
        count, _ = await tables.event_count(conn)  # positions need not be dense (PostgreSQL)
    port = free_port()
    during: list[Samples] = []
    with rebuild_exporter(port) as progress:
        assert progress is not None

        def watch(done: int, total: int) -> None:
            progress.update(done, total)
            if not during:  # scrape from inside the replay: the exporter has its own thread
                during.append(parse(get_text(f"http://127.0.0.1:{port}/metrics")))

        report = await rebuild(store.backend, store.projectors, progress=watch)
        done = parse(get_text(f"http://127.0.0.1:{port}/metrics"))
    assert report.events == count
    assert value(during[0], "jobledger_rebuild_running") == 1
    assert 0 < value(during[0], "jobledger_rebuild_position") <= head
    assert value(during[0], "jobledger_rebuild_target_position") == head
    assert value(done, "jobledger_rebuild_position") == head
    assert progress.runs == 1 and not progress.running


async def test_rebuild_with_a_metrics_port_runs_and_a_busy_port_is_one_line(db_url: str) -> None:
    """`jobledger rebuild --metrics-port` finishes as usual; a taken port is a one-line error."""
    await store_key(db_url, "acme")
    done = await acli("rebuild", "--db", db_url, "--metrics-port", str(free_port()))
    assert done.code == 0, done.err
    assert '"events": 1' in done.last_line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = await acli("rebuild", "--db", db_url, "--metrics-port", str(taken.getsockname()[1]))
    assert busy.code == 1 and len(busy.err.strip().splitlines()) == 1, busy.err
    assert "Traceback" not in busy.err


async def test_each_process_exposes_its_own_numbers(db_url: str) -> None:
    """Two servers over one database count their own appends; the other's show as head moves."""
    async with served(db_url) as first, served(db_url) as second:
        key = await store_key(db_url, "acme")
        async with aiohttp.ClientSession(headers=key.headers) as http:
            for n in range(3):
                async with http.post(
                    f"{first.base}/v1/jobs", json={"id": f"p{n}", "agent": "a", "account": "x"}
                ) as resp:
                    assert resp.status == 201
            async with http.get(f"{first.base}/v1/jobs/stats") as resp:
                head = (await resp.json())["position"]

            async def scrape_of(server: Any) -> Samples:
                async with http.get(f"{server.base}/metrics") as resp:
                    assert resp.status == 200
                    return parse(await resp.text())

            ours = await scrape_of(first)

            async def caught_up() -> Samples | None:  # by signal or poll
                latest = await scrape_of(second)
                return latest if value(latest, "jobledger_head_position") >= head else None

            theirs = await wait_until(caught_up, 10, "the second server to learn the head")
    assert value(ours, "jobledger_events_appended_total") == 3
    posts = value(
        ours, "jobledger_http_requests_total", method="POST", route="/v1/jobs", status="201"
    )
    assert posts == 3
    assert value(theirs, "jobledger_events_appended_total") == 0
    assert (
        value(
            theirs, "jobledger_http_requests_total", method="POST", route="/v1/jobs", status="201"
        )
        == 0
    )
    assert value(theirs, "jobledger_head_position") >= head
    assert value(theirs, "jobledger_feed_lag_events") == 0
