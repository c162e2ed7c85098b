"""Running a write for a request, with ``Idempotency-Key`` replay (Stripe's semantics).

``run_command`` runs a ledger command and renders its value into the answer once, after the
COMMIT; under an ``Idempotency-Key`` the command's value itself (ledger types, msgspec-encoded)
is what the transaction stores, and a replay renders it again.

The same key with the same request within 24 h answers the first answer again and appends
nothing; the same key with another request is ``409 conflict``. The check, the write and the
stored answer share one transaction, so concurrent retries cannot both append.

Keys are scoped to the caller's project (a key of project p2 never sees p1's answers), and the
fingerprint covers the project too. After the job a key created is erased, the key still
refuses to create it again: its replay answers the job as it stands now (erased).

Every answer of a write carries ``X-Ledger-Position`` (``api/replicas.py``): the tenant's chain
head once the write committed, which a later read presents to see it on a replica.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from aiohttp import web

from api import replicas
from api.context import caller, store
from api.http import ENCODE, fingerprint, raw_json
from api.schemas import job_view
from ledger.errors import Conflict, Invalid, JobNotFound
from ledger.jobs import JobState
from ledger.limits import bad_text
from ledger.store import IdempotentAnswer, UnitOfWork

V = TypeVar("V")
_ENCODE_VALUE = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Written(Generic[V]):
    """What a command gives back: the status to answer, its value, and the job it concerns."""

    status: int
    value: V
    job_id: str | None = None


def _scoped_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or bad_text(key):
        raise Invalid(
            "Idempotency-Key must be 1 to 255 characters, none of them control characters",
            field="Idempotency-Key",
        )
    project = caller(request).project
    return key if project is None else f"{len(project)}:{project}:{key}"


async def run_command(
    request: web.Request,
    command: Callable[[UnitOfWork], Awaitable[Written[V]]],
    render: Callable[[V], Any],
    value_type: Any,
) -> web.Response:
    """Run ``command``; after the COMMIT, answer ``render(value)`` with its status."""
    tenant = caller(request).tenant
    scoped = _scoped_key(request)
    if scoped is None:

        async def positioned(uow: UnitOfWork) -> tuple[Written[V], int]:
            written = await command(uow)
            return written, uow.head_position(tenant)

        written, position = await store(request).execute(positioned, tenants=[tenant])
        response = raw_json(ENCODE(render(written.value)), written.status)
        replicas.wrote(request, response, position)
        return response
    fp = fingerprint(request, await request.read())

    async def replayable(uow: UnitOfWork) -> tuple[int, Any, str | None, JobState | None, int]:
        """``(status, value, stored value text, erased job, position)``: one of the value,
        the text and the erased job is set; ``position`` is the tenant's head after it."""
        stored = await uow.idempotent(tenant, scoped)
        if stored is not None:
            answer, job_id = stored
            if answer.fingerprint != fp:
                raise Conflict(
                    "this Idempotency-Key was used with a different request",
                    field="Idempotency-Key",
                )
            position = uow.head_position(tenant)  # at or after the first answer's write
            if answer.body:
                return answer.status, None, answer.body, None, position
            erased = await _erased_job(uow, tenant, job_id)
            return answer.status, None, None, erased, position
        written = await command(uow)
        body = _ENCODE_VALUE(written.value).decode()
        uow.remember(tenant, scoped, IdempotentAnswer(fp, written.status, body), written.job_id)
        return written.status, written.value, None, None, uow.head_position(tenant)

    status, value, text, erased, position = await store(request).execute(
        replayable, tenants=[tenant]
    )
    if erased is not None:
        response = raw_json(ENCODE(job_view(erased)), status)  # the erased job, as it is now
    else:
        if text is not None:
            value = msgspec.json.decode(text, type=value_type)
        response = raw_json(ENCODE(render(value)), status)
    replicas.wrote(request, response, position)
    return response


async def _erased_job(uow: UnitOfWork, tenant: str, job_id: str | None) -> JobState:
    job = None if job_id is None else await uow.job(tenant, job_id)
    if job is None or job.deleted:
        raise JobNotFound(f"no job {job_id}")
    return job
