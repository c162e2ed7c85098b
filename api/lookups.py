"""Lookups every resource and dialect shares: a job id from the path, a live job of the
caller, status and time parameters, the job that produced a result."""

from __future__ import annotations

from aiohttp import web

from api.context import caller, store
from ledger.clock import parse_us
from ledger.errors import Invalid, JobNotFound
from ledger.ids import JOB_ID
from ledger.jobs import STATUSES, JobState
from projections import jobs


def job_id_of(request: web.Request, name: str = "id") -> str:
    job_id = request.match_info[name]
    if not JOB_ID.fullmatch(job_id):
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


async def job_of_result(request: web.Request, result_id: str) -> JobState:
    who = caller(request)
    async with store(request).backend.read() as conn:
        job = await jobs.by_result(conn, who.tenant, result_id, project=who.project)
    if job is None:
        raise JobNotFound(f"no result {result_id}")
    return job
