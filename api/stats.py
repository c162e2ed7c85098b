"""Routes of the tenant's overview: job counts and credits, and the running jobs by account."""

from __future__ import annotations

from aiohttp import web

from api import schemas as s
from api.context import caller, store
from api.http import endpoint, json_response
from api.views import stats_view
from ledger.clock import format_opt, now_us
from ledger.store import reads
from projections import counts, jobs

routes = web.RouteTableDef()


@endpoint(
    routes,
    "GET",
    "/v1/jobs/stats",
    role="reader",
    summary="Job counts and credits",
    response=s.Stats,
)
async def get_stats(request: web.Request) -> web.Response:
    who = caller(request)
    async with store(request).backend.read(snapshot=True) as conn:
        totals = await counts.stats(conn, who.tenant, project=who.project)
        head = await reads.head(conn, who.tenant)
    return json_response(stats_view(totals, head.position if head else 0))


@endpoint(
    routes,
    "GET",
    "/v1/jobs/running",
    role="reader",
    summary="Running jobs grouped by account",
    response=s.Running,
)
async def get_running(request: web.Request) -> web.Response:
    return json_response(await running_answer(request))


async def running_answer(request: web.Request) -> s.Running:
    who = caller(request)
    async with store(request).backend.read(snapshot=True, bulk=True) as conn:  # may be many
        live = await jobs.running(conn, who.tenant, project=who.project)
        accounts = await counts.by_account(conn, who.tenant, project=who.project)
    now = now_us()
    names = sorted(set(accounts) | {j.account for j in live})
    executing: dict[str, list[s.Executing]] = {a: [] for a in names}
    for job in live:
        executing[job.account].append(
            s.Executing(
                job_id=job.id,
                agent=job.agent,
                started_at=format_opt(job.started_at),
                elapsed=s.elapsed(job.started_at, now),
            )
        )
    return s.Running(
        accounts=names,
        summary={a: s.ExecutingCount(executing=len(executing[a])) for a in names},
        executing=executing,
    )
