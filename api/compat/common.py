"""What every dialect shares: its sub-application, time formats, full lists.

A dialect maps; it never computes. Reads go through the same projections and helpers the
native routes use (``api.jobs``), and writes through the same commands.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from api.auth import bearer
from api.http import Handler, endpoint
from api.middleware import Credential, ErrorRenderer, dialect_middleware, native_error

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PAGE = 1000


class Dialect:
    """One seed API: its routes, mounted as a sub-application with its own error middleware.

    ``render`` answers every error of the dialect (auth and unknown routes included) in the
    original's shape; ``credential`` reads the key the way the original's clients send it;
    ``trailing_slash`` also routes every path with a ``/`` appended, for originals that strip
    it (the extra routes are not documented twice).
    """

    def __init__(
        self,
        name: str,
        prefix: str,
        *,
        render: ErrorRenderer = native_error,
        credential: Credential = bearer,
        trailing_slash: bool = False,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.render = render
        self.credential = credential
        self.trailing_slash = trailing_slash
        self.routes = web.RouteTableDef()

    def endpoint(self, method: str, path: str, **options: Any) -> Callable[[Handler], Handler]:
        """``endpoint`` (auth, roles, documentation) for a route inside the sub-application."""
        return endpoint(self.routes, method, path, tag="compat", mount=self.prefix, **options)

    def paths(self) -> list[tuple[str, str]]:
        """``(method, full path)`` of every documented route."""
        return [
            (r.method, self.prefix + r.path) for r in self.routes if isinstance(r, web.RouteDef)
        ]

    def app(self) -> web.Application:
        sub = web.Application(middlewares=[dialect_middleware(self.render, self.credential)])
        sub.add_routes(self.routes)
        if self.trailing_slash:
            for r in self.routes:
                if isinstance(r, web.RouteDef) and not r.path.endswith("/"):
                    sub.router.add_route(r.method, r.path + "/", r.handler)
        return sub


def _utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def seconds_z(us: int | None) -> str | None:
    """``2026-03-30T10:15:00Z``: whole seconds (truncated), UTC."""
    return None if us is None else _utc(us).strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds_naive(us: int | None) -> str | None:
    """``2024-01-15T10:30:00``: whole seconds (truncated), UTC without a zone suffix."""
    return None if us is None else _utc(us).strftime("%Y-%m-%dT%H:%M:%S")


def millis_z(us: int | None) -> str | None:
    """``2026-06-08T12:00:00.000Z``: milliseconds (truncated), UTC."""
    if us is None:
        return None
    dt = _utc(us)
    return f"{dt.strftime('%Y-%m-%dT%H:%M:%S')}.{dt.microsecond // 1000:03d}Z"
