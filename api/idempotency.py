"""Running a write for a request, with ``Idempotency-Key`` replay (Stripe's semantics).

The same key with the same request within 24 h answers the first answer again and appends
nothing; the same key with another request is ``409 conflict``. The check, the write and the
stored answer share one transaction, so concurrent retries cannot both append.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from api.context import caller, store
from api.http import ENCODE, fingerprint, raw_json
from ledger.errors import Conflict, Invalid
from ledger.store import UnitOfWork

# A write: status, answer, and the job it concerns (so a redaction can forget its answers).
Write = Callable[[UnitOfWork], Awaitable[tuple[int, Any, str | None]]]


async def run_write(request: web.Request, write: Write) -> web.Response:
    tenant = caller(request).tenant
    key = request.headers.get("Idempotency-Key")
    if key is None:
        status, answer, _ = await store(request).execute(write, tenants=[tenant])
        return raw_json(ENCODE(answer), status)
    if not 1 <= len(key) <= 255:
        raise Invalid("Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
    fp = fingerprint(request, await request.read())

    async def replayable(uow: UnitOfWork) -> tuple[int, bytes]:
        stored = await uow.idempotent(tenant, key)
        if stored is not None:
            if stored[0] != fp:
                raise Conflict(
                    "this Idempotency-Key was used with a different request",
                    field="Idempotency-Key",
                )
            return stored[1], stored[2].encode()
        status, answer, job_id = await write(uow)
        body = ENCODE(answer)
        uow.remember(tenant, key, fp, status, body.decode(), job_id)
        return status, body

    status, body = await store(request).execute(replayable, tenants=[tenant])
    response = raw_json(body, status)
    return response
