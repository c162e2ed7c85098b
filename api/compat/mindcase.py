"""Mindcase agent jobs (seed 000), mounted at ``/compat/mindcase/api/v1``.

Status words: queued, running, completed, failed, cancelled; ``partial_failed`` shows as
``completed`` (it finished and is charged). Times are whole seconds ending in ``Z``; the seed
names no error shape, so errors keep the native envelope.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from api import schemas as s
from api.compat.common import dialect_endpoint, seconds_z
from api.compat.listing import stream_jobs
from api.context import caller, store
from api.http import json_response, read_query
from api.idempotency import run_write
from api.jobs import job_id_of, read_job, result_answer
from ledger import commands
from ledger.credits import from_units
from ledger.jobs import JobState
from ledger.store import UnitOfWork
from projections import credits, jobs

NAME = "mindcase"
PREFIX = "/compat/mindcase/api/v1"
STATUS = {"partial_failed": "completed"}
CANCELLED = "Job has been cancelled."

routes = web.RouteTableDef()


class Job(msgspec.Struct):
    id: str
    status: str
    agent: str
    row_count: int
    credits_used: s.Amount
    created_at: str
    completed_at: str | None


class JobDetail(Job):
    expires_at: str | None


class JobList(msgspec.Struct):
    jobs: list[Job]


class Results(msgspec.Struct):
    status: str
    row_count: int
    data: msgspec.Raw | None


class Cancelled(msgspec.Struct):
    job_id: str
    status: str
    message: str


class Credits(msgspec.Struct):
    credits_remaining: s.Amount


def status_word(job: JobState) -> str:
    return STATUS.get(job.status, job.status)


def _fields(job: JobState) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": status_word(job),
        "agent": job.agent,
        "row_count": job.row_count,
        "credits_used": from_units(job.credits_used),
        "created_at": seconds_z(job.created_at),
        "completed_at": seconds_z(job.finished_at),
    }


def job_row(job: JobState) -> Job:
    return Job(**_fields(job))


def job_detail(job: JobState) -> JobDetail:
    return JobDetail(**_fields(job), expires_at=seconds_z(job.expires_at))


@dialect_endpoint(NAME, routes, "GET", f"{PREFIX}/jobs", role="reader", summary="Mindcase: jobs")
async def list_all(request: web.Request) -> web.StreamResponse:
    return await stream_jobs(request, jobs.ListQuery(), job_row, prefix=b'{"jobs":[', suffix=b"]}")


@dialect_endpoint(
    NAME, routes, "GET", f"{PREFIX}/jobs/{{id}}", role="reader", summary="Mindcase: a job"
)
async def get_job(request: web.Request) -> web.Response:
    job = await read_job(request, job_id_of(request))
    return json_response(job_detail(job))


@dialect_endpoint(
    NAME,
    routes,
    "GET",
    f"{PREFIX}/jobs/{{id}}/results",
    role="reader",
    summary="Mindcase: a job's results (404 while running)",
)
async def get_results(request: web.Request) -> web.Response:
    job = await read_job(request, job_id_of(request))
    answer = await result_answer(request, job, compact=False)
    data = answer.data if isinstance(answer.data, msgspec.Raw) else None
    return json_response(Results(status=status_word(job), row_count=answer.row_count, data=data))


@dialect_endpoint(
    NAME,
    routes,
    "DELETE",
    f"{PREFIX}/jobs/{{id}}",
    role="writer",
    summary="Mindcase: cancel a queued or running job",
)
async def cancel_job(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    await read_job(request, job_id)  # 404 outside the caller's tenant and project

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        state = await commands.cancel(uow, who.tenant, job_id, None, actor=who.key_id)
        return 200, Cancelled(job_id=state.id, status=state.status, message=CANCELLED), job_id

    return await run_write(request, write)


@dialect_endpoint(
    NAME, routes, "GET", f"{PREFIX}/credits", role="reader", summary="Mindcase: credits left"
)
async def get_credits(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, s.CreditsQuery)
    async with store(request).backend.read(snapshot=True) as conn:
        totals = await credits.balance(conn, who.tenant, account=q.account, project=who.project)
    return json_response(Credits(credits_remaining=from_units(totals["granted"] - totals["used"])))
