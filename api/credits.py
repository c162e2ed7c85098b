"""Routes of section 5 (prices, grants, balances, statements) and per-account summaries."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from api import schemas as s
from api.context import caller, store
from api.http import endpoint, json_response, plain_amount, read_body, read_query
from api.idempotency import Written, run_command
from api.lookups import time_param
from api.views import account_views, credits_view
from ledger import commands, csvcells
from ledger.clock import format_opt
from ledger.credits import PRICE_FIELDS, from_units, to_units, validate_price
from ledger.errors import NotFound
from ledger.events import CreditsGranted, Price
from ledger.records import Recorded
from ledger.store import UnitOfWork
from projections import counts, credits, jobs

routes = web.RouteTableDef()


def price_view(agent: str, price: Price, updated_at: str | None) -> s.PriceView:
    return s.PriceView(
        agent=agent,
        per_job=from_units(to_units(price.per_job, field="per_job")),
        per_row=from_units(to_units(price.per_row, field="per_row")),
        per_execution=from_units(to_units(price.per_execution, field="per_execution")),
        per_second=from_units(to_units(price.per_second, field="per_second")),
        updated_at=updated_at,
    )


T = TypeVar("T")


async def read_amounts(request: web.Request, type_: type[T], fields: tuple[str, ...]) -> T:
    """``read_body``, and each of ``fields`` sent as a string must be a plain decimal."""
    body = await read_body(request, type_)
    value = msgspec.json.decode(await request.read())  # read_body decoded it: an object
    for name in fields:
        plain_amount(value.get(name), name)
    return body


@endpoint(
    routes,
    "POST",
    "/v1/prices",
    role="admin",
    summary="Set an agent's price (price.set)",
    body=s.PriceBody,
    response=s.PriceView,
    status=201,
    errors=(403, 422),
    tag="credits",
)
async def set_price(request: web.Request) -> web.Response:
    who = caller(request)
    body = await read_amounts(request, s.PriceBody, PRICE_FIELDS)
    price = Price(
        per_job=body.per_job,
        per_row=body.per_row,
        per_execution=body.per_execution,
        per_second=body.per_second,
    )
    validate_price(price)

    async def write(uow: UnitOfWork) -> Written[Recorded]:
        return Written(
            201, await commands.set_price(uow, who.tenant, body.agent, price, actor=who.key_id)
        )

    def render(recorded: Recorded) -> s.PriceView:
        return price_view(body.agent, price, recorded.recorded_at)

    return await run_command(request, write, render, Recorded)


@endpoint(
    routes,
    "GET",
    "/v1/prices",
    role="reader",
    summary="Prices in force",
    response=s.PriceList,
    tag="credits",
)
async def list_prices(request: web.Request) -> web.Response:
    async with store(request).backend.read() as conn:
        rows = await credits.prices(conn, caller(request).tenant)
    return json_response(s.PriceList(prices=[price_view(a, p, at) for a, p, at in rows]))


@endpoint(
    routes,
    "POST",
    "/v1/credits/grants",
    role="admin",
    summary="Grant (or, negative, adjust) an account's credits",
    body=s.GrantBody,
    response=s.GrantView,
    status=201,
    errors=(403, 422),
    tag="credits",
)
async def grant(request: web.Request) -> web.Response:
    who = caller(request)
    body = await read_amounts(request, s.GrantBody, ("amount",))
    units = to_units(body.amount, field="amount", allow_negative=True)
    event = CreditsGranted(account=body.account, amount=body.amount, reason=body.reason)

    async def write(uow: UnitOfWork) -> Written[commands.Granted]:
        return Written(201, await commands.grant(uow, who.tenant, event, actor=who.key_id))

    def render(granted: commands.Granted) -> s.GrantView:
        totals = granted.totals
        return s.GrantView(
            account=body.account,
            amount=from_units(units),
            reason=body.reason,
            position=granted.recorded.position,
            granted=from_units(totals.granted),
            used=from_units(totals.used),
            balance=from_units(totals.granted - totals.used),
        )

    return await run_command(request, write, render, commands.Granted)


@endpoint(
    routes,
    "GET",
    "/v1/credits",
    role="reader",
    summary="Granted, used and balance",
    query=s.CreditsQuery,
    response=s.Credits,
    tag="credits",
)
async def get_credits(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, s.CreditsQuery)
    async with store(request).backend.read(snapshot=True) as conn:
        totals = await credits.balance(conn, who.tenant, account=q.account, project=who.project)
    return json_response(credits_view(totals, scoped=who.project is not None))


@endpoint(
    routes,
    "GET",
    "/v1/credits/statement",
    role="reader",
    summary="Charges of jobs finished in a window (JSON or CSV)",
    query=s.StatementQuery,
    response=s.Statement,
    tag="credits",
    also=("text/csv",),
)
async def statement(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, s.StatementQuery)
    since, until = time_param(q.since, "since"), time_param(q.until, "until")
    async with store(request).backend.read() as conn:
        charged = await jobs.billable_between(
            conn, who.tenant, q.account, since, until, project=who.project
        )
    lines = [
        s.StatementLine(
            job_id=j.id,
            agent=j.agent,
            finished_at=format_opt(j.finished_at),
            row_count=j.row_count,
            credits=from_units(j.credits_used),
        )
        for j in charged
    ]
    total = from_units(sum(j.credits_used for j in charged))
    if q.format == "csv":
        text = csvcells.rows_text(
            [
                ("job_id", "agent", "finished_at", "row_count", "credits"),
                *((x.job_id, x.agent, x.finished_at, x.row_count, x.credits) for x in lines),
                ("total", "", "", "", total),
            ]
        )
        return web.Response(text=text, content_type="text/csv")
    return json_response(
        s.Statement(account=q.account, since=q.since, until=q.until, lines=lines, total=total)
    )


async def _accounts(request: web.Request, account: str | None) -> list[s.AccountView]:
    who = caller(request)
    async with store(request).backend.read(snapshot=True) as conn:
        job_counts = await counts.by_account(conn, who.tenant, project=who.project, account=account)
        money = await credits.accounts_usage(conn, who.tenant, project=who.project)
    return account_views(job_counts, money, account=account, scoped=who.project is not None)


@endpoint(
    routes,
    "GET",
    "/v1/accounts",
    role="reader",
    summary="Every account's summary",
    response=s.AccountList,
    tag="accounts",
)
async def list_accounts(request: web.Request) -> web.Response:
    return json_response(s.AccountList(accounts=await _accounts(request, None)))


@endpoint(
    routes,
    "GET",
    "/v1/accounts/{account}",
    role="reader",
    summary="One account's summary",
    response=s.AccountView,
    errors=(404,),
    tag="accounts",
)
async def get_account(request: web.Request) -> web.Response:
    account = request.match_info["account"]
    views = await _accounts(request, account)
    if not views:
        raise NotFound(f"no account {account}")
    return json_response(views[0])
