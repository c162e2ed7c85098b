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
from api.http import endpoint, json_response, plain_amount, read_body, read_query
from api.idempotency import Written, run_command
from ledger import agents as catalog
from ledger.commands import price_in_force
from ledger.credits import PRICE_FIELDS, validate_price
from ledger.errors import Invalid
from ledger.events import DEFAULT_PRICE, AgentDefined, Price
from ledger.records import Recorded
from ledger.sql import Conn
from ledger.store import UnitOfWork
from projections import agents, credits

routes = web.RouteTableDef()


AgentName = Annotated[str, Meta(min_length=3, max_length=200)]  # "group/slug"


class PriceIn(s.Body):
    per_job: Decimal = Decimal(0)
    per_row: Decimal = Decimal(0)
    per_execution: Decimal = Decimal(0)
    per_second: Decimal = Decimal(0)


class AgentBody(s.Body):
    name: AgentName | None = None
    agent: AgentName | None = None  # the same as ``name``, as jobs and prices call it
    title: Annotated[str, Meta(max_length=200)] | None = None
    description: Annotated[str, Meta(max_length=10_000)] = ""
    params_schema: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None  # Mindcase's parameter list instead of a schema
    price: Decimal | PriceIn | None = None  # a number is credits per row


class AgentView(msgspec.Struct):
    name: str
    agent: str
    group: str
    slug: str
    title: str | None
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
        name=entry.agent,
        agent=entry.agent,
        group=entry.group,
        slug=entry.slug,
        title=entry.title,
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


def _name(body: AgentBody) -> str:
    if body.name is not None and body.agent is not None and body.name != body.agent:
        raise Invalid("name and agent differ; send one", field="agent")
    name = body.name or body.agent
    if name is None:
        raise Invalid("name the agent as group/slug", field="name")
    try:
        catalog.split_name(name)
    except Invalid as exc:
        raise Invalid(exc.message, field="name" if body.name else "agent") from None
    return name


def _schema(body: AgentBody) -> dict[str, Any]:
    if body.params_schema is not None and body.parameters is not None:
        raise Invalid("send params_schema or parameters, not both", field="parameters")
    if body.parameters is not None:
        if catalog.looks_like_schema(body.parameters):
            return body.parameters  # a JSON Schema sent under Mindcase's word
        return catalog.schema_from_parameters(body.parameters)
    return body.params_schema if body.params_schema is not None else {}


def _price(body: AgentBody) -> Price | None:
    if body.price is None:
        return None
    if isinstance(body.price, Decimal):
        price = Price(per_row=body.price)
    else:
        price = Price(**msgspec.structs.asdict(body.price))
    try:
        validate_price(price)
    except Invalid as exc:
        field = "price" if isinstance(body.price, Decimal) else f"price.{exc.field}"
        raise Invalid(exc.message, field=field) from None
    return price


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
    sent = msgspec.json.decode(await request.read()).get("price")  # read_body decoded it
    if isinstance(sent, dict):
        for name in PRICE_FIELDS:
            plain_amount(sent.get(name), f"price.{name}")
    else:
        plain_amount(sent, "price")
    name = _name(body)
    price = _price(body)
    schema = _schema(body)
    definition = AgentDefined(
        agent=name, title=body.title, description=body.description, params_schema=schema
    )

    async def write(uow: UnitOfWork) -> Written[tuple[Recorded, Price]]:
        recorded = await catalog.define(uow, who.tenant, definition, price=price, actor=who.key_id)
        in_force = price if price is not None else await price_in_force(uow, who.tenant, name)
        return Written(201, (recorded, in_force))

    def render(value: tuple[Recorded, Price]) -> Any:
        recorded, in_force = value
        group, _, slug = name.partition("/")
        entry = agents.Agent(
            agent=name,
            group=group,
            slug=slug,
            title=body.title,
            description=body.description,
            params_schema=schema,
            position=recorded.position,
            updated_at=recorded.recorded_at,
        )
        price_at = recorded.recorded_at if price is not None else None
        return agent_view(entry, in_force, price_at)

    return await run_command(request, write, render, tuple[Recorded, Price])


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
