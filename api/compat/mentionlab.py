"""Mentionlab jobs (seed 003), mounted at ``/compat/mentionlab/api/jobs/{id}``.

Every request names its project in ``x-project-id`` (400 without); a job of another project
is 404. Fields are camelCase, times carry milliseconds, and the status words are pending,
processing, completed, failed and partial_failed (cancelled shows as failed). The ledger
derives the status from the executions already; this module only renames it. The seed names
no error shape, so errors keep the native envelope.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from api.compat.common import Dialect, millis_z
from api.http import json_response
from api.lookups import job_id_of, read_job
from ledger.errors import BadRequest
from ledger.events import Person
from ledger.jobs import JobState

NAME = "mentionlab"
PREFIX = "/compat/mentionlab/api"
STATUS = {
    "queued": "pending",
    "running": "processing",
    "completed": "completed",
    "partial_failed": "partial_failed",
    "failed": "failed",
    "cancelled": "failed",
}

DIALECT = Dialect(NAME, PREFIX)
routes = DIALECT.routes


class CreatedBy(msgspec.Struct, rename="camel"):
    first_name: str | None
    last_name: str | None
    email: str | None
    id: str | None


class Job(msgspec.Struct, rename="camel"):
    id: str
    project: str | None
    total_executions: int
    pending_executions: int
    retrying_executions: int
    success_executions: int
    failed_executions: int
    status: str
    created_at: str | None
    updated_at: str | None
    created_by: CreatedBy | None


def created_by(person: Person | None) -> CreatedBy | None:
    if person is None:
        return None
    return CreatedBy(
        first_name=person.first_name, last_name=person.last_name, email=person.email, id=person.id
    )


def job_view(job: JobState) -> Job:
    return Job(
        id=job.id,
        project=job.project,
        total_executions=job.exec_total,
        pending_executions=job.exec_pending,
        retrying_executions=job.exec_retrying,
        success_executions=job.exec_succeeded,
        failed_executions=job.exec_failed,
        status=STATUS[job.status],
        created_at=millis_z(job.created_at),
        updated_at=millis_z(job.updated_at),
        created_by=created_by(job.created_by),
    )


@DIALECT.endpoint("GET", "/jobs/{id}", role="reader", summary="Mentionlab: a job")
async def get_job(request: web.Request) -> web.Response:
    if not request.headers.get("x-project-id", "").strip():
        raise BadRequest("the x-project-id header is required")
    # The auth middleware scoped the caller to that project, so read_job answers 404 outside it.
    return json_response(job_view(await read_job(request, job_id_of(request))))
