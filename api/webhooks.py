"""Routes of signed webhooks: register, inspect, change, rotate, delete, delivery log, recover.

Every change to an endpoint is an event on ``$webhooks/<id>`` in the tenant's chain; the signing
secret is answered once (registration, rotation) and never stored in an event. See
docs/webhooks.md.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from api.context import caller, settings, store
from api.delivery import WEBHOOKS, check_target
from api.http import endpoint, json_response, read_body, read_query
from api.idempotency import Written, run_command
from api.replicas import POSITION_HEADER
from api.schemas import Body, Deleted, Label, Position, Query
from ledger import webhooks as hooks
from ledger.clock import format_opt, format_us, parse_us
from ledger.errors import Invalid, NotFound
from ledger.events import UNSET, UnsetType, WebhookUpdated
from ledger.store import UnitOfWork
from projections import webhooks as endpoints

routes = web.RouteTableDef()

Url = Annotated[str, Meta(min_length=1, max_length=hooks.MAX_URL)]
EventTypes = Annotated[list[Annotated[str, Meta(max_length=100)]], Meta(max_length=64)]
Description = Annotated[str, Meta(max_length=1000)]


class RegisterWebhook(Body):
    url: Url
    event_types: EventTypes | None = None  # null: every job event
    project: Label | None = None
    description: Description | None = None


class UpdateWebhook(Body):
    url: Url | UnsetType = UNSET
    event_types: EventTypes | UnsetType | None = UNSET
    project: Label | UnsetType | None = UNSET
    description: Description | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET


class RecoverBody(Body):
    since: Position | str  # a position, or an RFC 3339 time (events that occurred then or later)


class DeliveriesQuery(Query):
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50
    before: Annotated[str, Meta(max_length=64)] | None = None


class DeliveryState(msgspec.Struct, kw_only=True):
    position: int | None  # the last position this endpoint is done with
    head: int  # the tenant's last position
    attempt: int  # failed attempts at the next event
    next_attempt_at: str | None
    failing_since: str | None


class WebhookView(msgspec.Struct, kw_only=True):
    id: str
    url: str
    event_types: list[str] | None
    project: str | None
    description: str | None
    enabled: bool
    disabled_reason: str | None
    created_at: str
    updated_at: str
    delivery: DeliveryState


class WebhookCreated(WebhookView, kw_only=True):
    secret: str  # shown only this once: ``whsec_`` + base64


class WebhookList(msgspec.Struct, kw_only=True):
    webhooks: list[WebhookView]


class RotatedSecret(msgspec.Struct, kw_only=True):
    id: str
    secret: str
    previous_secret_expires_at: str  # until then both secrets sign every delivery


class Delivery(msgspec.Struct, kw_only=True):
    id: str
    event_id: str
    position: int
    event_type: str
    attempt: int
    outcome: str  # delivered, failed (a retry follows), gave_up, gone
    response_status: int | None
    latency_ms: float
    error: str | None
    response_body: str | None
    attempted_at: str
    next_retry_at: str | None


class DeliveryLog(msgspec.Struct, kw_only=True):
    deliveries: list[Delivery]
    next_before: str | None
    delivery: DeliveryState


class Recovering(msgspec.Struct, kw_only=True):
    id: str
    from_position: int  # every matching event after this one goes out again


def _state(ep: endpoints.Endpoint) -> DeliveryState:
    return DeliveryState(
        position=ep.position,
        head=ep.head,
        attempt=ep.attempt,
        next_attempt_at=format_opt(ep.next_us) if ep.attempt else None,
        failing_since=format_opt(ep.failing_since_us),
    )


def _view(ep: endpoints.Endpoint) -> WebhookView:
    return WebhookView(
        id=ep.id,
        url=ep.url,
        event_types=ep.event_types,
        project=ep.project,
        description=ep.description,
        enabled=ep.enabled,
        disabled_reason=ep.disabled_reason,
        created_at=ep.created_at,
        updated_at=ep.updated_at,
        delivery=_state(ep),
    )


def _kick(request: web.Request) -> None:
    dispatcher = request.app.get(WEBHOOKS)
    if dispatcher is not None:
        dispatcher.kick()


async def _endpoint(request: web.Request) -> endpoints.Endpoint:
    who = caller(request)
    webhook_id = request.match_info["id"]
    async with store(request).backend.read() as conn:
        ep = await endpoints.get(conn, who.tenant, webhook_id, project=who.project)
    if ep is None:
        raise NotFound(f"no webhook {webhook_id}")
    return ep


def _scoped_project(request: web.Request, project: str | None) -> str | None:
    scope = caller(request).project
    if scope is not None and project is not None and project != scope:
        raise Invalid(f"this request is scoped to project {scope!r}", field="project")
    return scope if scope is not None else project


@endpoint(
    routes,
    "POST",
    "/v1/webhooks",
    role="admin",
    summary="Register a webhook endpoint (webhook.registered); answers its secret once",
    body=RegisterWebhook,
    response=WebhookCreated,
    status=201,
    tag="webhooks",
)
async def register(request: web.Request) -> web.Response:
    who = caller(request)
    body = await read_body(request, RegisterWebhook)
    url = check_target(body.url, settings(request).webhook_allow_hosts)
    types = hooks.check_event_types(body.event_types)
    project = _scoped_project(request, body.project)

    async def write(uow: UnitOfWork) -> Written[WebhookCreated]:
        made = await hooks.register(
            uow,
            who.tenant,
            url=url,
            event_types=types,
            project=project,
            description=body.description,
            actor=who.key_id,
        )
        st = made.state
        answer = WebhookCreated(
            id=st.id,
            url=st.url,
            event_types=st.event_types,
            project=st.project,
            description=st.description,
            enabled=True,
            disabled_reason=None,
            created_at=st.created_at,
            updated_at=st.updated_at,
            delivery=DeliveryState(
                position=made.recorded.position,
                head=made.recorded.position,
                attempt=0,
                next_attempt_at=None,
                failing_since=None,
            ),
            secret=made.secret,
        )
        return Written(201, answer, st.id)  # the id lets a deletion forget this stored answer

    response = await run_command(request, write, _same, WebhookCreated)
    _kick(request)
    return response


@endpoint(
    routes,
    "GET",
    "/v1/webhooks",
    role="admin",
    summary="Webhook endpoints (never their secrets)",
    response=WebhookList,
    tag="webhooks",
)
async def list_webhooks(request: web.Request) -> web.Response:
    who = caller(request)
    async with store(request).backend.read() as conn:
        found = await endpoints.listing(conn, who.tenant, project=who.project)
    return json_response(WebhookList(webhooks=[_view(ep) for ep in found]))


@endpoint(
    routes,
    "GET",
    "/v1/webhooks/{id}",
    role="admin",
    summary="One webhook endpoint and its delivery state",
    response=WebhookView,
    tag="webhooks",
)
async def get_webhook(request: web.Request) -> web.Response:
    return json_response(_view(await _endpoint(request)))


@endpoint(
    routes,
    "PATCH",
    "/v1/webhooks/{id}",
    role="admin",
    summary="Change an endpoint (webhook.updated); enabled=true re-enables a disabled one",
    body=UpdateWebhook,
    response=WebhookView,
    tag="webhooks",
)
async def update_webhook(request: web.Request) -> web.Response:
    who = caller(request)
    webhook_id = (await _endpoint(request)).id  # another tenant's id: 404 before the body
    body = await read_body(request, UpdateWebhook)
    if body.url is not UNSET:
        check_target(body.url, settings(request).webhook_allow_hosts)
    types = body.event_types
    if types is not UNSET:
        types = hooks.check_event_types(types)
    project = body.project
    if project is not UNSET:
        if who.project is not None and project != who.project:
            raise Invalid(f"this request is scoped to project {who.project!r}", field="project")
    if all(value is UNSET for value in (body.url, types, project, body.description, body.enabled)):
        raise Invalid("nothing to change: send url, event_types, project, description or enabled")
    changes = WebhookUpdated(
        webhook_id=webhook_id,
        url=body.url,
        event_types=types,
        project=project,
        description=body.description,
        enabled=body.enabled,
    )

    async def write(uow: UnitOfWork) -> Written[None]:
        await hooks.update(
            uow, who.tenant, webhook_id, changes, scope=who.project, actor=who.key_id
        )
        return Written(200, None, webhook_id)

    written = await run_command(request, write, _same, None)
    _kick(request)
    response = json_response(_view(await _endpoint(request)))
    response.headers[POSITION_HEADER] = written.headers[POSITION_HEADER]
    return response


@endpoint(
    routes,
    "DELETE",
    "/v1/webhooks/{id}",
    role="admin",
    summary="Delete an endpoint (webhook.deleted); its secret and delivery log are erased",
    response=Deleted,
    tag="webhooks",
)
async def delete_webhook(request: web.Request) -> web.Response:
    who = caller(request)
    webhook_id = request.match_info["id"]

    async def write(uow: UnitOfWork) -> Written[Deleted]:
        await hooks.delete(uow, who.tenant, webhook_id, scope=who.project, actor=who.key_id)
        return Written(200, Deleted(deleted=1))

    return await run_command(request, write, _same, Deleted)


@endpoint(
    routes,
    "POST",
    "/v1/webhooks/{id}/rotate",
    role="admin",
    summary="A new signing secret (webhook.secret_rotated); the old one signs too for 24 h",
    response=RotatedSecret,
    tag="webhooks",
)
async def rotate(request: web.Request) -> web.Response:
    who = caller(request)
    webhook_id = request.match_info["id"]

    async def write(uow: UnitOfWork) -> Written[RotatedSecret]:
        made = await hooks.rotate(uow, who.tenant, webhook_id, scope=who.project, actor=who.key_id)
        answer = RotatedSecret(
            id=webhook_id,
            secret=made.secret,
            previous_secret_expires_at=format_us(made.previous_expires_us),
        )
        return Written(200, answer, webhook_id)

    return await run_command(request, write, _same, RotatedSecret)


@endpoint(
    routes,
    "GET",
    "/v1/webhooks/{id}/deliveries",
    role="admin",
    summary="The delivery log: every attempt, newest first",
    query=DeliveriesQuery,
    response=DeliveryLog,
    tag="webhooks",
)
async def deliveries(request: web.Request) -> web.Response:
    who = caller(request)
    q = read_query(request, DeliveriesQuery)
    ep = await _endpoint(request)
    async with store(request).backend.read() as conn:
        rows = await hooks.attempts_log(conn, who.tenant, ep.id, limit=q.limit, before=q.before)
    items = [
        Delivery(
            id=attempt_id,
            event_id=a.event_id,
            position=a.position,
            event_type=a.event_type,
            attempt=a.attempt,
            outcome=a.outcome,
            response_status=a.response_status,
            latency_ms=round(a.latency_us / 1000, 3),
            error=a.error,
            response_body=a.response_body,
            attempted_at=format_us(a.at_us),
            next_retry_at=format_opt(a.next_us),
        )
        for attempt_id, a in rows
    ]
    next_before = items[-1].id if len(items) == q.limit else None
    return json_response(
        DeliveryLog(deliveries=items, next_before=next_before, delivery=_state(ep))
    )


@endpoint(
    routes,
    "POST",
    "/v1/webhooks/{id}/recover",
    role="admin",
    summary="Send every matching event again from a position or a time, re-signed",
    body=RecoverBody,
    response=Recovering,
    status=202,
    tag="webhooks",
)
async def recover(request: web.Request) -> web.Response:
    who = caller(request)
    webhook_id = (await _endpoint(request)).id  # another tenant's id: 404 before the body
    body = await read_body(request, RecoverBody)
    since_us = None if isinstance(body.since, int) else parse_us(body.since, field="since")

    async def write(uow: UnitOfWork) -> Written[Recovering]:
        since = body.since
        if since_us is not None:
            since = await hooks.first_position_since(uow.conn, who.tenant, since_us)
        assert isinstance(since, int)
        position = await hooks.recover(
            uow, who.tenant, webhook_id, since_position=since, scope=who.project
        )
        return Written(202, Recovering(id=webhook_id, from_position=position))

    response = await run_command(request, write, _same, Recovering)
    _kick(request)
    return response


def _same(answer: Any) -> Any:
    """These answers are the commands' values themselves (small structs of the routes)."""
    return answer
