"""``make bench``: every scenario next to its baseline, a table of ratios, a results file.

This machine is noisy and the load generator shares its cores with the server, so absolute
numbers move from run to run; each figure is therefore a ratio against a baseline measured in
the same run with the same tool and settings (see docs/bench.md for what each one means).

    python -m bench.run                 # full sizes (1 M events, 1 M jobs); ~15 min
    python -m bench.run --quick         # small sizes, every scenario; ~1-2 min
    python -m bench.run --only append,reads --profile

Sizes also come from the environment: BENCH_HISTORY_EVENTS, BENCH_SMALL_HISTORY_EVENTS,
BENCH_JOBS_LARGE, BENCH_JOBS_SMALL, BENCH_APPEND_JOBS, BENCH_DURATION, BENCH_ROUNDS,
BENCH_CONNECTIONS, BENCH_ES_EVENTS, BENCH_DATAGEN_BUDGET_S, BENCH_POSTGRES (auto|on|off),
BENCH_POSTGRES_URL
(default $JOBLEDGER_TEST_POSTGRES's server or postgresql://postgres@127.0.0.1:5432).
Generated databases live in a temporary directory that is removed at the end (``--keep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import procs, scenarios
from bench.load import have_wrk
from bench.scenarios import Sizes

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_path() -> Path:
    """A new file per run, named by its UTC start time: a run never overwrites an earlier one."""
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    return RESULTS_DIR / f"{stamp}.json"


SCENARIOS = ("append", "rebuild", "reads", "export", "import", "postgres")
QUICK = Sizes(
    history_events=50_000,
    small_history_events=10_000,
    jobs_large=20_000,
    jobs_small=2_000,
    append_jobs=200,
    duration_s=3.0,
    warmup_s=1.0,
    latency_duration_s=2.0,
    rounds=1,
    es_events=300,
)
ENV = {
    "BENCH_HISTORY_EVENTS": "history_events",
    "BENCH_SMALL_HISTORY_EVENTS": "small_history_events",
    "BENCH_JOBS_LARGE": "jobs_large",
    "BENCH_JOBS_SMALL": "jobs_small",
    "BENCH_APPEND_JOBS": "append_jobs",
    "BENCH_DURATION": "duration_s",
    "BENCH_ROUNDS": "rounds",
    "BENCH_CONNECTIONS": "connections",
    "BENCH_ES_EVENTS": "es_events",
    "BENCH_DATAGEN_BUDGET_S": "datagen_budget_s",
    "BENCH_POSTGRES": "postgres",
    "BENCH_POSTGRES_URL": "postgres_url",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = dataclasses.replace(QUICK) if args.quick else Sizes()
    test_pg = os.environ.get("JOBLEDGER_TEST_POSTGRES")
    if test_pg and "://" in test_pg:
        scheme, rest = test_pg.split("://", 1)
        sizes.postgres_url = f"{scheme}://{rest.split('/', 1)[0]}"
    types = {f.name: f.type for f in dataclasses.fields(Sizes)}
    for var, name in ENV.items():
        if var in os.environ:
            kind = types[name]
            raw = os.environ[var]
            value: Any = raw
            if kind in ("int", int):
                value = int(float(raw))
            elif kind in ("float", float):
                value = float(raw)
            setattr(sizes, name, value)
    if args.rounds is not None:
        sizes.rounds = args.rounds
    if args.duration is not None:
        sizes.duration_s = args.duration
    if args.no_postgres:
        sizes.postgres = "off"
    sizes.profile = args.profile
    return sizes


# -- figures ------------------------------------------------------------------------------------


def figure(
    scenario: str,
    name: str,
    value: float | None,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str = "",
    ratio: float | None = None,
    target: str = "",
    check: Callable[[float], bool] | None = None,
    on: str = "ratio",
) -> dict[str, Any]:
    subject = ratio if on == "ratio" else value
    met = None if check is None or subject is None else bool(check(subject))
    return {
        "scenario": scenario,
        "figure": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def figures(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    a = results.get("append")
    if a and "error" not in a:
        out.append(
            figure(
                "append",
                "POST /v1/jobs/{id}/events, 32 conns",
                a["ledger_rps"],
                "req/s",
                baseline=a["echo_rps"],
                baseline_name="echo POST /echo",
                ratio=a["ratio_vs_echo"],
                target="ratio >= 0.6",
                check=lambda r: r >= 0.6,
            )
        )
        if "floor_ratio_vs_echo" in a:
            out.append(
                figure(
                    "append",
                    "floor: bare aiohttp + durable SQLite insert, same load",
                    a["floor_rps"],
                    "req/s",
                    baseline=a["echo_rps"],
                    baseline_name="echo POST /echo",
                    ratio=a["floor_ratio_vs_echo"],
                    target="reported (the ceiling)",
                )
            )
        if "ratio_vs_eventsourcing" in a:
            out.append(
                figure(
                    "append",
                    "HTTP appends vs pyeventsourcing save()",
                    a["ledger_rps"],
                    "req/s",
                    baseline=a["eventsourcing_events_per_s"],
                    baseline_name="eventsourcing events/s",
                    ratio=a["ratio_vs_eventsourcing"],
                    target="ratio >= 3",
                    check=lambda r: r >= 3,
                )
            )
            if "floor_ratio_vs_eventsourcing" in a:
                out.append(
                    figure(
                        "append",
                        "floor's appends vs pyeventsourcing save()",
                        a["floor_rps"],
                        "req/s",
                        baseline=a["eventsourcing_events_per_s"],
                        baseline_name="eventsourcing events/s",
                        ratio=a["floor_ratio_vs_eventsourcing"],
                        target="reported (the ceiling)",
                    )
                )
    b = results.get("rebuild")
    if b and "error" not in b:
        rb, raw = b["rebuild"], b["raw_fold"]
        out.append(
            figure(
                "rebuild",
                f"jobledger rebuild, {rb['events']:,} events",
                rb["events_per_second"],
                "events/s",
                baseline=raw["events_per_second"],
                baseline_name="raw sqlite3 fold",
                ratio=b["ratio"],
                target="ratio >= 0.5",
                check=lambda r: r >= 0.5,
            )
        )
        out.append(
            figure(
                "rebuild",
                "rebuild time",
                rb["seconds"],
                "s",
                target="<= 5 s (at 1 M events)",
                check=(lambda v: v <= 5) if rb["events"] >= 1_000_000 else None,
                on="value",
            )
        )
        if "floor_seconds" in b:
            out.append(
                figure(
                    "rebuild",
                    "floor: raw fold + raw write of the jobs read model",
                    b["floor_seconds"],
                    "s",
                    baseline=raw["seconds"],
                    baseline_name="raw sqlite3 fold alone",
                    ratio=raw["seconds"] / b["floor_seconds"],
                    target="reported (the ceiling)",
                )
            )
    c = results.get("reads")
    if c and "error" not in c:
        out.append(
            figure(
                "reads",
                "GET /v1/jobs/{id}, 32 conns",
                c["get_rps"],
                "req/s",
                baseline=c["ping_rps"],
                baseline_name="echo GET /ping",
                ratio=c["get_ratio"],
                target="ratio >= 0.7",
                check=lambda r: r >= 0.7,
            )
        )
        if "floor_get_ratio" in c:
            out.append(
                figure(
                    "reads",
                    "floor: bare aiohttp + SQLite read by key, same load",
                    c["floor_get_rps"],
                    "req/s",
                    baseline=c["ping_rps"],
                    baseline_name="echo GET /ping",
                    ratio=c["floor_get_ratio"],
                    target="reported (the ceiling)",
                )
            )
        out.append(
            figure(
                "reads",
                f"GET /v1/jobs/stats p50 at {c['jobs_large']:,} jobs, 1 conn",
                c["stats_large"]["latency_p50_ms"],
                "ms",
                baseline=c["stats_small"]["latency_p50_ms"],
                baseline_name=f"same at {c['jobs_small']:,} jobs",
                ratio=c["stats_ratio"],
                target="ratio <= 1.5",
                check=lambda r: r <= 1.5,
            )
        )
        ping_p99 = (c.get("ping_one_connection") or {}).get("latency_p99_ms")
        for key in ("list_status", "list_account"):
            out.append(
                figure(
                    "reads",
                    f"GET {c[key]['path']} p99, 1 conn",
                    c[key]["latency_p99_ms"],
                    "ms",
                    baseline=ping_p99,
                    baseline_name="echo GET /ping p99, 1 conn",
                    target="<= 10 ms",
                    check=lambda v: v <= 10,
                    on="value",
                )
            )
        rss = c["memory_after_reads_mib"].get("VmRSS")
        out.append(
            figure(
                "memory",
                f"server RSS after reads, {c['jobs_large']:,} jobs",
                rss,
                "MiB",
                target="<= 150 MB",
                check=lambda v: v <= 143,
                on="value",
            )
        )
    d = results.get("export")
    if d and "error" not in d:
        big, small = d["history"], d["history_small"]
        raw_read = (d.get("raw_read") or {}).get("events_per_second")
        for way in ("cli", "http"):
            label = "jobledger export" if way == "cli" else "GET /v1/audit/export"
            out.append(
                figure(
                    "export",
                    f"{label}, {big[way]['events']:,} events",
                    big[way]["events_per_second"],
                    "events/s",
                    baseline=raw_read,
                    baseline_name="raw sqlite3 read of the columns",
                    ratio=big[way]["events_per_second"] / raw_read if raw_read else None,
                    target=">= 150,000/s",
                    check=lambda v: v >= 150_000,
                    on="value",
                )
            )
        out.append(
            figure(
                "export",
                "server peak RSS (VmHWM) after HTTP export",
                big["http"]["memory_after_mib"].get("VmHWM"),
                "MiB",
                baseline=small["http"]["memory_after_mib"].get("VmHWM"),
                baseline_name=f"same at {small['history_events']:,} events",
                ratio=d["peak_rss_ratio"],
                target="flat (ratio ~1)",
                check=lambda r: r <= 1.2,
            )
        )
    g = results.get("import")
    if g and "error" not in g:
        imp = g["history"]["import"]
        out.append(
            figure(
                "import",
                f"jobledger import, {imp['events']:,} events into SQLite",
                imp["events_per_second"],
                "events/s",
                baseline=g["raw_insert"]["events_per_second"],
                baseline_name="raw sqlite3 executemany, same rows",
                ratio=imp["events_per_second"] / g["raw_insert"]["events_per_second"],
                target=">= 150,000/s",
                check=lambda v: v >= 150_000,
                on="value",
            )
        )
        b = results.get("rebuild") or {}
        if "floor_seconds" in b and b["rebuild"]["events"] == imp["events"]:
            # an import writes the events and then builds the read models from them
            floor_s = g["raw_insert"]["seconds"] + b["floor_seconds"]
            out.append(
                figure(
                    "import",
                    "floor: raw insert + raw fold + raw write of the jobs read model",
                    imp["events"] / floor_s,
                    "events/s",
                    baseline=g["raw_insert"]["events_per_second"],
                    baseline_name="raw sqlite3 executemany alone",
                    ratio=g["raw_insert"]["seconds"] / floor_s,
                    target="reported (the ceiling)",
                )
            )
        out.append(
            figure(
                "import",
                f"1 M-event history for the bench ({g['history']['events']:,} events)",
                g["history"]["seconds"],
                "s",
                target="<= 20 s",
                check=(lambda v: v <= 20) if g["history"]["events"] >= 1_000_000 else None,
                on="value",
            )
        )
    f = results.get("postgres")
    if f and "error" not in f and "skipped" not in f:
        runs = f["runs"]
        tenants = f"{f['tenants']} tenants"
        out.append(
            figure(
                "postgres",
                f"appends, 2 processes vs 1, one database, {tenants}",
                f["two_rps"],
                "req/s",
                baseline=f["one_rps"],
                baseline_name="1 process",
                ratio=f["ratio"],
                target=">= 1.3x",
                check=lambda v: v >= 1.3,
            )
        )
        out.append(
            figure(
                "postgres",
                f"appends, 4 processes vs 1, one database, {tenants}",
                f["four_rps"],
                "req/s",
                baseline=f["one_rps"],
                baseline_name="1 process",
                ratio=f["ratio_four"],
                target=">= 1.0x",
                check=lambda v: v >= 1.0,
            )
        )
        for n in sorted(runs, key=int):
            r = runs[n]
            out.append(
                figure(
                    "postgres",
                    f"tenant-lock wait, share of append latency, {n} process(es)",
                    r["lock_wait_share"] * 100,
                    "%",
                    target="<= 10 %" if n == "4" else "reported",
                    check=(lambda v: v <= 10) if n == "4" else None,
                    on="value",
                )
            )
            out.append(
                figure(
                    "postgres",
                    f"tenant-lock hold per batch ({r['commands_per_batch']:.1f} commands), "
                    f"{n} process(es)",
                    r["lock_hold_ms"],
                    "ms",
                    target="reported",
                    on="value",
                )
            )
        out.extend(_replica_read_figures(f.get("reads")))
    return out


def _replica_read_figures(r: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Reads from a hot standby: 2 processes on the standby vs 1 on the primary."""
    if not r or "skipped" in r or "error" in r:
        return []
    return [
        figure(
            "postgres",
            f"reads, {label}: 2 processes on a standby vs 1 on the primary",
            r[f"{name}_two_rps"],
            "req/s",
            baseline=r[f"{name}_one_rps"],
            baseline_name="1 process, primary",
            ratio=r[f"{name}_ratio"],
            target=">= 1.5x",
            check=lambda v: v >= 1.5,
        )
        for name, label in (("get", "GET a job"), ("list", f"list page {r['list_path']}"))
    ]


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("ms", "s", "MiB") or abs(value) < 100:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def table(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    header = ("scenario", "figure", "ledger", "baseline", "ratio", "target", "met")
    body = []
    for r in rows:
        ledger = f"{_num(r['value'], r['unit'])} {r['unit']}"
        base = (
            f"{_num(r['baseline'], r['unit'])} ({r['baseline_name']})"
            if r["baseline"] is not None
            else "-"
        )
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        body.append((r["scenario"], r["figure"], ledger, base, ratio, r["target"], met))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    rows_text = [
        "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |"
        for row in body
    ]
    return "\n".join([line, sep, *rows_text, "", *notes])


def diagnostics(results: dict[str, Any]) -> list[str]:
    """Lines under the table that explain it: CPU per request, datagen and process times."""
    out: list[str] = []
    a, c = results.get("append") or {}, results.get("reads") or {}
    cpu = []
    if "ledger_cpu_us_per_request" in a:
        cpu.append(
            f"append {a['ledger_cpu_us_per_request']:,.0f} us vs echo POST "
            f"{a['echo_cpu_us_per_request']:,.0f} us"
        )
    if "floor_cpu_us_per_request" in a:
        cpu.append(f"append floor {a['floor_cpu_us_per_request']:,.0f} us")
    if c.get("get_job"):
        cpu.append(
            f"GET job {_median_cpu(c['get_job'])} us vs ping {_median_cpu(c.get('ping'))} us"
        )
    if c.get("floor_get"):
        cpu.append(f"GET floor {_median_cpu(c['floor_get'])} us")
    if cpu:
        out.append("server CPU per request (all threads): " + "; ".join(cpu))
    for name, d in (results.get("datagen") or {}).items():
        if d.get("substituted"):
            continue  # the note above says which database stood in
        out.append(
            f"datagen {name}: {d['jobs']:,} jobs, {d['events']:,} events in {d['seconds']} s "
            f"({d['events_per_second']:,.0f} events/s, {d.get('jobs_per_second', 0):,.0f} jobs/s)"
        )
    g = results.get("import") or {}
    if "history" in g:
        h = g["history"]
        out.append(
            f"import: history written as NDJSON in {h['write_seconds']} s, imported in "
            f"{h['import']['seconds']} s (process {h['import']['wall_seconds']} s); raw insert "
            f"of the same rows {g['raw_insert']['seconds']:.2f} s"
        )
    b = results.get("rebuild") or {}
    if "rebuild" in b:
        out.append(
            f"rebuild process wall time {b['rebuild']['wall_seconds']} s; raw fold "
            f"{b['raw_fold']['seconds']:.2f} s"
        )
    return out


def _median_cpu(runs: list[dict[str, Any]] | None) -> str:
    values = sorted(r.get("server_cpu_us_per_request") or 0 for r in runs or [])
    if not values:
        return "-"
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return f"{median:,.0f}"


# -- main ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "wrk": shutil.which("wrk") is not None,
    }


def run(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    only = [s.strip() for s in (args.only or ",".join(SCENARIOS)).split(",") if s.strip()]
    for name in only:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    if sizes.postgres == "off" and "postgres" in only:
        only.remove("postgres")
    if not have_wrk():
        log(
            "wrk is not installed: using the slower aiohttp load generator "
            "(apt-get install -y wrk for the figures in docs/bench.md)"
        )
    tmp = Path(tempfile.mkdtemp(prefix="jobledger-bench-", dir=args.tmp_dir))
    started = time.perf_counter()
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "sizes": dataclasses.asdict(sizes),
    }
    log(f"bench: {results['mode']} run in {tmp}")
    try:
        needs_data = {"rebuild", "reads", "export", "import"} & set(only)
        data: dict[str, Any] = {}
        if needs_data:
            data = scenarios.make_data(tmp, sizes, log, needs_data)
            keep = (
                "jobs",
                "events",
                "seconds",
                "events_per_second",
                "jobs_per_second",
                "mix",
                "path",
                "substituted",
                "write_seconds",
                "import",
            )
            results["datagen"] = {k: {x: v[x] for x in keep if x in v} for k, v in data.items()}
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "append": lambda: scenarios.append(tmp, sizes, log),
            "rebuild": lambda: scenarios.rebuild(tmp, data, sizes, log),
            "reads": lambda: scenarios.reads(tmp, data, sizes, log),
            "export": lambda: scenarios.export(tmp, data, sizes, log),
            "import": lambda: scenarios.import_(tmp, data, sizes, log),
            "postgres": lambda: scenarios.postgres(tmp, sizes, log),
        }
        for name in only:
            log(f"[{name}]")
            t0 = time.perf_counter()
            try:
                results[name] = steps[name]()
            except Exception as exc:
                log(traceback.format_exc())
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            results[name]["scenario_seconds"] = round(time.perf_counter() - t0, 1)
            procs.stop_all()
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    render(results)
    out = Path(args.out) if args.out else results_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"wrote {out}")
    failed = [n for n in SCENARIOS if isinstance(results.get(n), dict) and "error" in results[n]]
    return 1 if failed else 0


def render(results: dict[str, Any]) -> str:
    """Compute the figures, notes and table of ``results`` (in place), print and return them."""
    results["figures"] = figures(results)
    notes = [
        f"{k}: {v['error']}" for k, v in results.items() if isinstance(v, dict) and "error" in v
    ]
    es_skipped = (results.get("append") or {}).get("eventsourcing_skipped")
    if es_skipped:
        notes.append(f"append: {es_skipped}")
    pg = results.get("postgres")
    if isinstance(pg, dict) and "skipped" in pg:
        notes.append(f"postgres: skipped: {pg['skipped']}")
    pg_reads = pg.get("reads") if isinstance(pg, dict) else None
    if isinstance(pg_reads, dict) and "skipped" in pg_reads:
        notes.append(f"postgres reads: skipped: {pg_reads['skipped']}")
    if isinstance(pg_reads, dict) and "error" in pg_reads:
        notes.append(f"postgres reads: {pg_reads['error']}")
    substituted = results.get("datagen", {}).get("jobs_large", {}).get("substituted")
    if substituted:
        notes.append(f"reads: {substituted}")
    results["notes"] = notes
    results["diagnostics"] = diagnostics(results)
    text = table(results["figures"], [*notes, *results["diagnostics"]])
    results["table"] = text
    m = results["machine"]
    print(
        f"jobledger bench, {results['date']}, {m['nproc']} cores ({m['cpu']}), "
        f"Python {m['python']}, {results['mode']} run, {results.get('total_seconds')} s"
    )
    print(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (~1-2 min)")
    parser.add_argument("--only", help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record py-spy profiles (append, GET, rebuild, export)",
    )
    parser.add_argument("--rounds", type=int, help="baseline/subject rounds (median)")
    parser.add_argument("--duration", type=float, help="seconds of each throughput run")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--tmp-dir", help="where to make the temporary directory")
    parser.add_argument(
        "--out", help=f"results file (default: a new {RESULTS_DIR}/<UTC time>.json)"
    )
    parser.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="measure nothing: recompute the figures and table of a results file, rewrite it",
    )
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        results = json.loads(path.read_text())
        render(results)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        sys.exit(0)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        code = run(args)
    except KeyboardInterrupt:
        procs.stop_all()
        log("interrupted")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
