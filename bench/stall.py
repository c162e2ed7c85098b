"""Does one request stall the server? ``/healthz`` latency while six full lists run.

``python -m bench.stall [--jobs 100000] [--db PATH_OR_URL]``: generates ``--jobs`` jobs (one
event each), starts ``jobledger serve`` on them, sends three ``/compat/mcrit/jobs`` (MCRIT's
default ``limit=0``: every job) and three ``/compat/mindcase/api/v1/jobs`` at once, and asks
``/healthz`` every 10 ms until all six are answered. Prints one JSON line: the ``/healthz``
latencies (p50, p99, max), how long the lists took, and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.datagen import generate

LISTS = ("/compat/mcrit/jobs", "/compat/mindcase/api/v1/jobs") * 3


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(url, headers=headers) as http:

        async def full_list(path: str) -> tuple[int, float]:
            started = time.perf_counter()
            size = 0
            async with http.get(path) as resp:
                resp.raise_for_status()
                async for chunk in resp.content.iter_any():  # counted, never parsed here
                    size += len(chunk)
            return size, time.perf_counter() - started

        lists = [asyncio.ensure_future(full_list(p)) for p in LISTS]
        latencies: list[float] = []
        while not all(t.done() for t in lists):
            started = time.perf_counter()
            async with http.get("/healthz") as resp:
                await resp.read()
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
        done = await asyncio.gather(*lists)
    return {
        "healthz_samples": len(latencies),
        "healthz_p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
        "healthz_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "healthz_max_ms": round(max(latencies) * 1000, 1),
        "list_bytes": done[0][0],
        "lists_seconds": round(max(s for _, s in done), 2),
    }


def run(jobs: int, db: str | None, tmp: Path) -> dict[str, Any]:
    target = db or str(tmp / "stall.db")
    data = generate(target, jobs, tenant="stall", events_per_job=1, jobs=jobs)
    with procs.ledger_server(target, tmp, name="stall") as server:
        result = asyncio.run(measure(server.url, data["token"]))
        result["server_memory_mib"] = server.memory()
    return {
        "jobs": jobs,
        "db": "postgresql" if target.startswith("postgres") else "sqlite",
        **result,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--db", help="an empty database URL (default: a new SQLite file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jobledger-stall-") as scratch:
        try:
            print(json.dumps(run(args.jobs, args.db, Path(scratch))))
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
