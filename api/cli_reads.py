"""Operators' reads on the machine: ``jobledger jobs list|show``, ``stats``, ``credits``.

They read the database directly through the same read-model functions the server's routes use
(``projections/``), as rich tables on a terminal or, with ``--json``, as the very JSON shapes the
HTTP API answers, so a script can switch between the two. Their arguments are in
``api/cli_reads_args.py``: the other commands start without importing this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from api import schemas as s
from api.views import account_views, credits_view, stats_view
from ledger.backends import backend_for
from ledger.clock import now_us, parse_us
from ledger.credits import from_units
from ledger.errors import Invalid, LedgerError
from ledger.jobs import STATUSES
from ledger.store import EventStore, reads
from projections import counts, credits, jobs, new_store, usage

ENCODE = msgspec.json.Encoder(decimal_format="number").encode


class JobWithEvents(s.JobView):
    """``jobs show --events --json``: the job as the API shows it, and its events."""

    events: list[s.EventView] = msgspec.field(default_factory=list)


class ReadError(LedgerError):
    """A read that cannot be answered: ``jobledger`` prints one line on stderr, exit code 1."""


# -- plumbing ---------------------------------------------------------------------------------


async def _with_store(
    args: argparse.Namespace, read: Callable[[EventStore, str], Awaitable[int]]
) -> int:
    try:
        backend = backend_for(args.db, create=False)
    except LedgerError as exc:
        raise ReadError(exc.message) from None
    store = new_store(backend)
    await store.start(writer=False)
    try:
        tenant = await _tenant(store, args.tenant)
        return await read(store, tenant)
    finally:
        await store.stop()


async def _tenant(store: EventStore, tenant: str | None) -> str:
    known = await store.tenants()
    if tenant is not None:
        if tenant not in known:
            raise ReadError(f"unknown tenant {tenant!r}: it has no events")
        return tenant
    if len(known) == 1:
        return known[0]
    if not known:
        raise ReadError("the database has no events yet")
    raise ReadError(f"name one with --tenant: {', '.join(known)}")


def _time(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_us(text, field=flag)
    except Invalid:
        raise ReadError(f"{flag} is not an RFC 3339 time: {text!r}") from None


def _out(obj: Any) -> None:
    sys.stdout.write(ENCODE(obj).decode() + "\n")


def _console() -> Console:
    # a pipe or a file gets wide lines rather than 80 columns of folded cells
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def _num(amount: Any) -> str:
    return str(amount)


STATUS_STYLE = {
    "running": "blue",
    "completed": "green",
    "failed": "red",
    "partial_failed": "yellow",
    "cancelled": "dim",
}


def _status(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


# -- jobs ------------------------------------------------------------------------------------


async def cmd_jobs(args: argparse.Namespace) -> int:
    if args.jobs_command == "list":
        return await _with_store(args, lambda st, t: _list(st, t, args))
    return await _with_store(args, lambda st, t: _show(st, t, args))


async def _list(store: EventStore, tenant: str, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise ReadError("--limit must be 1 to 1000")
    statuses = tuple(v.strip() for v in (args.status or "").split(",") if v.strip())
    for value in statuses:
        if value not in STATUSES:
            raise ReadError(f"unknown status {value!r}; one of {', '.join(STATUSES)}")
    query = jobs.ListQuery(
        statuses=statuses,
        agent=args.agent,
        account=args.account,
        project=args.project,
        created_after=_since(args.since),
        created_before=_time(args.until, "--until"),
        q=args.q,
        limit=args.limit,
    )
    async with store.backend.read(bulk=bool(args.q)) as conn:
        page, cursor = await jobs.page(conn, tenant, query)
    views = [s.job_view(j) for j in page]
    if args.json:
        _out(s.JobList(jobs=views, has_more=cursor is not None, next_cursor=cursor))
        return 0
    table = Table(title=f"jobs of {tenant}", title_justify="left")
    for column in ("id", "status", "agent", "account", "created", "finished"):
        table.add_column(column)
    table.add_column("rows", justify="right")
    table.add_column("credits", justify="right")
    for v in views:
        table.add_row(
            v.id,
            _status(v.status),
            v.agent,
            v.account,
            v.created_at,
            v.finished_at or "",
            str(v.row_count),
            _num(v.credits_used),
        )
    console = _console()
    console.print(table)
    if cursor is not None:
        console.print(f"[dim]more than {args.limit}; raise --limit or narrow the filters[/]")
    return 0


def _since(text: str | None) -> int | None:
    at = _time(text, "--since")
    return None if at is None else at - 1  # the list's filter is "after"; --since is inclusive


async def _show(store: EventStore, tenant: str, args: argparse.Namespace) -> int:
    async with store.backend.read() as conn:
        job = await jobs.get(conn, tenant, args.job_id, project=args.project)
    if job is None:
        raise ReadError(f"no job {args.job_id} in tenant {tenant}")
    events = await store.stream(tenant, job.id) if args.events else []
    view = s.job_view(job)
    if args.json:
        if args.events:
            events_view = [s.event_view(e) for e in events]
            _out(JobWithEvents(**msgspec.structs.asdict(view), events=events_view))
        else:
            _out(view)
        return 0
    console = _console()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    rows: list[tuple[str, str | None]] = [
        ("job", view.id),
        ("status", _status(view.status)),
        ("agent", view.agent),
        ("account", view.account),
        ("project", view.project),
        ("created", view.created_at),
        ("started", view.started_at),
        ("finished", view.finished_at),
        ("archived", view.archived_at),
        ("rows", str(view.row_count)),
        ("credits", _num(view.credits_used)),
        (
            "executions",
            f"{view.executions.total} total, {view.executions.succeeded} succeeded, "
            f"{view.executions.failed} failed, {view.executions.retrying} retrying, "
            f"{view.executions.pending} pending",
        ),
        ("result", view.result_id),
        ("error", None if view.error is None else f"{view.error.code}: {view.error.message}"),
        ("version", str(view.version)),
    ]
    for name, value in rows:
        if value is not None:
            facts.add_row(name, value)
    console.print(facts)
    if args.events:
        timeline = Table(title="events", title_justify="left")
        for column in ("position", "v", "type", "occurred", "hash", "actor", "data"):
            timeline.add_column(column, overflow="fold")
        for e in events:
            data = "(erased)" if e.data is None else e.data
            timeline.add_row(
                str(e.position),
                str(e.version),
                e.type,
                e.occurred_at,
                e.hash[:12],
                e.actor,
                data if len(data) <= 60 else data[:59] + "…",
            )
        console.print(timeline)
    return 0


# -- stats, credits --------------------------------------------------------------------------


async def cmd_stats(args: argparse.Namespace) -> int:
    async def read(store: EventStore, tenant: str) -> int:
        async with store.backend.read(snapshot=True) as conn:
            totals = await counts.stats(conn, tenant, project=args.project)
            head = await reads.head(conn, tenant)
        answer = stats_view(totals, head.position if head else 0)
        if args.json:
            _out(answer)
            return 0
        console = _console()
        console.print(
            f"[bold]{tenant}[/]: {answer.total_jobs} jobs, {answer.archived} archived, "
            f"{_num(answer.credits_used)} credits used, chain position {answer.position}"
        )
        table = Table(title="jobs by agent and status", title_justify="left")
        table.add_column("agent")
        table.add_column("total", justify="right")
        for status in STATUSES:
            table.add_column(status, justify="right")
        for agent, entry in answer.by_agent.items():
            table.add_row(agent, str(entry.total), *(str(entry.by_status[x]) for x in STATUSES))
        table.add_section()
        table.add_row(
            "[bold]all[/]",
            str(answer.total_jobs),
            *(str(answer.by_status[x]) for x in STATUSES),
        )
        console.print(table)
        return 0

    return await _with_store(args, read)


class CreditsReport(msgspec.Struct):
    totals: s.Credits
    accounts: list[s.AccountView]
    usage: dict[str, Any] | None = None


async def cmd_credits(args: argparse.Namespace) -> int:
    if not 0 <= args.days <= 366:
        raise ReadError("--days must be 0 to 366")

    async def read(store: EventStore, tenant: str) -> int:
        async with store.backend.read(snapshot=True) as conn:
            totals = await credits.balance(conn, tenant, account=args.account, project=args.project)
            job_counts = await counts.by_account(
                conn, tenant, project=args.project, account=args.account
            )
            money = await credits.accounts_usage(conn, tenant, project=args.project)
            daily = None
            if args.days:
                end = usage.day_start(now_us()) + usage.DAY_US
                daily = await usage.daily(
                    conn,
                    tenant,
                    since=end - args.days * usage.DAY_US,
                    until=end,
                    account=args.account,
                    project=args.project,
                )
        accounts = account_views(job_counts, money, account=args.account, scoped=False)
        if args.account is not None and not accounts:
            raise ReadError(f"no account {args.account} in tenant {tenant}")
        report = CreditsReport(
            totals=credits_view(totals, scoped=False),
            accounts=accounts,
            usage=None
            if daily is None
            else {
                "days": daily.days,
                "by_agent": {a: [from_units(u) for u in v] for a, v in daily.by_agent.items()},
            },
        )
        if args.json:
            _out(report)
            return 0
        _print_credits(tenant, report)
        return 0

    return await _with_store(args, read)


def _print_credits(tenant: str, report: CreditsReport) -> None:
    console = _console()
    t = report.totals
    console.print(
        f"[bold]{tenant}[/]: granted {_num(t.granted)}, used {_num(t.used)}, "
        f"balance {_num(t.balance)}"
    )
    table = Table(title="accounts", title_justify="left")
    table.add_column("account")
    for column in ("jobs", "running", "granted", "used", "balance"):
        table.add_column(column, justify="right")
    for a in report.accounts:
        balance = _num(a.credits.balance)
        table.add_row(
            a.account,
            str(a.jobs.total),
            str(a.executing),
            _num(a.credits.granted),
            _num(a.credits.used),
            f"[red]{balance}[/]" if str(balance).startswith("-") else balance,
        )
    console.print(table)
    if t.by_agent:
        agents = Table(title="used by agent", title_justify="left")
        agents.add_column("agent")
        agents.add_column("used", justify="right")
        for agent, used in t.by_agent.items():
            agents.add_row(agent, _num(used))
        console.print(agents)
    if report.usage is not None:
        days: list[str] = report.usage["days"]
        by_agent: dict[str, list[Any]] = report.usage["by_agent"]
        daily = Table(title="used per day (UTC, by finish time)", title_justify="left")
        daily.add_column("day")
        for agent in by_agent:
            daily.add_column(agent, justify="right")
        for i, day in enumerate(days):
            if any(by_agent[a][i] for a in by_agent):
                daily.add_row(day, *(_num(by_agent[a][i]) for a in by_agent))
        console.print(daily)


COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "jobs": cmd_jobs,
    "stats": cmd_stats,
    "credits": cmd_credits,
}


__all__: Sequence[str] = ["COMMANDS", "ReadError"]
