"""Read replicas: PostgreSQL hot standbys that answer the reads a request lets them.

A ``ReplicaSet`` holds one small asyncpg pool per standby (connected lazily, so a standby that
is down at start costs nothing) and chooses, per request, where its reads go
(``ledger/routing.py`` has the rule):

- no route, or every replica down: the primary;
- a route without a position: the least busy live replica;
- a route with a position: a live replica whose ``chain_heads`` row for the tenant has reached
  it. What each replica was last seen to have replayed is remembered per tenant (heads only
  move forward), so a replica that is known to be far enough costs no query; otherwise it is
  asked again, with short pauses, for up to the route's ``wait_s``, then the primary answers.

A replica that refuses a connection or loses one is left alone for ``DOWN_SECONDS``, then tried
again by the next read. ``ReadStats`` counts where routed requests were answered, for metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg
import structlog

from ledger.routing import ReadRoute

log = structlog.get_logger(__name__)

DOWN_SECONDS = 2.0  # a replica that failed is not asked again for this long
CHECK_TIMEOUT = 2.0  # connecting to a replica, or asking it for a head
FIRST_PAUSE = 0.002  # between two looks at a replica that is behind; doubles up to MAX_PAUSE
MAX_PAUSE = 0.02
HEAD_SQL = "SELECT position FROM chain_heads WHERE tenant = $1"
FALLBACK_REASONS = ("behind", "down", "failed")
# What asking a replica may raise when it is down, starting, or lacks the database yet
# (asyncpg raises InternalClientError, no InterfaceError, for a connection the server has just
# cut and that is used again at once)
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


@dataclass(slots=True)
class ReadStats:
    """Where the requests that could read from a replica were answered (for operators)."""

    replica: int = 0
    primary: int = 0
    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_REASONS, 0))


def label_of(url: str) -> str:
    """``host:port/database`` of a URL: no user, no password (a metrics label)."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
    except ValueError:
        return "<unparsable URL>"


class Replica:
    """One standby: its pool, what it has replayed per tenant, and whether it is up."""

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self.url = url
        self.label = label_of(url)
        self.pool = pool
        self.heads: dict[str, int] = {}  # tenant -> a chain position this replica has replayed
        self.down_until = 0.0
        self.in_flight = 0

    @property
    def up(self) -> bool:
        return self.down_until <= time.monotonic()

    def has(self, tenant: str, position: int) -> bool:
        return position <= 0 or self.heads.get(tenant, 0) >= position

    async def head(self, tenant: str) -> int:
        """Ask the replica how far it has replayed the tenant's chain (and remember it)."""
        async with self.pool.acquire(timeout=CHECK_TIMEOUT) as conn:
            try:
                value = await conn.fetchval(HEAD_SQL, tenant, timeout=CHECK_TIMEOUT)
            except asyncpg.UndefinedTableError:
                value = None  # the schema has not reached it yet
        position = int(value or 0)
        if position > self.heads.get(tenant, 0):
            self.heads[tenant] = position
        return position


PoolFactory = Callable[[str], Awaitable[asyncpg.Pool]]


class ReplicaSet:
    """The standbys reads may go to, and the choice of one per request."""

    def __init__(self, urls: Sequence[str], make_pool: PoolFactory) -> None:
        self.urls = tuple(urls)
        self._make_pool = make_pool
        self.replicas: list[Replica] = []
        self.stats = ReadStats()
        self._turn = itertools.count()

    async def open(self) -> None:
        """Make the pools (no connection yet) and say in the log what each server is."""
        for url in self.urls:
            self.replicas.append(Replica(url, await self._make_pool(url)))
        for replica in self.replicas:
            try:
                async with replica.pool.acquire(timeout=CHECK_TIMEOUT) as conn:
                    standby = await conn.fetchval("SELECT pg_is_in_recovery()")
            except _UNREACHABLE as exc:
                self.failed(replica, exc)
                continue
            if standby:
                log.info("replica.ready", replica=replica.label)
            else:  # allowed (say, the primary itself while testing), but worth a line
                log.warning("replica.not_a_standby", replica=replica.label)

    async def close(self) -> None:
        for replica in self.replicas:
            try:
                await asyncio.wait_for(replica.pool.close(), 10.0)
            except Exception:
                replica.pool.terminate()
        self.replicas = []

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """``replica`` refused or lost a connection: leave it alone for a while."""
        if replica.up:
            log.warning("replica.down", replica=replica.label, error=str(exc) or type(exc).__name__)
        replica.down_until = time.monotonic() + DOWN_SECONDS

    def fell_back(self, reason: str) -> None:
        self.stats.fallbacks[reason] += 1

    def _least_busy(self, replicas: list[Replica]) -> Replica:
        """The replica with the fewest reads in flight; ties take turns."""
        if len(replicas) == 1:
            return replicas[0]
        turn = next(self._turn)
        count = len(replicas)
        return min(
            ((r.in_flight, (i - turn) % count, r) for i, r in enumerate(replicas)),
            key=lambda item: (item[0], item[1]),
        )[2]

    def ready(self, route: ReadRoute) -> Replica | None:
        """Where ``route``'s request reads, if that is known without asking anyone: the
        replica it already chose, or a live one already known to be far enough."""
        if route.decided:
            server: Replica | None = route.server
            return server if server is None or server.up else None
        if len(self.replicas) == 1:
            replica = self.replicas[0]
            if not replica.up or not replica.has(route.tenant, route.position):
                return None
        else:
            ready = [r for r in self.replicas if r.up and r.has(route.tenant, route.position)]
            if not ready:
                return None
            replica = self._least_busy(ready)
        route.decided, route.server = True, replica
        self.stats.replica += 1
        return replica

    async def choose(self, route: ReadRoute) -> Replica | None:
        """Where ``route``'s request reads: a replica, or ``None`` for the primary."""
        if route.decided:
            server: Replica | None = route.server
            return server if server is None or server.up else None
        chosen = await self._pick(route)
        route.decided, route.server = True, chosen
        if chosen is None:
            self.stats.primary += 1
        else:
            self.stats.replica += 1
        return chosen

    async def _pick(self, route: ReadRoute) -> Replica | None:
        tenant, position = route.tenant, route.position
        deadline = time.monotonic() + route.wait_s
        pause = FIRST_PAUSE
        while True:
            live = [r for r in self.replicas if r.up]
            if not live:
                self.fell_back("down")
                return None
            ready = [r for r in live if r.has(tenant, position)]
            if ready:
                return self._least_busy(ready)
            for replica in live:  # behind, as far as we know: ask each again
                try:
                    if await replica.head(tenant) >= position:
                        return replica
                except _UNREACHABLE as exc:
                    self.failed(replica, exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fell_back("behind")
                return None
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, MAX_PAUSE)
