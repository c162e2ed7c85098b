"""MCRIT's jobs API (seed 002), mounted at ``/compat/mcrit``.

Every answer is ``{"status": "successful", "data": ...}`` and every failure
``{"status": "failed", "data": {"message": "<text>"}}`` with the native HTTP status, as
MCRIT's own client (``McritClient``) parses them. Keys come in MCRIT's ``apitoken`` header (or
``Authorization: Bearer``). Like MCRIT's server, every route also answers with a trailing
slash, and a job or result id that is not 24 hex characters is ``400``.

The agent is MCRIT's ``method``; states are queued, processing, finished and failed
(partial_failed and cancelled show as failed); the seed's times are ``YYYY-MM-DDTHH:MM:SS`` in
UTC. Each job also carries the fields of MCRIT's own job document (``_id``, ``payload`` with
``method`` and ``params``, ``created_at``, ``started_at``, ``finished_at``, ``result``,
``attempts_left``, ``terminated``, ...), which MCRIT's client wraps in its ``Job`` class.
``filter`` matches the job's id, method and account (the ledger does not search parameters),
applied before ``start``/``limit`` as MCRIT does, so pages of a filtered list are full.
"""

from __future__ import annotations

import json
import re
from functools import partial
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from api.auth import bearer_or_apitoken
from api.compat.common import Dialect, seconds_naive
from api.compat.listing import stream_jobs
from api.context import caller, store
from api.http import json_response, read_query
from api.idempotency import Written, run_command
from api.lookups import job_of_result, read_job, time_param
from api.results import result_answer
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
MAX_JOB_IDS = 1000
OBJECT_ID = re.compile(r"^[0-9a-fA-F]{24}$")
_ENCODE = msgspec.json.Encoder().encode


def render_error(status: int, error: LedgerError) -> web.StreamResponse:
    return json_response({"status": "failed", "data": {"message": error.message}}, status)


DIALECT = Dialect(
    NAME, PREFIX, render=render_error, credential=bearer_or_apitoken, trailing_slash=True
)
routes = DIALECT.routes


class Selection(Query):
    """What selects jobs, for the list and its count (MCRIT's ``_selection``)."""

    method: str | None = None
    state: str | None = None
    filter: str | None = None
    job_ids: str | None = None
    username: str | None = None
    sample_ids: str | None = None


class JobsQuery(Selection):
    start: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    limit: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    ascending: str = "false"


class DeleteQuery(Query):
    method: str | None = None
    created_before: str | None = None
    finished_before: str | None = None


class MongoDate(msgspec.Struct):
    """A time as MCRIT's server writes it (MongoDB extended JSON)."""

    date: str = msgspec.field(name="$date")


class Payload(msgspec.Struct):
    method: str
    params: str  # JSON text, as MCRIT's queue keeps a job's arguments
    descriptor: str  # JSON text of [method, params, file hashes]: no files here
    file_params: str = "{}"


class Job(msgspec.Struct, kw_only=True):
    # the seed's row
    job_id: str
    method: str
    state: str
    created: str
    finished: str | None
    # MCRIT's own job document, which its client's ``Job`` class reads
    id: str = msgspec.field(name="_id")
    payload: Payload
    username: str | None
    priority: int = 0
    attempts_left: int
    all_dependencies: list[str] = msgspec.field(default_factory=list)
    unfinished_dependencies: list[str] = msgspec.field(default_factory=list)
    created_at: MongoDate
    started_at: MongoDate | None
    finished_at: MongoDate | None
    locked_by: str | None
    locked_at: MongoDate | None
    last_error: str | None
    result: str | None
    progress: float
    terminated: bool


class JobDetail(Job, kw_only=True):
    parameters: dict[str, Any]
    result_id: str | None


class Stats(msgspec.Struct):
    total_jobs: int
    queued: int
    processing: int
    finished: int
    failed: int


class Count(msgspec.Struct):
    count: int


class Deleted(msgspec.Struct):
    num_deleted: int


def successful(data: Any) -> web.Response:
    return json_response({"status": "successful", "data": data})


def _date(us: int | None) -> MongoDate | None:
    """As MCRIT's server (bson's ``json_util``) writes a time: milliseconds only when non-zero."""
    if us is None:
        return None
    text = seconds_naive(us)
    millis = us % 1_000_000 // 1000
    return MongoDate(date=f"{text}.{millis:03d}Z" if millis else f"{text}Z")


def _descriptor(job: JobState) -> str:
    """What MCRIT's ``get_descriptor`` writes: ``json.dumps([method, params, hashes])``."""
    return json.dumps([job.agent, job.params, {}], sort_keys=True)


def _progress(job: JobState) -> float:
    if job.status == "completed":
        return 1.0
    if job.exec_total:
        return round((job.exec_succeeded + job.exec_failed) / job.exec_total, 4)
    return 0.0


def _fields(job: JobState) -> dict[str, Any]:
    state = STATE[job.status]
    finished = job.finished_at if state == "finished" else None
    started = job.started_at
    if started is None and job.finished_at is not None:
        started = job.finished_at  # it finished without running: a duration of zero
    last_error = None
    if job.error is not None:
        last_error = job.error.message or job.error.code
    elif job.status == "partial_failed":
        last_error = f"{job.exec_failed} of {job.exec_total} executions failed"
    person = job.created_by
    return {
        "job_id": job.id,
        "method": job.agent,
        "state": state,
        "created": seconds_naive(job.created_at),
        "finished": seconds_naive(job.finished_at),
        "id": job.id,
        "payload": Payload(
            method=job.agent,
            params=_ENCODE(job.params).decode(),
            descriptor=_descriptor(job),
        ),
        "username": (person.email or person.id) if person is not None else None,
        "attempts_left": 0 if job.status in ("failed", "partial_failed") else 1,
        "created_at": _date(job.created_at),
        "started_at": _date(started),
        "finished_at": _date(finished),
        "locked_by": job.account if state == "processing" else None,
        "locked_at": _date(job.started_at) if state == "processing" else None,
        "last_error": last_error,
        "result": job.result_id,
        "progress": _progress(job),
        "terminated": job.status == "cancelled",
    }


def job_row(job: JobState) -> Job:
    return Job(**_fields(job))


def job_detail(job: JobState) -> JobDetail:
    return JobDetail(**_fields(job), parameters=job.params, result_id=job.result_id)


def object_id(request: web.Request, name: str, what: str) -> str:
    """A job or result id as MCRIT takes it: 24 hex characters, read in lower case."""
    value = request.match_info[name]
    if not OBJECT_ID.fullmatch(value):
        raise BadRequest(f"Valid {what}IDs are hexstrings with 24 characters.")
    return value.lower()


def _statuses(state: str | None) -> tuple[str, ...]:
    if state is None:
        return ()
    if state not in STATUSES_OF:
        raise Invalid(f"unknown state {state!r}; one of {', '.join(STATES)}", field="state")
    return STATUSES_OF[state]


def _selection(q: Selection) -> jobs.ListQuery:
    for name in ("username", "sample_ids"):
        if getattr(q, name) is not None:
            raise BadRequest(
                f"selecting jobs by {name} is not supported: the ledger does not record it"
            )
    ids = None
    if q.job_ids is not None:
        ids = [i.strip().lower() for i in q.job_ids.split(",") if i.strip()]
        if len(ids) > MAX_JOB_IDS:
            raise BadRequest(f"job_ids selects at most {MAX_JOB_IDS} jobs")
    return jobs.ListQuery(statuses=_statuses(q.state), agent=q.method, q=q.filter or None, ids=ids)


@DIALECT.endpoint("GET", "/jobs", role="reader", summary="MCRIT: jobs", query=JobsQuery)
async def list_all(request: web.Request) -> web.StreamResponse:
    q = read_query(request, JobsQuery)
    query = _selection(q)
    query.ascending = q.ascending.strip().lower() in ("true", "1")
    query.offset = q.start
    return await stream_jobs(
        request,
        query,
        job_row,
        prefix=b'{"status":"successful","data":[',
        suffix=b"]}",
        limit=q.limit or None,
    )


@DIALECT.endpoint(
    "GET",
    "/jobs/count",
    role="reader",
    summary="MCRIT: how many jobs the same selection lists",
    query=Selection,
)
async def count(request: web.Request) -> web.Response:
    who = caller(request)
    query = _selection(read_query(request, Selection))
    query.project = who.project
    async with store(request).backend.read(snapshot=True) as conn:
        n = await jobs.count(conn, who.tenant, query)
    return successful(Count(count=n))


@DIALECT.endpoint("GET", "/jobs/stats", role="reader", summary="MCRIT: job counts")
async def stats(request: web.Request) -> web.Response:
    # ``with_refresh`` is accepted and needs nothing: the counts are current with every write.
    who = caller(request)
    async with store(request).backend.read(snapshot=True) as conn:
        totals = await counts.stats(conn, who.tenant, project=who.project)
    by_state = dict.fromkeys(STATES, 0)
    for status, n in totals.by_status.items():
        by_state[STATE[status]] += n
    return successful(Stats(total_jobs=totals.total_jobs, **by_state))


@DIALECT.endpoint(
    "DELETE",
    "/jobs",
    role="admin",
    summary="MCRIT: delete jobs by method, created_before, finished_before",
    query=DeleteQuery,
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

    async def write(uow: UnitOfWork) -> Written[int]:
        deleted = await commands.delete_many(
            uow, who.tenant, ids, actor=who.key_id, still=partial(jobs.matches, query=query)
        )
        return Written(200, deleted)

    return await run_command(request, write, _deleted, int)


@DIALECT.endpoint("GET", "/jobs/{id}", role="reader", summary="MCRIT: a job")
async def get_job(request: web.Request) -> web.Response:
    return successful(job_detail(await read_job(request, object_id(request, "id", "Job"))))


@DIALECT.endpoint("DELETE", "/jobs/{id}", role="writer", summary="MCRIT: delete a job")
async def delete_one(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = object_id(request, "id", "Job")
    await read_job(request, job_id)  # 404 outside the caller's tenant and project

    async def write(uow: UnitOfWork) -> Written[int]:
        await commands.delete(uow, who.tenant, job_id, actor=who.key_id, project=who.project)
        return Written(200, 1, job_id)

    return await run_command(request, write, _deleted, int)


def _deleted(count: int) -> dict[str, Any]:
    return {"status": "successful", "data": Deleted(num_deleted=count)}


async def _result(request: web.Request, job: JobState) -> web.Response:
    # ``compact`` is accepted: it drops function matches from MCRIT's own result documents,
    # and a ledger result is opaque, so both forms are the stored result.
    answer = await result_answer(request, job, compact=False)
    return successful(answer.data if isinstance(answer.data, msgspec.Raw) else None)


@DIALECT.endpoint("GET", "/jobs/{id}/result", role="reader", summary="MCRIT: a job's result")
async def job_result(request: web.Request) -> web.Response:
    return await _result(request, await read_job(request, object_id(request, "id", "Job")))


@DIALECT.endpoint("GET", "/results/{result_id}", role="reader", summary="MCRIT: a result by id")
async def result(request: web.Request) -> web.Response:
    result_id = object_id(request, "result_id", "Result")
    return await _result(request, await job_of_result(request, result_id))


@DIALECT.endpoint(
    "GET",
    "/results/{result_id}/job",
    role="reader",
    summary="MCRIT: the job that produced a result",
)
async def result_job(request: web.Request) -> web.Response:
    job = await job_of_result(request, object_id(request, "result_id", "Result"))
    return successful(job_detail(job))
