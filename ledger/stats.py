"""Plain counters the store keeps about its own work, for whoever wants to export them.

The ledger knows nothing of Prometheus (or of any exporter): the store only adds numbers
here, and ``api/metrics.py`` reads them when it is scraped. Everything is cumulative since the
process started, like a Prometheus counter, so a reader never needs to reset anything.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# group-commit batch sizes (commands per COMMIT); the writer takes at most 512 at once
BATCH_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# seconds from BEGIN to the end of COMMIT of one batch
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


class Distribution:
    """A histogram with fixed upper bounds: per-bucket counts (the last is +Inf), sum, count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)``, ending with ``(inf, count)``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


def _zero() -> int:
    return 0


@dataclass(slots=True)
class StoreStats:
    """What the store's writer did: batches, commands, events, commit time, its queue.

    ``queue_depth`` is a callable the store sets to its own queue's size, so a reader sees the
    commands waiting right now without the store counting anything per command.
    """

    batches: int = 0
    commands: int = 0
    events_appended: int = 0
    failed_batches: int = 0
    batch_sizes: Distribution = field(default_factory=lambda: Distribution(BATCH_BOUNDS))
    commit_seconds: Distribution = field(default_factory=lambda: Distribution(COMMIT_BOUNDS))
    queue_depth: Callable[[], int] = _zero

    def record_batch(self, *, commands: int, events: int, seconds: float) -> None:
        """One committed batch of ``commands`` that appended ``events`` in ``seconds``."""
        self.batches += 1
        self.commands += commands
        self.events_appended += events
        self.batch_sizes.observe(commands)
        self.commit_seconds.observe(seconds)


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
