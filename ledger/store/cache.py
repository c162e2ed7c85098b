"""The writer's cache: what this process knows of the ledger's committed state.

It holds job states (an LRU), chain heads, stream versions and the newest event of each
non-job stream. It learns only what a COMMIT made durable (``learn``), and forgets what another
process may have changed (``catch_up``) or what a failed transaction left in doubt (``forget``).
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

    def job(self, key: StreamKey) -> JobState | None:
        state = self.jobs.get(key)
        if state is not None:
            self.jobs.move_to_end(key)
        return state

    def remember_job(self, key: StreamKey, state: JobState) -> None:
        self.jobs[key] = state
        self.jobs.move_to_end(key)
        if len(self.jobs) > JOB_CACHE:
            self.jobs.popitem(last=False)

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
        self.last_position = -1
