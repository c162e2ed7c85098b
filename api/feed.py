"""Routes of sections 6 and 7: the event feed, Server-Sent Events, audit export and erasure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import msgspec
import structlog
from aiohttp import web

from api import schemas as s
from api.auth import Caller, bearer
from api.context import KEYRING, STOPPING, caller, store
from api.http import MAX_INT, endpoint, json_response, read_optional_body, read_query
from api.idempotency import Written, run_command
from api.lookups import job_id_of, read_job, time_param
from api.replicas import primary_only
from ledger import audit, commands, scans
from ledger.errors import Forbidden, Invalid
from ledger.events import EVENT_TYPES
from ledger.jobs import JobState
from ledger.records import Recorded
from ledger.store import UnitOfWork
from projections import jobs

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()
HEARTBEAT_SECONDS = 15.0
STREAM_BATCH = 500
KEY_CHECK_SECONDS = 0.5  # an open stream ends within about a second of its key's revocation
# Key events carry key names, roles, projects and secret hashes, webhook events the endpoints'
# URLs, filters and secret hashes: for admins, not for every reader of the feed (the audit
# export, admin-only, keeps them). Every type of both families, today's and any added later.
ADMIN_ONLY_TYPES = tuple(sorted(t for t in EVENT_TYPES if t.startswith(("key.", "webhook."))))


@endpoint(
    routes,
    "GET",
    "/v1/events",
    role="reader",
    summary="The tenant's events in order",
    query=s.EventsQuery,
    response=s.EventsPage,
    tag="events",
)
async def list_events(request: web.Request) -> web.Response:
    q = read_query(request, s.EventsQuery)
    types = tuple(t.strip() for t in (q.types or "").split(",") if t.strip())
    events = await _events(
        request, caller(request), after=q.after, limit=q.limit, types=types, stream=q.job_id
    )
    next_after = events[-1].position if events else q.after
    return json_response(
        s.EventsPage(events=[s.event_view(e) for e in events], next_after=next_after)
    )


async def _events(
    request: web.Request,
    who: Caller,
    *,
    after: int,
    limit: int,
    types: Sequence[str] = (),
    stream: str | None = None,
) -> list[Recorded]:
    """The caller's events after ``after``: the tenant's, or (``X-Project-Id`` or a key
    limited to a project) only the events of that project's jobs."""
    scope = None if who.project is None else jobs.project_streams(who.tenant, who.project)
    return await scans.events_page(
        store(request).backend,
        who.tenant,
        after=after,
        limit=limit,
        types=types,
        hidden_types=() if who.role == "admin" else ADMIN_ONLY_TYPES,
        stream=stream,
        streams_from=scope,
    )


async def _key_still_valid(request: web.Request) -> bool:
    """Whether the stream's key is still active (the key ring re-reads it every half second)."""
    key = await request.app[KEYRING].find(bearer(request))
    return key is not None and key.revoked_at is None


def _resume_from(request: web.Request, after: int | None) -> int:
    last_id = request.headers.get("Last-Event-ID")
    if last_id:
        # ASCII digits only: int() also reads "-1", " 7", "1_0" and digits of other scripts
        if not (last_id.isascii() and last_id.isdigit()) or int(last_id) > MAX_INT:
            raise Invalid("Last-Event-ID must be an event position", field="Last-Event-ID")
        return int(last_id)
    return after or 0


@endpoint(
    routes,
    "GET",
    "/v1/events/stream",
    role="reader",
    summary="Server-Sent Events: every new event, resumable",
    query=s.StreamQuery,
    content="text/event-stream",
    tag="events",
)
@primary_only  # woken by the primary's NOTIFY: a standby may not have replayed it yet
async def stream_events(request: web.Request) -> web.StreamResponse:
    q = read_query(request, s.StreamQuery)
    cursor = _resume_from(request, q.after)
    who = caller(request)
    ledger = store(request)
    stopping = request.app[STOPPING]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    if request.method == "HEAD":  # aiohttp routes HEAD here too: headers only, no body
        return response
    await response.write(b"retry: 1000\n\n")
    last_sent = time.monotonic()
    key_checked = time.monotonic()
    read_at = -1  # the store's change count when a read last came back with nothing
    encode = msgspec.json.encode
    while not stopping.is_set():
        if time.monotonic() - key_checked >= KEY_CHECK_SECONDS:
            if not await _key_still_valid(request):
                log.info("sse.key_revoked", cursor=cursor)
                await response.write(b": the API key was revoked\n\n")
                break
            key_checked = time.monotonic()
        seen = ledger.change_token(who.tenant)  # read first: a commit after it counts again
        if seen != read_at:  # waking for the key check alone costs no read
            events = await _events(request, who, after=cursor, limit=STREAM_BATCH)
            if events:
                chunk = b"".join(
                    b"id: %d\nevent: %s\ndata: %s\n\n"
                    % (e.position, e.type.encode(), encode(s.event_view(e)))
                    for e in events
                )
                await response.write(chunk)
                cursor = events[-1].position
                last_sent = time.monotonic()
                continue
            read_at = seen
        idle = time.monotonic() - last_sent
        if idle >= HEARTBEAT_SECONDS:
            await response.write(b": heartbeat\n\n")
            last_sent = time.monotonic()
            continue
        wait = min(HEARTBEAT_SECONDS - idle, KEY_CHECK_SECONDS)
        waiter = asyncio.ensure_future(ledger.wait_for_change(wait, seen=seen, tenant=who.tenant))
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stop):
            task.cancel()
    return response


@endpoint(
    routes,
    "GET",
    "/v1/audit/head",
    role="admin",
    summary="The end of the tenant's chain",
    response=s.AuditHead,
    tag="audit",
)
async def audit_head(request: web.Request) -> web.Response:
    who = caller(request)
    if who.project is not None:
        raise Forbidden(
            "the chain head covers the whole tenant; a key scoped to a project cannot read it"
        )
    head = await store(request).head(who.tenant)
    position, digest, count = head or (0, "0" * 64, 0)
    return json_response(s.AuditHead(position=position, hash=digest, count=count))


@endpoint(
    routes,
    "GET",
    "/v1/audit/export",
    role="admin",
    summary="Stream the tenant's audit log (NDJSON or CSV)",
    query=s.ExportQuery,
    content="application/x-ndjson",
    also=("text/csv",),
    tag="audit",
)
async def audit_export(request: web.Request) -> web.StreamResponse:
    who = caller(request)
    q = read_query(request, s.ExportQuery)
    streams: frozenset[str] | None = None
    if q.account is not None:
        async with store(request).backend.read(bulk=True) as conn:
            ids = await jobs.stream_ids(conn, who.tenant, account=q.account)
        streams = frozenset([*ids, commands.credits_stream(q.account)])
    if who.project is not None:  # a project's export holds that project's jobs alone
        async with store(request).backend.read(bulk=True) as conn:
            mine = frozenset(await jobs.stream_ids(conn, who.tenant, project=who.project))
        streams = mine if streams is None else streams & mine
    flt = audit.ExportFilter(
        tenant=who.tenant,
        since_us=time_param(q.since, "since"),
        until_us=time_param(q.until, "until"),
        stream=q.job_id,
        streams=streams,
        until_position=await store(request).max_position(),  # a consistent end
    )
    csv_format = q.format == "csv"
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv" if csv_format else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="audit.{q.format}"',
        }
    )
    await response.prepare(request)
    if request.method == "HEAD":  # aiohttp routes HEAD here too: headers only, no body
        return response
    if csv_format:
        await response.write(audit.csv_header())
    async for chunk, _ in audit.export_chunks(store(request).backend, flt, q.format):
        await response.write(chunk)
    await response.write_eof()
    return response


@endpoint(
    routes,
    "POST",
    "/v1/jobs/{id}/redact",
    role="admin",
    summary="Erase a job's data (job.redacted); hashes stay",
    body=s.Reason,
    response=s.JobView,
    errors=(404,),
    tag="audit",
)
async def redact(request: web.Request) -> web.Response:
    who = caller(request)
    job_id = job_id_of(request)
    await read_job(request, job_id)
    body = await read_optional_body(request, s.Reason)

    async def write(uow: UnitOfWork) -> Written[JobState]:
        state = await commands.redact(
            uow, who.tenant, job_id, body.reason, actor=who.key_id, project=who.project
        )
        return Written(200, state)

    return await run_command(request, write, s.job_view, JobState)
