"""useapi.net MiniMax running agent jobs (seed 001), at ``/compat/useapi/v1/minimax/agent/jobs``.

The native ``GET /v1/jobs/running`` answer with useapi's field names (``jobId``, ``elapsed`` as
``mm:ss``). Errors are ``{"error": "<text>"}``; a missing or bad token is exactly
``401 {"error": "Unauthorized"}``.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from api.compat.common import dialect_endpoint
from api.http import json_response
from api.middleware import ERROR_RENDERERS
from api.stats import running_answer
from ledger.errors import LedgerError

NAME = "useapi"
PREFIX = "/compat/useapi/v1/minimax"

routes = web.RouteTableDef()


class Executing(msgspec.Struct, rename="camel"):
    job_id: str
    elapsed: str


class Summary(msgspec.Struct):
    executing: int


class Running(msgspec.Struct):
    accounts: list[str]
    summary: dict[str, Summary]
    executing: dict[str, list[Executing]]


@dialect_endpoint(
    NAME,
    routes,
    "GET",
    f"{PREFIX}/agent/jobs",
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


def render_error(status: int, error: LedgerError) -> web.StreamResponse:
    message = "Unauthorized" if status == 401 else error.message
    return json_response({"error": message}, status)


ERROR_RENDERERS[NAME] = render_error
