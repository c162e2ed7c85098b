"""The event vocabulary: frozen, tagged msgspec Structs, one per event type.

A Struct holds an event's ``data``; its tag is the stable dotted ``type`` stored with it. Evolve
an event only by adding fields with defaults. Fields the ledger fills in itself (a job's price,
a result's hash) are marked *server*; callers that send them get ``422``.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, TypeGuard

import msgspec

from ledger.errors import Invalid
from ledger.limits import Count, LongText, Name, Text

UNSET = msgspec.UNSET
UnsetType = msgspec.UnsetType


class Event(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True
):
    """Base of every event's data."""


class Source(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    repository: Text | None = None
    ref: Text | None = None


class Person(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: Text | None = None
    email: Text | None = None
    first_name: Text | None = None
    last_name: Text | None = None


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    code: Text = "error"
    message: LongText = ""


class Price(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Credits an agent costs, in exact decimals (at most 4 fractional digits)."""

    per_job: Decimal = Decimal(0)
    per_row: Decimal = Decimal(1)
    per_execution: Decimal = Decimal(0)
    per_second: Decimal = Decimal(0)


DEFAULT_PRICE = Price()


# --- job events -----------------------------------------------------------------------------


class JobQueued(Event, frozen=True, kw_only=True, tag="job.queued"):
    agent: Name
    account: Name = "default"
    project: Name | None = None
    params: dict[str, Any] = {}
    source: Source | None = None
    model: Text | None = None
    created_by: Person | None = None
    executions_total: Count = 0
    price: Price = DEFAULT_PRICE  # server: the price in force at this position


class JobStarted(Event, frozen=True, kw_only=True, tag="job.started"):
    pass


class JobProgressed(Event, frozen=True, kw_only=True, tag="job.progressed"):
    row_count: Count | None = None
    message: LongText | None = None


class JobCompleted(Event, frozen=True, kw_only=True, tag="job.completed"):
    row_count: Count | None = None
    result: Any | UnsetType = UNSET  # taken out before storing; the results store keeps it
    result_id: str | None = None  # server
    result_sha256: str | None = None  # server
    result_size: int | None = None  # server
    expires_at: str | None = None  # server


class JobFailed(Event, frozen=True, kw_only=True, tag="job.failed"):
    error: ErrorInfo | None = None


class JobCancelled(Event, frozen=True, kw_only=True, tag="job.cancelled"):
    reason: Text | None = None


class JobArchived(Event, frozen=True, kw_only=True, tag="job.archived"):
    pass


class JobPrLinked(Event, frozen=True, kw_only=True, tag="job.pr_linked"):
    pr_link: Text


class JobDeleted(Event, frozen=True, kw_only=True, tag="job.deleted"):
    pass


class JobRedacted(Event, frozen=True, kw_only=True, tag="job.redacted"):
    reason: Text | None = None
    state: dict[str, Any] | None = None  # server: what the job keeps after erasure


class ExecutionsPlanned(Event, frozen=True, kw_only=True, tag="job.executions_planned"):
    total: Count


class ExecutionRetrying(Event, frozen=True, kw_only=True, tag="job.execution_retrying"):
    execution_id: Name


class ExecutionSucceeded(Event, frozen=True, kw_only=True, tag="job.execution_succeeded"):
    execution_id: Name


class ExecutionFailed(Event, frozen=True, kw_only=True, tag="job.execution_failed"):
    execution_id: Name


# --- tenant events --------------------------------------------------------------------------


class KeyCreated(Event, frozen=True, kw_only=True, tag="key.created"):
    key_id: str
    role: str
    name: Text | None = None
    project: Name | None = None
    secret_sha256: str


class KeyRevoked(Event, frozen=True, kw_only=True, tag="key.revoked"):
    key_id: str


class PriceSet(Event, frozen=True, kw_only=True, tag="price.set"):
    agent: Name
    price: Price


class CreditsGranted(Event, frozen=True, kw_only=True, tag="credits.granted"):
    account: Name
    amount: Decimal
    reason: Text | None = None


class AgentDefined(Event, frozen=True, kw_only=True, tag="agent.defined"):
    """An agent of the tenant's catalog, defined or redefined (the latest one is in force)."""

    agent: str  # "group/slug"
    title: str | None = None  # a display name
    description: str = ""
    params_schema: dict[str, Any] = {}  # a JSON Schema subset (``ledger.agents``)


# --- webhook events (stream ``$webhooks/<id>``; the signing secret is never in an event) ------


class WebhookRegistered(Event, frozen=True, kw_only=True, tag="webhook.registered"):
    webhook_id: str
    url: str
    event_types: list[str] | None = None  # None: every job event
    project: str | None = None
    description: str | None = None
    secret_sha256: str  # server: identifies the secret without revealing it


class WebhookUpdated(Event, frozen=True, kw_only=True, tag="webhook.updated"):
    """Only the fields that changed are present."""

    webhook_id: str
    url: str | UnsetType = UNSET
    event_types: list[str] | UnsetType | None = UNSET
    project: str | UnsetType | None = UNSET
    description: str | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET


class WebhookDeleted(Event, frozen=True, kw_only=True, tag="webhook.deleted"):
    webhook_id: str


class WebhookSecretRotated(Event, frozen=True, kw_only=True, tag="webhook.secret_rotated"):
    webhook_id: str
    secret_sha256: str  # server: the new secret's hash
    previous_expires_at: str  # server: until when the old secret keeps signing too


class WebhookDisabled(Event, frozen=True, kw_only=True, tag="webhook.disabled"):
    webhook_id: str
    reason: str
    code: str = "disabled"  # ``gone`` (the endpoint answered 410), ``failing`` (for days)


JobEvent = (
    JobQueued
    | JobStarted
    | JobProgressed
    | JobCompleted
    | JobFailed
    | JobCancelled
    | JobArchived
    | JobPrLinked
    | JobDeleted
    | JobRedacted
    | ExecutionsPlanned
    | ExecutionRetrying
    | ExecutionSucceeded
    | ExecutionFailed
)
WebhookEvent = (
    WebhookRegistered | WebhookUpdated | WebhookDeleted | WebhookSecretRotated | WebhookDisabled
)
TenantEvent = KeyCreated | KeyRevoked | PriceSet | CreditsGranted | AgentDefined | WebhookEvent
AnyEvent = JobEvent | TenantEvent

JOB_EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in JobEvent.__args__  # type: ignore[attr-defined]
}
EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in AnyEvent.__args__  # type: ignore[attr-defined]
}
# Events a caller may post to a job's stream; the others are made by dedicated routes.
POSTABLE_TYPES = frozenset(JOB_EVENT_TYPES) - {"job.queued", "job.redacted"}

_ENCODER = msgspec.json.Encoder(decimal_format="string")
_DECODERS = {tag: msgspec.json.Decoder(cls) for tag, cls in EVENT_TYPES.items()}


_JOB_CLASSES = frozenset(JOB_EVENT_TYPES.values())


def is_job_event(event: Event) -> TypeGuard[JobEvent]:
    """Whether ``event`` belongs on a job's stream (the fold's ``match`` is then exhaustive)."""
    return type(event) in _JOB_CLASSES


def event_type(event: Event) -> str:
    return event.__struct_config__.tag  # type: ignore[return-value]


def to_data(event: Event) -> dict[str, Any]:
    """The event's ``data`` as plain JSON values (decimals as strings), without the tag."""
    data: dict[str, Any] = msgspec.json.decode(_ENCODER.encode(event))
    data.pop("type", None)
    return data


def from_data(type_: str, data: dict[str, Any] | None) -> Event:
    """Build the typed event from stored or posted ``data``; ``Invalid`` names the bad field."""
    cls = EVENT_TYPES.get(type_)
    if cls is None:
        raise Invalid(f"unknown event type {type_!r}", field="type")
    try:
        return msgspec.convert(data or {}, cls)
    except msgspec.ValidationError as exc:
        raise Invalid(f"bad data for {type_}: {exc}", field=field_of(exc, "data")) from None


def decode_stored(type_: str, raw: bytes | str | None) -> Event | None:
    """Decode a stored event's data text; ``None`` for erased (redacted) data."""
    if raw is None:
        return None
    return _DECODERS[type_].decode(raw)  # type: ignore[no-any-return]


def field_of(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """The dotted path of the field a msgspec error blames: ``data.row_count``, ``agent``."""
    text = str(exc)
    path = ""
    if " - at `$" in text:
        text, _, where = text.rpartition(" - at `$")
        path = where.rstrip("`")
    named = _NAMED_FIELD.search(text)
    if named:
        path += "." + named.group(1)
    return (prefix + path).lstrip(".") or prefix or "$"


_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")
