"""MCRIT's jobs API (seed 002), mounted at ``/compat/mcrit``.

Every answer is ``{"status": "successful", "data": ...}`` and every failure
``{"status": "failed", "data": "<message>"}`` with the native HTTP status. The agent is MCRIT's
``method``; states are queued, processing, finished and failed (partial_failed and cancelled
show as failed); times are ``YYYY-MM-DDTHH:MM:SS`` in UTC. Unlike the original, ``filter`` is
applied before ``start``/``limit``, so pages of a filtered list are full.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from api.compat.common import dialect_endpoint, seconds_naive
from api.compat.listing import stream_jobs
from api.context import caller, store
from api.http import json_response, read_query
from api.idempotency import run_write
from api.jobs import job_id_of, job_of_result, read_job, result_answer, time_param
from api.middleware import ERROR_RENDERERS
from api.schemas import Query
from ledger import commands
from ledger.errors import BadRequest, Invalid, LedgerError
from ledger.jobs import STATUSES, JobState
from ledger.store import UnitOfWork
from projections import counts, jobs

NAME = "mcrit"
PREFIX = "/compat/mcrit"
STATE = {
    "queued": "queued",
    "running": "processing",
    "completed": "finished",
    "partial_failed": "failed",
    "failed": "failed",
    "cancelled": "failed",
}
STATES = ("queued", "processing", "finished", "failed")
STATUSES_OF = {state: tuple(s for s in STATUSES if STATE[s] == state) for state in STATES}

routes = web.RouteTableDef()


class JobsQuery(Query):
    start: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    limit: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    ascending: str = "false"
    method: str | None = None
    state: str | None = None
    filter: str | None = None


class DeleteQuery(Query):
    method: str | None = None
    created_before: str | None = None
    finished_before: str | None = None


class Job(msgspec.Struct):
    job_id: str
    method: str
    state: str
    created: str
    finished: str | None


class JobDetail(Job):
    parameters: dict[str, Any]
    result_id: str | None


class Stats(msgspec.Struct):
    total_jobs: int
    queued: int
    processing: int
    finished: int
    failed: int


class Deleted(msgspec.Struct):
    num_deleted: int


def successful(data: Any) -> web.Response:
    return json_response({"status": "successful", "data": data})


def _fields(job: JobState) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "method": job.agent,
        "state": STATE[job.status],
        "created": seconds_naive(job.created_at),
        "finished": seconds_naive(job.finished_at),
    }


def job_row(job: JobState) -> Job:
    return Job(**_fields(job))


def job_detail(job: JobState) -> JobDetail:
    return JobDetail(**_fields(job), parameters=job.params, result_id=job.result_id)


def _statuses(state: str | None) -> tuple[str, ...]:
    if state is None:
        return ()
    if state not in STATUSES_OF:
        raise Invalid(f"unknown state {state!r}; one of {', '.join(STATES)}", field="state")
    return STATUSES_OF[state]


@dialect_endpoint(NAME, routes, "GET", f"{PREFIX}/jobs", role="reader", summary="MCRIT: jobs")
async def list_all(request: web.Request) -> web.StreamResponse:
    q = read_query(request, JobsQuery)
    query = jobs.ListQuery(
        statuses=_statuses(q.state),
        agent=q.method,
        q=q.filter or None,
        ascending=q.ascending.strip().lower() in ("true", "1"),
        offset=q.start,
    )
    return await stream_jobs(
        request,
        query,
        job_row,
        prefix=b'{"status":"successful","data":[',
        suffix=b"]}",
        limit=q.limit or None,
    )


@dialect_endpoint(
    NAME, routes, "GET", f"{PREFIX}/jobs/stats", role="reader", summary="MCRIT: job counts"
)
async def stats(request: web.Request) -> web.Response:
    # ``with_refresh`` is accepted and needs nothing: the counts are current with every write.
    who = caller(request)
    async with store(request).backend.read(snapshot=True) as conn:
        totals = await counts.stats(conn, who.tenant, project=who.project)
    by_state = dict.fromkeys(STATES, 0)
    for status, n in totals["by_status"].items():
        by_state[STATE[status]] += n
    return successful(Stats(total_jobs=totals["total_jobs"], **by_state))


@dialect_endpoint(
    NAME,
    routes,
    "DELETE",
    f"{PREFIX}/jobs",
    role="admin",
    summary="MCRIT: delete jobs by method, created_before, finished_before",
)
async def delete_many(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, DeleteQuery)
    if not any((q.method, q.created_before, q.finished_before)):
        raise BadRequest("name at least one filter: method, created_before, finished_before")
    query = jobs.ListQuery(
        agent=q.method,
        project=who.project,
        created_before=time_param(q.created_before, "created_before"),
        finished_before=time_param(q.finished_before, "finished_before"),
    )
    async with store(request).backend.read() as conn:
        ids = await jobs.ids_matching(conn, who.tenant, query)

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        n = await commands.delete_many(uow, who.tenant, ids, actor=who.key_id)
        return 200, {"status": "successful", "data": Deleted(num_deleted=n)}, None

    return await run_write(request, write)


@dialect_endpoint(
    NAME, routes, "GET", f"{PREFIX}/jobs/{{id}}", role="reader", summary="MCRIT: a job"
)
async def get_job(request: web.Request) -> web.Response:
    return successful(job_detail(await read_job(request, job_id_of(request))))


@dialect_endpoint(
    NAME, routes, "DELETE", f"{PREFIX}/jobs/{{id}}", role="writer", summary="MCRIT: delete a job"
)
async def delete_one(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    await read_job(request, job_id)  # 404 outside the caller's tenant and project

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        await commands.delete(uow, who.tenant, job_id, actor=who.key_id)
        return 200, {"status": "successful", "data": Deleted(num_deleted=1)}, job_id

    return await run_write(request, write)


async def _result(request: web.Request, job: JobState) -> web.Response:
    # ``compact`` is accepted: it drops function matches from MCRIT's own result documents,
    # and a ledger result is opaque, so both forms are the stored result.
    answer = await result_answer(request, job, compact=False)
    return successful(answer.data if isinstance(answer.data, msgspec.Raw) else None)


@dialect_endpoint(
    NAME,
    routes,
    "GET",
    f"{PREFIX}/jobs/{{id}}/result",
    role="reader",
    summary="MCRIT: a job's result",
)
async def job_result(request: web.Request) -> web.Response:
    return await _result(request, await read_job(request, job_id_of(request)))


@dialect_endpoint(
    NAME,
    routes,
    "GET",
    f"{PREFIX}/results/{{result_id}}",
    role="reader",
    summary="MCRIT: a result by id",
)
async def result(request: web.Request) -> web.Response:
    return await _result(request, await job_of_result(request, request.match_info["result_id"]))


@dialect_endpoint(
    NAME,
    routes,
    "GET",
    f"{PREFIX}/results/{{result_id}}/job",
    role="reader",
    summary="MCRIT: the job that produced a result",
)
async def result_job(request: web.Request) -> web.Response:
    job = await job_of_result(request, request.match_info["result_id"])
    return successful(job_detail(job))


def render_error(status: int, error: LedgerError) -> web.StreamResponse:
    return json_response({"status": "failed", "data": error.message}, status)


ERROR_RENDERERS[NAME] = render_error
