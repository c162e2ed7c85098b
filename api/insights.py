"""Read routes for operators: who am I, credits used per day, and verifying the audit chain.

The dashboard (``api/dashboard.py``) is built on these and on the rest of ``/v1``; they are
ordinary API routes, documented in the OpenAPI document like every other.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from api.context import caller, store
from api.http import endpoint, json_response, read_query
from api.lookups import time_param
from ledger import audit
from ledger.clock import format_us, now_us
from ledger.credits import from_units
from ledger.errors import Invalid
from projections import usage

routes = web.RouteTableDef()
Amount = int | Decimal
MAX_DAYS = 366
LAST_DAY_US = 253_402_214_400 * 1_000_000  # 9999-12-31T00:00:00Z: later days cannot be named


class Me(msgspec.Struct):
    tenant: str
    key_id: str
    role: str
    project: str | None


class UsageQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    days: Annotated[int, Meta(ge=1, le=MAX_DAYS)] = 30
    until: str | None = None
    account: str | None = None


class Usage(msgspec.Struct):
    """Credits used per UTC day: ``by_agent[agent][i]`` is the amount of ``days[i]``."""

    since: str
    until: str
    days: list[str]
    by_agent: dict[str, list[Amount]]
    total: Amount


class Verification(msgspec.Struct):
    ok: bool
    count: int
    head: str
    bad_position: int | None
    reason: str
    checked_at: str


@endpoint(
    routes,
    "GET",
    "/v1/me",
    role="reader",
    summary="The calling key: tenant, role, project",
    response=Me,
    tag="meta",
)
async def me(request: web.Request) -> web.Response:
    who = caller(request)
    return json_response(
        Me(tenant=who.tenant, key_id=who.key_id, role=who.role, project=who.project)
    )


@endpoint(
    routes,
    "GET",
    "/v1/credits/usage",
    role="reader",
    summary="Credits used per day and agent (jobs finished each UTC day)",
    query=UsageQuery,
    response=Usage,
    tag="credits",
)
async def credits_usage(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, UsageQuery)
    end = time_param(q.until, "until")
    end = usage.day_start(now_us() if end is None else end) + usage.DAY_US
    since = end - q.days * usage.DAY_US
    if since < 0 or end > LAST_DAY_US:
        raise Invalid("until must fall between 1970 and 9999", field="until")
    async with store(request).backend.read(snapshot=True) as conn:
        daily = await usage.daily(
            conn, who.tenant, since=since, until=end, account=q.account, project=who.project
        )
    return json_response(
        Usage(
            since=format_us(since),
            until=format_us(end),
            days=daily.days,
            by_agent={a: [from_units(u) for u in v] for a, v in daily.by_agent.items()},
            total=from_units(daily.total),
        )
    )


@endpoint(
    routes,
    "POST",
    "/v1/audit/verify",
    role="admin",
    summary="Recompute the tenant's hash chain on the server and check it against its head",
    response=Verification,
    tag="audit",
)
async def verify(request: web.Request) -> web.Response:
    verdict = await audit.verify_store(store(request).backend, caller(request).tenant)
    return json_response(
        Verification(
            ok=verdict.ok,
            count=verdict.count,
            head=verdict.head,
            bad_position=verdict.bad_position,
            reason=verdict.reason,
            checked_at=format_us(now_us()),
        )
    )
