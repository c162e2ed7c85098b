"""Write a large job history quickly: an export with a valid chain, then ``jobledger import``.

``generate(db_path, events)`` into a new (empty) database writes the history as the audit
export would show it (every hash computed, ``write_history``) and loads it with the real
``jobledger import`` command, which checks every hash again and builds the read models: about
a million events in seconds. Into a database that already holds events (the append
benchmark's, which already has a key) it goes through the store instead: it opens
``EventStore(backend_for(path), all_projectors())`` (what ``api.app.open_store`` builds) and
submits one command per job, many at a time, so the store's
writer batches them into few transactions (group commit): each command creates the job with
``ledger.commands.create_job`` and appends the rest of its events with
``ledger.commands.append_events``, exactly what ``POST /v1/jobs`` and
``POST /v1/jobs/{id}/events`` run. Job and event ids are the ledger's own time-ordered ULIDs.

With the default ``mix="lifecycle"`` each job has ``events_per_job`` events, the prefix of a
lifecycle ``job.queued``, ``job.started``, ``job.progressed`` ... and a last event chosen by
the job's index: 80 % ``job.completed``, 10 % ``job.failed``, 10 % stay running (another
``job.progressed``), so list filters such as ``status=running`` find something.
``mix="running"``: every job stays running, ready to take ``job.progressed`` appends.
``mix="backlog"``: a large read model cheaply, ``jobs`` jobs of one or two events (80 % still
queued, 5 % running, 10 % completed, 5 % failed). Jobs spread round-robin over ``accounts``
accounts (``acct-0000``...) and ``agents`` agents (``bench/agent-00``...).

On that path ``path="apply"`` (the default) stages ``job.queued`` with ``UnitOfWork.apply``, as
``create_job`` does, but without its two per-job lookups (does the id exist? which price is in
force?): the ids are fresh and the price is looked up once per agent. ``path="commands"`` calls
``create_job`` itself. Everything else (state machine, hash chain, projections, group commit)
is the store's own code either way.

CLI: ``python -m bench.datagen /tmp/x.db --events 1000000`` prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ledger import chain, commands
from ledger.backends import backend_for
from ledger.clock import format_us, now_us
from ledger.events import (
    ErrorInfo,
    Event,
    JobCompleted,
    JobFailed,
    JobProgressed,
    JobQueued,
    JobStarted,
    KeyCreated,
    Price,
    event_type,
    to_data,
)
from ledger.ids import _CROCKFORD, new_job_id
from ledger.store import UnitOfWork
from projections import new_store

ACTOR = "bench-datagen"
RETENTION_S = 7 * 86400
# Commands in flight at once: enough to fill the writer's batches (ledger.store.MAX_BATCH,
# 512 commands a transaction); more only costs memory and scheduling.
DEFAULT_INFLIGHT = 1024


def account_name(i: int) -> str:
    return f"acct-{i:04d}"


def agent_name(i: int) -> str:
    return f"bench/agent-{i:02d}"


MIXES = ("lifecycle", "running", "backlog")
# backlog: by job index modulo 20, what follows job.queued.
_BACKLOG = ("running", "failed", "completed", "completed", *["queued"] * 16)


def lifecycle(index: int, n_events: int, mix: str = "lifecycle") -> list[Event]:
    """The events after ``job.queued`` of job number ``index``.

    ``lifecycle``: ``n_events - 1`` of them, ending 80 % completed, 10 % failed, 10 % running.
    ``running``: ``n_events - 1`` of them, the job still running.
    ``backlog`` (``n_events`` is ignored): 80 % stay queued (no more events), 5 % running,
    10 % completed, 5 % failed, each with one more event: a large read model cheaply.
    """
    if mix == "backlog":
        kind = _BACKLOG[index % 20]
        if kind == "queued":
            return []
        n_events = 2
    elif mix == "running":
        kind = "running"
    else:
        kind = ("running", "failed", *["completed"] * 8)[index % 10]
    if n_events <= 1:
        return []
    rest: list[Event] = [JobStarted()]
    while len(rest) < n_events - 2:
        rest.append(JobProgressed(row_count=10 * len(rest)))
    if kind == "completed":
        last: Event = JobCompleted(row_count=10 * n_events)
    elif kind == "failed":
        last = JobFailed(error=ErrorInfo(code="bench", message="synthetic failure"))
    else:
        last = JobProgressed(row_count=10 * n_events)
    if n_events == 2:
        return rest if kind == "running" else [last]  # queued, then started or its end
    rest.append(last)
    return rest


def _job_command(
    tenant: str, job_id: str, queued: JobQueued, rest: Sequence[Event], path: str
) -> Any:
    items = [commands.NewEvent(event=e) for e in rest]

    async def command(uow: UnitOfWork) -> None:
        if path == "commands":
            await commands.create_job(uow, tenant, job_id, queued, actor=ACTOR)
        else:
            # What create_job stages, minus its two per-job lookups (is the id taken? which
            # price is in force?): ids are fresh ULIDs and ``queued`` already carries the
            # price in force, looked up once per agent before the run.
            await uow.apply(tenant, job_id, queued, actor=ACTOR)
        if items:
            await commands.append_events(
                uow, tenant, job_id, items, actor=ACTOR, retention_s=RETENTION_S
            )

    return command


async def agenerate(
    db_path: str | Path,
    events: int,
    tenant: str = "bench",
    *,
    events_per_job: int = 5,
    jobs: int | None = None,
    accounts: int = 100,
    agents: int = 10,
    mix: str = "lifecycle",
    path: str = "apply",
    inflight: int = DEFAULT_INFLIGHT,
    key_role: str | None = "admin",
) -> dict[str, Any]:
    """Append ``events // events_per_job`` jobs (or ``jobs``) and their events; a summary."""
    if events_per_job < 1:
        raise ValueError("events_per_job must be at least 1")
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {', '.join(MIXES)}")
    n_jobs = jobs if jobs is not None else max(1, events // events_per_job)
    # Events are frozen Structs: one list per job kind, shared by every job of that kind.
    shapes = [lifecycle(k, events_per_job, mix) for k in range(20)]
    store = new_store(backend_for(str(db_path)))
    await store.start()
    job_ids: list[str] = []
    token: str | None = None
    written = 0
    started = time.perf_counter()
    try:
        if key_role is not None:
            role = key_role
            new_key = await store.execute(
                lambda uow: commands.create_key(uow, tenant, role, name="bench"),
                tenants=[tenant],
            )
            token = new_key.secret

        async def prices(uow: UnitOfWork) -> dict[str, Price]:
            return {
                agent_name(g): await commands.price_in_force(uow, tenant, agent_name(g))
                for g in range(agents)
            }

        price = await store.execute(prices, tenants=[tenant])
        queued_by = {
            (a, g): JobQueued(
                agent=agent_name(g), account=account_name(a), price=price[agent_name(g)]
            )
            for a in range(accounts)
            for g in range(agents)
        }
        slots = asyncio.Semaphore(inflight)
        failures: list[BaseException] = []
        tasks: set[asyncio.Task[Any]] = set()

        def finished(task: asyncio.Task[Any]) -> None:
            tasks.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]

        for i in range(n_jobs):
            await slots.acquire()
            if failures:
                raise failures[0]  # a failed command fails the whole generation
            job_id = new_job_id()
            job_ids.append(job_id)
            queued = queued_by[(i % accounts, (i // accounts) % agents)]
            rest = shapes[i % 20]
            written += 1 + len(rest)
            command = _job_command(tenant, job_id, queued, rest, path)
            task = asyncio.ensure_future(store.execute(command, tenants=[tenant]))
            tasks.add(task)
            task.add_done_callback(finished)
        if tasks:
            await asyncio.wait(tasks)
        if failures:
            raise failures[0]
        elapsed = time.perf_counter() - started
        position = store.head_position
    finally:
        await store.stop()
    return {
        "db": str(db_path),
        "tenant": tenant,
        "jobs": n_jobs,
        "events": written,
        "position": position,
        "seconds": round(elapsed, 3),
        "events_per_second": round(written / elapsed, 1) if elapsed else 0.0,
        "jobs_per_second": round(n_jobs / elapsed, 1) if elapsed else 0.0,
        "token": token,
        "job_ids_sample": job_ids[:: max(1, n_jobs // 1000)][:1000],
        "accounts": accounts,
        "agents": agents,
        "mix": mix,
        "path": path,
        "inflight": inflight,
    }


# -- the fast way: an export with a valid chain, then ``jobledger import`` ---------------------


def _crockford(value: int, chars: int) -> str:
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in range(chars - 1, -1, -1))


def _shape(event: Event) -> tuple[str, str, str]:
    """``(type, data text, data_hash)`` of an event, exactly as the store would stage it."""
    data = chain.canonical(to_data(event)).decode()
    return event_type(event), data, chain.sha256_hex(data.encode())


def write_history(
    out: Path,
    tenant: str,
    *,
    n_jobs: int,
    events_per_job: int = 5,
    accounts: int = 100,
    agents: int = 10,
    mix: str = "lifecycle",
    key_role: str | None = "admin",
) -> dict[str, Any]:
    """Write ``n_jobs`` jobs (and a key) as a one-tenant NDJSON export, every hash computed.

    Every string is plain ASCII (ids, agents, accounts, times), so lines and headers are
    formatted directly; the data texts come from the ledger's own canonical form, once per
    distinct event. Ids are ULID-shaped: this second's time, 6 random characters, a counter.
    """
    shapes = [[_shape(e) for e in lifecycle(k, events_per_job, mix)] for k in range(20)]
    queued = {
        (a, g): _shape(JobQueued(agent=agent_name(g), account=account_name(a)))
        for a in range(accounts)
        for g in range(agents)
    }
    stamp = _crockford(now_us() // 1000, 10) + _crockford(secrets.randbits(30), 6)
    sha256 = hashlib.sha256
    prev = chain.GENESIS
    position = 0
    token: str | None = None
    t0 = now_us() - 10 * (n_jobs * (events_per_job + 1) + 1)  # every event in the past
    job_ids: list[str] = []

    # the parts of a line that do not change from one event to the next are formatted once:
    # per shape (type, data, data_hash) and actor
    pieces: dict[tuple[tuple[str, str, str], str], tuple[str, str, str]] = {}

    def line(stream: str, version: int, shape: tuple[str, str, str], at: str, actor: str) -> str:
        nonlocal prev, position
        position += 1
        found = pieces.get((shape, actor))
        if found is None:
            type_, data, data_hash = shape
            found = (
                f'{{"actor":"{actor}","data_hash":"{data_hash}","event_id":"evt_{stamp}',
                f'"type":"{type_}","version":',
                f'"type":"{type_}","occurred_at":"',
            )
            pieces[(shape, actor)] = found
        eid = f"{position:010d}"
        header = (
            f'{found[0]}{eid}","occurred_at":"{at}","position":{position},"recorded_at":"{at}",'
            f'"stream":"{stream}",{found[1]}{version}}}'
        )
        digest = sha256(f"{prev}\n{header}".encode()).hexdigest()
        type_, data, data_hash = shape
        text = (
            f'{{"position":{position},"event_id":"evt_{stamp}{eid}","stream":"{stream}",'
            f'"version":{version},{found[2]}{at}","recorded_at":"{at}",'
            f'"actor":"{actor}","data":{data},"data_hash":"{data_hash}","prev_hash":"{prev}",'
            f'"hash":"{digest}"}}\n'
        )
        prev = digest
        return text

    with open(out, "w", encoding="ascii") as handle:
        if key_role is not None:
            token = "jl_" + secrets.token_urlsafe(32)
            key_id = f"key_{stamp}0000000000"
            key = KeyCreated(
                key_id=key_id,
                role=key_role,
                name="bench",
                secret_sha256=commands.hash_secret(token),
            )
            handle.write(line(commands.key_stream(key_id), 1, _shape(key), format_us(t0), "cli"))
        lines: list[str] = []
        for i in range(n_jobs):
            job_id = f"job_{stamp}{i:010d}"
            job_ids.append(job_id)
            t = t0 + 10 * position
            lines.append(
                line(
                    job_id,
                    1,
                    queued[(i % accounts, (i // accounts) % agents)],
                    format_us(t),
                    ACTOR,
                )
            )
            for version, shape in enumerate(shapes[i % 20], 2):
                lines.append(line(job_id, version, shape, format_us(t + version), ACTOR))
            if len(lines) >= 50_000:
                handle.write("".join(lines))
                lines.clear()
        handle.write("".join(lines))
    return {"token": token, "job_ids": job_ids, "events": position, "position": position}


def import_history(
    db_path: str | Path,
    events: int,
    tenant: str = "bench",
    *,
    events_per_job: int = 5,
    jobs: int | None = None,
    accounts: int = 100,
    agents: int = 10,
    mix: str = "lifecycle",
    key_role: str | None = "admin",
    **_: Any,
) -> dict[str, Any]:
    """Write the history as an export beside the database and ``jobledger import`` it."""
    from bench import procs

    n_jobs = jobs if jobs is not None else max(1, events // events_per_job)
    started = time.perf_counter()
    write_cpu = time.process_time()
    folder = Path(str(db_path)).parent if "://" not in str(db_path) else None
    with tempfile.TemporaryDirectory(prefix="jobledger-history-", dir=folder) as tmp:
        export = Path(tmp) / "history.ndjson"
        history = write_history(
            export,
            tenant,
            n_jobs=n_jobs,
            events_per_job=events_per_job,
            accounts=accounts,
            agents=agents,
            mix=mix,
            key_role=key_role,
        )
        written = time.perf_counter() - started
        write_cpu = time.process_time() - write_cpu
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        out, wall = procs.cli("import", "--db", str(db_path), "--tenant", tenant, str(export))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    summary = json.loads(out.strip().splitlines()[-1])
    elapsed = time.perf_counter() - started
    n_events = history["events"] - (1 if key_role is not None else 0)
    job_ids: list[str] = history["job_ids"]
    return {
        "db": str(db_path),
        "tenant": tenant,
        "jobs": n_jobs,
        "events": n_events,
        "position": history["position"],
        "seconds": round(elapsed, 3),
        "events_per_second": round(n_events / elapsed, 1) if elapsed else 0.0,
        "jobs_per_second": round(n_jobs / elapsed, 1) if elapsed else 0.0,
        "write_seconds": round(written, 3),
        "write_cpu_seconds": round(write_cpu, 3),
        "import": {**summary, "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)},
        "token": history["token"],
        "job_ids_sample": job_ids[:: max(1, n_jobs // 1000)][:1000],
        "accounts": accounts,
        "agents": agents,
        "mix": mix,
        "path": "import",
    }


def _has_events(db_path: str | Path) -> bool:
    if "://" in str(db_path):
        return asyncio.run(_store_has_events(db_path))
    if not os.path.exists(str(db_path)):
        return False
    with sqlite3.connect(str(db_path)) as conn:
        tables = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchall()
        found = bool(tables) and bool(conn.execute("SELECT 1 FROM events LIMIT 1").fetchall())
    conn.close()
    return found


async def _store_has_events(db_path: str | Path) -> bool:
    backend = backend_for(str(db_path))
    await backend.open()
    try:
        async with backend.read() as conn:
            return await conn.fetchone("SELECT 1 FROM events LIMIT 1") is not None
    except Exception:  # no events table yet: a new database
        return False
    finally:
        await backend.close()


def generate(
    db_path: str | Path,
    events: int,
    tenant: str = "bench",
    **options: Any,
) -> dict[str, Any]:
    """A new database: :func:`import_history`; one with events already: :func:`agenerate`."""
    if options.get("path", "import") == "import" and not _has_events(db_path):
        return import_history(db_path, events, tenant, **options)
    options.setdefault("path", "apply")
    if options["path"] == "import":
        options["path"] = "apply"
    return asyncio.run(agenerate(db_path, events, tenant, **options))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", help="a file path, sqlite:///path or postgresql://...")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=None, help="instead of events/job count")
    parser.add_argument("--tenant", default="bench")
    parser.add_argument("--events-per-job", type=int, default=5)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--mix", choices=MIXES, default="lifecycle")
    parser.add_argument(
        "--path",
        choices=("import", "apply", "commands"),
        default="import",
        help="import: write an export and jobledger import it (a new database only); "
        "commands: create_job per job through the store; apply: uow.apply through the store",
    )
    parser.add_argument("--inflight", type=int, default=DEFAULT_INFLIGHT)
    parser.add_argument("--no-key", action="store_true", help="do not create an admin key")
    parser.add_argument("--json-out", help="also write the full summary (job id sample) here")
    args = parser.parse_args(argv)
    summary = generate(
        args.db_path,
        args.events,
        args.tenant,
        events_per_job=args.events_per_job,
        jobs=args.jobs,
        accounts=args.accounts,
        agents=args.agents,
        mix=args.mix,
        path=args.path,
        inflight=args.inflight,
        key_role=None if args.no_key else "admin",
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary))
    summary.pop("job_ids_sample")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
