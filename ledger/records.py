"""What the store hands to projections and readers: stored events and job changes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import msgspec

from ledger.events import Event
from ledger.jobs import JobState
from ledger.sql import Conn

EVENT_COLUMNS = (
    "position, tenant, stream, version, event_id, type, occurred_at, occurred_us, recorded_at, "
    "actor, data, data_hash, prev_hash, hash, redacted"
)


class Recorded(msgspec.Struct, kw_only=True):
    """One stored event, as the events table holds it (``data`` is canonical JSON text)."""

    position: int
    tenant: str
    stream: str
    version: int
    event_id: str
    type: str
    occurred_at: str
    occurred_us: int
    recorded_at: str
    actor: str
    data: str | None
    data_hash: str
    prev_hash: str
    hash: str
    redacted: bool = False

    def row(self) -> tuple[Any, ...]:
        return (
            self.position,
            self.tenant,
            self.stream,
            self.version,
            self.event_id,
            self.type,
            self.occurred_at,
            self.occurred_us,
            self.recorded_at,
            self.actor,
            self.data,
            self.data_hash,
            self.prev_hash,
            self.hash,
            int(self.redacted),
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Recorded:
        return cls(
            position=row[0],
            tenant=row[1],
            stream=row[2],
            version=row[3],
            event_id=row[4],
            type=row[5],
            occurred_at=row[6],
            occurred_us=row[7],
            recorded_at=row[8],
            actor=row[9],
            data=row[10],
            data_hash=row[11],
            prev_hash=row[12],
            hash=row[13],
            redacted=bool(row[14]),
        )


@dataclass(slots=True)
class Change:
    """One job's state before and after a batch (``before`` is ``None`` for a new job)."""

    tenant: str
    before: JobState | None
    after: JobState


@dataclass(slots=True)
class Batch:
    """What one transaction appended: its events (typed) and the jobs they changed."""

    events: list[tuple[Recorded, Event | None]] = field(default_factory=list)
    changes: dict[tuple[str, str], Change] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One table of a read model as a rebuild and maintenance see it.

    ``key`` identifies a row (the primary key); ``counters`` are summed columns, so a row whose
    counters are all zero means the same as no row; ``erasable`` tables hold data that a
    redaction erases.
    """

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    counters: tuple[str, ...] = ()
    erasable: bool = False

    def is_zero(self, row: Sequence[Any]) -> bool:
        """Whether ``row`` (all ``columns``, in order) is a counter row summing to nothing."""
        if not self.counters:
            return False
        return all(row[self.columns.index(c)] == 0 for c in self.counters)


class Projector(Protocol):
    """A read model folded from events, written in the same transaction as they are.

    It owns ``tables``, described by ``specs``; ``ddl(suffix)`` creates them under
    ``name + suffix`` (a rebuild fills suffixed shadow tables and swaps them in);
    ``indexes()`` indexes the live tables.
    """

    name: str
    tables: tuple[str, ...]
    specs: tuple[TableSpec, ...]

    def ddl(self, suffix: str = "") -> list[str]: ...

    def indexes(self) -> list[str]: ...

    def with_suffix(self, suffix: str) -> Projector: ...

    async def apply(self, conn: Conn, batch: Batch) -> None: ...


class CreditTotals(NamedTuple):
    """An account's credits in units (ten-thousandths): granted and used, ever."""

    granted: int
    used: int


class CreditBalances(Protocol):
    """The committed credit totals of an account: a port the credits read model implements.

    The ledger asks it inside a write transaction (credit enforcement, a grant's answer) and
    adds what the transaction itself has staged; nothing below calls back up into the API.
    """

    async def totals(self, conn: Conn, tenant: str, account: str) -> CreditTotals: ...
