"""Routes of section 4: jobs, their events, results, stats, running jobs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from aiohttp import web

from api import schemas as s
from api.context import STOPPING, caller, settings, store
from api.http import (
    ENCODE,
    convert,
    decode_json,
    endpoint,
    json_response,
    raw_json,
    read_body,
    read_optional_body,
    read_query,
)
from api.idempotency import run_write
from api.streaming import json_array
from ledger import commands, scans
from ledger.clock import format_opt, now_us, parse_us
from ledger.credits import from_units
from ledger.errors import (
    BadRequest,
    InsufficientCredits,
    Invalid,
    InvalidTransition,
    JobNotFound,
    NoResults,
    ResultsExpired,
    ResultsNotReady,
)
from ledger.events import POSTABLE_TYPES, JobQueued, from_data
from ledger.ids import JOB_ID, RESERVED_JOB_IDS, new_job_id
from ledger.jobs import OPEN, STATUSES, JobState
from ledger.sql import Conn
from ledger.store import UnitOfWork
from projections import counts, credits, jobs

routes = web.RouteTableDef()


# -- helpers shared with the dialects ---------------------------------------------------------


def job_id_of(request: web.Request, name: str = "id") -> str:
    job_id = request.match_info[name]
    if not JOB_ID.match(job_id):
        raise Invalid("job ids are 1-128 of [A-Za-z0-9_.:-]", field="id")
    return job_id


async def read_job(request: web.Request, job_id: str) -> JobState:
    """A live job of the caller's tenant (and project), or 404."""
    who = caller(request)
    async with store(request).backend.read() as conn:
        job = await jobs.get(conn, who.tenant, job_id, project=who.project)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def statuses(text: str | None, field: str = "status") -> tuple[str, ...]:
    if not text:
        return ()
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    for value in values:
        if value not in STATUSES:
            raise Invalid(f"unknown status {value!r}; one of {', '.join(STATUSES)}", field=field)
    return values


def time_param(text: str | None, field: str) -> int | None:
    return None if text is None else parse_us(text, field=field)


async def result_answer(request: web.Request, job: JobState, *, compact: bool) -> s.ResultView:
    """The result of a finished job: 404 not ready / none, 410 past expiry or erased."""
    if job.status in OPEN:
        raise ResultsNotReady(f"job {job.id} is {job.status}; results are not ready")
    if job.result_id is None:
        raise NoResults(f"job {job.id} finished without results")
    if job.expires_at is not None and now_us() >= job.expires_at:
        raise ResultsExpired(f"the results of job {job.id} expired at its expires_at")
    if job.redacted:
        raise ResultsExpired(f"the results of job {job.id} were erased")
    stored = await store(request).result(caller(request).tenant, job.result_id)
    if stored is None or stored[2] is None:
        raise ResultsExpired(f"the results of job {job.id} are no longer stored")
    answer = s.ResultView(
        job_id=job.id,
        result_id=job.result_id,
        status=job.status,
        row_count=job.row_count,
        expires_at=format_opt(job.expires_at),
    )
    if not compact:
        answer.data = msgspec.Raw(stored[2].encode())
    return answer


def _check_credits(request: web.Request) -> commands.CreditCheck | None:
    if not settings(request).enforce_credits:
        return None

    async def check(conn: Conn, tenant: str, account: str) -> None:
        totals = await credits.balance(conn, tenant, account=account)
        available = totals["granted"] - totals["used"]
        if available <= 0:
            raise InsufficientCredits(
                f"account {account} has no credits left",
                credits_available=from_units(available),
            )

    return check


# -- routes ------------------------------------------------------------------------------------


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
        head = await conn.fetchone(
            "SELECT position FROM chain_heads WHERE tenant = ?", (who.tenant,)
        )
    return json_response(
        s.Stats(
            total_jobs=totals["total_jobs"],
            by_status=totals["by_status"],
            by_agent={a: s.ByAgent(**e) for a, e in totals["by_agent"].items()},
            archived=totals["archived"],
            credits_used=from_units(totals["credits_units"]),
            position=head[0] if head else 0,
        )
    )


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


@endpoint(
    routes,
    "POST",
    "/v1/jobs",
    role="writer",
    summary="Create a job (job.queued)",
    body=s.CreateJob,
    response=s.JobView,
    status=201,
    errors=(402, 409, 422),
)
async def create_job(request: web.Request) -> web.Response:
    who = caller(request)
    spec = await read_body(request, s.CreateJob)
    if spec.id is not None and spec.id in RESERVED_JOB_IDS:
        raise Invalid(f"{spec.id!r} is a reserved word, not a job id", field="id")
    project = spec.project
    if who.project is not None:
        if project is not None and project != who.project:
            raise Invalid("project differs from the X-Project-Id header", field="project")
        project = who.project
    job_id = spec.id or new_job_id()
    occurred = time_param(spec.occurred_at, "occurred_at")
    queued = JobQueued(
        agent=spec.agent,
        account=spec.account,
        project=project,
        params=spec.params,
        source=spec.source,
        model=spec.model,
        created_by=spec.created_by,
        executions_total=spec.executions_total,
    )
    credit_check = _check_credits(request)

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        state = await commands.create_job(
            uow,
            who.tenant,
            job_id,
            queued,
            actor=who.key_id,
            occurred_us=occurred,
            credit_check=credit_check,
            fresh_id=spec.id is None,
        )
        return 201, s.job_view(state), job_id

    return await run_write(request, write)


@endpoint(
    routes,
    "GET",
    "/v1/jobs",
    role="reader",
    summary="List jobs, newest first",
    query=s.ListJobsQuery,
    response=s.JobList,
)
async def list_jobs(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, s.ListJobsQuery)
    query = jobs.ListQuery(
        statuses=statuses(q.status),
        agent=q.agent,
        account=q.account,
        project=who.project or q.project,
        created_after=time_param(q.created_after, "created_after"),
        created_before=time_param(q.created_before, "created_before"),
        archived=None if q.archived == "any" else q.archived == "true",
        q=q.q,
        ascending=q.order == "asc",
        limit=q.limit,
        cursor=q.cursor,
    )
    if who.project and q.project and q.project != who.project:
        return json_response(s.JobList(jobs=[], has_more=False, next_cursor=None))
    async with store(request).backend.read(bulk=jobs.may_scan(query)) as conn:
        page, cursor = await jobs.page(conn, who.tenant, query)
    return json_response(
        s.JobList(
            jobs=[s.job_view(j) for j in page], has_more=cursor is not None, next_cursor=cursor
        )
    )


@endpoint(
    routes,
    "DELETE",
    "/v1/jobs",
    role="admin",
    summary="Delete every matching job",
    query=s.BulkDeleteQuery,
    response=s.Deleted,
)
async def delete_jobs(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, s.BulkDeleteQuery)
    if not any((q.agent, q.status, q.created_before, q.finished_before)):
        raise BadRequest("name at least one filter: agent, status, created_before, finished_before")
    query = jobs.ListQuery(
        statuses=statuses(q.status),
        agent=q.agent,
        project=who.project,
        created_before=time_param(q.created_before, "created_before"),
        finished_before=time_param(q.finished_before, "finished_before"),
    )
    async with store(request).backend.read(bulk=True) as conn:
        ids = await jobs.ids_matching(conn, who.tenant, query)

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        n = await commands.delete_many(uow, who.tenant, ids, actor=who.key_id)
        return 200, s.Deleted(deleted=n), None

    return await run_write(request, write)


@endpoint(
    routes,
    "GET",
    "/v1/jobs/{id}",
    role="reader",
    summary="A job (long-poll, as_of)",
    query=s.GetJobQuery,
    response=s.JobView,
)
async def get_job(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    q = read_query(request, s.GetJobQuery)
    if q.as_of is not None:
        past = await scans.job_as_of(store(request).backend, who.tenant, job_id, q.as_of)
        if past is None or past.deleted or (who.project and past.project != who.project):
            raise JobNotFound(f"no job {job_id} at position {q.as_of}")
        return json_response(s.job_view(past))
    job = await read_job(request, job_id)
    if q.wait and q.after_version is not None:
        stopping = request.app[STOPPING]
        deadline = time.monotonic() + q.wait
        while job.version <= q.after_version and not stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await _change_or_stop(request, remaining)
            job = await read_job(request, job_id)
    return json_response(s.job_view(job))


async def _change_or_stop(request: web.Request, seconds: float) -> None:
    """Sleep until new events are committed, the server begins to stop, or ``seconds`` pass.

    On SIGTERM a long poll answers the job as it stands at once, instead of holding the
    shutdown until its wait runs out (or aiohttp's shutdown timeout cuts the connection).
    """
    change = asyncio.ensure_future(store(request).wait_for_change(seconds))
    stop = asyncio.ensure_future(request.app[STOPPING].wait())
    try:
        await asyncio.wait({change, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (change, stop):
            task.cancel()


@endpoint(
    routes,
    "GET",
    "/v1/jobs/{id}/events",
    role="reader",
    summary="The job's events",
    response=s.JobEvents,
)
async def job_events(request: web.Request) -> web.StreamResponse:
    job_id = job_id_of(request)
    await read_job(request, job_id)
    chunks = scans.stream_chunks(store(request).backend, caller(request).tenant, job_id)
    encoded = (ENCODE([s.event_view(e) for e in chunk])[1:-1] async for chunk in chunks)
    return await json_array(request, b'{"events":[', encoded, b"]}")  # a long job streams


def _new_event(item: s.AppendEvent, field: str) -> commands.NewEvent:
    if item.type == "job.queued":
        raise InvalidTransition("the job is already queued; job.queued comes from POST /v1/jobs")
    if item.type not in POSTABLE_TYPES:
        if item.type == "job.redacted":
            raise Invalid("erase with POST /v1/jobs/{id}/redact (admin)", field=f"{field}type")
        raise Invalid(f"unknown event type {item.type!r}", field=f"{field}type")
    try:
        event = from_data(item.type, item.data)
    except Invalid as exc:
        exc.field = field + (exc.field or "data")
        raise
    return commands.NewEvent(
        event=event,
        event_id=item.event_id,
        expected_version=item.expected_version,
        occurred_us=time_param(item.occurred_at, f"{field}occurred_at"),
    )


@endpoint(
    routes,
    "POST",
    "/v1/jobs/{id}/events",
    role="writer",
    summary="Append one event, or several all-or-nothing",
    body=s.AppendEvent | s.AppendBatch,
    response=s.Appended,
    status=201,
    errors=(404, 409, 422),
)
async def append(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    raw = decode_json(await request.read())
    if not isinstance(raw, dict):
        raise Invalid("the request body must be a JSON object", field="$")
    if "events" in raw:
        batch = convert(raw, s.AppendBatch)
        items = [_new_event(e, f"events[{i}].") for i, e in enumerate(batch.events)]
    else:
        items = [_new_event(convert(raw, s.AppendEvent), "")]
    retention = settings(request).result_retention_s

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        state, records = await commands.append_events(
            uow, who.tenant, job_id, items, actor=who.key_id, retention_s=retention
        )
        if who.project is not None and state.project != who.project:
            raise JobNotFound(f"no job {job_id}")
        return (
            201,
            s.Appended(job=s.job_view(state), events=[s.event_view(r) for r in records]),
            job_id,
        )

    return await run_write(request, write)


async def _transition(request: web.Request, make: Any, status: int = 200) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    await read_job(request, job_id)  # 404 outside the caller's project

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        state = await make(uow, who, job_id)
        return status, s.job_view(state), job_id

    return await run_write(request, write)


@endpoint(
    routes,
    "POST",
    "/v1/jobs/{id}/cancel",
    role="writer",
    summary="Cancel (job.cancelled)",
    body=s.Reason,
    response=s.JobView,
    errors=(404, 409),
)
async def cancel(request: web.Request) -> web.Response:
    await read_job(request, job_id_of(request))  # 404 comes before any body error
    body = await read_optional_body(request, s.Reason)
    return await _transition(
        request,
        lambda uow, who, job_id: commands.cancel(
            uow, who.tenant, job_id, body.reason, actor=who.key_id
        ),
    )


@endpoint(
    routes,
    "POST",
    "/v1/jobs/{id}/archive",
    role="writer",
    summary="Archive a finished job (job.archived)",
    response=s.JobView,
    errors=(404, 409),
)
async def archive(request: web.Request) -> web.Response:
    return await _transition(
        request,
        lambda uow, who, job_id: commands.archive(uow, who.tenant, job_id, actor=who.key_id),
    )


@endpoint(
    routes,
    "DELETE",
    "/v1/jobs/{id}",
    role="writer",
    summary="Delete a job (job.deleted)",
    response=s.Deleted,
    errors=(404,),
)
async def delete_job(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    await read_job(request, job_id)

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        await commands.delete(uow, who.tenant, job_id, actor=who.key_id)
        return 200, s.Deleted(deleted=1), job_id

    return await run_write(request, write)


@endpoint(
    routes,
    "GET",
    "/v1/jobs/{id}/results",
    role="reader",
    summary="The job's results",
    query=s.ResultsQuery,
    response=s.ResultView,
    errors=(404, 410),
)
async def job_results(request: web.Request) -> web.Response:
    job = await read_job(request, job_id_of(request))
    compact = read_query(request, s.ResultsQuery).compact in ("true", "1")
    return json_response(await result_answer(request, job, compact=compact))


async def job_of_result(request: web.Request, result_id: str) -> JobState:
    who = caller(request)
    async with store(request).backend.read() as conn:
        job = await jobs.by_result(conn, who.tenant, result_id, project=who.project)
    if job is None:
        raise JobNotFound(f"no result {result_id}")
    return job


@endpoint(
    routes,
    "GET",
    "/v1/results/{result_id}",
    role="reader",
    summary="A result by id",
    query=s.ResultsQuery,
    response=s.ResultView,
    errors=(404, 410),
)
async def get_result(request: web.Request) -> web.Response:
    job = await job_of_result(request, request.match_info["result_id"])
    compact = read_query(request, s.ResultsQuery).compact in ("true", "1")
    return json_response(await result_answer(request, job, compact=compact))


@endpoint(
    routes,
    "GET",
    "/v1/results/{result_id}/job",
    role="reader",
    summary="The job that produced a result",
    response=s.JobView,
    errors=(404,),
)
async def get_result_job(request: web.Request) -> web.Response:
    job = await job_of_result(request, request.match_info["result_id"])
    return json_response(s.job_view(job))


__all__ = ["raw_json", "routes"]
