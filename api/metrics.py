"""``GET /metrics``: the Prometheus text format, through the official ``prometheus-client``.

Each server process has its own registry and exposes its own numbers (scrape every process;
``docs/operations.md`` shows the scrape config). Request counts and latencies come from the
API's middleware (``api/middleware.py`` calls ``Metrics.observe``); the store's work (events
appended, group-commit batch sizes, commit latency, the writer's queue) is read from the plain
counters the store keeps (``EventStore.stats``, ``WriterStats``) when the page is scraped, so
the ledger never imports Prometheus. Without ``--metrics-token`` only loopback clients may
scrape; with it, a scraper sends ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from api.context import SETTINGS, STORE
from api.delivery import WEBHOOKS
from api.http import OPERATIONS
from ledger.errors import Forbidden, Unauthorized

if TYPE_CHECKING:  # the PostgreSQL driver is imported only by a server that uses it
    from ledger.backends.replicas import ReplicaSet

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PENDING_MAX = 1000  # requests of one label set kept before they are moved into the metrics
LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
UNMATCHED = "unmatched"  # one label for every path no route knows (no label explosion)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

routes = web.RouteTableDef()

# group-commit batch sizes (commands per COMMIT); the writer takes at most 512 at once
BATCH_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# seconds from taking a batch to its COMMIT returning
COMMIT_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


@dataclass(slots=True)
class RebuildProgress:
    """How far a rebuild has come: the position folded and the position it aims for."""

    running: bool = False
    position: int = 0
    target: int = 0
    runs: int = 0

    def update(self, position: int, target: int) -> None:
        self.running = True
        self.position = position
        self.target = target

    def finish(self) -> None:
        self.running = False
        self.runs += 1


class Metrics:
    """One process's registry: HTTP metrics, open streams, and a collector over the store."""

    def __init__(self, app: web.Application) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "jobledger_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "jobledger_http_request_duration_seconds",
            "Time from receiving a request to its answer (or the end of its stream).",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.streams = Gauge(
            "jobledger_sse_streams_open",
            "Server-Sent Events streams open now.",
            registry=self.registry,
        )
        self.feed_lag = Gauge(
            "jobledger_feed_lag_events",
            "Events committed in the database (by any process) that this process's live feed "
            "has not yet been woken for, measured at scrape time.",
            registry=self.registry,
        )
        self.batch_sizes = Histogram(
            "jobledger_group_commit_batch_size",
            "Commands per group-commit transaction (one COMMIT, one fsync).",
            buckets=BATCH_BOUNDS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "jobledger_commit_seconds",
            "Seconds from taking a group-commit batch to its COMMIT returning.",
            buckets=COMMIT_BOUNDS,
            registry=self.registry,
        )
        self.registry.register(StoreCollector(app))
        self.registry.register(WebhookCollector(app))
        self._stream_routes: frozenset[str] | None = None
        # requests answered since the last scrape, by (method, route, status): their latencies,
        # moved into the Prometheus metrics when scraped (or every thousand). ``labels()`` takes
        # a lock and builds its key, ``observe`` another lock and a walk of the buckets: about
        # a tenth of a plain request's time, where appending to a list is a hundredth of that
        self._pending: dict[tuple[str, str, str], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (method, route, str(status))
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = []
        pending.append(seconds)
        if len(pending) >= PENDING_MAX:
            self._flush(key, pending)

    def flush_requests(self) -> None:
        """Move every pending request into the counters and histograms (before a scrape)."""
        for key, pending in self._pending.items():
            if pending:
                self._flush(key, pending)

    def _flush(self, key: tuple[str, str, str], pending: list[float]) -> None:
        self.requests.labels(*key).inc(len(pending))
        histogram = self.latency.labels(key[0], key[1])
        for seconds in pending:
            histogram.observe(seconds)
        pending.clear()

    def drain(self, stats: Any) -> None:
        """Move the writer's batch sizes and commit times since the last read into histograms.

        The writer keeps them in two lists that its reader empties (``WriterStats``).
        """
        for name, histogram in (
            ("batch_sizes", self.batch_sizes),
            ("commit_seconds", self.commit_seconds),
        ):
            pending = getattr(stats, name, None)
            if isinstance(pending, list):
                for value in pending:
                    histogram.observe(value)
                pending.clear()

    def is_stream(self, route: str) -> bool:
        if self._stream_routes is None:
            self._stream_routes = frozenset(
                op.path for op in OPERATIONS if op.content == "text/event-stream"
            )
        return route in self._stream_routes


METRICS = web.AppKey("metrics", Metrics)


class StoreCollector(Collector):
    """Reads the store's writer counters at scrape time; absent counters are left out."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Any]:
        store = self._app.get(STORE)
        if store is None:
            return
        yield GaugeMetricFamily(
            "jobledger_head_position",
            "The newest event position this process knows to be committed.",
            value=store.head_position,
        )
        stats = getattr(store, "stats", None)
        if stats is None:
            return
        for attr, name, doc in (
            ("events", "jobledger_events_appended", "Events this process appended (committed)."),
            ("commands", "jobledger_commands", "Write commands this process's writer answered."),
            ("batches", "jobledger_batches", "Group-commit batches this process's writer ran."),
            (
                "isolated_batches",
                "jobledger_batches_isolated",
                "Batches run again command by command after the shared transaction failed.",
            ),
            (
                "failed_commits",
                "jobledger_batches_failed",
                "Batches whose transaction did not commit (every waiter got 503).",
            ),
            (
                "lingered",
                "jobledger_batches_lingered",
                "Batches that waited (at most 2 ms) for the writers recently seen to send again.",
            ),
        ):
            count = getattr(stats, attr, None)
            if isinstance(count, int):
                yield CounterMetricFamily(name, doc, value=count)
        for attr, name, doc in (  # per-tenant write locks (PostgreSQL); 0 on SQLite
            (
                "lock_wait_seconds",
                "jobledger_tenant_lock_wait_seconds",
                "Seconds write batches waited for their tenants' write locks.",
            ),
            (
                "lock_hold_seconds",
                "jobledger_tenant_lock_hold_seconds",
                "Seconds write batches held their tenants' write locks (to the COMMIT's answer).",
            ),
            (
                "lock_wait_weighted",
                "jobledger_tenant_lock_wait_command_seconds",
                "Lock wait times the commands of each batch: what write commands waited in all.",
            ),
            (
                "command_seconds",
                "jobledger_writer_command_seconds",
                "Batch time times its commands: what write commands spent in the writer in all.",
            ),
        ):
            seconds = getattr(stats, attr, None)
            if isinstance(seconds, float):
                yield CounterMetricFamily(name, doc, value=seconds)
        depth = getattr(store, "queue_depth", None)
        if isinstance(depth, int):
            yield GaugeMetricFamily(
                "jobledger_writer_queue_depth",
                "Write commands waiting for the writer now.",
                value=depth,
            )
        yield from _replica_metrics(getattr(store.backend, "replicas", None))


def _replica_metrics(replicas: ReplicaSet | None) -> Iterator[Any]:
    """Where reads a replica could answer went (``serve --replica``; none without one)."""
    if replicas is None:
        return
    reads = CounterMetricFamily(
        "jobledger_replica_reads",
        "Read requests a replica could answer, by the server that answered them.",
        labels=["server"],
    )
    reads.add_metric(["replica"], replicas.stats.replica)
    reads.add_metric(["primary"], replicas.stats.primary)
    yield reads
    fallbacks = CounterMetricFamily(
        "jobledger_replica_fallbacks",
        "Reads the primary answered instead of a replica: behind (not replayed far enough "
        "within --replica-wait), down (no replica up), failed (a replica failed mid-read).",
        labels=["reason"],
    )
    for reason, count in replicas.stats.fallbacks.items():
        fallbacks.add_metric([reason], count)
    yield fallbacks
    up = GaugeMetricFamily(
        "jobledger_replica_up",
        "1 while the replica is taking reads, 0 while it is left alone after a failure.",
        labels=["replica"],
    )
    for replica in replicas.replicas:
        up.add_metric([replica.label], int(replica.up))
    yield up


class WebhookCollector(Collector):
    """This process's webhook deliveries (``api.delivery``), read at scrape time."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Any]:
        dispatcher = self._app.get(WEBHOOKS)
        stats = getattr(dispatcher, "stats", None)
        if stats is None:
            return
        for name, text in (
            ("attempts", "Webhook delivery attempts made by this process."),
            ("delivered", "Webhook events delivered (a 2xx answer)."),
            ("failed", "Webhook attempts that got no 2xx answer."),
            ("gave_up", "Webhook events abandoned once their retry schedule was spent."),
            ("disabled", "Webhook endpoints this process disabled (410, or failing for days)."),
        ):
            yield CounterMetricFamily(f"jobledger_webhook_{name}", text, value=getattr(stats, name))
        yield GaugeMetricFamily(
            "jobledger_webhook_in_flight", "Webhook attempts in flight.", value=stats.in_flight
        )
        lag = GaugeMetricFamily(
            "jobledger_webhook_lag_events",
            "Events an endpoint's cursor was behind its tenant's head when last looked at.",
            labels=["tenant", "webhook_id"],
        )
        for (tenant, webhook_id), behind in sorted(stats.lag.items()):
            lag.add_metric([tenant, webhook_id], behind)
        yield lag


class RebuildCollector(Collector):
    """The progress of the rebuild running in this process (``jobledger rebuild``)."""

    def __init__(self, progress: RebuildProgress) -> None:
        self._progress = progress

    def collect(self) -> Iterator[Any]:
        p = self._progress
        yield GaugeMetricFamily(
            "jobledger_rebuild_running",
            "1 while the rebuild replays or swaps.",
            value=int(p.running),
        )
        yield GaugeMetricFamily(
            "jobledger_rebuild_position",
            "The event position the rebuild has folded up to.",
            value=p.position,
        )
        yield GaugeMetricFamily(
            "jobledger_rebuild_target_position",
            "The last event position the rebuild replays (the head when it began).",
            value=p.target,
        )


@contextmanager
def rebuild_exporter(port: int | None, host: str = "127.0.0.1") -> Iterator[RebuildProgress | None]:
    """While a rebuild runs, serve its progress at ``http://host:port/metrics`` (or do nothing).

    A rebuild is its own process (``jobledger rebuild``), so it exposes its own metrics, on
    loopback unless told otherwise; the gauges stay until the process exits.
    """
    if port is None:
        yield None
        return
    progress = RebuildProgress()
    registry = CollectorRegistry()
    registry.register(RebuildCollector(progress))
    ProcessCollector(registry=registry)
    server, thread = start_http_server(port, addr=host, registry=registry)
    try:
        yield progress
    finally:
        progress.finish()
        server.shutdown()
        server.server_close()
        thread.join()


def _allowed(request: web.Request) -> None:
    token = request.app[SETTINGS].metrics_token
    if token:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise Unauthorized("send Authorization: Bearer <metrics token>")
        return
    if request.remote not in LOOPBACK:
        raise Forbidden("metrics answer loopback clients only (or start with --metrics-token)")


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    _allowed(request)
    metrics = request.app[METRICS]
    store = request.app.get(STORE)
    if store is not None:
        metrics.feed_lag.set(max(0, await store.max_position() - store.head_position))
        metrics.drain(getattr(store, "stats", None))
    metrics.flush_requests()
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application) -> None:
    """Give ``app`` its own registry and the ``/metrics`` route."""
    app[METRICS] = Metrics(app)
    app.add_routes(routes)
