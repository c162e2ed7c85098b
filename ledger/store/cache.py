"""The writer's cache: what this process knows of the ledger's committed state.

It holds job states (an LRU), chain heads, stream versions and the newest event of each
non-job stream. It learns only what a COMMIT made durable (``learn``), and forgets what another
process may have changed or what a failed transaction left in doubt (``forget``).

What another process changed is found one of two ways. With one writer for the whole ledger
(SQLite), ``catch_up`` reads the streams appended to since the global head it last saw. With
per-tenant write locks (PostgreSQL), ``validate`` compares each locked tenant's chain head with
the cached one and drops only the streams of that tenant that moved: the cached entries of a
tenant are valid exactly as long as its head is the cached head.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from ledger import chain
from ledger.events import Event
from ledger.jobs import JobState
from ledger.sql import Conn

JOB_CACHE = 50_000
CATCH_UP_MAX = 10_000  # events another process appended; more and the cache starts afresh

StreamKey = tuple[str, str]  # (tenant, stream)


class ChainHead(NamedTuple):
    """The newest link of a tenant's hash chain."""

    position: int
    hash: str
    length: int  # events in the chain


GENESIS_HEAD = ChainHead(0, chain.GENESIS, 0)


class Learned(NamedTuple):
    """What one committed transaction wrote, as the cache keeps it."""

    heads: dict[str, ChainHead]
    versions: dict[StreamKey, int]
    latest: dict[StreamKey, Event | None]
    jobs: dict[StreamKey, JobState]


class WriterCache:
    """Committed state only; a transaction's own writes stay in its unit of work."""

    def __init__(self) -> None:
        self.jobs: OrderedDict[StreamKey, JobState] = OrderedDict()
        self.heads: dict[str, ChainHead] = {}
        self.versions: dict[StreamKey, int] = {}
        self.latest: dict[StreamKey, Event | None] = {}
        self.last_position = -1  # the head this cache is valid at; -1: unknown
        self._keys: dict[str, set[StreamKey]] = {}  # tenant -> its cached stream keys

    def job(self, key: StreamKey) -> JobState | None:
        state = self.jobs.get(key)
        if state is not None:
            self.jobs.move_to_end(key)
        return state

    def remember_job(self, key: StreamKey, state: JobState) -> None:
        self.jobs[key] = state
        self.jobs.move_to_end(key)
        self.keep(key)
        if len(self.jobs) > JOB_CACHE:
            old, _ = self.jobs.popitem(last=False)
            if old not in self.versions and old not in self.latest:
                self._keys.get(old[0], set()).discard(old)

    def keep(self, key: StreamKey) -> None:
        """Index a cached stream under its tenant, so ``validate`` can drop it."""
        keys = self._keys.get(key[0])
        if keys is None:
            keys = self._keys[key[0]] = set()
        keys.add(key)

    def validate(
        self,
        tenants: list[str],
        heads: dict[str, ChainHead],
        stale: dict[str, set[str] | None],
    ) -> None:
        """Under the tenants' write locks: make what is cached of them current.

        ``heads`` are their committed chain heads; ``stale`` the streams appended to after the
        cached head's position (``None``: too many). A tenant whose head did not move keeps
        everything; one that moved loses the streams that moved (all of them when unknown).
        """
        for tenant in tenants:
            head = heads.get(tenant, GENESIS_HEAD)
            cached = self.heads.get(tenant)
            if cached == head:
                continue
            streams = stale.get(tenant) if cached is not None else None
            if streams is None:
                self._drop_tenant(tenant)
            else:
                for stream in streams:
                    self._drop((tenant, stream))
            self.heads[tenant] = head

    def _drop(self, key: StreamKey) -> None:
        self.jobs.pop(key, None)
        self.versions.pop(key, None)
        self.latest.pop(key, None)

    def _drop_tenant(self, tenant: str) -> None:
        for key in self._keys.pop(tenant, ()):
            self._drop(key)

    async def load_heads(self, conn: Conn, tenants: list[str]) -> None:
        """Read the chain heads of ``tenants`` this cache does not hold yet."""
        for tenant in dict.fromkeys(t for t in tenants if t not in self.heads):
            row = await conn.fetchone(
                "SELECT position, hash, count FROM chain_heads WHERE tenant = ?", (tenant,)
            )
            self.heads[tenant] = ChainHead(*row) if row else GENESIS_HEAD

    def learn(self, learned: Learned, last_position: int) -> None:
        """A transaction committed: take its writes as the new committed state."""
        self.heads.update(learned.heads)
        self.versions.update(learned.versions)
        self.latest.update(learned.latest)
        for key in (*learned.versions, *learned.latest):
            self.keep(key)
        for key, state in learned.jobs.items():
            self.remember_job(key, state)
        self.last_position = last_position

    async def catch_up(self, conn: Conn, position: int) -> None:
        """Forget what the events after ``last_position`` (another process's) made stale."""
        if self.last_position < 0 or not 0 < position - self.last_position <= CATCH_UP_MAX:
            self.forget()
            return
        rows = await conn.fetchall(
            "SELECT DISTINCT tenant, stream FROM events WHERE position > ?",
            (self.last_position,),
        )
        for tenant, stream in rows:
            self.jobs.pop((tenant, stream), None)
            self.versions.pop((tenant, stream), None)
            self.latest.pop((tenant, stream), None)
            self.heads.pop(tenant, None)
        self.last_position = position

    def forget(self) -> None:
        self.jobs.clear()
        self.heads.clear()
        self.versions.clear()
        self.latest.clear()
        self._keys.clear()
        self.last_position = -1
