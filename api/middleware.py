"""One aiohttp middleware: request context, authentication, metrics, the one error envelope."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from api import logs, replicas
from api.auth import RateLimited, authenticate, bearer
from api.context import CALLER, KEYRING, LIMITER, SETTINGS
from api.http import ROLE_RANK, Handler, error_body, json_response
from api.metrics import METHODS, METRICS, UNMATCHED
from ledger import errors
from ledger.ids import ulid
from ledger.limits import bad_text

log = structlog.get_logger(__name__)

STATUS: dict[type[errors.LedgerError], int] = {
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.InsufficientCredits: 402,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.ResultsExpired: 410,
    errors.Invalid: 422,
    RateLimited: 429,
    errors.StoreUnavailable: 503,
}
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
}

# A dialect renders errors in its own shape: (status, error) -> response.
ErrorRenderer = Callable[[int, errors.LedgerError], web.StreamResponse]
# Where a request's secret comes from: the Bearer header, or a dialect's own header.
Credential = Callable[[web.Request], str]


def status_of(error: errors.LedgerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


def _from_http(exc: web.HTTPException) -> errors.LedgerError:
    error = errors.LedgerError(exc.reason if exc.status != 413 else "the request body is too large")
    error.code = HTTP_CODES.get(exc.status, "error")
    return error


def native_error(status: int, error: errors.LedgerError) -> web.StreamResponse:
    """The contract's envelope: ``{"error": {"code", "message", "field"?}}``."""
    return json_response(error_body(error), status)


def _check_text(request: web.Request, in_dialect: bool, project: str | None) -> None:
    """No control character reaches a query: 422 naming the parameter, on every backend.

    A dialect checks its ids its own way; ``project`` is the ``X-Project-Id`` header.
    """
    if not in_dialect:
        for name, value in request.match_info.items():
            if bad_text(value):
                raise errors.Invalid(f"{name} holds a control character", field=name)
    if request.query_string:  # most requests have none: no MultiDict to build
        for name, value in request.query.items():
            if bad_text(name) or bad_text(value):
                raise errors.Invalid(
                    f"query parameter {name!r} holds a control character", field=name
                )
    if project is not None and bad_text(project):
        raise errors.Invalid("X-Project-Id holds a control character", field="X-Project-Id")


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def guarded(render: ErrorRenderer, credential: Credential, *, root: bool) -> Middleware:
    """A middleware doing, for every request, what the API promises around its handlers.

    It binds a request id for the logs, resolves the caller from the key ``credential`` reads,
    checks the route's role and the key's rate limit, answers every error with ``render``,
    logs one line per request and counts the request in the metrics (``api/metrics.py``), by
    route template and status. The ``root`` application's passes a request routed into a
    dialect's sub-application on to it: the dialect's own (``dialect_middleware``) does the
    same work with its credential and error shape.

    One function, without helpers to call on the way: this runs for every request, and each
    call of a coroutine costs about as much as the checks themselves.
    """

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        match = request.match_info
        if root and len(match.apps) > 1:
            return await handler(request)
        started = time.perf_counter()
        headers = request.headers
        request_id = headers.get("X-Request-Id")
        request_id = request_id[:64] if request_id else ulid()
        method = request.method
        fields = logs.bind_request(request_id=request_id, method=method, path=request.path)
        app = request.app
        metrics = app.get(METRICS) if root else request.config_dict.get(METRICS)
        resource = match.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        stream = metrics is not None and metrics.is_stream(route)
        if stream:
            metrics.streams.inc()  # type: ignore[union-attr]
        status = 499  # the client went away mid-request (nginx's name for it), unless answered
        extra: dict[str, str] = {}
        try:
            try:
                if match.http_exception is not None:
                    raise match.http_exception
                project = headers.get("X-Project-Id")
                _check_text(request, not root, project)
                role = getattr(match.handler, "__role__", "public")
                if role == "public":
                    response = await handler(request)
                else:
                    ring = app.get(KEYRING) or request.config_dict[KEYRING]
                    caller = await authenticate(request, ring, credential)
                    request[CALLER] = caller
                    fields["key_id"] = caller.key_id
                    fields["tenant"] = caller.tenant
                    limiter = app.get(LIMITER) if root else request.config_dict.get(LIMITER)
                    if limiter is not None:
                        extra = limiter.hit(caller.key_id)
                    if ROLE_RANK[caller.role] < ROLE_RANK[role]:
                        raise errors.Forbidden(
                            f"this route needs the {role} role; the key has {caller.role}"
                        )
                    settings = app.get(SETTINGS) or request.config_dict[SETTINGS]
                    if settings.replicas or replicas.POSITION_HEADER in headers:
                        with replicas.Routed(request, caller, settings):  # a standby may answer
                            response = await handler(request)
                    else:  # no standby to route to, no position to check
                        response = await handler(request)
            except errors.LedgerError as exc:
                if isinstance(exc, RateLimited):
                    extra = exc.headers
                response = render(status_of(exc), exc)
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise
                response = render(exc.status, _from_http(exc))
            except web.RequestPayloadError:  # e.g. Content-Encoding: gzip on a non-gzip body
                error = errors.BadRequest(
                    "the request body cannot be read as its headers describe it"
                )
                response = render(400, error)
            except Exception as exc:
                if isinstance(exc, ConnectionResetError) and _client_gone(request):
                    log.info("http.client_gone", ms=_ms(started))
                    raise  # the client left mid-stream: no one to answer, nothing went wrong
                log.exception("http.unhandled")
                err = errors.LedgerError("an internal error occurred; it has been logged")
                err.code = "internal"
                response = render(500, err)
            status = response.status
            if not response.prepared:
                if extra:
                    response.headers.update(extra)
                response.headers["X-Request-Id"] = request_id
            logs.access(status, _ms(started))
            return response
        finally:
            if metrics is not None:
                if stream:
                    metrics.streams.dec()
                metrics.observe(
                    method if method in METHODS else "other",
                    route,
                    status,
                    time.perf_counter() - started,
                )

    return guard


def _ms(started: float) -> float:
    """Milliseconds since ``started``, to 0.01 ms (``round(x, 2)`` costs five times more)."""
    return round((time.perf_counter() - started) * 100_000) / 100


# The application's middleware: context, auth, roles, rate limit, error envelope, metrics.
handle = guarded(native_error, bearer, root=True)


def dialect_middleware(render: ErrorRenderer, credential: Credential = bearer) -> Middleware:
    """A sub-application's middleware: the same work with the dialect's credential and errors."""
    return guarded(render, credential, root=False)
