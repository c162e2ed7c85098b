"""Baseline for rebuild speed: raw sqlite3 read + msgspec decode + trivial fold.

Reads every event in position order with the stdlib sqlite3 module (fetchmany in
chunks of 10,000), decodes each ``data`` column with ``msgspec.json.decode`` and
folds into ``stream -> (status, count)``. A projection rebuild does at least
this much work per event, so its events/s divided by this one's is its overhead.

Run: ``python bench/baselines/sqlite_fold.py /path/to/ledger.db``
"""

from __future__ import annotations

import argparse
import sqlite3
import time

import msgspec

CHUNK = 10_000
STATUS_BY_TYPE = {
    "job.queued": "queued",
    "job.started": "running",
    "job.completed": "completed",
    "job.failed": "failed",
    "job.cancelled": "cancelled",
}


def raw_fold(db_path: str) -> tuple[int, float]:
    """Fold every event of ``db_path``; return (events read, seconds taken)."""
    decode = msgspec.json.decode
    status_by_type = STATUS_BY_TYPE
    jobs: dict[str, tuple[str, int]] = {}
    events = 0
    start = time.perf_counter()
    conn = sqlite3.connect(db_path)
    try:
        cursor = conn.execute("SELECT stream, type, data FROM events ORDER BY position")
        while rows := cursor.fetchmany(CHUNK):
            for stream, type_, data in rows:
                if data is not None:
                    decode(data)
                status, count = jobs.get(stream, ("unknown", 0))
                jobs[stream] = (status_by_type.get(type_, status), count + 1)
            events += len(rows)
    finally:
        conn.close()
    return events, time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Raw sqlite3 + msgspec fold rate.")
    parser.add_argument("db_path")
    args = parser.parse_args()
    n, seconds = raw_fold(args.db_path)
    rate = n / seconds if seconds else 0.0
    print(f"{n} events in {seconds:.3f} s: {rate:,.0f} events/s")
