"""Routes of jobs: create, list, read (long-poll, time travel), events, cancel, archive, delete."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from api import schemas as s
from api.auth import Caller
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
from api.idempotency import Written, run_command
from api.lookups import job_id_of, read_job, statuses, time_param
from api.streaming import json_array
from ledger import commands, scans
from ledger.errors import BadRequest, Invalid, InvalidTransition, JobNotFound
from ledger.events import POSTABLE_TYPES, JobQueued, from_data
from ledger.ids import RESERVED_JOB_IDS, new_job_id
from ledger.jobs import JobState
from ledger.records import Recorded
from ledger.store import UnitOfWork
from projections import jobs

routes = web.RouteTableDef()


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
    enforce = settings(request).enforce_credits

    async def write(uow: UnitOfWork) -> Written[JobState]:
        state = await commands.create_job(
            uow,
            who.tenant,
            job_id,
            queued,
            actor=who.key_id,
            occurred_us=occurred,
            enforce_credits=enforce,
            fresh_id=spec.id is None,
        )
        return Written(201, state, job_id)

    return await run_command(request, write, s.job_view, JobState)


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

    async def write(uow: UnitOfWork) -> Written[int]:
        deleted = await commands.delete_many(
            uow, who.tenant, ids, actor=who.key_id, still=partial(jobs.matches, query=query)
        )
        return Written(200, deleted)

    return await run_command(request, write, _deleted, int)


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
    if not request.query_string:  # the common case: the job as it is now
        return raw_json(await _view_body(request, who, job_id))
    q = read_query(request, s.GetJobQuery)
    if q.as_of is not None:
        past = await scans.job_as_of(store(request).backend, who.tenant, job_id, q.as_of)
        if past is None or past.deleted or (who.project and past.project != who.project):
            raise JobNotFound(f"no job {job_id} at position {q.as_of}")
        return json_response(s.job_view(past))
    if not (q.wait and q.after_version is not None):
        return raw_json(await _view_body(request, who, job_id))
    ledger = store(request)
    seen = ledger.change_token(who.tenant)  # before the read: a commit during it must wake us
    job = await read_job(request, job_id)  # a long poll: wait for a version after this one
    stopping = request.app[STOPPING]
    deadline = time.monotonic() + q.wait
    while job.version <= q.after_version and not stopping.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await _change_or_stop(request, remaining, seen, who.tenant)
        seen = ledger.change_token(who.tenant)
        job = await read_job(request, job_id)
    return json_response(s.job_view(job))


# The answers of recent GETs, by job: (the database's committed version when the row was read,
# the stored state's text, the job's project, the answer's body). The body is a pure function
# of the text, so a job read again unchanged (a client polling it) is answered without
# decoding and re-encoding it; any change to the job changes its text. Where the backend knows
# that nothing has committed since the row was read (SQLite in WAL mode, from any process:
# ``Backend.committed_version``), the row is not even read again.
_VIEWS: dict[tuple[str, str], tuple[int | None, str, str | None, bytes]] = {}
VIEWS_KEPT = 4096


async def _view_body(request: web.Request, who: Caller, job_id: str) -> bytes:
    """The body of ``GET /v1/jobs/{id}`` for a live job of the caller's scope, or 404."""
    backend = store(request).backend
    version = backend.committed_version()  # before the read: a commit after it changes it
    key = (who.tenant, job_id)
    kept = _VIEWS.get(key)
    if kept is not None and version is not None and kept[0] == version:
        project, body = kept[2], kept[3]
    else:
        async with backend.read() as conn:
            row = await jobs.get_text(conn, who.tenant, job_id)
        if row is None:
            if kept is not None:
                del _VIEWS[key]
            raise JobNotFound(f"no job {job_id}")
        text, project = row
        if kept is not None and kept[1] == text:
            body = kept[3]
        else:
            body = ENCODE(s.job_view(jobs.decode(text)))
            if kept is None and len(_VIEWS) >= VIEWS_KEPT:
                del _VIEWS[next(iter(_VIEWS))]  # the oldest entry
        _VIEWS[key] = (version, text, project, body)
    if who.project is not None and project != who.project:
        raise JobNotFound(f"no job {job_id}")
    return body


async def _change_or_stop(request: web.Request, seconds: float, seen: int, tenant: str) -> None:
    """Sleep until events that may be ``tenant``'s are committed, the server begins to stop,
    or ``seconds`` pass (``seen``: ``EventStore.change_token(tenant)`` before the last read).

    On SIGTERM a long poll answers the job as it stands at once, instead of holding the
    shutdown until its wait runs out (or aiohttp's shutdown timeout cuts the connection).
    """
    change = asyncio.ensure_future(
        store(request).wait_for_change(seconds, seen=seen, tenant=tenant)
    )
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

    async def write(uow: UnitOfWork) -> Written[tuple[JobState, list[Recorded]]]:
        appended = await commands.append_events(
            uow,
            who.tenant,
            job_id,
            items,
            actor=who.key_id,
            retention_s=retention,
            project=who.project,
        )
        return Written(201, appended, job_id)

    return await run_command(request, write, _appended, tuple[JobState, list[Recorded]])


def _appended(value: tuple[JobState, list[Recorded]]) -> s.Appended:
    state, records = value
    return s.Appended(job=s.job_view(state), events=[s.event_view(r) for r in records])


def _deleted(count: int) -> s.Deleted:
    return s.Deleted(deleted=count)


Transition = Callable[[UnitOfWork, Caller, str], Awaitable[JobState]]


async def _transition(request: web.Request, make: Transition) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    await read_job(request, job_id)  # 404 outside the caller's project

    async def write(uow: UnitOfWork) -> Written[JobState]:
        return Written(200, await make(uow, who, job_id), job_id)

    return await run_command(request, write, s.job_view, JobState)


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
            uow, who.tenant, job_id, body.reason, actor=who.key_id, project=who.project
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
        lambda uow, who, job_id: commands.archive(
            uow, who.tenant, job_id, actor=who.key_id, project=who.project
        ),
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

    async def write(uow: UnitOfWork) -> Written[int]:
        await commands.delete(uow, who.tenant, job_id, actor=who.key_id, project=who.project)
        return Written(200, 1, job_id)

    return await run_command(request, write, _deleted, int)
