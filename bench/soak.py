"""Soak: minutes of mixed load against ``jobledger serve`` with periodic graceful restarts.

Workers create jobs and drive them through their lifecycle (start, progress, complete with a
result, or cancel), long-poll, page lists and the feed, read stats, credits and the dialects.
Every ``--restart-every`` seconds the server gets SIGTERM (it must exit 0) and a new one starts
on the same database; workers ride through the gap (refused connections are counted, not
errors). At the end every acknowledged append is looked up in the feed, and ``jobledger verify``
and ``jobledger rebuild --verify`` must pass.

Reports requests served, status counts, 5xx (must be 0), lost acknowledged events (must be 0),
exit codes of the restarts and server RSS over time. Loopback only; bounded in time and count.

    .venv/bin/python -m bench.soak --minutes 10
    .venv/bin/python -m bench.soak --minutes 2 --db postgresql://postgres@127.0.0.1:5432/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs

MAX_REQUESTS = 5_000_000  # a hard cap on top of the time limit
RSS_EVERY = 5.0


@dataclass
class Soak:
    base: str
    headers: dict[str, str]
    deadline: float
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    refused: int = 0  # connection refused or dropped while the server restarted
    server_errors: list[str] = field(default_factory=list)
    unexpected: Counter[str] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)  # event ids answered 201
    serving: asyncio.Event = field(default_factory=asyncio.Event)

    def done(self) -> bool:
        return time.monotonic() > self.deadline or self.requests >= MAX_REQUESTS


async def call(
    soak: Soak,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    *,
    expect: tuple[int, ...] = (200, 201),
    **kw: Any,
) -> Any:
    """One request; ``None`` if the server was away (restarting)."""
    await soak.serving.wait()
    try:
        async with http.request(method, soak.base + path, headers=soak.headers, **kw) as resp:
            body = await resp.read()
    except (aiohttp.ClientConnectionError, TimeoutError):
        soak.refused += 1
        await asyncio.sleep(0.05)
        return None
    soak.requests += 1
    soak.statuses[resp.status] += 1
    if resp.status >= 500:
        soak.server_errors.append(f"{method} {path}: {resp.status} {body[:200]!r}")
    elif resp.status not in expect:
        soak.unexpected[f"{method} {path.split('?')[0]} {resp.status}"] += 1
    if resp.content_type == "application/json" and body:
        return json.loads(body)
    return body


async def append(
    soak: Soak, http: aiohttp.ClientSession, job_id: str, type_: str, data: dict[str, Any]
) -> bool:
    """Append with an event id, retrying across a restart; ``True`` once acknowledged."""
    event_id = f"soak-{job_id}-{type_}-{random.getrandbits(40):x}"
    body = {"type": type_, "data": data, "event_id": event_id}
    for _ in range(50):  # an event id makes the retry safe: it appends at most once
        answer = await call(soak, http, "POST", f"/v1/jobs/{job_id}/events", json=body)
        if answer is not None:
            if isinstance(answer, dict) and "job" in answer:
                soak.acked.add(event_id)
                return True
            return False
        if soak.done():
            return False
    return False


async def worker(n: int, soak: Soak) -> None:
    rng = random.Random(n)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        i = 0
        while not soak.done():
            i += 1
            job_id = f"soak-{n}-{i}-{rng.getrandbits(24):x}"
            created = await call(
                soak,
                http,
                "POST",
                "/v1/jobs",
                json={"agent": f"agent-{n % 4}", "account": f"acct-{n % 3}", "id": job_id},
                expect=(201, 409),  # 409: a retry after a restart found it already made
            )
            if created is None:
                continue
            await append(soak, http, job_id, "job.started", {})
            for r in range(rng.randrange(0, 3)):
                await append(soak, http, job_id, "job.progressed", {"row_count": r})
            roll = rng.random()
            if roll < 0.7:
                rows = [{"n": k} for k in range(rng.randrange(1, 6))]
                await append(soak, http, job_id, "job.completed", {"result": rows})
                await call(soak, http, "GET", f"/v1/jobs/{job_id}/results", expect=(200, 404))
            elif roll < 0.85:
                await call(
                    soak, http, "POST", f"/v1/jobs/{job_id}/cancel", json={}, expect=(200, 409)
                )
            await call(soak, http, "GET", f"/v1/jobs/{job_id}")
            await call(soak, http, "GET", f"/v1/jobs/{job_id}?wait=0.2&after_version=100")
            read = rng.choice(
                [
                    "/v1/jobs?limit=20",
                    "/v1/jobs/stats",
                    "/v1/jobs/running",
                    "/v1/credits",
                    "/v1/accounts",
                    f"/v1/events?after={max(0, i * 10)}&limit=50",
                    f"/v1/jobs/{job_id}/events",
                    "/compat/mcrit/jobs?limit=10",
                    "/compat/mindcase/api/v1/jobs",
                    "/compat/useapi/v1/minimax/agent/jobs",
                    "/compat/mcrit/jobs/stats",
                ]
            )
            await call(soak, http, "GET", read)


async def sample_rss(soak: Soak, server: list[procs.Server], out: list[dict[str, Any]]) -> None:
    started = time.monotonic()
    while not soak.done():
        current = server[0]
        if current.proc is not None and current.proc.poll() is None:
            mem = current.memory()
            out.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "pid": current.pid,
                    "rss_mib": mem.get("VmRSS"),
                    "requests": soak.requests,
                }
            )
        await asyncio.sleep(RSS_EVERY)


async def restarter(
    soak: Soak, db: str, log_dir: Path, server: list[procs.Server], every: float, codes: list[int]
) -> None:
    while True:
        wait_until = time.monotonic() + every
        while time.monotonic() < wait_until:
            if soak.done():
                return
            await asyncio.sleep(0.2)
        old = server[0]
        soak.serving.clear()  # new requests wait; in-flight ones finish on the old server
        code = await asyncio.to_thread(old.stop)
        codes.append(-999 if code is None else code)
        new = procs.ledger_server(db, log_dir, name=f"soak{len(codes)}")
        await asyncio.to_thread(new.start)
        server[0] = new
        soak.base = new.url
        soak.serving.set()


async def feed_event_ids(base: str, headers: dict[str, str]) -> set[str]:
    found: set[str] = set()
    after = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for _ in range(100_000):
            async with http.get(
                f"{base}/v1/events", params={"after": after, "limit": 1000}, headers=headers
            ) as resp:
                page = await resp.json()
            if not page["events"]:
                break
            found.update(e["event_id"] for e in page["events"])
            after = page["next_after"]
    return found


async def soak_run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="jobledger-soak-"))
    db = args.db or str(log_dir / "soak.db")
    secret = procs.create_key(db, "soak")
    headers = {"Authorization": f"Bearer {secret}"}
    server = [procs.ledger_server(db, log_dir, name="soak0").start()]
    started = time.monotonic()
    soak = Soak(base=server[0].url, headers=headers, deadline=started + args.minutes * 60)
    soak.serving.set()
    rss: list[dict[str, Any]] = []
    codes: list[int] = []
    try:
        await asyncio.gather(
            *(worker(n, soak) for n in range(args.workers)),
            sample_rss(soak, server, rss),
            restarter(soak, db, log_dir, server, args.restart_every, codes),
        )
        elapsed = time.monotonic() - started
        stored = await feed_event_ids(server[0].url, headers)
    finally:
        final = server[0].stop()
        codes.append(-999 if final is None else final)
        procs.stop_all()
    verify, _ = procs.cli("verify", "--db", db)
    rebuilt, _ = procs.cli("rebuild", "--verify", "--db", db)
    lost = soak.acked - stored
    peak = max((s["rss_mib"] or 0 for s in rss), default=0)
    return {
        "minutes": args.minutes,
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "db": "postgresql" if db.startswith("postgres") else "sqlite",
        "requests_served": soak.requests,
        "requests_per_s": round(soak.requests / elapsed, 1) if elapsed else None,
        "status_counts": dict(sorted(soak.statuses.items())),
        "server_errors_5xx": len(soak.server_errors),
        "first_5xx": soak.server_errors[:5],
        "unexpected_statuses": dict(soak.unexpected.most_common(10)),
        "refused_during_restarts": soak.refused,
        "restarts": len(codes) - 1,
        "exit_codes": codes,
        "acknowledged_appends": len(soak.acked),
        "acknowledged_appends_lost": len(lost),
        "verify": verify.strip().splitlines()[-1],
        "rebuild_verify": json.loads(rebuilt.strip().splitlines()[-1]),
        "rss_mib_peak": peak,
        "rss_mib_over_time": [(s["t"], s["pid"], s["rss_mib"]) for s in rss],
        "logs": str(log_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--restart-every", type=float, default=60.0, help="seconds")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--db", help="a SQLite path or postgresql:// URL (default: a temp file)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    report = asyncio.run(soak_run(args))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    ok = (
        report["server_errors_5xx"] == 0
        and report["acknowledged_appends_lost"] == 0
        and all(code == 0 for code in report["exit_codes"])
        and report["verify"].startswith("OK")
        and report["rebuild_verify"].get("identical") is True
    )
    print("SOAK OK" if ok else "SOAK FAILED", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
