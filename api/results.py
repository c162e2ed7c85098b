"""Routes of results: a job's results, a result by id, and the job behind a result."""

from __future__ import annotations

import msgspec
from aiohttp import web

from api import schemas as s
from api.context import caller, store
from api.http import endpoint, json_response, read_query
from api.lookups import job_id_of, job_of_result, read_job
from ledger.clock import format_opt, now_us
from ledger.errors import NoResults, ResultsExpired, ResultsNotReady
from ledger.jobs import OPEN, JobState

routes = web.RouteTableDef()


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
