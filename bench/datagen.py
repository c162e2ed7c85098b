"""Write a large job history quickly through the store's own write path (not HTTP).

``generate(db_path, events)`` opens ``EventStore(backend_for(path), all_projectors())`` (what
``api.app.open_store`` builds) and submits one command per job, many at a time, so the store's
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

``path="apply"`` (the default) stages ``job.queued`` with ``UnitOfWork.apply``, as
``create_job`` does, but without its two per-job lookups (does the id exist? which price is in
force?): the ids are fresh and the price is looked up once per agent. ``path="commands"`` calls
``create_job`` itself. Everything else (state machine, hash chain, projections, group commit)
is the store's own code either way.

CLI: ``python -m bench.datagen /tmp/x.db --events 1000000`` prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ledger import commands
from ledger.backends import backend_for
from ledger.events import (
    ErrorInfo,
    Event,
    JobCompleted,
    JobFailed,
    JobProgressed,
    JobQueued,
    JobStarted,
    Price,
)
from ledger.ids import new_job_id
from ledger.store import EventStore, UnitOfWork
from projections import new_store

ACTOR = "bench-datagen"
RETENTION_S = 7 * 86400
# Commands in flight at once: enough to fill the writer's batches (ledger.store.MAX_BATCH,
# 512 commands a transaction); more only costs memory and scheduling.
DEFAULT_INFLIGHT = 1024
STOP_TIMEOUT_S = 60.0


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


async def _stop(store: EventStore) -> None:
    """``store.stop()``, bounded: on PostgreSQL it can hang (found by this benchmark).

    Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives in the same loop
    iteration as the awaited event (CPython gh-86296); the backend's ``wait_for_signal`` waits
    like that for its own ``NOTIFY``, so cancelling the store's watcher right after the last
    commit can be lost and ``stop()`` then waits for the watcher forever. Letting the last
    ``NOTIFY`` arrive first avoids the race; the timeout turns a hang into an error.
    """
    if store.backend.dialect != "sqlite":
        await asyncio.sleep(0.6)
    await asyncio.wait_for(store.stop(), STOP_TIMEOUT_S)


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
        await _stop(store)
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


def generate(
    db_path: str | Path,
    events: int,
    tenant: str = "bench",
    **options: Any,
) -> dict[str, Any]:
    """Synchronous wrapper of :func:`agenerate` (runs its own event loop)."""
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
        choices=("apply", "commands"),
        default="apply",
        help="commands: create_job per job (two more lookups a job); apply: uow.apply",
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
