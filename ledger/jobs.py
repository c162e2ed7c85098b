"""The job aggregate: its state, and the state machine that folds events into it.

``evolve`` is the one fold, used by the write path (with ``check=True`` it enforces the
contract's transitions), by replays for time travel, and by projection rebuilds.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, assert_never

import msgspec

from ledger.clock import format_us, parse_us
from ledger.credits import charge, from_units, to_units
from ledger.errors import Invalid, InvalidTransition
from ledger.events import (
    DEFAULT_PRICE,
    ErrorInfo,
    Event,
    ExecutionFailed,
    ExecutionRetrying,
    ExecutionsPlanned,
    ExecutionSucceeded,
    JobArchived,
    JobCancelled,
    JobCompleted,
    JobDeleted,
    JobEvent,
    JobFailed,
    JobPrLinked,
    JobProgressed,
    JobQueued,
    JobRedacted,
    JobStarted,
    Person,
    Price,
    Source,
    is_job_event,
)
from ledger.limits import MAX_COUNT, MAX_EXECUTIONS

STATUSES = ("queued", "running", "completed", "partial_failed", "failed", "cancelled")
OPEN = frozenset({"queued", "running"})
FINISHED = frozenset({"completed", "partial_failed", "failed", "cancelled"})
BILLABLE = frozenset({"completed", "partial_failed"})
# Events still allowed once a job has finished.
AFTER_FINISH = frozenset({JobArchived, JobPrLinked, JobDeleted, JobRedacted})


class JobState(msgspec.Struct, kw_only=True, gc=False):
    """Everything the ledger knows about one job; times are epoch microseconds.

    ``gc=False``: its fields are decoded JSON and strings, which cannot form a reference
    cycle, so the cyclic collector need not walk the hundreds of thousands a replay holds.
    (Not ``omit_defaults``: msgspec omits a default only when it is the same object, so a live
    state and its replay would be stored differently.)
    """

    id: str
    status: str = "queued"
    agent: str = ""
    account: str = "default"
    project: str | None = None
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    updated_at: int = 0
    archived_at: int | None = None
    expires_at: int | None = None
    row_count: int = 0
    credits_used: int = 0  # ten-thousandths
    exec_total: int = 0
    exec_pending: int = 0
    exec_retrying: int = 0
    exec_succeeded: int = 0
    exec_failed: int = 0
    executions: dict[str, str] = {}
    error: ErrorInfo | None = None
    source: Source | None = None
    model: str | None = None
    pr_link: str | None = None
    created_by: Person | None = None
    params: dict[str, Any] = {}
    result_id: str | None = None
    result_sha256: str | None = None
    result_size: int | None = None
    price: Price = DEFAULT_PRICE
    version: int = 0
    position: int = 0
    queued_position: int = 0
    deleted: bool = False
    redacted: bool = False


def evolve(
    state: JobState | None,
    event: Event | None,
    *,
    type_: str,
    job_id: str,
    occurred_us: int,
    position: int,
    check: bool = False,
    copy: bool = True,
    own_executions: bool = False,
) -> JobState:
    """Apply one event to a copy of ``state``; ``event`` is ``None`` for erased data.

    A replay that owns its states (a rebuild) passes ``copy=False`` to fold in place; a caller
    that also owns the state's ``executions`` map (nothing else holds it) passes
    ``own_executions=True``, and an execution event then adds to it instead of copying it: a
    batch of k execution events on a job with n executions costs O(n + k), not O(n * k).
    """
    if state is None:
        if type_ != "job.queued":
            if check:
                raise InvalidTransition(f"job {job_id} has no job.queued event")
        new = JobState(id=job_id, created_at=occurred_us, updated_at=occurred_us)
        new.queued_position = position
    else:
        if check and occurred_us < state.updated_at:
            raise Invalid("occurred_at is before the job's previous event", field="occurred_at")
        new = msgspec.structs.replace(state) if copy else state
    new.version += 1
    new.position = position
    new.updated_at = max(new.updated_at, occurred_us)
    if event is None:
        _apply_bare(new, type_, occurred_us)
    elif is_job_event(event):
        _apply(new, event, occurred_us, check, own_executions)
    else:
        raise Invalid(f"{event.__struct_config__.tag} is not a job event", field="type")
    return new


def _apply(job: JobState, event: JobEvent, at: int, check: bool, own: bool = False) -> None:
    if check and job.status in FINISHED and type(event) not in AFTER_FINISH:
        raise InvalidTransition(
            f"job {job.id} is {job.status}; {event.__struct_config__.tag} is not allowed"
        )
    match event:
        case JobQueued():
            if check and job.version > 1:
                raise InvalidTransition(f"job {job.id} is already queued")
            job.agent, job.account, job.project = event.agent, event.account, event.project
            job.params, job.source, job.model = event.params, event.source, event.model
            job.created_by, job.price = event.created_by, event.price
            job.created_at = at
            if event.executions_total:
                job.exec_total = job.exec_pending = event.executions_total
        case JobStarted():
            if check and job.status != "queued":
                raise InvalidTransition(f"job {job.id} is {job.status}, not queued")
            _start(job, at)
        case JobProgressed():
            if event.row_count is not None:
                job.row_count = event.row_count
        case JobCompleted():
            if event.row_count is not None:
                job.row_count = event.row_count
            job.result_id, job.result_sha256 = event.result_id, event.result_sha256
            job.result_size = event.result_size
            if event.expires_at is not None:
                job.expires_at = parse_us(event.expires_at, field="expires_at")
            _finish(job, "completed", at)
        case JobFailed():
            job.error = event.error or ErrorInfo()
            _finish(job, "failed", at)
        case JobCancelled():
            _finish(job, "cancelled", at)
        case JobArchived():
            if check and job.status not in FINISHED:
                raise InvalidTransition(f"job {job.id} is {job.status}; only finished jobs archive")
            if check and job.archived_at is not None:
                raise InvalidTransition(f"job {job.id} is already archived")
            job.archived_at = at
        case JobPrLinked():
            job.pr_link = event.pr_link
        case JobDeleted():
            job.deleted = True
        case JobRedacted():
            if event.state is not None:
                kept = msgspec.convert(from_snapshot(event.state), JobState)
                kept.version, kept.position = job.version, job.position
                kept.updated_at = job.updated_at
                _copy_into(job, kept)
            job.redacted = True
        case ExecutionsPlanned():
            if check and event.total < 0:
                raise Invalid("total must not be negative", field="data.total")
            if check and job.exec_total + event.total > MAX_COUNT:
                raise Invalid(
                    f"total would bring the job's planned executions to "
                    f"{job.exec_total + event.total}, over the limit of {MAX_COUNT}",
                    field="data.total",
                )
            job.exec_total += event.total
            job.exec_pending += event.total
        case ExecutionRetrying() | ExecutionSucceeded() | ExecutionFailed():
            _execution(job, event, at, check, own)
        case _:
            assert_never(event)


def _apply_bare(job: JobState, type_: str, at: int) -> None:
    """Fold an event whose data was erased: only what its type alone says."""
    if type_ == "job.started":
        _start(job, at)
    elif type_ in ("job.completed", "job.failed", "job.cancelled"):
        _finish(job, type_.removeprefix("job."), at)
    elif type_ == "job.archived":
        job.archived_at = at
    elif type_ == "job.deleted":
        job.deleted = True
    elif type_ == "job.redacted":
        job.redacted = True


def _start(job: JobState, at: int) -> None:
    job.status = "running"
    job.started_at = at


def _finish(job: JobState, status: str, at: int) -> None:
    job.status = status
    job.finished_at = at
    if status in BILLABLE:
        job.credits_used = charge(
            job.price,
            row_count=job.row_count,
            succeeded=job.exec_succeeded,
            started_us=job.started_at,
            finished_us=at,
        )


_EXEC_STATE = {
    ExecutionRetrying: "retrying",
    ExecutionSucceeded: "succeeded",
    ExecutionFailed: "failed",
}


EXECUTION_EVENTS = (ExecutionRetrying, ExecutionSucceeded, ExecutionFailed)


def _execution(
    job: JobState,
    event: ExecutionRetrying | ExecutionSucceeded | ExecutionFailed,
    at: int,
    check: bool,
    own: bool,
) -> None:
    new = _EXEC_STATE[type(event)]
    old = job.executions.get(event.execution_id)
    if old in ("succeeded", "failed") or old == new:
        return  # each execution is counted once; a repeat changes nothing
    if check and old is None and len(job.executions) >= MAX_EXECUTIONS:
        raise Invalid(
            f"the job already has {MAX_EXECUTIONS} executions, the most one job may have",
            field="data.execution_id",
        )
    if own:
        job.executions[event.execution_id] = new
    else:  # the map may be shared with an earlier state: never change it
        job.executions = {**job.executions, event.execution_id: new}
    if old is None:
        if job.exec_pending > 0:
            job.exec_pending -= 1
        else:
            job.exec_total += 1
    else:
        job.exec_retrying -= 1
    if new == "retrying":
        job.exec_retrying += 1
    elif new == "succeeded":
        job.exec_succeeded += 1
    else:
        job.exec_failed += 1
    if job.status == "queued":
        _start(job, at)
    if job.status in OPEN and job.exec_pending == 0 and job.exec_retrying == 0:
        if job.exec_failed == 0:
            _finish(job, "completed", at)
        elif job.exec_succeeded == 0:
            _finish(job, "failed", at)
        else:
            _finish(job, "partial_failed", at)


def redaction_snapshot(job: JobState) -> dict[str, Any]:
    """What a job keeps after erasure: the facts the bill and the lists need, nothing written
    by a person or a worker (no params, source, model, PR link, error, executions, creator)."""
    kept = msgspec.structs.replace(
        job,
        params={},
        created_by=None,
        source=None,
        model=None,
        pr_link=None,
        error=None,
        executions={},
        redacted=True,
    )
    snapshot: dict[str, Any] = msgspec.to_builtins(kept)
    return to_snapshot(snapshot)


# The snapshot in ``job.redacted`` is read by auditors: it speaks the API's units (RFC 3339 times,
# decimal credits as strings, like every amount in event data), not the storage's (epoch
# microseconds, ten-thousandths). Snapshots written before hold the storage units (integers);
# ``from_snapshot`` reads both.
SNAPSHOT_TIMES = (
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "archived_at",
    "expires_at",
)


def to_snapshot(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for name in SNAPSHOT_TIMES:
        if isinstance(out.get(name), int):
            out[name] = format_us(out[name])
    if isinstance(out.get("credits_used"), int):
        out["credits_used"] = str(from_units(out["credits_used"]))
    return out


def from_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    out = dict(snapshot)
    for name in SNAPSHOT_TIMES:
        if isinstance(out.get(name), str):
            out[name] = parse_us(out[name], field=name)
    if isinstance(out.get("credits_used"), str):
        out["credits_used"] = to_units(Decimal(out["credits_used"]), field="credits_used")
    return out


def _copy_into(target: JobState, source: JobState) -> None:
    for name in target.__struct_fields__:
        setattr(target, name, getattr(source, name))
