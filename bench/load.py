"""Load generators for the benchmark suite.

``run_wrk`` drives wrk with a Lua script from ``bench/lua/`` (``request.lua``, a
fixed request, unless ``lua_path`` is given) and parses the one JSON line its
``done()`` prints. ``run_aiohttp_load`` is a slower in-process fallback with the
same return shape, for machines without wrk. Both return a dict with at least::

    requests_per_s, latency_p50_ms, latency_p99_ms, non_2xx,
    requests, duration_s, status_counts, errors, tool

Every figure should be read as a ratio against a baseline server measured with
the same tool in the same run (``bench/baselines/echo_server.py``).

CLI: ``python bench/load.py http://127.0.0.1:8081/ping -d 5``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

LUA_DIR = Path(__file__).resolve().parent / "lua"
REQUEST_LUA = LUA_DIR / "request.lua"
APPEND_LUA = LUA_DIR / "append.lua"
_MARKER = "WRK_JSON "

# (method, url, body, headers) for one request of the aiohttp fallback.
Request = tuple[str, str, bytes | None, Mapping[str, str]]


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _as_bytes(body: bytes | str | None) -> bytes | None:
    return body.encode() if isinstance(body, str) else body


def run_wrk(
    url: str,
    *,
    method: str,
    body: bytes | str | None,
    headers: Mapping[str, str] | None,
    connections: int = 32,
    threads: int = 2,
    duration_s: float = 10,
    lua_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run wrk against ``url``; ``env`` adds variables for the Lua script
    (e.g. ``JOB_IDS`` and ``TOKEN`` for ``append.lua``)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    raw = _as_bytes(body)
    script_env = {
        **os.environ,
        "WRK_METHOD": method.upper(),
        "WRK_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
        "WRK_THREADS": str(threads),
        **(env or {}),
    }
    if raw is not None:
        script_env["WRK_BODY"] = raw.decode()
    cmd = [
        wrk,
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration_s))}s",
        "--timeout=5s",
        f"--script={lua_path or REQUEST_LUA}",
        url,
    ]
    proc = subprocess.run(
        cmd,
        env=script_env,
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_MARKER):
            result: dict[str, Any] = json.loads(line[len(_MARKER) :])
            result["tool"] = "wrk"
            return result
    raise RuntimeError(
        f"wrk exited {proc.returncode} without a result line:\n{proc.stdout}\n{proc.stderr}"
    )


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


async def _aiohttp_load(
    next_request: Callable[[], Request],
    connections: int,
    duration_s: float,
    max_requests: int,
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, issued
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            method, url, body, headers = next_request()
            t0 = time.perf_counter()
            try:
                async with session.request(method, url, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    done = sum(statuses.values())
    return {
        "requests": done,
        "duration_s": elapsed,
        "requests_per_s": done / elapsed if elapsed else 0.0,
        "latency_p50_ms": _percentile(latencies, 50) * 1000,
        "latency_p99_ms": _percentile(latencies, 99) * 1000,
        "latency_mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else 0.0,
        "latency_max_ms": latencies[-1] * 1000 if latencies else 0.0,
        "non_2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
        "status_counts": {str(s): n for s, n in sorted(statuses.items())},
        "errors": {"client": errors},
        "tool": "aiohttp",
    }


def run_aiohttp_load(
    url: str,
    *,
    method: str,
    body: bytes | str | None,
    headers: Mapping[str, str] | None,
    connections: int = 32,
    duration_s: float = 10,
    max_requests: int = 1_000_000,
    next_request: Callable[[], Request] | None = None,
) -> dict[str, Any]:
    """Closed-loop load from ``connections`` aiohttp workers, stopping after
    ``duration_s`` or ``max_requests``, whichever comes first. ``next_request``,
    if given, replaces the fixed (method, url, body, headers) request."""
    fixed: Request = (method.upper(), url, _as_bytes(body), dict(headers or {}))
    return asyncio.run(
        _aiohttp_load(next_request or (lambda: fixed), connections, duration_s, max_requests)
    )


def append_requests(base_url: str, job_ids: Iterable[str], token: str) -> Callable[[], Request]:
    """The aiohttp fallback's equivalent of ``lua/append.lua``."""
    ids = itertools.cycle(list(job_ids))
    row_count = itertools.count(1)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    base = base_url.rstrip("/")

    def next_request() -> Request:
        body = b'{"type":"job.progressed","data":{"row_count":%d}}' % next(row_count)
        return ("POST", f"{base}/v1/jobs/{next(ids)}/events", body, headers)

    return next_request


def run_append_load(
    base_url: str,
    job_ids: Iterable[str],
    token: str,
    *,
    connections: int = 32,
    threads: int = 2,
    duration_s: float = 10,
) -> dict[str, Any]:
    """Append ``job.progressed`` events to many existing jobs concurrently,
    with wrk if installed, else with the aiohttp fallback."""
    ids = list(job_ids)
    if have_wrk():
        env = {"JOB_IDS": ",".join(ids), "TOKEN": token}
        return run_wrk(
            base_url,
            method="POST",
            body=None,
            headers=None,
            connections=connections,
            threads=threads,
            duration_s=duration_s,
            lua_path=APPEND_LUA,
            env=env,
        )
    return run_aiohttp_load(
        base_url,
        method="POST",
        body=None,
        headers=None,
        connections=connections,
        duration_s=duration_s,
        next_request=append_requests(base_url, ids, token),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Load one URL with wrk or aiohttp.")
    parser.add_argument("url")
    parser.add_argument("-m", "--method", default="GET")
    parser.add_argument("-b", "--body", default=None)
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-d", "--duration", type=float, default=10)
    parser.add_argument("--aiohttp", action="store_true", help="force the fallback")
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    common: dict[str, Any] = {
        "method": args.method,
        "body": args.body,
        "headers": headers,
        "connections": args.connections,
        "duration_s": args.duration,
    }
    if args.aiohttp or not have_wrk():
        result = run_aiohttp_load(args.url, **common)
    else:
        result = run_wrk(args.url, threads=args.threads, **common)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
