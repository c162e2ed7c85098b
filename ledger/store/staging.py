"""What a unit of work has decided to write but not yet written: named rows, not tuples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ledger.events import Event
from ledger.jobs import JobState
from ledger.records import Batch, Change, Recorded
from ledger.store.cache import ChainHead, Learned, StreamKey


class IdempotentAnswer(NamedTuple):
    """The answer stored under an ``Idempotency-Key`` (``body`` is the JSON text)."""

    fingerprint: str
    status: int
    body: str


class IdempotencyRow(NamedTuple):
    tenant: str
    key: str
    answer: IdempotentAnswer
    job_id: str | None
    created_us: int


class ResultRow(NamedTuple):
    result_id: str
    tenant: str
    job_id: str
    expires_us: int | None
    payload: str


class StoredResult(NamedTuple):
    """A result as the results table holds it; ``payload`` is ``None`` once dropped."""

    job_id: str
    expires_us: int | None
    payload: str | None


class Erasure(NamedTuple):
    """Erase the data of a job's events before ``before_position``, and its results."""

    tenant: str
    job_id: str
    before_position: int


@dataclass(slots=True)
class Staged:
    """The writes of one command, or of every command of a batch merged."""

    events: list[tuple[Recorded, Event | None]] = field(default_factory=list)
    jobs: dict[StreamKey, JobState] = field(default_factory=dict)
    befores: dict[StreamKey, JobState | None] = field(default_factory=dict)
    heads: dict[str, ChainHead] = field(default_factory=dict)
    versions: dict[StreamKey, int] = field(default_factory=dict)
    event_ids: dict[tuple[str, str], Recorded] = field(default_factory=dict)
    results: list[ResultRow] = field(default_factory=list)
    idempotency: dict[tuple[str, str], IdempotencyRow] = field(default_factory=dict)
    erasures: list[Erasure] = field(default_factory=list)
    # one command's own: the jobs whose state object it made (False), and whose executions
    # map too (True); never merged into the batch, whose states earlier commands answered with
    owned: dict[StreamKey, bool] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.events or self.results or self.idempotency or self.erasures)

    def merge(self, later: Staged) -> None:
        """Add the writes of a later command; ``befores`` keep the earliest state."""
        self.events.extend(later.events)
        self.jobs.update(later.jobs)
        for key, before in later.befores.items():
            self.befores.setdefault(key, before)
        self.heads.update(later.heads)
        self.versions.update(later.versions)
        self.event_ids.update(later.event_ids)
        self.results.extend(later.results)
        self.idempotency.update(later.idempotency)
        self.erasures.extend(later.erasures)

    def batch(self) -> Batch:
        """What the projectors fold: the events and each changed job's before and after."""
        out = Batch(events=self.events)
        for key, after in self.jobs.items():
            out.changes[key] = Change(key[0], self.befores.get(key), after)
        return out

    def learned(self) -> Learned:
        latest = {
            (recorded.tenant, recorded.stream): event
            for recorded, event in self.events
            if recorded.stream.startswith("$")
        }
        return Learned(dict(self.heads), dict(self.versions), latest, dict(self.jobs))
