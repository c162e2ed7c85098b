"""Request context, authentication and the one error envelope, as one aiohttp middleware."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from aiohttp import web

from api.auth import RateLimited, authenticate
from api.context import CALLER, KEYRING, LIMITER
from api.http import ROLE_RANK, Handler, error_body, json_response
from ledger import errors
from ledger.ids import ulid

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
ERROR_RENDERERS: dict[str, ErrorRenderer] = {}


def status_of(error: errors.LedgerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


def _from_http(exc: web.HTTPException) -> errors.LedgerError:
    error = errors.LedgerError(exc.reason if exc.status != 413 else "the request body is too large")
    error.code = HTTP_CODES.get(exc.status, "error")
    return error


def _render(request: web.Request, status: int, error: errors.LedgerError) -> web.StreamResponse:
    dialect = getattr(request.match_info.handler, "__dialect__", None)
    renderer = ERROR_RENDERERS.get(dialect) if dialect else None
    if renderer is not None:
        return renderer(status, error)
    return json_response(error_body(error), status)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


@web.middleware
async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One middleware for every request: context, auth, roles, rate limit, error envelope.

    It binds a request id for the logs, resolves the caller from the Bearer key, checks the
    route's role and the key's rate limit, answers every error in the envelope (or the
    dialect's shape), and logs one line per request.
    """
    request_id = request.headers.get("X-Request-Id", "")[:64] or ulid()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        request_id=request_id, method=request.method, path=request.path
    )
    started = time.perf_counter()
    extra: dict[str, str] = {}
    try:
        match = request.match_info
        if match.http_exception is not None:
            raise match.http_exception
        role = getattr(match.handler, "__role__", "public")
        if role != "public":
            caller = await authenticate(request, request.app[KEYRING])
            request[CALLER] = caller
            structlog.contextvars.bind_contextvars(key_id=caller.key_id, tenant=caller.tenant)
            limiter = request.app.get(LIMITER)
            if limiter is not None:
                extra = limiter.hit(caller.key_id)
            if ROLE_RANK[caller.role] < ROLE_RANK[role]:
                raise errors.Forbidden(
                    f"this route needs the {role} role; the key has {caller.role}"
                )
        response = await handler(request)
    except errors.LedgerError as exc:
        if isinstance(exc, RateLimited):
            extra = exc.headers
        response = _render(request, status_of(exc), exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _render(request, exc.status, _from_http(exc))
    except web.RequestPayloadError:  # e.g. Content-Encoding: gzip on a body that is not gzip
        error = errors.BadRequest("the request body cannot be read as its headers describe it")
        response = _render(request, 400, error)
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and _client_gone(request):
            log.info("http.client_gone", ms=round((time.perf_counter() - started) * 1000, 2))
            raise  # the client left mid-stream: no one to answer, nothing went wrong
        log.exception("http.unhandled")
        err = errors.LedgerError("an internal error occurred; it has been logged")
        err.code = "internal"
        response = _render(request, 500, err)
    if not response.prepared:
        if extra:
            response.headers.update(extra)
        response.headers["X-Request-Id"] = request_id
    log.info(
        "http.request",
        status=response.status,
        ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return response
