"""Signed webhooks: endpoints are events, delivery state is operational data the ledger owns.

An endpoint lives on the stream ``$webhooks/<id>`` of its tenant's chain (``webhook.registered``,
``webhook.updated``, ``webhook.secret_rotated``, ``webhook.disabled``, ``webhook.deleted``). The
signing secret is never in an event (they carry its SHA-256): it sits in ``webhook_secrets``
beside the events, written in the same transaction, read by every server process, erased when
the endpoint is deleted, and never exported.

Delivery state is operational too (``webhook_cursors``, ``webhook_attempts``): each endpoint has a
cursor, the position of the last event it is done with, and a lease; the process holding the
lease sends the next matching event after the cursor, in position order, and moves the cursor
only after a 2xx (or once the retry schedule gives the event up). Payloads are never copied:
each attempt reads the event from the log, so an erased (``job.redacted``) event goes out erased.

Signatures follow the Standard Webhooks specification, with its reference implementation.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import random
import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec
from standardwebhooks import Webhook

from ledger.clock import format_us
from ledger.errors import Conflict, Invalid, NotFound
from ledger.events import (
    EVENT_TYPES,
    UNSET,
    Event,
    WebhookDeleted,
    WebhookDisabled,
    WebhookRegistered,
    WebhookSecretRotated,
    WebhookUpdated,
    decode_stored,
)
from ledger.ids import ulid
from ledger.records import EVENT_COLUMNS, Recorded
from ledger.sql import Conn
from ledger.store import UnitOfWork

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
ROTATION_OVERLAP_US = 24 * 3600 * 1_000_000
# Standard Webhooks' suggested schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
DEFAULT_DISABLE_AFTER_S = 5 * 86400.0
JITTER = 0.2  # each delay is drawn from ±20 % of the schedule's
MAX_RETRY_AFTER_S = 86400.0
MAX_URL = 2048
MAX_EVENT_TYPES = 64
SYSTEM_ACTOR = "system:webhooks"
# Key events are not for pushing; every other type may be asked for by name or ``prefix.*``.
DELIVERABLE_TYPES = frozenset(t for t in EVENT_TYPES if not t.startswith("key."))


def stream_of(webhook_id: str) -> str:
    return f"$webhooks/{webhook_id}"


def new_webhook_id() -> str:
    return "wh_" + ulid()


def new_secret() -> str:
    """``whsec_`` + base64 of 32 random bytes: the Standard Webhooks secret format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- rules ------------------------------------------------------------------------------------


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# IPv6 prefixes that reach IPv4 hosts: the well-known NAT64 prefix translates the low 32 bits,
# the deprecated IPv4-compatible ``::a.b.c.d`` carries them. 6to4, Teredo and IPv4-mapped
# addresses are read by ``ipaddress`` itself.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# The local-use NAT64 prefix (RFC 8215): translated by the operator's own gateway, into its own
# network, with an embedding we cannot know. Never a delivery address, unless allowed by name.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def _ipv4_behind(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses a connection to ``ip`` reaches or passes through, if it embeds any
    (IPv4-mapped addresses are the caller's: they are IPv4 addresses)."""
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # not ``::`` nor ``::1``
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo  # the relay server and the client behind it
    return ()


def _ip_allowed(host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_loopback:
        return is_loopback(host)
    return ip.is_global and not ip.is_multicast


def address_allowed(host: str, address: str, allow_hosts: Collection[str] = ()) -> bool:
    """May a delivery for ``host`` connect to ``address`` (one of the addresses it resolved to)?

    Public addresses, yes. Loopback only when the URL names loopback itself (``localhost``,
    ``127.0.0.1``), so a public name that resolves to ``127.0.0.1`` (DNS rebinding) is refused.
    Private, link-local (the cloud metadata service at 169.254.169.254), shared, multicast,
    site-local and reserved addresses only for hosts the operator named with
    ``--webhook-allow-host``: a tenant must not reach the operator's internal network through
    the deliveries. An IPv6 address that embeds an IPv4 one (IPv4-compatible, NAT64, 6to4,
    Teredo) must pass for itself and for every IPv4 address it reaches; an IPv4-mapped one is
    that IPv4 address.
    """
    if host.lower() in {h.lower() for h in allow_hosts}:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # the IPv4 address itself, written as IPv6
        elif ip in _NAT64_LOCAL or ip.is_site_local:
            return False
        elif not all(_ip_allowed(host, v4) for v4 in _ipv4_behind(ip)):
            return False
    return _ip_allowed(host, ip)


def _ascii_host(host: str) -> str:
    """The host as a client connects to it: an internationalized name in its ASCII form, folded
    (NFKC) as IDNA folds it. ``１９２.０.２.２`` (full-width digits), ``10。0。0。1`` (ideographic
    full stops) and ``①⓪.0.0.1`` are the IP addresses they become on the wire, not names. A
    host Python's IDNA 2003 codec refuses (some valid IDNA 2008 names) stays as written: a
    name, resolved and checked at every attempt, and the server also checks the URL in the
    form its HTTP client sends (``api.delivery.check_target``)."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return host


# What a client may take for an IPv4 address without asking a resolver (aiohttp does), or a
# resolver may read as one (``127.1``, ``2130706433``, ``10.0.0.1.``): only the dotted quad
# is judged as an address here, so the other forms are refused outright.
_IPV4_LIKE = re.compile(r"[0-9.]+")


def check_url(url: str, allow_hosts: Collection[str] = ()) -> str:
    """The URL if deliveries may go there: ``https``, or ``http`` to loopback or allowed hosts.

    The host is judged in its ASCII form (``_ascii_host``): a host that is an IP address there
    must be one ``address_allowed`` accepts; a name is checked against the addresses it
    resolves to, at every attempt (api/delivery.py).
    """
    if len(url) > MAX_URL:
        raise Invalid(f"url is longer than {MAX_URL} characters", field="url")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise Invalid("url must not contain whitespace or control characters", field="url")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise Invalid(f"url is not a valid URL: {exc}", field="url") from None
    host = _ascii_host(host)
    if _IPV4_LIKE.fullmatch(host) and not _is_address(host):
        raise Invalid(
            "url's host is written like an IPv4 address but is not one: write a.b.c.d",
            field="url",
        )
    if parts.scheme not in ("https", "http") or not host:
        raise Invalid("url must be an absolute https:// URL", field="url")
    allowed = {h.lower() for h in allow_hosts}
    if _is_address(host) and not address_allowed(host, host, allow_hosts):
        raise Invalid(
            "url points at a private, link-local or reserved address; deliveries go to public "
            "addresses (and loopback) unless the operator allows the host with "
            "--webhook-allow-host",
            field="url",
        )
    if parts.scheme == "http" and not (is_loopback(host) or host.lower() in allowed):
        raise Invalid(
            "url must use https (http only for loopback or hosts named by --webhook-allow-host)",
            field="url",
        )
    return url


def check_event_types(types: Sequence[str] | None) -> list[str] | None:
    """Known event types, or ``prefix.*`` patterns; ``None`` means every ``job.*`` event."""
    if types is None:
        return None
    if not types:
        raise Invalid("event_types must name at least one type (or be null)", field="event_types")
    if len(types) > MAX_EVENT_TYPES:
        raise Invalid(f"at most {MAX_EVENT_TYPES} event_types", field="event_types")
    out: list[str] = []
    for index, name in enumerate(types):
        known = (
            any(t.startswith(name[:-1]) for t in DELIVERABLE_TYPES)
            if name.endswith(".*")
            else name in DELIVERABLE_TYPES
        )
        if not known:
            raise Invalid(f"unknown event type {name!r}", field=f"event_types[{index}]")
        if name not in out:
            out.append(name)
    return out


def matches(event_types: Sequence[str] | None, type_: str) -> bool:
    if event_types is None:
        return type_.startswith("job.")
    return any(type_ == t or (t.endswith(".*") and type_.startswith(t[:-1])) for t in event_types)


def type_filter(event_types: Sequence[str] | None) -> tuple[str, list[Any]]:
    """The SQL condition (and parameters) ``matches`` stands for."""
    names = ["job.*"] if event_types is None else list(event_types)
    exact = [t for t in names if not t.endswith(".*")]
    prefixes = [t[:-1] for t in names if t.endswith(".*")]
    terms: list[str] = []
    params: list[Any] = []
    if exact:
        terms.append(f"type IN ({', '.join('?' * len(exact))})")
        params.extend(exact)
    for prefix in prefixes:
        terms.append("substr(type, 1, ?) = ?")
        params.extend([len(prefix), prefix])
    return "(" + " OR ".join(terms) + ")", params


def parse_schedule(text: str) -> tuple[float, ...]:
    """``0,5s,5m,30m,2h,5h,10h,10h``; ``1s*20`` repeats a delay; bare numbers are seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    out: list[float] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        spec, _, times = item.partition("*")
        spec = spec.strip()
        unit = next((u for u in ("ms", "s", "m", "h", "d") if spec.endswith(u)), "")
        try:
            seconds = float(spec[: len(spec) - len(unit)]) * units.get(unit, 1.0)
            count = int(times) if times else 1
        except ValueError:
            raise ValueError(f"not a delay: {item!r} (use e.g. 0,5s,5m,2h or 1s*10)") from None
        if seconds < 0 or not 1 <= count <= 1000 or seconds != seconds:
            raise ValueError(f"not a delay: {item!r}")
        out.extend([seconds] * count)
    if not out:
        raise ValueError("the retry schedule needs at least one delay")
    return tuple(out)


def next_delay(
    schedule: Sequence[float],
    attempts: int,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds until attempt ``attempts + 1`` (jittered, at least ``Retry-After``); ``None``
    once the schedule is spent."""
    if attempts >= len(schedule):
        return None
    base = schedule[attempts]
    delay = base * (1 + JITTER * (2 * (rng or random).random() - 1))
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def sign(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    text = body.decode()
    return " ".join(Webhook(s).sign(msg_id=msg_id, timestamp=when, data=text) for s in secrets_)


# -- the endpoint, folded from its stream -----------------------------------------------------


@dataclass(slots=True)
class WebhookState:
    id: str
    url: str
    event_types: list[str] | None
    project: str | None
    description: str | None
    secret_sha256: str
    created_at: str
    updated_at: str
    enabled: bool = True
    disabled_reason: str | None = None
    deleted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def evolve(state: WebhookState | None, event: Event, recorded_at: str) -> WebhookState | None:
    if isinstance(event, WebhookRegistered):
        return WebhookState(
            id=event.webhook_id,
            url=event.url,
            event_types=event.event_types,
            project=event.project,
            description=event.description,
            secret_sha256=event.secret_sha256,
            created_at=recorded_at,
            updated_at=recorded_at,
        )
    if state is None:
        return None
    state.updated_at = recorded_at
    if isinstance(event, WebhookUpdated):
        if event.url is not UNSET:
            state.url = event.url
        if event.event_types is not UNSET:
            state.event_types = event.event_types
        if event.project is not UNSET:
            state.project = event.project
        if event.description is not UNSET:
            state.description = event.description
        if event.enabled is not UNSET:
            state.enabled = event.enabled
            if event.enabled:
                state.disabled_reason = None
    elif isinstance(event, WebhookSecretRotated):
        state.secret_sha256 = event.secret_sha256
    elif isinstance(event, WebhookDisabled):
        state.enabled = False
        state.disabled_reason = event.reason
    elif isinstance(event, WebhookDeleted):
        state.deleted = True
    return state


async def load(uow: UnitOfWork, tenant: str, webhook_id: str) -> WebhookState | None:
    """The endpoint as its committed stream stands, and gone or disabled if a command earlier
    in this batch (staged, not yet written) deleted or disabled it."""
    stream = stream_of(webhook_id)
    rows = await uow.conn.fetchall(
        "SELECT type, data, recorded_at FROM events WHERE tenant = ? AND stream = ? "
        "ORDER BY version",
        (tenant, stream),
    )
    state: WebhookState | None = None
    for type_, data, recorded_at in rows:
        event = decode_stored(type_, data)
        if event is not None:
            state = evolve(state, event, recorded_at)
    latest = await uow.latest(tenant, stream)
    if state is not None and isinstance(latest, WebhookDeleted | WebhookDisabled):
        state = evolve(state, latest, state.updated_at)
    return state


async def _live(uow: UnitOfWork, tenant: str, webhook_id: str, project: str | None) -> WebhookState:
    state = await load(uow, tenant, webhook_id)
    if state is None or state.deleted or (project is not None and state.project != project):
        raise NotFound(f"no webhook {webhook_id}")
    return state


# -- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registered:
    state: WebhookState
    secret: str
    recorded: Recorded


async def register(
    uow: UnitOfWork,
    tenant: str,
    *,
    url: str,
    event_types: list[str] | None,
    project: str | None,
    description: str | None,
    actor: str,
) -> Registered:
    """Append ``webhook.registered``; the secret goes to ``webhook_secrets`` in the same commit.

    The cursor starts at the registration's own position: later events are delivered.
    """
    webhook_id = new_webhook_id()
    secret = new_secret()
    event = WebhookRegistered(
        webhook_id=webhook_id,
        url=url,
        event_types=event_types,
        project=project,
        description=description,
        secret_sha256=secret_hash(secret),
    )
    recorded = await uow.append(tenant, stream_of(webhook_id), event, actor=actor)
    # operational rows last: nothing in this command can fail after them
    await uow.conn.execute(
        "INSERT INTO webhook_secrets (tenant, webhook_id, secret, created_us, expires_us) "
        "VALUES (?, ?, ?, ?, NULL)",
        (tenant, webhook_id, secret, uow.now),
    )
    await uow.conn.execute(
        "INSERT INTO webhook_cursors (tenant, webhook_id, position) VALUES (?, ?, ?)",
        (tenant, webhook_id, recorded.position),
    )
    state = evolve(None, event, recorded.recorded_at)
    assert state is not None
    return Registered(state, secret, recorded)


async def update(
    uow: UnitOfWork,
    tenant: str,
    webhook_id: str,
    changes: WebhookUpdated,
    *,
    scope: str | None,
    actor: str,
) -> WebhookState:
    state = await _live(uow, tenant, webhook_id, scope)
    recorded = await uow.append(tenant, stream_of(webhook_id), changes, actor=actor)
    moved = changes.url is not UNSET and changes.url != state.url
    if (changes.enabled is True and not state.enabled) or moved:
        # a fresh start: the next attempt now, the failure streak forgotten
        await uow.conn.execute(
            "UPDATE webhook_cursors SET attempt = 0, next_us = 0, failing_since_us = NULL, "
            "generation = generation + 1 WHERE tenant = ? AND webhook_id = ?",
            (tenant, webhook_id),
        )
    after = evolve(state, changes, recorded.recorded_at)
    assert after is not None
    return after


async def delete(
    uow: UnitOfWork, tenant: str, webhook_id: str, *, scope: str | None, actor: str
) -> None:
    """Append ``webhook.deleted`` and erase its secrets, cursor and delivery log."""
    await _live(uow, tenant, webhook_id, scope)
    await uow.append(
        tenant, stream_of(webhook_id), WebhookDeleted(webhook_id=webhook_id), actor=actor
    )
    for table in ("webhook_secrets", "webhook_cursors", "webhook_attempts"):
        await uow.conn.execute(
            f"DELETE FROM {table} WHERE tenant = ? AND webhook_id = ?", (tenant, webhook_id)
        )
    # an Idempotency-Key replay of the registration or a rotation would answer the secret
    await uow.conn.execute(
        "DELETE FROM idempotency WHERE tenant = ? AND job_id = ?", (tenant, webhook_id)
    )


@dataclass(frozen=True, slots=True)
class Rotated:
    state: WebhookState
    secret: str
    previous_expires_us: int


async def rotate(
    uow: UnitOfWork,
    tenant: str,
    webhook_id: str,
    *,
    scope: str | None,
    actor: str,
    overlap_us: int = ROTATION_OVERLAP_US,
) -> Rotated:
    """A new secret; the ones still current keep signing beside it for ``overlap_us``."""
    state = await _live(uow, tenant, webhook_id, scope)
    secret = new_secret()
    expires = uow.now + overlap_us
    event = WebhookSecretRotated(
        webhook_id=webhook_id,
        secret_sha256=secret_hash(secret),
        previous_expires_at=format_us(expires),
    )
    recorded = await uow.append(tenant, stream_of(webhook_id), event, actor=actor)
    conn = uow.conn
    await conn.execute(
        "DELETE FROM webhook_secrets WHERE tenant = ? AND webhook_id = ? AND expires_us <= ?",
        (tenant, webhook_id, uow.now),
    )
    await conn.execute(
        "UPDATE webhook_secrets SET expires_us = ? "
        "WHERE tenant = ? AND webhook_id = ? AND expires_us IS NULL",
        (expires, tenant, webhook_id),
    )
    await conn.execute(
        "INSERT INTO webhook_secrets (tenant, webhook_id, secret, created_us, expires_us) "
        "VALUES (?, ?, ?, ?, NULL)",
        (tenant, webhook_id, secret, uow.now),
    )
    after = evolve(state, event, recorded.recorded_at)
    assert after is not None
    return Rotated(after, secret, expires)


async def disable(uow: UnitOfWork, tenant: str, webhook_id: str, *, reason: str, code: str) -> bool:
    """Append ``webhook.disabled`` unless it is already disabled or gone (several processes
    may decide it at once); whether it did."""
    state = await load(uow, tenant, webhook_id)
    if state is None or state.deleted or not state.enabled:
        return False
    event = WebhookDisabled(webhook_id=webhook_id, reason=reason, code=code)
    await uow.append(tenant, stream_of(webhook_id), event, actor=SYSTEM_ACTOR)
    return True


async def recover(
    uow: UnitOfWork, tenant: str, webhook_id: str, *, since_position: int, scope: str | None
) -> int:
    """Move the cursor back so every matching event from ``since_position`` on goes out again
    (re-signed when sent); the cursor never moves forward here. The new cursor."""
    await _live(uow, tenant, webhook_id, scope)
    row = await uow.conn.fetchone(
        "SELECT position FROM webhook_cursors WHERE tenant = ? AND webhook_id = ?",
        (tenant, webhook_id),
    )
    if row is None:
        raise Conflict(f"webhook {webhook_id} has no delivery cursor")
    position = min(int(row[0]), max(0, since_position - 1))
    await uow.conn.execute(
        "UPDATE webhook_cursors SET position = ?, attempt = 0, next_us = 0, "
        "generation = generation + 1 WHERE tenant = ? AND webhook_id = ?",
        (position, tenant, webhook_id),
    )
    return position


async def first_position_since(conn: Conn, tenant: str, since_us: int) -> int:
    """The first position of the tenant's events that occurred at or after ``since_us``."""
    row = await conn.fetchone(
        "SELECT min(position) FROM events WHERE tenant = ? AND occurred_us >= ?",
        (tenant, since_us),
    )
    if row is None or row[0] is None:
        head = await conn.fetchone("SELECT position FROM chain_heads WHERE tenant = ?", (tenant,))
        return (int(head[0]) if head else 0) + 1
    return int(row[0])


# -- delivery state ---------------------------------------------------------------------------


class Cursor(msgspec.Struct, kw_only=True):
    position: int
    generation: int
    attempt: int
    next_us: int
    failing_since_us: int | None
    lease_owner: str | None = None
    lease_until_us: int = 0


_CURSOR = "position, generation, attempt, next_us, failing_since_us, lease_owner, lease_until_us"


def _cursor(row: Sequence[Any] | None) -> Cursor | None:
    if row is None:
        return None
    return Cursor(
        position=int(row[0]),
        generation=int(row[1]),
        attempt=int(row[2]),
        next_us=int(row[3]),
        failing_since_us=row[4],
        lease_owner=row[5],
        lease_until_us=int(row[6]),
    )


async def cursor(conn: Conn, tenant: str, webhook_id: str) -> Cursor | None:
    return _cursor(
        await conn.fetchone(
            f"SELECT {_CURSOR} FROM webhook_cursors WHERE tenant = ? AND webhook_id = ?",
            (tenant, webhook_id),
        )
    )


async def claim(
    conn: Conn, tenant: str, webhook_id: str, *, owner: str, now: int, lease_us: int
) -> Cursor | None:
    """Take (or extend) the endpoint's lease unless another process holds it; its cursor.

    Run inside a write transaction: every writer is serialised, so two processes can never
    both see the lease free.
    """
    return _cursor(
        await conn.fetchone(
            "UPDATE webhook_cursors SET lease_owner = ?, lease_until_us = ? "
            "WHERE tenant = ? AND webhook_id = ? AND (lease_until_us < ? OR lease_owner = ?) "
            f"RETURNING {_CURSOR}",
            (owner, now + lease_us, tenant, webhook_id, now, owner),
        )
    )


async def release(
    conn: Conn, owner: str, tenant: str | None = None, webhook_id: str | None = None
) -> None:
    sql = "UPDATE webhook_cursors SET lease_owner = NULL, lease_until_us = 0 WHERE lease_owner = ?"
    params: list[Any] = [owner]
    if tenant is not None and webhook_id is not None:
        sql += " AND tenant = ? AND webhook_id = ?"
        params.extend([tenant, webhook_id])
    await conn.execute(sql, params)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt, as the delivery log keeps it (never the payload)."""

    position: int
    stream: str
    event_id: str
    event_type: str
    attempt: int
    at_us: int
    outcome: str  # delivered, failed (will retry), gave_up, skipped (url refused), gone
    response_status: int | None
    latency_us: int
    error: str | None
    response_body: str | None
    next_us: int | None


async def record(
    conn: Conn,
    tenant: str,
    webhook_id: str,
    *,
    owner: str,
    generation: int,
    attempts_log: Sequence[Attempt],
    position: int,
    attempts: int,
    next_us: int,
    failing_since_us: int | None,
    lease_until_us: int,
    release: bool = False,
) -> bool:
    """Log the attempts and move the cursor, if the lease and the generation are still ours
    (a recovery bumps the generation); whether the cursor moved."""
    if attempts_log:
        # an answer may echo the event: none is kept for an event erased meanwhile (a redaction
        # committed after this one nulls the answers itself)
        positions = sorted({a.position for a in attempts_log if a.response_body})
        erased: set[int] = set()
        if positions:
            rows = await conn.fetchall(
                "SELECT position FROM events WHERE tenant = ? AND redacted = 1 "
                f"AND position IN ({', '.join('?' * len(positions))})",
                [tenant, *positions],
            )
            erased = {int(r[0]) for r in rows}
        await conn.executemany(
            "INSERT INTO webhook_attempts (attempt_id, tenant, webhook_id, position, stream, "
            "event_id, event_type, attempt, at_us, outcome, response_status, latency_us, error, "
            "response_body, next_us, worker) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    "wha_" + ulid(),
                    tenant,
                    webhook_id,
                    a.position,
                    a.stream,
                    a.event_id,
                    a.event_type,
                    a.attempt,
                    a.at_us,
                    a.outcome,
                    a.response_status,
                    a.latency_us,
                    a.error,
                    None if a.position in erased else a.response_body,
                    a.next_us,
                    owner,
                )
                for a in attempts_log
            ],
        )
    row = await conn.fetchone(
        "UPDATE webhook_cursors SET position = ?, attempt = ?, next_us = ?, "
        "failing_since_us = ?, lease_until_us = ?, lease_owner = ? "
        "WHERE tenant = ? AND webhook_id = ? AND lease_owner = ? AND generation = ? "
        "RETURNING position",
        (
            position,
            attempts,
            next_us,
            failing_since_us,
            lease_until_us,
            None if release else owner,
            tenant,
            webhook_id,
            owner,
            generation,
        ),
    )
    return row is not None


async def signing_secrets(conn: Conn, tenant: str, webhook_id: str, now: int) -> list[str]:
    """The current secret and any rotated-out one still inside its overlap, newest first."""
    rows = await conn.fetchall(
        "SELECT secret FROM webhook_secrets WHERE tenant = ? AND webhook_id = ? "
        "AND (expires_us IS NULL OR expires_us > ?) ORDER BY created_us DESC",
        (tenant, webhook_id, now),
    )
    return [r[0] for r in rows]


async def next_events(
    conn: Conn,
    tenant: str,
    *,
    after: int,
    until: int,
    event_types: Sequence[str] | None,
    streams_from: tuple[str, Sequence[Any]] | None = None,
    limit: int = 1,
) -> list[Recorded]:
    """The next events after ``after`` (up to ``until``) the endpoint asked for, in order."""
    condition, params = type_filter(event_types)
    sql = (
        f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant = ? AND position > ? "
        f"AND position <= ? AND {condition}"
    )
    args: list[Any] = [tenant, after, until, *params]
    if streams_from is not None:
        sql += f" AND stream IN ({streams_from[0]})"
        args.extend(streams_from[1])
    rows = await conn.fetchall(sql + " ORDER BY position LIMIT ?", [*args, limit])
    return [Recorded.from_row(r) for r in rows]


async def head_position(conn: Conn, tenant: str) -> int:
    row = await conn.fetchone("SELECT position FROM chain_heads WHERE tenant = ?", (tenant,))
    return int(row[0]) if row else 0


async def attempts_log(
    conn: Conn, tenant: str, webhook_id: str, *, limit: int, before: str | None = None
) -> list[tuple[str, Attempt]]:
    """The endpoint's delivery log, newest first: ``(attempt_id, attempt)``."""
    sql = (
        "SELECT attempt_id, position, stream, event_id, event_type, attempt, at_us, outcome, "
        "response_status, latency_us, error, response_body, next_us FROM webhook_attempts "
        "WHERE tenant = ? AND webhook_id = ?"
    )
    params: list[Any] = [tenant, webhook_id]
    if before is not None:
        sql += " AND attempt_id < ?"
        params.append(before)
    rows = await conn.fetchall(sql + " ORDER BY attempt_id DESC LIMIT ?", [*params, limit])
    return [(r[0], Attempt(*r[1:])) for r in rows]


async def forget_responses(conn: Conn, tenant: str, stream: str) -> None:
    """Erase what receivers answered about a redacted job's events (an echo may hold its data)."""
    await conn.execute(
        "UPDATE webhook_attempts SET response_body = NULL WHERE tenant = ? AND stream = ?",
        (tenant, stream),
    )


async def prune_attempts(conn: Conn, older_than_us: int) -> None:
    await conn.execute("DELETE FROM webhook_attempts WHERE at_us < ?", (older_than_us,))
