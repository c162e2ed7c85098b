"""The agent catalog: ``POST /v1/agents`` defines an agent (``agent.defined``), ``GET`` lists.

The Mindcase dialect reads the same catalog (``agents.*`` of its SDK) and runs its agents.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from api import schemas as s
from api.context import caller, store
from api.credits import price_view
from api.http import endpoint, json_response, read_body, read_query
from api.idempotency import run_write
from ledger import agents as catalog
from ledger.commands import price_in_force
from ledger.credits import validate_price
from ledger.errors import Invalid
from ledger.events import DEFAULT_PRICE, AgentDefined, Price
from ledger.sql import Conn
from ledger.store import UnitOfWork
from projections import agents, credits

routes = web.RouteTableDef()


class PriceIn(s.Body):
    per_job: Decimal = Decimal(0)
    per_row: Decimal = Decimal(0)
    per_execution: Decimal = Decimal(0)
    per_second: Decimal = Decimal(0)


class AgentBody(s.Body):
    agent: Annotated[str, Meta(min_length=3, max_length=200)]  # "group/slug"
    name: Annotated[str, Meta(max_length=200)] | None = None
    description: Annotated[str, Meta(max_length=10_000)] = ""
    params_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    price: PriceIn | None = None


class AgentView(msgspec.Struct):
    agent: str
    group: str
    slug: str
    name: str
    description: str
    params_schema: dict[str, Any]
    price: s.PriceView
    updated_at: str | None


class AgentList(msgspec.Struct):
    agents: list[AgentView]


class AgentsQuery(s.Query):
    group: str | None = None


def agent_view(entry: agents.Agent, price: Price, price_at: str | None) -> AgentView:
    return AgentView(
        agent=entry.agent,
        group=entry.group,
        slug=entry.slug,
        name=entry.name or entry.slug,
        description=entry.description,
        params_schema=entry.params_schema,
        price=price_view(entry.agent, price, price_at),
        updated_at=entry.updated_at,
    )


async def catalog_of(conn: Conn, tenant: str, group: str | None = None) -> list[AgentView]:
    """The tenant's agents with the price in force of each (the default where none is set)."""
    found = await agents.listing(conn, tenant, group)
    prices = {a: (p, at) for a, p, at in await credits.prices(conn, tenant)}
    return [agent_view(e, *prices.get(e.agent, (DEFAULT_PRICE, None))) for e in found]


@endpoint(
    routes,
    "POST",
    "/v1/agents",
    role="admin",
    summary="Define or redefine an agent (agent.defined; price.set with a price)",
    body=AgentBody,
    response=AgentView,
    status=201,
    errors=(403, 422),
    tag="agents",
)
async def define_agent(request: web.Request) -> web.Response:
    who = caller(request)
    body = await read_body(request, AgentBody)
    catalog.split_name(body.agent)
    price = None
    if body.price is not None:
        price = Price(**msgspec.structs.asdict(body.price))
        try:
            validate_price(price)
        except Invalid as exc:
            raise Invalid(exc.message, field=f"price.{exc.field}") from None
    definition = AgentDefined(
        agent=body.agent,
        name=body.name,
        description=body.description,
        params_schema=body.params_schema,
    )

    async def write(uow: UnitOfWork) -> tuple[int, Any, str | None]:
        recorded = await catalog.define(uow, who.tenant, definition, price=price, actor=who.key_id)
        in_force = price if price is not None else await price_in_force(uow, who.tenant, body.agent)
        group, _, slug = body.agent.partition("/")
        entry = agents.Agent(
            agent=body.agent,
            group=group,
            slug=slug,
            name=body.name,
            description=body.description,
            params_schema=body.params_schema,
            position=recorded.position,
            updated_at=recorded.recorded_at,
        )
        price_at = recorded.recorded_at if price is not None else None
        return 201, agent_view(entry, in_force, price_at), None

    return await run_write(request, write)


@endpoint(
    routes,
    "GET",
    "/v1/agents",
    role="reader",
    summary="The agent catalog, by group and slug",
    query=AgentsQuery,
    response=AgentList,
    tag="agents",
)
async def list_agents(request: web.Request) -> web.Response:
    q = read_query(request, AgentsQuery)
    async with store(request).backend.read() as conn:
        found = await catalog_of(conn, caller(request).tenant, q.group)
    return json_response(AgentList(agents=found))
