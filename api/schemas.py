"""The HTTP API's shapes: request bodies, query strings and answers, as msgspec Structs.

Handlers decode and encode with exactly these types, and ``api/openapi.py`` generates the
OpenAPI document from them, so the document cannot drift from what the handlers do.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ledger import jobs as job_rules
from ledger.audit import EventRecord, record
from ledger.clock import format_opt, format_us
from ledger.credits import from_units
from ledger.events import ErrorInfo, Person, Source
from ledger.jobs import JobState
from ledger.limits import NAME_PATTERN, Name, Text

Agent = Name
Label = Name
# Not "." or "..": such ids could never be addressed in a URL path.
JobId = Annotated[str, Meta(pattern=r"^(?!\.{1,2}$)[A-Za-z0-9_.:-]{1,128}$")]
Time = Annotated[str, Meta(max_length=64, pattern=NAME_PATTERN)]
# Positions and versions: what a database integer holds (a bigger one is 422, not a 500).
Position = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Amount = int | Decimal


class Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of request bodies: unknown fields are typos, and typos are 422."""


class CreateJob(Body):
    agent: Agent
    account: Label = "default"
    project: Label | None = None
    params: dict[str, Any] = {}
    source: Source | None = None
    model: Text | None = None
    created_by: Person | None = None
    executions_total: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    id: JobId | None = None
    occurred_at: Time | None = None


class AppendEvent(Body):
    type: Annotated[str, Meta(max_length=100, pattern=NAME_PATTERN)]
    data: dict[str, Any] = {}
    event_id: Name | None = None
    expected_version: Position | None = None
    occurred_at: Time | None = None


class AppendBatch(Body):
    events: Annotated[list[AppendEvent], Meta(min_length=1, max_length=1000)]


class Reason(Body):
    reason: Text | None = None


class PriceBody(Body):
    agent: Agent
    per_job: Decimal = Decimal(0)
    per_row: Decimal = Decimal(0)
    per_execution: Decimal = Decimal(0)
    per_second: Decimal = Decimal(0)


class GrantBody(Body):
    account: Label
    amount: Decimal
    reason: Text | None = None


# -- query strings ---------------------------------------------------------------------------


class Query(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of query strings; values arrive as text and convert leniently."""


class ListJobsQuery(Query):
    status: str | None = None
    agent: str | None = None
    account: str | None = None
    project: str | None = None
    created_after: str | None = None
    created_before: str | None = None
    archived: Literal["true", "false", "any"] = "any"
    q: str | None = None
    order: Literal["asc", "desc"] = "desc"
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50
    cursor: str | None = None


class GetJobQuery(Query):
    wait: Annotated[float, Meta(ge=0, le=60)] | None = None
    after_version: Position | None = None
    as_of: Position | None = None


class BulkDeleteQuery(Query):
    agent: str | None = None
    status: str | None = None
    created_before: str | None = None
    finished_before: str | None = None


class ResultsQuery(Query):
    compact: Literal["true", "false", "1", "0"] = "false"


class EventsQuery(Query):
    after: Position = 0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    types: str | None = None
    job_id: str | None = None


class StreamQuery(Query):
    after: Position | None = None


class CreditsQuery(Query):
    account: str | None = None


class StatementQuery(Query):
    account: str
    since: str | None = None
    until: str | None = None
    format: Literal["json", "csv"] = "json"


class ExportQuery(Query):
    format: Literal["ndjson", "csv"] = "ndjson"
    since: str | None = None
    until: str | None = None
    job_id: str | None = None
    account: str | None = None


# -- answers ---------------------------------------------------------------------------------

# Documentation annotations for the OpenAPI document: what the handlers put in these strings.
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]  # RFC 3339, UTC
JobStatus = Annotated[str, Meta(extra_json_schema={"enum": list(job_rules.STATUSES)})]


class Executions(msgspec.Struct):
    total: int
    pending: int
    retrying: int
    succeeded: int
    failed: int


class JobView(msgspec.Struct):
    id: str
    status: JobStatus
    agent: str
    account: str
    project: str | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    updated_at: Timestamp
    archived_at: Timestamp | None
    expires_at: Timestamp | None
    row_count: int
    credits_used: Amount
    executions: Executions
    error: ErrorInfo | None
    source: Source | None
    model: str | None
    pr_link: str | None
    created_by: Person | None
    params: dict[str, Any]
    result_id: str | None
    version: int


class JobList(msgspec.Struct):
    jobs: list[JobView]
    has_more: bool
    next_cursor: str | None


EventView = EventRecord


class JobEvents(msgspec.Struct):
    events: list[EventView]


class Appended(msgspec.Struct):
    job: JobView
    events: list[EventView]


class EventsPage(msgspec.Struct):
    events: list[EventView]
    next_after: int


class ResultView(msgspec.Struct):
    job_id: str
    result_id: str | None
    status: JobStatus
    row_count: int
    expires_at: Timestamp | None
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class ByAgent(msgspec.Struct):
    total: int
    by_status: dict[str, int]


class Stats(msgspec.Struct):
    total_jobs: int
    by_status: dict[str, int]
    by_agent: dict[str, ByAgent]
    archived: int
    credits_used: Amount
    position: int


class Executing(msgspec.Struct):
    job_id: str
    agent: str
    started_at: Timestamp | None
    elapsed: str


class ExecutingCount(msgspec.Struct):
    executing: int


class Running(msgspec.Struct):
    accounts: list[str]
    summary: dict[str, ExecutingCount]
    executing: dict[str, list[Executing]]


class JobCounts(msgspec.Struct):
    total: int
    by_status: dict[str, int]


class Balance(msgspec.Struct):
    """``granted`` and ``balance`` are ``null`` for a key scoped to a project: grants belong to
    the account in every project, so a project's key sees its own usage only."""

    granted: Amount | None
    used: Amount
    balance: Amount | None


class AccountView(msgspec.Struct):
    account: str
    jobs: JobCounts
    executing: int
    credits: Balance


class AccountList(msgspec.Struct):
    accounts: list[AccountView]


class PriceView(msgspec.Struct):
    agent: str
    per_job: Amount
    per_row: Amount
    per_execution: Amount
    per_second: Amount
    updated_at: Timestamp | None = None


class PriceList(msgspec.Struct):
    prices: list[PriceView]


class GrantView(msgspec.Struct):
    account: str
    amount: Amount
    reason: str | None
    position: int
    granted: Amount
    used: Amount
    balance: Amount


class Credits(msgspec.Struct):
    """``granted`` and ``balance`` are ``null`` for a key scoped to a project (see Balance)."""

    granted: Amount | None
    used: Amount
    balance: Amount | None
    by_agent: dict[str, Amount]


class StatementLine(msgspec.Struct):
    job_id: str
    agent: str
    finished_at: Timestamp | None
    row_count: int
    credits: Amount


class Statement(msgspec.Struct):
    account: str
    since: str | None
    until: str | None
    lines: list[StatementLine]
    total: Amount


class Deleted(msgspec.Struct):
    deleted: int


class AuditHead(msgspec.Struct):
    position: int
    hash: str
    count: int


class Health(msgspec.Struct):
    status: str


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


# -- rendering -------------------------------------------------------------------------------


def job_view(job: JobState) -> JobView:
    return JobView(
        id=job.id,
        status=job.status,
        agent=job.agent,
        account=job.account,
        project=job.project,
        created_at=format_us(job.created_at),
        started_at=format_opt(job.started_at),
        finished_at=format_opt(job.finished_at),
        updated_at=format_us(job.updated_at),
        archived_at=format_opt(job.archived_at),
        expires_at=format_opt(job.expires_at),
        row_count=job.row_count,
        credits_used=from_units(job.credits_used),
        executions=Executions(
            total=job.exec_total,
            pending=job.exec_pending,
            retrying=job.exec_retrying,
            succeeded=job.exec_succeeded,
            failed=job.exec_failed,
        ),
        error=job.error,
        source=job.source,
        model=job.model,
        pr_link=job.pr_link,
        created_by=job.created_by,
        params=job.params,
        result_id=job.result_id,
        version=job.version,
    )


event_view = record


def elapsed(started_us: int | None, now_us: int) -> str:
    """``mm:ss`` since ``started_us``; minutes may pass 59."""
    if started_us is None:
        return "00:00"
    seconds = max(0, (now_us - started_us) // 1_000_000)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"
