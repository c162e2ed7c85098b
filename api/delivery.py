"""The webhook delivery worker: one per ``jobledger serve`` process, started with the app.

It scans for enabled endpoints whose cursor is behind their tenant's head (woken by every commit,
in any process, and by the next retry falling due; while no tenant has an enabled endpoint, once
a second and when one is registered here), takes each one's lease in a write
transaction, and sends its matching events one at a time in position order. Several processes
over one database share the work: the lease makes each endpoint, hence each event, one process's
at a time, and the cursor moves only after a 2xx. A process that dies holding a lease leaves it
to expire (``webhook_lease_s``), and the event is sent again: delivery is at least once.

A slow endpoint costs one of ``webhook_concurrency`` slots for at most ``webhook_timeout_s``;
it never holds a database connection while it waits, and nothing on the request path waits
for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import aiohttp
import msgspec
import structlog
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from api.context import SETTINGS, STORE
from api.settings import Settings
from ledger import webhooks as hooks
from ledger.audit import record
from ledger.clock import format_us, now_us
from ledger.errors import Invalid, LedgerError
from ledger.records import Recorded
from ledger.store import EventStore, UnitOfWork
from projections import jobs as job_models
from projections import webhooks as endpoints

log = structlog.get_logger(__name__)

MAX_RESPONSE_READ = 4096  # bytes of a receiver's answer read (and 1 KiB of them logged)
MAX_RESPONSE_LOGGED = 1024
POLL_SECONDS = 1.0
SEND_BATCH = 64  # events read at once for one endpoint
FLUSH_SECONDS = 0.25  # successes are written at least this often while a turn goes on
LINGER_SECONDS = 0.05  # a caught-up turn waits this long for more before writing
TURN_SECONDS = 2.0  # then the endpoint lets the others have its slot
MIN_SCAN_SECONDS = 0.02  # at most ~50 scans a second, however fast events are committed
PRUNE_EVERY_SECONDS = 3600.0
ATTEMPTS_KEPT_US = 30 * 86400 * 1_000_000
USER_AGENT = "jobledger-webhooks/0.1"
_ENCODE = msgspec.json.Encoder().encode


@dataclass(slots=True)
class WebhookStats:
    """Counters of this process's deliveries, for the metrics module to read.

    ``lag`` maps ``(tenant, webhook_id)`` to how many positions the endpoint's cursor was
    behind its tenant's head when this process last looked at it.
    """

    attempts: int = 0
    delivered: int = 0
    failed: int = 0  # attempts that did not get a 2xx
    gave_up: int = 0  # events abandoned once the retry schedule was spent
    disabled: int = 0
    in_flight: int = 0
    lag: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(slots=True)
class _Run:
    """One turn at an endpoint: its cursor as it stands in memory and what is not yet written."""

    cur: hooks.Cursor
    lease_until: int
    logged: list[hooks.Attempt] = field(default_factory=list)
    dirty: bool = False  # the cursor moved since the last write
    closed: bool = False  # the lease is released (or lost): nothing more to write
    flushed: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)

    @property
    def generation(self) -> int:
        return self.cur.generation

    def advance(self, position: int) -> None:
        self.cur.position = position
        self.cur.attempt = 0
        self.cur.next_us = 0
        self.cur.failing_since_us = None
        self.dirty = True

    def skip(self, position: int) -> None:
        """Past events the endpoint did not ask for (a failure streak goes on)."""
        self.cur.position = position
        self.cur.attempt = 0
        self.cur.next_us = 0
        self.dirty = True

    def failed(self, attempt: int, next_us: int, failing_since: int) -> None:
        self.cur.attempt = attempt
        self.cur.next_us = next_us
        self.cur.failing_since_us = failing_since
        self.dirty = True


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | None
    latency_us: int
    error: str | None = None
    body: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Dispatcher:
    """Sends every process's share of webhook deliveries."""

    def __init__(self, store: EventStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.stats = WebhookStats()
        self._slots = asyncio.Semaphore(max(1, settings.webhook_concurrency))
        # one tenant's slow endpoints can hold at most a quarter of the slots
        self._per_tenant = max(1, settings.webhook_concurrency // 4)
        self._tenant_slots: dict[str, asyncio.Semaphore] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running = False
        self._kick = asyncio.Event()
        self._rng = random.Random()
        self._last_prune = 0.0

    @property
    def lease_us(self) -> int:
        # a lease outlives any one attempt by a wide margin
        return int(max(self.settings.webhook_lease_s, 3 * self.settings.webhook_timeout_s) * 1e6)

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._resolver = GuardedResolver(self.settings.webhook_allow_hosts)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max(1, self.settings.webhook_concurrency), resolver=self._resolver
            ),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
        )
        self._running = True
        self._loop_task = asyncio.create_task(self._loop(), name="webhook-dispatcher")

    async def stop(self) -> None:
        """Let each turn finish its attempt and write it (within the timeout), then stop."""
        self._running = False
        self._kick.set()
        turns = list(self._tasks.values())
        if turns:
            await asyncio.wait(turns, timeout=self.settings.webhook_timeout_s + 1.0)
        tasks = [t for t in (self._loop_task, *turns) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):  # the leases would expire anyway
            await self.store.execute(lambda uow: hooks.release(uow.conn, self.owner), tenants=())
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:  # the connector does not own it
            await self._resolver.close()
            self._resolver = None

    def kick(self) -> None:
        """Look for work now (an endpoint was registered, recovered or re-enabled)."""
        self._kick.set()

    # -- the scan --------------------------------------------------------------------------

    async def _loop(self) -> None:
        last_scan = 0.0
        while self._running:
            wait = POLL_SECONDS
            pause = last_scan + MIN_SCAN_SECONDS - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            last_scan = time.monotonic()
            seen = self.store.changes  # before the scan: events committed during it wake us
            idle = False
            try:
                found = await self._scan()
                idle = found is None
                wait = POLL_SECONDS if found is None else found
                if time.monotonic() - self._last_prune > PRUNE_EVERY_SECONDS:
                    self._last_prune = time.monotonic()
                    await self._prune(now_us() - ATTEMPTS_KEPT_US)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("webhooks.scan_failed", exc_info=True)
            # No enabled endpoint anywhere: a commit cannot make work, so only a registration
            # here (a kick) or the next poll (one elsewhere) is worth a scan. Else every commit
            # would cost every process a scan, with nothing to send.
            kicked = asyncio.create_task(self._kick.wait())
            changed = asyncio.create_task(
                asyncio.sleep(wait)
                if idle
                else self.store.wait_for_change(max(0.01, wait), seen=seen)
            )
            try:
                await asyncio.wait({kicked, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (kicked, changed):
                    task.cancel()
            self._kick.clear()

    async def _prune(self, cutoff: int) -> None:
        async def prune(uow: UnitOfWork) -> None:
            await hooks.prune_attempts(uow.conn, cutoff)

        await self.store.execute(prune, tenants=())

    async def _scan(self) -> float | None:
        """Start a task for each endpoint due now; seconds until the next one falls due, or
        ``None`` when no tenant has an enabled endpoint."""
        now = now_us()
        async with self.store.backend.read() as conn:
            if not await endpoints.any_enabled(conn):
                return None
            due = await endpoints.due(conn, now=now, owner=self.owner)
            soonest = await endpoints.soonest(conn, now=now)
        for key in due:
            if key not in self._tasks:
                task = asyncio.create_task(self._serve(*key), name=f"webhook-{key[1]}")
                self._tasks[key] = task
                task.add_done_callback(functools.partial(self._done, key))
        if soonest is None:
            return POLL_SECONDS
        return min(POLL_SECONDS, max(0.0, (soonest - now_us()) / 1e6))

    def _done(self, key: tuple[str, str], _: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        self._kick.set()  # it may have stopped with more to send

    # -- one endpoint ----------------------------------------------------------------------

    async def _serve(self, tenant: str, webhook_id: str) -> None:
        """One turn at an endpoint: claim its lease, send what is due, write, release."""
        tenant_slots = self._tenant_slots.get(tenant)
        if tenant_slots is None:
            tenant_slots = self._tenant_slots[tenant] = asyncio.Semaphore(self._per_tenant)
        async with tenant_slots, self._slots:
            if not self._running:
                return
            owner, lease = self.owner, self.lease_us
            cur = await self.store.execute(
                lambda uow: hooks.claim(
                    uow.conn, tenant, webhook_id, owner=owner, now=uow.now, lease_us=lease
                ),
                tenants=(),
            )
            if cur is None:
                return  # another process holds it
            run = _Run(cur, now_us() + lease)
            try:
                await self._turn(tenant, webhook_id, run)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("webhooks.endpoint_failed", webhook_id=webhook_id, exc_info=True)
                await asyncio.sleep(POLL_SECONDS)  # no busy loop on a failing database
            finally:
                if not run.closed:
                    with contextlib.suppress(Exception):  # else the lease expires
                        await self._flush(tenant, webhook_id, run, release=True)

    async def _turn(self, tenant: str, webhook_id: str, run: _Run) -> None:
        """Send matching events in order until caught up, a failure, or the turn is over.

        Successes (and positions skipped over) are written together, at the end of the turn
        or every ``FLUSH_SECONDS``: a crash in between sends them again, which at least once
        allows. A turn lasts at most ``TURN_SECONDS``, so endpoints take turns at the slots.
        """
        key = (tenant, webhook_id)
        lingered = False
        while self._running and time.monotonic() - run.started < TURN_SECONDS:
            now = now_us()
            if run.cur.next_us > now:
                return
            async with self.store.backend.read() as conn:
                ep = await endpoints.get(conn, tenant, webhook_id)
                if ep is None or not ep.enabled:
                    return
                head = await hooks.head_position(conn, tenant)
                self.stats.lag[key] = max(0, head - run.cur.position)
                events: list[Recorded] = []
                if run.cur.position < head:
                    scope = (
                        None
                        if ep.project is None
                        else job_models.project_streams(tenant, ep.project)
                    )
                    events = await hooks.next_events(
                        conn,
                        tenant,
                        after=run.cur.position,
                        until=head,
                        event_types=ep.event_types,
                        streams_from=scope,
                        limit=SEND_BATCH,
                    )
                    signing = await hooks.signing_secrets(conn, tenant, webhook_id, now)
            if run.cur.position >= head:
                if run.dirty and not lingered:
                    lingered = True  # more may follow at once: write them all together
                    await self.store.wait_for_change(LINGER_SECONDS)
                    continue
                return
            lingered = False
            if not events:  # nothing matching up to the head: skip over it all at once
                run.skip(head)
                continue
            if not await self._send_run(tenant, webhook_id, ep.url, run, events, signing):
                return
            if run.dirty and time.monotonic() - run.flushed >= FLUSH_SECONDS:
                if not await self._flush(tenant, webhook_id, run):
                    return

    async def _send_run(
        self,
        tenant: str,
        webhook_id: str,
        url: str,
        run: _Run,
        events: list[Recorded],
        signing: list[str],
    ) -> bool:
        """Send ``events`` in order until one fails; whether the turn may go on."""
        settings = self.settings
        key = (tenant, webhook_id)
        margin = int(2 * settings.webhook_timeout_s * 1e6)
        for event in events:
            if time.monotonic() - run.started >= TURN_SECONDS:
                return True  # the turn ends; the rest waits for the next one
            due = run.dirty and time.monotonic() - run.flushed >= FLUSH_SECONDS
            if (due or run.lease_until - now_us() < margin) and not await self._flush(
                tenant, webhook_id, run
            ):
                return False
            number = run.cur.attempt + 1
            outcome = await self._send(url, event, signing)
            now = now_us()
            self.stats.attempts += 1
            if outcome.ok:
                self.stats.delivered += 1
                self.stats.lag[key] = max(0, self.stats.lag.get(key, 0) - 1)
                log.info(
                    "webhook.delivered",
                    webhook_id=webhook_id,
                    position=event.position,
                    status=outcome.status,
                    attempt=number,
                )
                run.logged.append(self._log(event, number, now, "delivered", outcome, None))
                run.advance(event.position)
                continue
            self.stats.failed += 1
            failing_since = run.cur.failing_since_us or now
            failing_for = (now - failing_since) / 1e6
            if outcome.status == 410:
                run.logged.append(self._log(event, number, now, "gone", outcome, None))
                run.failed(number, 0, failing_since)
                await self._flush(tenant, webhook_id, run, release=True)
                await self._disable(tenant, webhook_id, "the endpoint answered 410 Gone", "gone")
                return False
            delay = hooks.next_delay(
                settings.webhook_retry_schedule, number, outcome.retry_after, self._rng
            )
            if delay is None:
                self.stats.gave_up += 1
                log.warning(
                    "webhook.gave_up",
                    webhook_id=webhook_id,
                    position=event.position,
                    attempts=number,
                )
                run.logged.append(self._log(event, number, now, "gave_up", outcome, None))
                run.advance(event.position)
                run.cur.failing_since_us = failing_since
                go_on = True
            else:
                next_us = now + int(delay * 1e6)
                log.info(
                    "webhook.failed",
                    webhook_id=webhook_id,
                    position=event.position,
                    status=outcome.status,
                    error=outcome.error,
                    attempt=number,
                    retry_in=round(delay, 3),
                )
                run.logged.append(self._log(event, number, now, "failed", outcome, next_us))
                run.failed(number, next_us, failing_since)
                go_on = False
            if failing_for >= settings.webhook_disable_after_s:
                await self._flush(tenant, webhook_id, run, release=True)
                await self._disable(
                    tenant,
                    webhook_id,
                    f"every delivery failed for {failing_for / 86400:.2f} days "
                    f"(since {format_us(failing_since)})",
                    "failing",
                )
                return False
            return go_on and await self._flush(tenant, webhook_id, run)
        return True

    async def _flush(
        self, tenant: str, webhook_id: str, run: _Run, *, release: bool = False
    ) -> bool:
        """Write the run's log and cursor (and extend, or with ``release`` give up, the lease);
        whether the lease and the cursor were still ours."""
        owner, lease = self.owner, self.lease_us
        cur, logged, generation = run.cur, run.logged, run.generation
        run.logged = []
        run.dirty = False
        run.flushed = time.monotonic()
        if release:
            run.closed = True

        async def write(uow: UnitOfWork) -> bool:
            ours = await hooks.record(
                uow.conn,
                tenant,
                webhook_id,
                owner=owner,
                generation=generation,
                attempts_log=logged,
                position=cur.position,
                attempts=cur.attempt,
                next_us=cur.next_us,
                failing_since_us=cur.failing_since_us,
                lease_until_us=0 if release else uow.now + lease,
                release=release,
            )
            if not ours:  # recovered meanwhile: let a fresh turn start from the new cursor
                await hooks.release(uow.conn, owner, tenant, webhook_id)
            return ours

        # under the tenant's lock: a redaction cannot commit between the check and the log
        ours = bool(await self.store.execute(write, tenants=[tenant]))
        run.lease_until = now_us() + lease
        if not ours:
            run.closed = True  # somebody else's now: nothing more to write or release
        return ours

    @staticmethod
    def _log(
        event: Recorded, number: int, now: int, outcome: str, sent: Outcome, next_us: int | None
    ) -> hooks.Attempt:
        return hooks.Attempt(
            position=event.position,
            stream=event.stream,
            event_id=event.event_id,
            event_type=event.type,
            attempt=number,
            at_us=now,
            outcome=outcome,
            response_status=sent.status,
            latency_us=sent.latency_us,
            error=sent.error,
            response_body=sent.body,
            next_us=next_us,
        )

    async def _disable(self, tenant: str, webhook_id: str, reason: str, code: str) -> None:
        try:
            done = await self.store.execute(
                lambda uow: hooks.disable(uow, tenant, webhook_id, reason=reason, code=code),
                tenants=[tenant],
            )
        except LedgerError:
            log.warning("webhooks.disable_failed", webhook_id=webhook_id, exc_info=True)
            return
        if done:
            self.stats.disabled += 1
            log.warning("webhook.disabled", webhook_id=webhook_id, code=code, reason=reason)

    # -- the wire --------------------------------------------------------------------------

    async def _send(self, url: str, event: Recorded, signing: list[str]) -> Outcome:
        """POST the event, signed; never follows redirects, reads at most a few KiB back."""
        assert self._session is not None
        started = time.monotonic()

        def took() -> int:
            return int((time.monotonic() - started) * 1e6)

        try:
            check_target(url, self.settings.webhook_allow_hosts)
        except LedgerError as exc:
            return Outcome(None, 0, error=f"url refused: {exc.message}")
        if not signing:
            return Outcome(None, 0, error="no signing secret")
        body = _ENCODE(record(event))
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": hooks.sign(signing, event.event_id, timestamp, body),
        }
        self.stats.in_flight += 1
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            ) as resp:
                read = b""
                while len(read) < MAX_RESPONSE_READ:
                    chunk = await resp.content.read(MAX_RESPONSE_READ - len(read))
                    if not chunk:
                        break
                    read += chunk
                text = read[:MAX_RESPONSE_LOGGED].decode(errors="replace") or None
                return Outcome(
                    resp.status,
                    took(),
                    body=text,
                    retry_after=retry_after(resp.headers.get("Retry-After")),
                    error=None if 200 <= resp.status < 300 else f"HTTP {resp.status}",
                )
        except TimeoutError:
            return Outcome(None, took(), error="timed out")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Outcome(None, took(), error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self.stats.in_flight -= 1


def check_target(url: str, allow_hosts: Collection[str]) -> str:
    """``hooks.check_url`` on the URL as given and as aiohttp sends it (yarl's normalised form,
    whose host aiohttp connects to: an IP address there never reaches the resolver, so no
    other check sees it). The URL as given, or ``Invalid``."""
    try:
        wire = str(URL(url))
    except (ValueError, TypeError) as exc:
        raise Invalid(f"url is not a valid URL: {exc}", field="url") from None
    hooks.check_url(url, allow_hosts)
    hooks.check_url(wire, allow_hosts)
    return url


class GuardedResolver(AbstractResolver):
    """Resolves as aiohttp does, then keeps only the addresses a delivery may connect to.

    The check runs on the very addresses the connection uses, so a name that resolves to a
    public address at registration and to an internal one later (DNS rebinding) is refused.
    """

    def __init__(self, allow_hosts: Collection[str]) -> None:
        self._inner = DefaultResolver()
        self._allow = tuple(allow_hosts)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if hooks.address_allowed(host, r["host"], self._allow)]
        if not kept:
            raise OSError(
                f"{host} resolves only to private, link-local or reserved addresses "
                "(allow it with --webhook-allow-host)"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()


WEBHOOKS = web.AppKey("webhooks", Dispatcher)


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the delivery worker beside the store (registered after ``store_ctx``, so it stops
    first)."""
    dispatcher = Dispatcher(app[STORE], app[SETTINGS])
    app[WEBHOOKS] = dispatcher
    if app[SETTINGS].webhooks:
        await dispatcher.start()
    yield
    await dispatcher.stop()
