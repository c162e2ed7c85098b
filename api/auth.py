"""Who is calling: Bearer keys (hashed, cached for under a second), roles, rate limits."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web

from api.schemas import Label
from ledger.commands import hash_secret
from ledger.errors import Forbidden, Invalid, LedgerError, Unauthorized
from ledger.sql import Backend
from projections import keys
from projections.keys import ApiKey

KEY_CACHE_SECONDS = 0.5  # a key created or revoked elsewhere takes effect within a second


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of one request."""

    tenant: str
    key_id: str
    role: str
    project: str | None  # the project every read and write of this request is scoped to


class KeyRing:
    """Looks up keys by the SHA-256 of their secret; remembers answers for half a second.

    The answers are kept by the secret itself, so a client's next request within that half
    second costs one dict lookup instead of hashing its secret again (a key created, revoked or
    changed by any process is seen within a second all the same). With the key is kept the
    ``Caller`` of a request that names no project, which is most of them.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._cache: dict[str, tuple[float, ApiKey | None, Caller | None]] = {}

    async def find(self, secret: str) -> ApiKey | None:
        return (self.cached(secret) or await self.lookup(secret))[0]

    def cached(self, secret: str) -> tuple[ApiKey | None, Caller | None] | None:
        """What ``lookup`` answered for ``secret`` less than half a second ago, if it did."""
        hit = self._cache.get(secret)
        if hit is not None and time.monotonic() - hit[0] < KEY_CACHE_SECONDS:
            return hit[1], hit[2]
        return None

    async def lookup(self, secret: str) -> tuple[ApiKey | None, Caller | None]:
        """The key of ``secret`` (``None``: no such key) and, if it is a live key, the caller of
        a request that sends no ``X-Project-Id``; remembered for half a second."""
        now = time.monotonic()
        digest = hash_secret(secret)
        async with self._backend.read() as conn:
            key = await keys.by_secret_hash(conn, digest)
        if key is not None and not hmac.compare_digest(key.secret_sha256, digest):
            key = None
        caller = None
        if key is not None and key.revoked_at is None:
            caller = Caller(key.tenant, key.key_id, key.role, key.project)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[secret] = (now, key, caller)
        return key, caller


def bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("send Authorization: Bearer <api key>")
    return secret.strip()


def bearer_or_apitoken(request: web.Request) -> str:
    """MCRIT's clients send ``apitoken: <secret>``; a Bearer header is accepted as well."""
    token = request.headers.get("apitoken", "").strip()
    if token and "Authorization" not in request.headers:
        return token
    try:
        return bearer(request)
    except Unauthorized:
        raise Unauthorized("send apitoken: <api key> or Authorization: Bearer <api key>") from None


def project_header(request: web.Request) -> str | None:
    """``X-Project-Id``, held to the rule of the ``project`` field of a body (422 otherwise)."""
    project = request.headers.get("X-Project-Id") or None
    if project is not None:
        try:
            msgspec.convert(project, Label)
        except msgspec.ValidationError as exc:
            raise Invalid(f"X-Project-Id: {exc}", field="X-Project-Id") from None
    return project


async def authenticate(
    request: web.Request, ring: KeyRing, credential: Callable[[web.Request], str] = bearer
) -> Caller:
    secret = credential(request)
    key, caller = ring.cached(secret) or await ring.lookup(secret)
    if caller is not None and not request.headers.get("X-Project-Id"):
        return caller  # the key's own scope, as below
    if key is None:
        raise Unauthorized("the API key is not valid")
    if key.revoked_at is not None:
        raise Unauthorized("the API key has been revoked")
    project = project_header(request)
    if key.project is not None:
        if project is not None and project != key.project:
            raise Forbidden(f"this key is limited to project {key.project}")
        project = key.project
    return Caller(tenant=key.tenant, key_id=key.key_id, role=key.role, project=project)


class RateLimited(LedgerError):
    code = "rate_limited"

    def __init__(self, message: str, *, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.headers = headers


class RateLimiter:
    """A fixed one-minute window per key, like GitHub's: limit, remaining, reset (epoch s)."""

    def __init__(self, per_minute: int) -> None:
        self.limit = per_minute
        self._windows: dict[str, tuple[int, int]] = {}

    def hit(self, key_id: str) -> dict[str, str]:
        now = time.time()
        window = int(now // 60)
        start, count = self._windows.get(key_id, (window, 0))
        if start != window:
            start, count = window, 0
        count += 1
        self._windows[key_id] = (start, count)
        reset = (start + 1) * 60
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - count)),
            "X-RateLimit-Reset": str(reset),
        }
        if count > self.limit:
            headers["Retry-After"] = str(max(1, math.ceil(reset - now)))
            raise RateLimited(
                f"more than {self.limit} requests this minute; retry after "
                f"{headers['Retry-After']} s",
                headers=headers,
            )
        return headers
