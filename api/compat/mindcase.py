"""Mindcase agent jobs (seed 000) and its Developer API's agents, at ``/compat/mindcase/api/v1``.

Status words: queued, running, completed, failed, cancelled; ``partial_failed`` shows as
``completed`` (it finished and is charged), and so answers results (an empty ``data`` when it
stored none). Times are whole seconds ending in ``Z``. Errors keep the native envelope and add
``detail``, the message Mindcase's SDK reads.

``GET /agents/all``, ``/agents/{group}`` and ``/agents/{group}/{slug}`` read the agent catalog
(``POST /v1/agents``); ``POST /agents/{group}/{slug}/run`` checks ``params`` against the
agent's schema and appends ``job.queued``: the worker that runs it reports through ``/v1``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from api import schemas as s
from api.agents import AgentView, catalog_of
from api.compat.common import Dialect, seconds_z
from api.compat.listing import stream_jobs
from api.context import caller, settings, store
from api.http import error_body, json_response, read_body, read_query
from api.idempotency import Written, run_command
from api.lookups import job_id_of, read_job
from api.results import result_answer
from ledger import agents as catalog
from ledger import commands
from ledger.credits import from_units
from ledger.errors import Invalid, LedgerError, NoResults, NotFound
from ledger.events import JobQueued
from ledger.ids import new_job_id
from ledger.jobs import BILLABLE, STATUSES, JobState
from ledger.store import UnitOfWork
from projections import credits, jobs

NAME = "mindcase"
PREFIX = "/compat/mindcase/api/v1"
STATUS = {"partial_failed": "completed"}
WORDS = ("queued", "running", "completed", "failed", "cancelled")
STATUSES_OF = {w: tuple(st for st in STATUSES if STATUS.get(st, st) == w) for w in WORDS}
CANCELLED = "Job has been cancelled."


def render_error(status: int, error: LedgerError) -> web.StreamResponse:
    """The native envelope plus ``detail``: what Mindcase's SDK puts in its exceptions."""
    return json_response({"detail": error.message, **error_body(error)}, status)


DIALECT = Dialect(NAME, PREFIX, render=render_error)
routes = DIALECT.routes


class Job(msgspec.Struct):
    id: str
    status: str
    agent: str
    row_count: int
    credits_used: s.Amount
    created_at: str
    completed_at: str | None
    started_at: str | None
    error: str | None


class JobDetail(Job):
    expires_at: str | None


class Started(JobDetail):
    job_id: str


class JobsQuery(s.Query):
    status: str | None = None
    limit: int | None = None


class Results(msgspec.Struct):
    status: str
    row_count: int
    data: msgspec.Raw | list[Any] | None


class Cancelled(msgspec.Struct):
    job_id: str
    status: str
    message: str


class Credits(msgspec.Struct):
    credits_remaining: s.Amount


class RunBody(s.Body):
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class AgentSummary(msgspec.Struct):
    group: str
    slug: str
    name: str
    description: str
    credits_per_row: s.Amount


class AgentList(msgspec.Struct):
    agents: list[AgentSummary]


class Agent(AgentSummary):
    parameters: dict[str, dict[str, Any]]


def status_word(job: JobState) -> str:
    return STATUS.get(job.status, job.status)


def error_text(job: JobState) -> str | None:
    if job.error is not None:
        return job.error.message or job.error.code
    return CANCELLED if job.status == "cancelled" else None


def _fields(job: JobState) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": status_word(job),
        "agent": job.agent,
        "row_count": job.row_count,
        "credits_used": from_units(job.credits_used),
        "created_at": seconds_z(job.created_at),
        "completed_at": seconds_z(job.finished_at),
        "started_at": seconds_z(job.started_at),
        "error": error_text(job),
    }


def job_row(job: JobState) -> Job:
    return Job(**_fields(job))


def job_detail(job: JobState) -> JobDetail:
    return JobDetail(**_fields(job), expires_at=seconds_z(job.expires_at))


def _statuses(word: str | None) -> tuple[str, ...]:
    if word is None:
        return ()
    if word not in STATUSES_OF:
        raise Invalid(f"unknown status {word!r}; one of {', '.join(WORDS)}", field="status")
    return STATUSES_OF[word]


@DIALECT.endpoint("GET", "/jobs", role="reader", summary="Mindcase: jobs", query=JobsQuery)
async def list_all(request: web.Request) -> web.StreamResponse:
    q = read_query(request, JobsQuery)
    if q.limit is not None and not 1 <= q.limit <= 1000:
        raise Invalid("limit is 1 to 1000", field="limit")
    query = jobs.ListQuery(statuses=_statuses(q.status))
    return await stream_jobs(
        request, query, job_row, prefix=b'{"jobs":[', suffix=b"]}", limit=q.limit
    )


@DIALECT.endpoint("GET", "/jobs/{id}", role="reader", summary="Mindcase: a job")
async def get_job(request: web.Request) -> web.Response:
    job = await read_job(request, job_id_of(request))
    return json_response(job_detail(job))


@DIALECT.endpoint(
    "GET",
    "/jobs/{id}/results",
    role="reader",
    summary="Mindcase: a job's results (404 while running)",
)
async def get_results(request: web.Request) -> web.Response:
    job = await read_job(request, job_id_of(request))
    try:
        answer = await result_answer(request, job, compact=False)
    except NoResults:
        if job.status not in BILLABLE:
            raise
        # completed (or partial_failed) without a stored result: no rows to give
        return json_response(Results(status=status_word(job), row_count=job.row_count, data=[]))
    data = answer.data if isinstance(answer.data, msgspec.Raw) else None
    return json_response(Results(status=status_word(job), row_count=answer.row_count, data=data))


@DIALECT.endpoint(
    "DELETE",
    "/jobs/{id}",
    role="writer",
    summary="Mindcase: cancel a queued or running job",
)
async def cancel_job(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    await read_job(request, job_id)  # 404 outside the caller's tenant and project

    async def write(uow: UnitOfWork) -> Written[JobState]:
        state = await commands.cancel(
            uow, who.tenant, job_id, None, actor=who.key_id, project=who.project
        )
        return Written(200, state, job_id)

    def render(state: JobState) -> Cancelled:
        return Cancelled(job_id=state.id, status=state.status, message=CANCELLED)

    return await run_command(request, write, render, JobState)


@DIALECT.endpoint("GET", "/credits", role="reader", summary="Mindcase: credits left")
async def get_credits(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, s.CreditsQuery)
    async with store(request).backend.read(snapshot=True) as conn:
        totals = await credits.balance(conn, who.tenant, account=q.account, project=who.project)
    return json_response(Credits(credits_remaining=from_units(totals.granted - totals.used)))


# -- agents --------------------------------------------------------------------------------------


def _summary(view: AgentView) -> AgentSummary:
    return AgentSummary(
        group=view.group,
        slug=view.slug,
        name=view.title or view.slug,
        description=view.description,
        credits_per_row=view.price.per_row,
    )


async def _catalog(request: web.Request, group: str | None = None) -> list[AgentView]:
    async with store(request).backend.read() as conn:
        return await catalog_of(conn, caller(request).tenant, group)


@DIALECT.endpoint("GET", "/agents/all", role="reader", summary="Mindcase: every agent")
async def all_agents(request: web.Request) -> web.Response:
    return json_response(AgentList(agents=[_summary(v) for v in await _catalog(request)]))


@DIALECT.endpoint("GET", "/agents/{group}", role="reader", summary="Mindcase: a group's agents")
async def group_agents(request: web.Request) -> web.Response:
    found = await _catalog(request, request.match_info["group"])
    return json_response(AgentList(agents=[_summary(v) for v in found]))


def _agent_name(request: web.Request) -> str:
    name = f"{request.match_info['group']}/{request.match_info['slug']}"
    catalog.split_name(name)
    return name


@DIALECT.endpoint(
    "GET", "/agents/{group}/{slug}", role="reader", summary="Mindcase: an agent and its parameters"
)
async def get_agent(request: web.Request) -> web.Response:
    name = _agent_name(request)
    view = next(
        (v for v in await _catalog(request, request.match_info["group"]) if v.agent == name), None
    )
    if view is None:
        raise NotFound(f"no agent {name}")
    summary = _summary(view)
    return json_response(
        Agent(**msgspec.structs.asdict(summary), parameters=catalog.parameters(view.params_schema))
    )


@DIALECT.endpoint(
    "POST",
    "/agents/{group}/{slug}/run",
    role="writer",
    summary="Mindcase: run an agent (job.queued, params checked against its schema)",
    body=RunBody,
    response=Started,
    status=201,
    errors=(402, 404, 422),
)
async def run_agent(request: web.Request) -> web.Response:
    who = caller(request)
    name = _agent_name(request)
    body = await read_body(request, RunBody)
    job_id = new_job_id()
    queued = JobQueued(agent=name, project=who.project, params=body.params)
    enforce = settings(request).enforce_credits

    async def write(uow: UnitOfWork) -> Written[JobState]:
        state = await catalog.run(
            uow, who.tenant, job_id, queued, actor=who.key_id, enforce_credits=enforce
        )
        return Written(201, state, job_id)

    def render(state: JobState) -> Started:
        return Started(**_fields(state), expires_at=None, job_id=state.id)

    return await run_command(request, write, render, JobState)
