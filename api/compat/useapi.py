"""useapi.net MiniMax agent jobs (seed 001), mounted at ``/compat/useapi/v1/minimax``.

``GET agent/jobs`` is the native ``GET /v1/jobs/running`` answer with useapi's field names
(``jobId``, ``elapsed`` as ``mm:ss``). ``GET agent/{jobId}`` answers one job, finished ones
included, as the seed promises. Errors are ``{"error": "<text>"}``; a missing or bad token is
exactly ``401 {"error": "Unauthorized"}``.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from api import schemas as s
from api.compat.common import Dialect, seconds_z
from api.http import json_response
from api.lookups import job_id_of, read_job
from api.stats import running_answer
from ledger.clock import now_us
from ledger.errors import LedgerError
from ledger.jobs import JobState

NAME = "useapi"
PREFIX = "/compat/useapi/v1/minimax"
# useapi's job words: started while it runs, then completed or failed.
STATUS = {
    "queued": "started",
    "running": "started",
    "completed": "completed",
    "partial_failed": "completed",
    "failed": "failed",
    "cancelled": "failed",
}


def render_error(status: int, error: LedgerError) -> web.StreamResponse:
    message = "Unauthorized" if status == 401 else error.message
    return json_response({"error": message}, status)


DIALECT = Dialect(NAME, PREFIX, render=render_error)
routes = DIALECT.routes


class Executing(msgspec.Struct, rename="camel"):
    job_id: str
    elapsed: str


class Summary(msgspec.Struct):
    executing: int


class Running(msgspec.Struct):
    accounts: list[str]
    summary: dict[str, Summary]
    executing: dict[str, list[Executing]]


@DIALECT.endpoint(
    "GET",
    "/agent/jobs",
    role="reader",
    summary="useapi: running agent jobs by account",
)
async def running_jobs(request: web.Request) -> web.Response:
    native = await running_answer(request)
    return json_response(
        Running(
            accounts=native.accounts,
            summary={a: Summary(executing=n.executing) for a, n in native.summary.items()},
            executing={
                a: [Executing(job_id=j.job_id, elapsed=j.elapsed) for j in jobs]
                for a, jobs in native.executing.items()
            },
        )
    )


class AgentJob(msgspec.Struct, rename="camel", omit_defaults=True):
    job_id: str
    status: str
    account: str
    created: str | None
    updated: str | None
    elapsed: str | None = None  # while it runs
    error: str | None = None  # when it failed


def agent_job(job: JobState) -> AgentJob:
    status = STATUS[job.status]
    return AgentJob(
        job_id=job.id,
        status=status,
        account=job.account,
        created=seconds_z(job.created_at),
        updated=seconds_z(job.updated_at),
        elapsed=s.elapsed(job.started_at, now_us()) if job.status == "running" else None,
        error=(job.error.message or job.error.code)
        if job.error is not None
        else ("cancelled" if job.status == "cancelled" else None),
    )


@DIALECT.endpoint(
    "GET",
    "/agent/{id}",
    role="reader",
    summary="useapi: one agent job, running or finished",
)
async def get_job(request: web.Request) -> web.Response:
    return json_response(agent_job(await read_job(request, job_id_of(request))))
