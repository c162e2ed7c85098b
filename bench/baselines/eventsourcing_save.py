"""Baseline for append cost: pyeventsourcing saving one event per ``app.save()``.

An ``Application`` persisted with ``eventsourcing.sqlite`` (the library's own
SQLite recorder, at its default durability: WAL journal, SQLite's default
``synchronous``) saves ``n_events`` ``Job.Progressed`` events, one per call,
the way a request handler appending a single event would. The aggregate stays
in memory, so only event creation and the save path are timed.

Run: ``python bench/baselines/eventsourcing_save.py [--tmp-dir DIR] [-n 5000]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event


class Job(Aggregate):
    def __init__(self, name: str) -> None:
        self.name = name
        self.row_count = 0

    @event("Progressed")
    def progress(self, row_count: int) -> None:
        self.row_count = row_count


def eventsourcing_append_rate(tmp_dir: str | Path, n_events: int = 5000) -> float:
    """Save ``n_events`` events one ``app.save()`` at a time; return events/s."""
    db_path = Path(tmp_dir) / "eventsourcing_bench.sqlite"
    for leftover in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        leftover.unlink(missing_ok=True)
    app: Application[UUID] = Application(
        env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(db_path)}
    )
    try:
        job = Job(name="bench")
        app.save(job)  # The creation event is not timed.
        start = time.perf_counter()
        for row_count in range(1, n_events + 1):
            job.progress(row_count)
            app.save(job)
        elapsed = time.perf_counter() - start
    finally:
        app.close()
    return n_events / elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="pyeventsourcing per-event save rate.")
    parser.add_argument("--tmp-dir", default=None, help="default: a fresh temp dir")
    parser.add_argument("-n", "--n-events", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as fresh:
        rate = eventsourcing_append_rate(args.tmp_dir or fresh, args.n_events)
    print(f"{args.n_events} events saved one per app.save(): {rate:,.0f} events/s")
