"""Running a write for a request, with ``Idempotency-Key`` replay (Stripe's semantics).

The same key with the same request within 24 h answers the first answer again and appends
nothing; the same key with another request is ``409 conflict``. The check, the write and the
stored answer share one transaction, so concurrent retries cannot both append.

Keys are scoped to the caller's project (a key of project p2 never sees p1's answers), and the
fingerprint covers the project too. After the job a key created is erased, the key still
refuses to create it again: its replay answers the job as it stands now (erased).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from api.context import caller, store
from api.http import ENCODE, fingerprint, raw_json
from api.schemas import job_view
from ledger.errors import Conflict, Invalid, JobNotFound
from ledger.limits import bad_text
from ledger.store import IdempotentAnswer, UnitOfWork

# A write: status, answer, and the job it concerns (so a redaction can forget its answers).
Write = Callable[[UnitOfWork], Awaitable[tuple[int, Any, str | None]]]


async def run_write(request: web.Request, write: Write) -> web.Response:
    who = caller(request)
    tenant = who.tenant
    key = request.headers.get("Idempotency-Key")
    if key is None:
        status, answer, _ = await store(request).execute(write, tenants=[tenant])
        return raw_json(ENCODE(answer), status)
    if not 1 <= len(key) <= 255 or bad_text(key):
        raise Invalid(
            "Idempotency-Key must be 1 to 255 characters, none of them control characters",
            field="Idempotency-Key",
        )
    scoped = key if who.project is None else f"{len(who.project)}:{who.project}:{key}"
    fp = fingerprint(request, await request.read())

    async def replayable(uow: UnitOfWork) -> tuple[int, bytes]:
        stored = await uow.idempotent(tenant, scoped)
        if stored is not None:
            answer, job_id = stored
            if answer.fingerprint != fp:
                raise Conflict(
                    "this Idempotency-Key was used with a different request",
                    field="Idempotency-Key",
                )
            if answer.body:
                return answer.status, answer.body.encode()
            return answer.status, await _erased_answer(uow, tenant, job_id)
        status, answer_, job_id = await write(uow)
        body = ENCODE(answer_)
        uow.remember(tenant, scoped, IdempotentAnswer(fp, status, body.decode()), job_id)
        return status, body

    status, body = await store(request).execute(replayable, tenants=[tenant])
    return raw_json(body, status)


async def _erased_answer(uow: UnitOfWork, tenant: str, job_id: str | None) -> bytes:
    """The answer of a request whose job was erased since: the job as it stands now."""
    job = None if job_id is None else await uow.job(tenant, job_id)
    if job is None or job.deleted:
        raise JobNotFound(f"no job {job_id}")
    return ENCODE(job_view(job))
