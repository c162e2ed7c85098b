"""Commands: the ledger's write operations, each run by the store inside one transaction.

A command reads the state it needs through the ``UnitOfWork``, decides which events to append
(the state machine refuses what the contract forbids), and stages them. It returns the state the
caller answers with, so every write answers with the job as it stands after the write.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from ledger.clock import MAX_US, format_us
from ledger.credits import from_units
from ledger.errors import (
    Conflict,
    InsufficientCredits,
    Invalid,
    JobNotFound,
    NotFound,
    VersionConflict,
)
from ledger.events import (
    UNSET,
    CreditsGranted,
    Event,
    JobArchived,
    JobCancelled,
    JobCompleted,
    JobDeleted,
    JobQueued,
    JobRedacted,
    KeyCreated,
    KeyRevoked,
    Price,
    PriceSet,
)
from ledger.ids import new_key_id, new_result_id
from ledger.jobs import JobState, redaction_snapshot
from ledger.records import CreditTotals, Recorded
from ledger.store import UnitOfWork

ROLES = ("reader", "writer", "admin")
SECRET_PREFIX = re.compile(r"^[a-z0-9_]{1,32}$")
DEFAULT_SECRET_PREFIX = "jl_"
_ENCODE = msgspec.json.Encoder(decimal_format="number").encode


def price_stream(agent: str) -> str:
    return f"$prices/{agent}"


def credits_stream(account: str) -> str:
    return f"$credits/{account}"


def key_stream(key_id: str) -> str:
    return f"$keys/{key_id}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def _live_job(
    uow: UnitOfWork, tenant: str, job_id: str, project: str | None = None
) -> JobState:
    """The job, unless deleted or outside ``project`` (when the caller is scoped to one)."""
    job = await uow.job(tenant, job_id)
    if job is None or job.deleted or (project is not None and job.project != project):
        raise JobNotFound(f"no job {job_id}")
    return job


async def price_in_force(uow: UnitOfWork, tenant: str, agent: str) -> Price:
    """The latest ``price.set`` of the agent's price stream, read from the history itself."""
    event = await uow.latest(tenant, price_stream(agent))
    return event.price if isinstance(event, PriceSet) else Price()


async def create_job(
    uow: UnitOfWork,
    tenant: str,
    job_id: str,
    queued: JobQueued,
    *,
    actor: str,
    occurred_us: int | None = None,
    enforce_credits: bool = False,
    fresh_id: bool = False,
) -> JobState:
    """Append ``job.queued`` with the agent's price in force at this position.

    ``enforce_credits``: refuse the job (402) when its account has no credits left, counting
    every earlier write of this transaction. ``fresh_id``: the server made the id just now, so
    it cannot exist yet.
    """
    if await uow.job(tenant, job_id, fresh=fresh_id) is not None:
        raise Conflict(f"job {job_id} already exists", field="id")
    price = await price_in_force(uow, tenant, queued.agent)
    if enforce_credits:
        totals = await uow.credit_totals(tenant, queued.account)
        available = totals.granted - totals.used
        if available <= 0:
            raise InsufficientCredits(
                f"account {queued.account} has no credits left",
                credits_available=from_units(available),
            )
    event = msgspec.structs.replace(queued, price=price)
    state, _ = await uow.apply(
        tenant, job_id, event, actor=actor, occurred_us=occurred_us, fresh=fresh_id
    )
    return state


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event a caller posts to a job's stream."""

    event: Event
    event_id: str | None = None
    expected_version: int | None = None
    occurred_us: int | None = None


async def append_events(
    uow: UnitOfWork,
    tenant: str,
    job_id: str,
    items: Sequence[NewEvent],
    *,
    actor: str,
    retention_s: int,
    project: str | None = None,
) -> tuple[JobState, list[Recorded]]:
    """Append every item, or none; an ``event_id`` seen before appends nothing again."""
    state = await _live_job(uow, tenant, job_id, project)
    records: list[Recorded] = []
    for item in items:
        if item.event_id is not None:
            seen = await uow.find_event(tenant, item.event_id)
            if seen is not None:
                if seen.stream != job_id:
                    raise Conflict(
                        f"event_id {item.event_id} is already taken; choose another",
                        field="event_id",
                    )
                records.append(seen)
                continue
        if item.expected_version is not None and item.expected_version != state.version:
            raise _version_conflict(job_id, item.expected_version, state.version)
        event = item.event
        if isinstance(event, JobCompleted):
            event = _store_result(uow, tenant, job_id, event, state, item, retention_s)
        state, recorded = await uow.apply(
            tenant,
            job_id,
            event,
            actor=actor,
            occurred_us=item.occurred_us,
            event_id=item.event_id,
        )
        records.append(recorded)
    return state, records


def _version_conflict(job_id: str, expected: int, actual: int) -> Conflict:
    return VersionConflict(
        f"job {job_id} is at version {actual}, not {expected}",
        field="expected_version",
        current_version=actual,
    )


def _store_result(
    uow: UnitOfWork,
    tenant: str,
    job_id: str,
    event: JobCompleted,
    state: JobState,
    item: NewEvent,
    retention_s: int,
) -> JobCompleted:
    """Move a completion's result into the results store; the event keeps its hash and size."""
    if any(v is not None for v in (event.result_id, event.result_sha256, event.result_size)) or (
        event.expires_at is not None
    ):
        raise Invalid(
            "result_id, result_sha256, result_size and expires_at are set by the ledger",
            field="data",
        )
    finished = item.occurred_us if item.occurred_us is not None else uow.now
    finished = max(finished, state.updated_at)
    expires = min(finished + retention_s * 1_000_000, MAX_US)
    if event.result is UNSET or event.result is None:
        return msgspec.structs.replace(event, result=UNSET, expires_at=format_us(expires))
    payload = _ENCODE(event.result)
    row_count = event.row_count
    if row_count is None and isinstance(event.result, list):
        row_count = len(event.result)
    result_id = new_result_id()
    uow.put_result(tenant, result_id, job_id, payload.decode(), expires)
    return msgspec.structs.replace(
        event,
        result=UNSET,
        row_count=row_count,
        result_id=result_id,
        result_sha256=hashlib.sha256(payload).hexdigest(),
        result_size=len(payload),
        expires_at=format_us(expires),
    )


async def transition(
    uow: UnitOfWork,
    tenant: str,
    job_id: str,
    event: Event,
    *,
    actor: str,
    project: str | None = None,
) -> JobState:
    """Cancel, archive, delete or link: one event, checked by the state machine."""
    await _live_job(uow, tenant, job_id, project)
    state, _ = await uow.apply(tenant, job_id, event, actor=actor)
    return state


async def cancel(
    uow: UnitOfWork,
    tenant: str,
    job_id: str,
    reason: str | None,
    *,
    actor: str,
    project: str | None = None,
) -> JobState:
    event = JobCancelled(reason=reason)
    return await transition(uow, tenant, job_id, event, actor=actor, project=project)


async def archive(
    uow: UnitOfWork, tenant: str, job_id: str, *, actor: str, project: str | None = None
) -> JobState:
    return await transition(uow, tenant, job_id, JobArchived(), actor=actor, project=project)


async def delete(
    uow: UnitOfWork, tenant: str, job_id: str, *, actor: str, project: str | None = None
) -> JobState:
    return await transition(uow, tenant, job_id, JobDeleted(), actor=actor, project=project)


async def delete_many(
    uow: UnitOfWork,
    tenant: str,
    job_ids: Sequence[str],
    *,
    actor: str,
    still: Callable[[JobState], bool],
) -> int:
    """Delete every listed job that is live and ``still`` matches the filter it was found by
    (it may have changed since the ids were read); the count deleted."""
    deleted = 0
    for job_id in job_ids:
        job = await uow.job(tenant, job_id)
        if job is not None and not job.deleted and still(job):
            await uow.apply(tenant, job_id, JobDeleted(), actor=actor)
            deleted += 1
    return deleted


async def redact(
    uow: UnitOfWork,
    tenant: str,
    job_id: str,
    reason: str | None,
    *,
    actor: str,
    project: str | None = None,
) -> JobState:
    """Append ``job.redacted`` and erase the data of the job's earlier events and results."""
    job = await _live_job(uow, tenant, job_id, project)
    event = JobRedacted(reason=reason, state=redaction_snapshot(job))
    state, recorded = await uow.apply(tenant, job_id, event, actor=actor)
    uow.erase(tenant, job_id, recorded.position)
    return state


async def set_price(
    uow: UnitOfWork, tenant: str, agent: str, price: Price, *, actor: str
) -> Recorded:
    return await uow.append(
        tenant, price_stream(agent), PriceSet(agent=agent, price=price), actor=actor
    )


@dataclass(frozen=True, slots=True)
class Granted:
    """A grant's event and the account's totals right after it."""

    recorded: Recorded
    totals: CreditTotals


async def grant(uow: UnitOfWork, tenant: str, grant_: CreditsGranted, *, actor: str) -> Granted:
    recorded = await uow.append(tenant, credits_stream(grant_.account), grant_, actor=actor)
    return Granted(recorded, await uow.credit_totals(tenant, grant_.account))


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    secret: str
    recorded: Recorded


async def create_key(
    uow: UnitOfWork,
    tenant: str,
    role: str,
    *,
    name: str | None = None,
    project: str | None = None,
    actor: str = "cli",
    secret_prefix: str = DEFAULT_SECRET_PREFIX,
) -> NewKey:
    """A new API key; the secret leaves only in the answer, the ledger keeps its hash.

    ``secret_prefix`` lets a tenant hand its customers keys in the format their SDK expects
    (Mindcase's refuses any key not starting ``mk_live_``); only the hash is stored either way.
    """
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}", field="role")
    if not SECRET_PREFIX.match(secret_prefix):
        raise Invalid("a secret prefix is 1-32 of [a-z0-9_]", field="secret_prefix")
    key_id = new_key_id()
    secret = secret_prefix + secrets.token_urlsafe(32)
    event = KeyCreated(
        key_id=key_id, role=role, name=name, project=project, secret_sha256=hash_secret(secret)
    )
    recorded = await uow.append(tenant, key_stream(key_id), event, actor=actor)
    return NewKey(key_id=key_id, secret=secret, recorded=recorded)


async def revoke_key(uow: UnitOfWork, tenant: str, key_id: str, *, actor: str = "cli") -> Recorded:
    latest = await uow.latest(tenant, key_stream(key_id))
    if latest is None:
        raise NotFound(f"no key {key_id}")
    if isinstance(latest, KeyRevoked):
        raise Conflict(f"key {key_id} is already revoked")
    return await uow.append(tenant, key_stream(key_id), KeyRevoked(key_id=key_id), actor=actor)
