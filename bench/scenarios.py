"""The benchmark's scenarios, each measured next to its baseline in the same run.

Every function returns a dict of raw measurements; ``bench/run.py`` turns them into figures
(ratios against the baselines, targets) and the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.baselines.sqlite_fold import raw_fold
from bench.datagen import account_name, generate
from bench.load import LUA_DIR, have_wrk, run_aiohttp_load, run_append_load, run_wrk
from bench.profile import summarise

GET_JOB_LUA = LUA_DIR / "get_job.lua"
APPEND_BODY = '{"type":"job.progressed","data":{"row_count":1}}'
PG_URL = "postgresql://postgres@127.0.0.1:5432"


@dataclass
class Sizes:
    """Every size and duration of a run (``--quick`` shrinks them)."""

    history_events: int = 1_000_000  # rebuild and export (5 events a job)
    small_history_events: int = 100_000  # export RSS at the small size
    jobs_large: int = 1_000_000  # reads and memory ("backlog" jobs of 1-2 events)
    jobs_small: int = 10_000  # stats at the small size
    # Generate the large jobs database only if the datagen rate measured on the small one
    # promises it within this many seconds; else the reads use the history database.
    datagen_budget_s: float = 300.0
    append_jobs: int = 1_000
    duration_s: float = 10.0
    warmup_s: float = 2.0
    latency_duration_s: float = 5.0
    connections: int = 32
    threads: int = 2
    rounds: int = 2
    es_events: int = 2_000
    accounts: int = 100
    agents: int = 10
    profile: bool = False
    postgres: str = "auto"  # auto | on | off
    postgres_url: str = PG_URL


# -- helpers ------------------------------------------------------------------------------------


def _load(url: str, **kw: Any) -> dict[str, Any]:
    """wrk with ``request.lua`` (or ``lua_path``), else the aiohttp fallback."""
    if have_wrk():
        return run_wrk(url, **kw)
    kw.pop("threads", None)
    kw.pop("lua_path", None)
    kw.pop("env", None)
    return run_aiohttp_load(url, **kw)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def profiled(
    pid: int, out: Path, seconds: float, enabled: bool, result: dict[str, Any]
) -> Iterator[None]:
    """Sample ``pid`` with py-spy (non-blocking) while the body runs; top functions in result."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not enabled or not Path(spy).exists():
        yield
        return
    argv = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.track(proc)
    try:
        yield
    finally:
        try:
            proc.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        procs.untrack(proc)
    if out.exists():
        result["profile"] = summarise(out, top=15)


def _py_spy_command(argv: list[str], out: Path, enabled: bool) -> list[str]:
    spy = Path(sys.executable).parent / "py-spy"
    if not enabled or not spy.exists():
        return argv
    return [
        str(spy),
        "record",
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(out),
        "--",
        *argv,
    ]


def _eventsourcing_rate(tmp_dir: Path, n_events: int) -> float | None:
    """pyeventsourcing's per-event save rate, or ``None`` when the library is not installed."""
    try:
        from bench.baselines.eventsourcing_save import eventsourcing_append_rate
    except ImportError:
        return None
    return eventsourcing_append_rate(tmp_dir, n_events)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _slim(load: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "requests_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "latency_mean_ms",
        "requests",
        "non_2xx",
        "errors",
        "tool",
        "server_cpu_percent",
        "server_cpu_us_per_request",
    )
    return {k: load[k] for k in keys if k in load}


# -- data ---------------------------------------------------------------------------------------


def make_data(
    tmp: Path, sizes: Sizes, log: Callable[[str], None], needs: set[str]
) -> dict[str, Any]:
    """Generate every database the scenarios read; their datagen summaries.

    ``history`` (5 events a job) serves rebuild and export, ``history_small`` the export's
    small size, ``jobs_small``/``jobs_large`` (the backlog mix) the reads. When the large jobs
    database would take longer than ``datagen_budget_s`` at the rate just measured, the reads
    run on ``history`` instead and the summary says so. Only what ``needs`` (the scenarios to
    run) read is generated.
    """
    common: dict[str, Any] = {"accounts": sizes.accounts, "agents": sizes.agents}
    out: dict[str, Any] = {}

    def make(name: str, events: int, **options: Any) -> dict[str, Any]:
        db = tmp / f"{name}.db"
        summary = generate(db, events, "bench", **options, **common)
        log(
            f"  datagen {name}: {summary['jobs']:,} jobs, {summary['events']:,} events in "
            f"{summary['seconds']} s ({summary['events_per_second']:,.0f} events/s, "
            f"{summary['jobs_per_second']:,.0f} jobs/s)"
        )
        out[name] = summary
        return summary

    reads = "reads" in needs
    if reads:
        small = make("jobs_small", 0, jobs=sizes.jobs_small, mix="backlog")
    if "export" in needs:
        make("history_small", sizes.small_history_events, events_per_job=5)
    if needs & {"rebuild", "export", "import"}:
        make("history", sizes.history_events, events_per_job=5)
    if not reads:
        return out
    estimate = sizes.jobs_large / max(small["jobs_per_second"], 1.0)
    if estimate <= sizes.datagen_budget_s or "history" not in out:
        make("jobs_large", 0, jobs=sizes.jobs_large, mix="backlog")
    else:
        note = (
            f"{sizes.jobs_large:,} jobs would take about {estimate:,.0f} s to generate at "
            f"{small['jobs_per_second']:,.0f} jobs/s (budget {sizes.datagen_budget_s:,.0f} "
            f"s, BENCH_DATAGEN_BUDGET_S): reads ran on the history database, "
            f"{out['history']['jobs']:,} jobs"
        )
        log(f"  {note}")
        out["jobs_large"] = {**out["history"], "substituted": note}
    return out


# -- (a) append ---------------------------------------------------------------------------------


def append(tmp: Path, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """Rounds of: echo POST /echo, ledger appends, pyeventsourcing saves; medians of each."""
    db = str(tmp / "append.db")
    token = procs.create_key(db, "bench")  # the CLI creates the schema and the first key
    seed = generate(
        db,
        sizes.append_jobs * 2,
        events_per_job=2,
        mix="running",
        key_role=None,
        accounts=sizes.accounts,
        agents=sizes.agents,
    )
    job_ids: list[str] = seed["job_ids_sample"]
    load = {"connections": sizes.connections, "threads": sizes.threads}
    body = {
        "method": "POST",
        "body": APPEND_BODY,
        "headers": {"Content-Type": "application/json"},
        **load,
    }
    echo_runs: list[dict[str, Any]] = []
    floor_runs: list[dict[str, Any]] = []
    ledger_runs: list[dict[str, Any]] = []
    es_rates: list[float] = []
    es_dir = tmp / "eventsourcing"
    es_dir.mkdir(exist_ok=True)
    result: dict[str, Any] = {"jobs": len(job_ids), "seed_seconds": seed["seconds"]}
    for round_ in range(sizes.rounds):
        with procs.echo_server(tmp) as echo:
            _load(echo.url + "/echo", duration_s=sizes.warmup_s, **body)
            echo_runs.append(
                echo.measure(lambda: _load(echo.url + "/echo", duration_s=sizes.duration_s, **body))
            )
        with procs.floor_server(tmp, tmp / f"floor-append-{round_}.db") as floor:
            run_append_load(floor.url, job_ids, token, duration_s=sizes.warmup_s, **load)
            floor_runs.append(
                floor.measure(
                    lambda: run_append_load(
                        floor.url, job_ids, token, duration_s=sizes.duration_s, **load
                    )
                )
            )
        with procs.ledger_server(db, tmp, name="append") as server:
            run_append_load(server.url, job_ids, token, duration_s=sizes.warmup_s, **load)
            ledger_runs.append(
                server.measure(
                    lambda: run_append_load(
                        server.url, job_ids, token, duration_s=sizes.duration_s, **load
                    )
                )
            )
            if sizes.profile and round_ == sizes.rounds - 1:
                with profiled(
                    server.pid, tmp / "profile-append.txt", sizes.duration_s, True, result
                ):
                    result["profiled_run"] = _slim(
                        run_append_load(
                            server.url, job_ids, token, duration_s=sizes.duration_s, **load
                        )
                    )
            result["server_memory_mib"] = server.memory()
        es_rate = _eventsourcing_rate(es_dir, sizes.es_events)
        if es_rate is not None:
            es_rates.append(es_rate)
        e, f, lr = echo_runs[-1], floor_runs[-1], ledger_runs[-1]
        log(
            f"  round {round_ + 1}: echo {e['requests_per_s']:,.0f} req/s "
            f"({e['server_cpu_us_per_request']} us CPU/req), floor "
            f"{f['requests_per_s']:,.0f} req/s ({f['server_cpu_us_per_request']} us CPU/req), "
            "ledger "
            f"{lr['requests_per_s']:,.0f} req/s ({lr['server_cpu_us_per_request']} us CPU/req, "
            f"non-2xx {lr['non_2xx']}), eventsourcing "
            + (f"{es_rate:,.0f} saves/s" if es_rate is not None else "not installed")
        )
    result.update(
        echo=[_slim(r) for r in echo_runs],
        ledger=[_slim(r) for r in ledger_runs],
        echo_rps=_median([r["requests_per_s"] for r in echo_runs]),
        ledger_rps=_median([r["requests_per_s"] for r in ledger_runs]),
        ratios=[
            lr["requests_per_s"] / er["requests_per_s"]
            for lr, er in zip(ledger_runs, echo_runs, strict=True)
        ],
        floor=[_slim(r) for r in floor_runs],
        floor_rps=_median([r["requests_per_s"] for r in floor_runs]),
        floor_ratio_vs_echo=_median(
            [
                f["requests_per_s"] / er["requests_per_s"]
                for f, er in zip(floor_runs, echo_runs, strict=True)
            ]
        ),
        floor_cpu_us_per_request=_median([r["server_cpu_us_per_request"] or 0 for r in floor_runs]),
        non_2xx=sum(r["non_2xx"] for r in ledger_runs),
        eventsourcing_runs=es_rates,
        echo_cpu_us_per_request=_median([r["server_cpu_us_per_request"] or 0 for r in echo_runs]),
        ledger_cpu_us_per_request=_median(
            [r["server_cpu_us_per_request"] or 0 for r in ledger_runs]
        ),
    )
    result["ratio_vs_echo"] = _median(result["ratios"])
    if es_rates:
        result["eventsourcing_events_per_s"] = _median(es_rates)
        result["es_ratios"] = [
            lr["requests_per_s"] / es for lr, es in zip(ledger_runs, es_rates, strict=True)
        ]
        result["ratio_vs_eventsourcing"] = _median(result["es_ratios"])
        result["floor_ratio_vs_eventsourcing"] = _median(
            [f["requests_per_s"] / es for f, es in zip(floor_runs, es_rates, strict=True)]
        )
    else:
        result["eventsourcing_skipped"] = (
            "pyeventsourcing is not installed (pip install eventsourcing)"
        )
    return result


# -- (b) rebuild --------------------------------------------------------------------------------


def rebuild(
    tmp: Path, data: dict[str, Any], sizes: Sizes, log: Callable[[str], None]
) -> dict[str, Any]:
    db = data["history"]["db"]
    cpu = time.process_time()
    events, seconds = raw_fold(db)
    cpu = time.process_time() - cpu
    raw = {
        "events": events,
        "seconds": seconds,
        "events_per_second": events / seconds,
        "cpu_seconds": round(cpu, 3),
    }
    log(f"  raw fold: {events:,} events in {seconds:.2f} s (CPU {cpu:.2f} s)")
    cpu = child_cpu()
    summary = procs.rebuild(db)
    summary["cpu_seconds"] = round(child_cpu() - cpu, 3)
    log(
        f"  jobledger rebuild: {summary['events']:,} events in {summary['seconds']} s "
        f"(process {summary['wall_seconds']} s, CPU {summary['cpu_seconds']} s)"
    )
    written = raw_write(db, tmp)
    log(
        f"  raw write of the jobs read model: {written['rows']:,} rows in "
        f"{written['insert_seconds']:.2f} s, its indexes in {written['index_seconds']:.2f} s "
        f"(CPU {written['cpu_seconds']:.2f} s); floor (raw fold + raw write) "
        f"{seconds + written['seconds']:.2f} s"
    )
    result: dict[str, Any] = {
        "raw_fold": raw,
        "raw_write": written,
        "floor_seconds": round(seconds + written["seconds"], 3),
        "rebuild": summary,
        "ratio": summary["events_per_second"] / raw["events_per_second"],
    }
    if sizes.profile:
        out = tmp / "profile-rebuild.txt"
        argv = _py_spy_command([procs.JOBLEDGER, "rebuild", "--db", db], out, True)
        subprocess.run(argv, capture_output=True, check=False, timeout=900, cwd=procs.ROOT)
        if out.exists():
            result["profile"] = summarise(out, top=15)
    return result


def _insert_all(conn: sqlite3.Connection, table: str, rows: list[Any]) -> None:
    """Every row into ``table``, 50,000 to an ``executemany``, in the caller's transaction."""
    insert = f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})"
    for i in range(0, len(rows), 50_000):
        conn.executemany(insert, rows[i : i + 50_000])


def _remove(target: Path) -> None:
    """A SQLite file of a baseline, with its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)


def raw_write(db: str, tmp: Path) -> dict[str, Any]:
    """Baseline: stdlib sqlite3 writes the rebuilt ``jobs`` rows of ``db`` into a new file
    (the read model's own table and indexes, one transaction, no waiting for the disk, the
    rebuild's page cache): what writing the biggest read model costs the database alone.
    With the raw fold it is the floor of a rebuild: reading, decoding, writing, indexing."""
    from projections.jobs import JobsProjector

    projector = JobsProjector()
    source = sqlite3.connect(db)
    rows = source.execute(f"SELECT {', '.join(projector.specs[0].columns)} FROM jobs").fetchall()
    source.close()
    target = tmp / "raw-write.db"
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        conn.execute("PRAGMA temp_store = MEMORY")
        started, cpu = time.perf_counter(), time.process_time()
        conn.execute("BEGIN IMMEDIATE")
        for sql in projector.ddl():
            conn.execute(sql)
        _insert_all(conn, "jobs", rows)
        inserted = time.perf_counter()
        for sql in projector.indexes():
            conn.execute(sql)
        conn.execute("COMMIT")
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        conn.close()
        _remove(target)
    return {
        "rows": len(rows),
        "seconds": round(seconds, 3),
        "insert_seconds": round(inserted - started, 3),
        "index_seconds": round(started + seconds - inserted, 3),
        "cpu_seconds": round(cpu, 3),
    }


# -- (c) reads and (e) memory -------------------------------------------------------------------


def reads(
    tmp: Path, data: dict[str, Any], sizes: Sizes, log: Callable[[str], None]
) -> dict[str, Any]:
    large, small = data["jobs_large"], data["jobs_small"]
    load = {"connections": sizes.connections, "threads": sizes.threads}
    one = {"connections": 1, "threads": 1, "duration_s": sizes.latency_duration_s}
    result: dict[str, Any] = {}
    ping_runs: list[dict[str, Any]] = []
    floor_runs: list[dict[str, Any]] = []
    get_runs: list[dict[str, Any]] = []
    with procs.ledger_server(large["db"], tmp, name="reads-large") as server:
        headers = _auth(large["token"])
        env = {"JOB_IDS": ",".join(large["job_ids_sample"]), "TOKEN": large["token"]}
        get = {
            "method": "GET",
            "body": None,
            "headers": None,
            "lua_path": GET_JOB_LUA,
            "env": env,
            **load,
        }
        result["memory_after_start_mib"] = server.memory()
        ping = {"method": "GET", "body": None, "headers": None, **load}
        for round_ in range(sizes.rounds):
            with procs.echo_server(tmp) as echo:
                _load(echo.url + "/ping", duration_s=sizes.warmup_s, **ping)
                ping_runs.append(
                    echo.measure(
                        lambda: _load(echo.url + "/ping", duration_s=sizes.duration_s, **ping)
                    )
                )
                if round_ == 0:  # the machine's own tail latency, for the list p99 figures
                    fixed_ping = {"method": "GET", "body": None, "headers": None, **one}
                    result["ping_one_connection"] = _slim(_load(echo.url + "/ping", **fixed_ping))
            with procs.floor_server(tmp, tmp / "floor-reads.db", large["db"]) as floor:
                _load(floor.url, duration_s=sizes.warmup_s, **get)
                floor_runs.append(
                    floor.measure(lambda: _load(floor.url, duration_s=sizes.duration_s, **get))
                )
            _load(server.url, duration_s=sizes.warmup_s, **get)
            get_runs.append(
                server.measure(lambda: _load(server.url, duration_s=sizes.duration_s, **get))
            )
            p, f, g = ping_runs[-1], floor_runs[-1], get_runs[-1]
            log(
                f"  round {round_ + 1}: ping {p['requests_per_s']:,.0f} req/s "
                f"({p['server_cpu_us_per_request']} us CPU/req), floor GET "
                f"{f['requests_per_s']:,.0f} req/s ({f['server_cpu_us_per_request']} us CPU/req, "
                f"non-2xx {f['non_2xx']}), GET job "
                f"{g['requests_per_s']:,.0f} req/s ({g['server_cpu_us_per_request']} us CPU/req, "
                f"non-2xx {g['non_2xx']})"
            )
        if sizes.profile:
            with profiled(
                server.pid,
                tmp / "profile-get.txt",
                sizes.duration_s,
                True,
                result.setdefault("get_profile", {}),
            ):
                _load(server.url, duration_s=sizes.duration_s, **get)
        fixed = {"method": "GET", "body": None, "headers": headers}
        stats_url = server.url + "/v1/jobs/stats"
        _load(stats_url, **fixed, **{**one, "duration_s": sizes.warmup_s})
        result["stats_large"] = _slim(_load(stats_url, **fixed, **one))
        lists = {
            "list_status": "/v1/jobs?status=running&limit=50",
            "list_account": f"/v1/jobs?account={account_name(42 % sizes.accounts)}&limit=50",
        }
        for name, path in lists.items():
            _load(server.url + path, **fixed, **{**one, "duration_s": sizes.warmup_s})
            result[name] = _slim(_load(server.url + path, **fixed, **one))
            result[name]["path"] = path
        result["memory_after_reads_mib"] = server.memory()
        result["jobs_large"] = large["jobs"]
    with procs.ledger_server(small["db"], tmp, name="reads-small") as server:
        fixed = {"method": "GET", "body": None, "headers": _auth(small["token"])}
        stats_url = server.url + "/v1/jobs/stats"
        _load(stats_url, **fixed, **{**one, "duration_s": sizes.warmup_s})
        result["stats_small"] = _slim(_load(stats_url, **fixed, **one))
        result["jobs_small"] = small["jobs"]
    result.update(
        ping=[_slim(r) for r in ping_runs],
        get_job=[_slim(r) for r in get_runs],
        ping_rps=_median([r["requests_per_s"] for r in ping_runs]),
        get_rps=_median([r["requests_per_s"] for r in get_runs]),
        get_ratio=_median(
            [
                g["requests_per_s"] / p["requests_per_s"]
                for g, p in zip(get_runs, ping_runs, strict=True)
            ]
        ),
        floor_get=[_slim(r) for r in floor_runs],
        floor_get_rps=_median([r["requests_per_s"] for r in floor_runs]),
        floor_get_ratio=_median(
            [
                f["requests_per_s"] / p["requests_per_s"]
                for f, p in zip(floor_runs, ping_runs, strict=True)
            ]
        ),
        stats_ratio=result["stats_large"]["latency_p50_ms"]
        / max(result["stats_small"]["latency_p50_ms"], 1e-6),
    )
    return result


# -- (d) export ---------------------------------------------------------------------------------


async def _http_export(url: str, token: str) -> tuple[int, int, float]:
    started = time.perf_counter()
    lines = size = 0
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url + "/v1/audit/export", headers=_auth(token)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"export answered {resp.status}: {await resp.text()}")
            async for chunk in resp.content.iter_chunked(1 << 20):
                lines += chunk.count(b"\n")
                size += len(chunk)
    return lines, size, time.perf_counter() - started


def child_cpu() -> float:
    """User + system CPU seconds of this process's finished children so far: what a command
    cost, which on a shared machine says more than its wall time."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def raw_read(db: str) -> dict[str, Any]:
    """Baseline for exports: stdlib sqlite3 reads every exported column of every event in
    position order (fetchmany 10,000), encoding nothing: the database's own floor."""
    started = time.perf_counter()
    cpu = time.process_time()
    conn = sqlite3.connect(db)
    events = 0
    try:
        cursor = conn.execute(
            "SELECT position, event_id, stream, version, type, occurred_at, recorded_at, actor, "
            "data, data_hash, prev_hash, hash, redacted FROM events ORDER BY position"
        )
        while rows := cursor.fetchmany(10_000):
            events += len(rows)
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    return {
        "events": events,
        "seconds": seconds,
        "events_per_second": events / seconds,
        "cpu_seconds": round(time.process_time() - cpu, 3),
    }


def export(
    tmp: Path, data: dict[str, Any], sizes: Sizes, log: Callable[[str], None]
) -> dict[str, Any]:
    result: dict[str, Any] = {"raw_read": raw_read(data["history"]["db"])}
    log(
        f"  raw read: {result['raw_read']['events_per_second']:,.0f} events/s "
        f"(CPU {result['raw_read']['cpu_seconds']} s)"
    )
    for name in ("history_small", "history"):
        info = data[name]
        cpu = child_cpu()
        lines, size, seconds = procs.count_stream(
            [procs.JOBLEDGER, "export", "--db", info["db"], "--tenant", info["tenant"]]
        )
        cli = {
            "events": lines,
            "bytes": size,
            "seconds": round(seconds, 3),
            "events_per_second": lines / seconds,
            "cpu_seconds": round(child_cpu() - cpu, 3),
        }
        with procs.ledger_server(info["db"], tmp, name=f"export-{name}") as server:
            before = server.memory()
            lines_h, size_h, seconds_h = asyncio.run(_http_export(server.url, info["token"]))
            after = server.memory()
        http = {
            "events": lines_h,
            "bytes": size_h,
            "seconds": round(seconds_h, 3),
            "events_per_second": lines_h / seconds_h,
            "memory_before_mib": before,
            "memory_after_mib": after,
        }
        log(
            f"  {name}: CLI {cli['events_per_second']:,.0f} events/s (CPU "
            f"{cli['cpu_seconds']} s), HTTP "
            f"{http['events_per_second']:,.0f} events/s, server peak RSS {after.get('VmHWM')} MiB"
        )
        result[name] = {"history_events": info["events"], "cli": cli, "http": http}
    if sizes.profile:
        out = tmp / "profile-export.txt"
        info = data["history"]
        argv = [
            procs.JOBLEDGER,
            "export",
            "--db",
            info["db"],
            "--tenant",
            info["tenant"],
            "--out",
            os.devnull,
        ]
        subprocess.run(
            _py_spy_command(argv, out, True),
            capture_output=True,
            check=False,
            timeout=900,
            cwd=procs.ROOT,
        )
        if out.exists():
            result["profile"] = summarise(out, top=15)
    small = result["history_small"]["http"]["memory_after_mib"].get("VmHWM", 0.0)
    large = result["history"]["http"]["memory_after_mib"].get("VmHWM", 0.0)
    result["peak_rss_ratio"] = large / small if small else None
    return result


# -- (g) import -------------------------------------------------------------------------------


def raw_insert(db: str, tmp: Path) -> dict[str, Any]:
    """Baseline: stdlib sqlite3 copies the events rows of ``db`` into a fresh events table
    (same schema and indexes, WAL, ``synchronous=FULL``, one transaction): what an import
    costs the database alone, without reading, checking or folding."""
    from ledger.schema import LEDGER_SCHEMA

    target = tmp / "raw-insert.db"
    source = sqlite3.connect(db)
    rows = source.execute("SELECT * FROM events ORDER BY position").fetchall()
    source.close()
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        for sql in LEDGER_SCHEMA:
            if "ON events" in sql or "TABLE IF NOT EXISTS events" in sql:
                conn.execute(sql)
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        cpu = time.process_time()
        _insert_all(conn, "events", rows)
        conn.execute("COMMIT")
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        conn.close()
        _remove(target)
    return {
        "events": len(rows),
        "seconds": seconds,
        "events_per_second": len(rows) / seconds,
        "cpu_seconds": round(cpu, 3),
    }


def import_(
    tmp: Path, data: dict[str, Any], sizes: Sizes, log: Callable[[str], None]
) -> dict[str, Any]:
    """``jobledger import`` of the history (datagen made it so) next to a raw insert."""
    history = data["history"]
    raw = raw_insert(history["db"], tmp)
    imp = history["import"]
    log(
        f"  import: {imp['events']:,} events in {imp['seconds']} s "
        f"({imp['events_per_second']:,.0f}/s, process CPU {imp.get('cpu_seconds')} s); "
        f"raw insert {raw['seconds']:.2f} s (CPU {raw['cpu_seconds']} s)"
    )
    keep = ("events", "jobs", "seconds", "write_seconds", "write_cpu_seconds", "import")
    return {"history": {k: history[k] for k in keep}, "raw_insert": raw}


def _pg_cpu(started: tuple[Any, ...]) -> tuple[float, float, float, float]:
    """CPU seconds so far: the servers', PostgreSQL's, the machine's busy and all cores'."""
    servers = sum(procs.cpu_seconds(s.pid) for s in started)
    return (servers, procs.named_cpu_seconds("postgres"), *procs.machine_cpu_seconds())


def _pg_run(
    processes: int,
    loads: list[dict[str, Any]],
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    cpu: list[float],
) -> dict[str, Any]:
    """One configuration's throughput, lock and CPU figures over the measured window.

    CPU per append is what the servers, PostgreSQL and the whole machine (load generators
    included) spent per request: if it stays flat while processes are added and the machine
    is busy, the configuration is bound by cores, not by a lock.
    """
    delta = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in after[0]}
    requests = sum(r["requests"] for r in loads)
    servers, postgres, busy, every = cpu
    # the clients' time in all: each request's latency, summed
    latency_s = sum(r["requests"] * r["latency_mean_ms"] for r in loads) / 1000
    batches = delta["jobledger_batches_total"] or 1.0
    return {
        "processes": processes,
        "rps": sum(r["requests_per_s"] for r in loads),
        "requests": requests,
        "latency_mean_ms": latency_s / requests * 1000 if requests else 0.0,
        "latency_p99_ms": max((r["latency_p99_ms"] for r in loads), default=0.0),
        "non_2xx": sum(r["non_2xx"] for r in loads),
        "batches": int(delta["jobledger_batches_total"]),
        "commands_per_batch": delta["jobledger_commands_total"] / batches,
        "lock_wait_ms": delta["jobledger_tenant_lock_wait_seconds_total"] / batches * 1000,
        "lock_hold_ms": delta["jobledger_tenant_lock_hold_seconds_total"] / batches * 1000,
        # what the appends waited for locks, as a share of what they took end to end
        "lock_wait_share": (
            delta["jobledger_tenant_lock_wait_command_seconds_total"] / latency_s
            if latency_s
            else 0.0
        ),
        "cpu_us": {
            name: seconds / requests * 1e6 if requests else 0.0
            for name, seconds in (("servers", servers), ("postgres", postgres), ("machine", busy))
        },
        "machine_busy": busy / every if every else 0.0,
        "per_tenant": [_slim(r) for r in loads],
    }


# -- (f) PostgreSQL -----------------------------------------------------------------------------


async def _pg(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


PG_TENANTS = 8
PG_PROCESSES = (1, 2, 4)
_LOCK_METRICS = (
    "jobledger_tenant_lock_wait_seconds_total",
    "jobledger_tenant_lock_hold_seconds_total",
    "jobledger_tenant_lock_wait_command_seconds_total",
    "jobledger_writer_command_seconds_total",
    "jobledger_batches_total",
    "jobledger_commands_total",
)


def _scrape(url: str) -> dict[str, float]:
    """The writer's lock counters from a server's ``/metrics`` (loopback needs no token)."""

    async def get() -> str:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
            return await resp.text()

    values = dict.fromkeys(_LOCK_METRICS, 0.0)
    for line in asyncio.run(get()).splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


def postgres(tmp: Path, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """Append throughput of 1, 2 and 4 server processes over one PostgreSQL database.

    ``PG_TENANTS`` tenants append at once over ``sizes.connections`` connections in all (one
    wrk per tenant, its connections to one process, tenants spread round-robin over the
    processes). Each process's ``/metrics`` give the time its batches waited for and held the
    tenants' write locks over the measured window.
    """
    admin = sizes.postgres_url.rstrip("/") + "/postgres"
    try:
        asyncio.run(_pg(admin, "SELECT 1"))
    except Exception as exc:
        return {"skipped": f"PostgreSQL at {sizes.postgres_url} is not reachable ({exc})"}
    name = f"jlbench_{uuid.uuid4().hex[:10]}"
    db = f"{sizes.postgres_url.rstrip('/')}/{name}"
    asyncio.run(_pg(admin, f'CREATE DATABASE "{name}"'))
    result: dict[str, Any] = {"database": name, "tenants": PG_TENANTS}
    try:
        tenants = [f"tenant{i}" for i in range(PG_TENANTS)]
        tokens = {t: procs.create_key(db, t) for t in tenants}
        jobs: dict[str, list[str]] = {}
        for tenant in tenants:
            seed = generate(
                db,
                max(128, sizes.append_jobs * 2 // PG_TENANTS),
                tenant=tenant,
                events_per_job=2,
                mix="running",
                key_role=None,
                accounts=sizes.accounts,
                agents=sizes.agents,
                path="apply",
            )
            jobs[tenant] = seed["job_ids_sample"]
        per_tenant = max(1, sizes.connections // PG_TENANTS)
        runs: dict[str, dict[str, Any]] = {}
        for n in PG_PROCESSES:
            servers = [procs.ledger_server(db, tmp, name=f"pg{n}-{i}") for i in range(n)]
            with procs.servers(*servers) as started:

                def drive(duration: float, started: tuple[Any, ...] = started) -> list[Any]:
                    with ThreadPoolExecutor(PG_TENANTS) as pool:
                        futures = [
                            pool.submit(
                                run_append_load,
                                started[i % len(started)].url,
                                jobs[t],
                                tokens[t],
                                duration_s=duration,
                                connections=per_tenant,
                                threads=1,
                            )
                            for i, t in enumerate(tenants)
                        ]
                        return [f.result() for f in futures]

                drive(sizes.warmup_s)
                before = [_scrape(s.url) for s in started]
                cpu0 = _pg_cpu(started)
                loads = drive(sizes.duration_s)
                cpu = [b - a for a, b in zip(cpu0, _pg_cpu(started), strict=True)]
                after = [_scrape(s.url) for s in started]
            run = runs[str(n)] = _pg_run(n, loads, before, after, cpu)
            log(
                f"  {n} process(es): {run['rps']:,.0f} req/s, lock wait "
                f"{run['lock_wait_share']:.1%} of latency, hold {run['lock_hold_ms']:.2f} ms/batch;"
                f" CPU per append: servers {run['cpu_us']['servers']:.0f} us, PostgreSQL "
                f"{run['cpu_us']['postgres']:.0f} us, machine {run['cpu_us']['machine']:.0f} us"
                f" ({run['machine_busy']:.0%} busy)"
            )
        one = runs["1"]["rps"]
        result.update(
            runs=runs,
            one_rps=one,
            two_rps=runs["2"]["rps"],
            four_rps=runs["4"]["rps"],
            ratio=runs["2"]["rps"] / one if one else None,
            ratio_four=runs["4"]["rps"] / one if one else None,
            non_2xx=sum(r["non_2xx"] for r in runs.values()),
        )
        first = tenants[0]  # reads: one tenant's key over its jobs
        result["reads"] = postgres_reads(tmp, sizes, log, db, tokens[first], jobs[first])
    except Exception as exc:
        result["skipped"] = f"PostgreSQL run failed: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(_pg(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return result


def postgres_reads(
    tmp: Path,
    sizes: Sizes,
    log: Callable[[str], None],
    db: str,
    token: str,
    job_ids: list[str],
) -> dict[str, Any]:
    """Reads (GET a job, a list page): 2 processes reading from a hot standby vs 1 process
    reading from the primary, in alternating rounds over the same database."""
    from tests.standby import Unavailable, standby

    try:
        with standby(sizes.postgres_url) as hot:
            replica = hot.replica_of(db)
            asyncio.run(_caught_up(db, replica))
            return _measure_replica_reads(tmp, sizes, log, db, replica, token, job_ids)
    except Unavailable as exc:
        return {"skipped": f"no hot standby: {exc}"}
    except Exception as exc:  # the append figures of the same scenario still count
        return {"error": f"replica reads failed: {type(exc).__name__}: {exc}"}


async def _caught_up(db: str, replica: str, seconds: float = 300.0) -> None:
    """Wait until the standby has the database and has replayed every event of it."""
    import asyncpg

    sql = "SELECT coalesce(max(position), 0) FROM events"
    primary = await asyncpg.connect(db, timeout=10)
    try:
        head = await primary.fetchval(sql)
    finally:
        await primary.close()
    deadline = time.monotonic() + seconds
    while True:
        try:
            conn = await asyncpg.connect(replica, timeout=10)
            try:
                if await conn.fetchval(sql) >= head:
                    return
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the standby did not replay {db} within {seconds} s")
        await asyncio.sleep(0.2)


def _replica_reads_served(url: str) -> dict[str, float]:
    """The ``jobledger_replica_reads_total`` counters of one server, by who answered."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("jobledger_replica_reads_total{"):
            server = line.split('server="', 1)[1].split('"', 1)[0]
            found[server] = float(line.rsplit(" ", 1)[1])
    return found


def _measure_replica_reads(
    tmp: Path,
    sizes: Sizes,
    log: Callable[[str], None],
    db: str,
    replica: str,
    token: str,
    job_ids: list[str],
) -> dict[str, Any]:
    conns = sizes.connections
    get_job = {
        "method": "GET",
        "body": None,
        "headers": None,
        "lua_path": GET_JOB_LUA,
        "env": {"JOB_IDS": ",".join(job_ids), "TOKEN": token},
    }
    list_page = {"method": "GET", "body": None, "headers": _auth(token)}
    list_path = "/v1/jobs?limit=50"
    runs: dict[str, list[float]] = {"get_one": [], "get_two": [], "list_one": [], "list_two": []}
    cpu_us: dict[str, list[dict[str, float]]] = {key: [] for key in runs}
    non_2xx = 0

    def on(
        started: tuple[Any, ...], path: str, kind: dict[str, Any], duration: float, tag: str = ""
    ) -> float:
        nonlocal non_2xx
        urls = [s.url for s in started]
        share = max(1, conns // len(urls))
        threads = 1 if len(urls) > 1 else sizes.threads
        cpu0 = _pg_cpu(started)
        with ThreadPoolExecutor(len(urls)) as pool:
            futures = [
                pool.submit(
                    _load,
                    url + path,
                    duration_s=duration,
                    connections=share,
                    threads=threads,
                    **kind,
                )
                for url in urls
            ]
            loads = [f.result() for f in futures]
        servers, postgres, busy, every = (
            b - a for a, b in zip(cpu0, _pg_cpu(started), strict=True)
        )
        non_2xx += sum(r["non_2xx"] for r in loads)
        requests = sum(r["requests"] for r in loads) or 1
        if tag:  # CPU per read: the servers', PostgreSQL's (primary and standby), the machine's
            cpu_us[tag].append(
                {
                    "servers": servers / requests * 1e6,
                    "postgres": postgres / requests * 1e6,
                    "machine": busy / requests * 1e6,
                    "machine_busy": busy / every if every else 0.0,
                }
            )
        return float(sum(r["requests_per_s"] for r in loads))

    def measure(started: tuple[Any, ...], tag: str) -> None:
        for name, path, kind in (("get", "", get_job), ("list", list_path, list_page)):
            on(started, path, kind, sizes.warmup_s)
            runs[f"{name}_{tag}"].append(on(started, path, kind, sizes.duration_s, f"{name}_{tag}"))

    served: dict[str, float] = {}
    for round_ in range(sizes.rounds):
        with procs.ledger_server(db, tmp, name="pg-read-primary") as one:
            measure((one,), "one")
        with procs.servers(
            procs.ledger_server(db, tmp, "--replica", replica, name="pg-read-a"),
            procs.ledger_server(db, tmp, "--replica", replica, name="pg-read-b"),
        ) as (a, b):
            measure((a, b), "two")
            for server in (a, b):
                for where, count in _replica_reads_served(server.url).items():
                    served[where] = served.get(where, 0.0) + count
        log(
            f"  reads, round {round_ + 1}: GET job {runs['get_one'][-1]:,.0f} req/s (1 process, "
            f"primary) vs {runs['get_two'][-1]:,.0f} (2 processes, standby); list page "
            f"{runs['list_one'][-1]:,.0f} vs {runs['list_two'][-1]:,.0f}"
        )
        for key in runs:
            c = cpu_us[key][-1]
            log(
                f"    {key}: CPU per read: servers {c['servers']:.0f} us, PostgreSQL "
                f"{c['postgres']:.0f} us, machine {c['machine']:.0f} us "
                f"({c['machine_busy']:.0%} busy)"
            )
    get_ratio = _median([t / o for t, o in zip(runs["get_two"], runs["get_one"], strict=True)])
    list_ratio = _median([t / o for t, o in zip(runs["list_two"], runs["list_one"], strict=True)])
    return {
        "runs": runs,
        "get_one_rps": _median(runs["get_one"]),
        "get_two_rps": _median(runs["get_two"]),
        "list_one_rps": _median(runs["list_one"]),
        "list_two_rps": _median(runs["list_two"]),
        "get_ratio": get_ratio,
        "list_ratio": list_ratio,
        "list_path": list_path,
        "cpu_us": cpu_us,
        "answered_by": served,  # the replica servers' own count: standby vs primary
        "non_2xx": non_2xx,
    }
