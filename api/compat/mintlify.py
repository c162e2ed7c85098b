"""Mintlify agent jobs (seed 004), mounted at ``/compat/mintlify/v2/agent/{projectId}/job/{id}``.

The job must belong to ``projectId`` (else 404). Status words: ``archived`` once archived,
else ``active`` while queued or running, ``completed`` (partial_failed too: it finished and is
charged) and ``failed`` (cancelled too). Times are whole seconds ending in ``Z``. The seed
names no error shape, so errors keep the native envelope.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from api.compat.common import Dialect, seconds_z
from api.http import json_response
from api.lookups import job_id_of, read_job
from ledger.errors import JobNotFound
from ledger.jobs import JobState

NAME = "mintlify"
PREFIX = "/compat/mintlify/v2"
STATUS = {
    "queued": "active",
    "running": "active",
    "completed": "completed",
    "partial_failed": "completed",
    "failed": "failed",
    "cancelled": "failed",
}

DIALECT = Dialect(NAME, PREFIX)
routes = DIALECT.routes


class Source(msgspec.Struct):
    repository: str | None
    ref: str | None


class Job(msgspec.Struct, rename="camel"):
    id: str
    status: str
    source: Source
    model: str | None
    pr_link: str | None
    created_at: str | None
    archived_at: str | None


def status_word(job: JobState) -> str:
    return "archived" if job.archived_at is not None else STATUS[job.status]


def job_view(job: JobState) -> Job:
    source = job.source
    return Job(
        id=job.id,
        status=status_word(job),
        source=Source(
            repository=source.repository if source else None, ref=source.ref if source else None
        ),
        model=job.model,
        pr_link=job.pr_link,
        created_at=seconds_z(job.created_at),
        archived_at=seconds_z(job.archived_at),
    )


@DIALECT.endpoint(
    "GET",
    "/agent/{projectId}/job/{id}",
    role="reader",
    summary="Mintlify: an agent job",
)
async def get_job(request: web.Request) -> web.Response:
    job_id = job_id_of(request)
    job = await read_job(request, job_id)
    if job.project != request.match_info["projectId"]:
        raise JobNotFound(f"no job {job_id} in project {request.match_info['projectId']}")
    return json_response(job_view(job))
