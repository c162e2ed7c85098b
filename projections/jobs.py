"""The jobs read model: one row per job with its current state, indexed for the lists."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ledger.errors import Invalid
from ledger.jobs import JobState
from ledger.records import Batch, TableSpec
from ledger.sql import Conn
from projections.base import SqlProjector

DECODE_CHUNK = 1000
_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder(JobState).decode

COLUMNS = (
    "tenant, id, status, agent, account, project, created_us, finished_us, archived, deleted, "
    "seq, version, result_id, state"
)


class JobsProjector(SqlProjector):
    name = "jobs"
    tables = ("jobs",)
    specs = (TableSpec("jobs", tuple(COLUMNS.split(", ")), ("tenant", "id"), erasable=True),)
    table_ddl = (
        """CREATE TABLE IF NOT EXISTS {jobs} (
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            status TEXT NOT NULL,
            agent TEXT NOT NULL,
            account TEXT NOT NULL,
            project TEXT,
            created_us INTEGER NOT NULL,
            finished_us INTEGER,
            archived INTEGER NOT NULL,
            deleted INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            version INTEGER NOT NULL,
            result_id TEXT,
            state TEXT NOT NULL,
            PRIMARY KEY (tenant, id)
        )""",
    )
    index_ddl = (
        "CREATE INDEX IF NOT EXISTS jobs_created ON {jobs} (tenant, created_us, seq)",
        "CREATE INDEX IF NOT EXISTS jobs_status ON {jobs} (tenant, status, created_us, seq)",
        "CREATE INDEX IF NOT EXISTS jobs_account ON {jobs} (tenant, account, created_us, seq)",
        "CREATE INDEX IF NOT EXISTS jobs_result ON {jobs} (tenant, result_id)",
        # the agent= and project= lists, and a project's streams for its feed
        "CREATE INDEX IF NOT EXISTS jobs_agent ON {jobs} (tenant, agent, created_us, seq)",
        "CREATE INDEX IF NOT EXISTS jobs_project ON {jobs} (tenant, project, created_us, seq)",
    )

    def __init__(self, suffix: str = "") -> None:
        super().__init__(suffix)
        t = self.t["jobs"]
        insert = f"INSERT INTO {t} ({COLUMNS}) VALUES ({', '.join('?' * 14)}) "
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS.split(", ")[2:])
        self._upsert = f"{insert}ON CONFLICT (tenant, id) DO UPDATE SET {updates}"
        # a change that leaves every indexed column as it was (most of them: progress, a
        # result, an execution) sets only the other columns, so no index of the table is
        # touched; should the row be missing, the insert writes it whole
        narrow = ", ".join(f"{c} = excluded.{c}" for c in UNINDEXED)
        self._upsert_unindexed = f"{insert}ON CONFLICT (tenant, id) DO UPDATE SET {narrow}"

    async def apply(self, conn: Conn, batch: Batch) -> None:
        if not batch.changes:
            return
        full: list[tuple[Any, ...]] = []
        narrow: list[tuple[Any, ...]] = []
        for change in batch.changes.values():
            before = change.before
            same = before is not None and _indexed(before) == _indexed(change.after)
            (narrow if same else full).append(row(change.tenant, change.after))
        if full:
            await conn.executemany(self._upsert, full)
        if narrow:
            await conn.executemany(self._upsert_unindexed, narrow)


# the columns no index of the table holds (every other column is in one: see index_ddl)
UNINDEXED = ("finished_us", "archived", "deleted", "version", "state")


def _indexed(job: JobState) -> tuple[Any, ...]:
    """The job's values of the indexed columns (tenant and id are the key)."""
    return (
        job.status,
        job.agent,
        job.account,
        job.project,
        job.created_at,
        job.queued_position,
        job.result_id,
    )


def row(tenant: str, job: JobState) -> tuple[Any, ...]:
    return (
        tenant,
        job.id,
        job.status,
        job.agent,
        job.account,
        job.project,
        job.created_at,
        job.finished_at,
        int(job.archived_at is not None),
        int(job.deleted),
        job.queued_position,
        job.version,
        job.result_id,
        _ENCODE(job).decode(),
    )


# -- reads ---------------------------------------------------------------------------------


async def get(
    conn: Conn, tenant: str, job_id: str, *, project: str | None = None
) -> JobState | None:
    """A live (not deleted) job, within ``project`` when one is given."""
    row_ = await conn.fetchone(
        "SELECT state, project FROM jobs WHERE tenant = ? AND id = ? AND deleted = 0",
        (tenant, job_id),
    )
    if row_ is None or (project is not None and row_[1] != project):
        return None
    return _DECODE(row_[0])


async def get_text(conn: Conn, tenant: str, job_id: str) -> tuple[str, str | None] | None:
    """A live job's stored state as its JSON text (``get`` without the decoding), and its
    project (the caller checks it)."""
    row_ = await conn.fetchone(
        "SELECT state, project FROM jobs WHERE tenant = ? AND id = ? AND deleted = 0",
        (tenant, job_id),
    )
    return None if row_ is None else (row_[0], row_[1])


def decode(text: str) -> JobState:
    """A state as ``get_text`` reads it."""
    return _DECODE(text)


async def by_result(
    conn: Conn, tenant: str, result_id: str, *, project: str | None = None
) -> JobState | None:
    row_ = await conn.fetchone(
        "SELECT state, project FROM jobs WHERE tenant = ? AND result_id = ? AND deleted = 0",
        (tenant, result_id),
    )
    if row_ is None or (project is not None and row_[1] != project):
        return None
    return _DECODE(row_[0])


@dataclass(slots=True)
class ListQuery:
    """Filters of ``GET /v1/jobs`` (and the dialects' lists); times are epoch microseconds."""

    statuses: Sequence[str] = ()
    agent: str | None = None
    account: str | None = None
    project: str | None = None
    created_after: int | None = None
    created_before: int | None = None
    finished_before: int | None = None
    archived: bool | None = None
    q: str | None = None
    ids: Sequence[str] | None = None  # only these job ids (MCRIT's ``job_ids``)
    ascending: bool = False
    limit: int = 50
    offset: int = 0
    cursor: str | None = None


def may_scan(query: ListQuery) -> bool:
    """Whether a page of ``query`` may read many rows it does not return.

    One equality filter (status, agent, account or project) with the time range and the cursor
    is one index's range in ``(created_at, seq)`` order: the page reads about ``limit`` rows.
    A substring, several statuses (merged and sorted), several equality filters together, the
    archived or finished filters, or an offset may scan; such a page is read off the event loop.
    """
    equalities = (
        len(query.statuses),
        query.agent is not None,
        query.account is not None,
        query.project is not None,
    )
    return (
        bool(query.q)
        or sum(equalities) > 1
        or query.archived is not None
        or query.finished_before is not None
        or query.offset > 0
    )


def encode_cursor(created_us: int, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{created_us}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, seq = base64.urlsafe_b64decode(padded.encode()).decode().split(":")
        return int(created), int(seq)
    except (ValueError, UnicodeDecodeError):
        raise Invalid("cursor is not one this server gave out", field="cursor") from None


def _where(tenant: str, query: ListQuery) -> tuple[str, list[Any]]:
    sql = ["tenant = ?", "deleted = 0"]
    params: list[Any] = [tenant]
    if query.statuses:
        sql.append(f"status IN ({', '.join('?' * len(query.statuses))})")
        params.extend(query.statuses)
    if query.ids is not None:
        sql.append(f"id IN ({', '.join('?' * len(query.ids))})" if query.ids else "1 = 0")
        params.extend(query.ids)
    for column, value in (("agent", query.agent), ("account", query.account)):
        if value is not None:
            sql.append(f"{column} = ?")
            params.append(value)
    if query.project is not None:
        sql.append("project = ?")
        params.append(query.project)
    if query.created_after is not None:
        sql.append("created_us > ?")
        params.append(query.created_after)
    if query.created_before is not None:
        sql.append("created_us < ?")
        params.append(query.created_before)
    if query.finished_before is not None:
        sql.append("finished_us IS NOT NULL AND finished_us < ?")
        params.append(query.finished_before)
    if query.archived is not None:
        sql.append("archived = ?")
        params.append(int(query.archived))
    if query.q:
        pattern = "%" + query.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql.append(
            "(id LIKE ? ESCAPE '\\' OR agent LIKE ? ESCAPE '\\' OR account LIKE ? ESCAPE '\\')"
        )
        params.extend([pattern] * 3)
    return " AND ".join(sql), params


async def page(conn: Conn, tenant: str, query: ListQuery) -> tuple[list[JobState], str | None]:
    """One page of jobs and the cursor of the next (keyset on ``(created_at, seq)``)."""
    where, params = _where(tenant, query)
    order = "ASC" if query.ascending else "DESC"
    if query.cursor:
        created, seq = decode_cursor(query.cursor)
        op = ">" if query.ascending else "<"
        # a row value, not ``a < ? OR (a = ? AND b < ?)``: PostgreSQL then starts the index
        # scan at the cursor instead of filtering every row before it (a page cost O(offset))
        where += f" AND (created_us, seq) {op} (?, ?)"
        params.extend([created, seq])
    sql = (
        f"SELECT state, created_us, seq FROM jobs WHERE {where} "
        f"ORDER BY created_us {order}, seq {order} LIMIT ? OFFSET ?"
    )
    rows = await conn.fetchall(sql, [*params, query.limit + 1, query.offset])
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    cursor = encode_cursor(rows[-1][1], rows[-1][2]) if more and rows else None
    return [_DECODE(r[0]) for r in rows], cursor


async def count(conn: Conn, tenant: str, query: ListQuery) -> int:
    """How many live jobs match ``query`` (its paging fields aside)."""
    where, params = _where(tenant, query)
    row = await conn.fetchone(f"SELECT COUNT(*) FROM jobs WHERE {where}", params)
    return int(row[0]) if row is not None else 0


def project_streams(tenant: str, project: str) -> tuple[str, list[Any]]:
    """A query naming the streams (job ids) of one project, for filtering events."""
    return "SELECT id FROM jobs WHERE tenant = ? AND project = ?", [tenant, project]


def matches(job: JobState, query: ListQuery) -> bool:
    """Whether a live ``job`` matches ``query``'s filters, as ``_where`` reads them (the
    substring filter ``q`` and the order and paging fields aside).

    A bulk delete reads the matching ids first, then deletes in a write transaction; a job
    that changed in between (completed, say, while ``status=queued`` was asked for) is checked
    again there with this, so a delete never removes a job that no longer matches.
    """
    if query.q:
        raise ValueError("matches() does not read the substring filter q")
    if job.deleted or (query.statuses and job.status not in query.statuses):
        return False
    if query.ids is not None and job.id not in query.ids:
        return False
    if query.agent is not None and job.agent != query.agent:
        return False
    if query.account is not None and job.account != query.account:
        return False
    if query.project is not None and job.project != query.project:
        return False
    if query.created_after is not None and not job.created_at > query.created_after:
        return False
    if query.created_before is not None and not job.created_at < query.created_before:
        return False
    if query.finished_before is not None and (
        job.finished_at is None or not job.finished_at < query.finished_before
    ):
        return False
    return query.archived is None or (job.archived_at is not None) == query.archived


async def ids_matching(conn: Conn, tenant: str, query: ListQuery) -> list[str]:
    """Every live job id matching ``query`` (for bulk deletes; check each again with
    ``matches`` where it is deleted)."""
    where, params = _where(tenant, query)
    rows = await conn.fetchall(f"SELECT id FROM jobs WHERE {where} ORDER BY seq", params)
    return [r[0] for r in rows]


async def stream_ids(
    conn: Conn, tenant: str, *, account: str | None = None, project: str | None = None
) -> list[str]:
    """The ids of every job (deleted ones too) of an account and/or a project."""
    sql, params = "SELECT id FROM jobs WHERE tenant = ?", [tenant]
    if account is not None:
        sql += " AND account = ?"
        params.append(account)
    if project is not None:
        sql += " AND project = ?"
        params.append(project)
    return [r[0] for r in await conn.fetchall(sql, params)]


async def running(conn: Conn, tenant: str, *, project: str | None = None) -> list[JobState]:
    query = ListQuery(statuses=("running",), project=project, ascending=True)
    where, params = _where(tenant, query)
    rows = await conn.fetchall(
        f"SELECT state FROM jobs WHERE {where} ORDER BY created_us, seq", params
    )
    found: list[JobState] = []
    for start in range(0, len(rows), DECODE_CHUNK):  # the loop is free between chunks
        found.extend(_DECODE(r[0]) for r in rows[start : start + DECODE_CHUNK])
        await asyncio.sleep(0)
    return found


async def billable_between(
    conn: Conn,
    tenant: str,
    account: str,
    since: int | None,
    until: int | None,
    *,
    project: str | None = None,
) -> list[JobState]:
    """Charged jobs (deleted ones too: deleting never refunds) finished in ``[since, until)``."""
    sql = (
        "SELECT state FROM jobs WHERE tenant = ? AND account = ? "
        "AND status IN ('completed', 'partial_failed')"
    )
    params: list[Any] = [tenant, account]
    if project is not None:
        sql += " AND project = ?"
        params.append(project)
    if since is not None:
        sql += " AND finished_us >= ?"
        params.append(since)
    if until is not None:
        sql += " AND finished_us < ?"
        params.append(until)
    rows = await conn.fetchall(sql + " ORDER BY finished_us, seq", params)
    return [_DECODE(r[0]) for r in rows]


async def account_job_ids(conn: Conn, tenant: str, account: str) -> list[str]:
    """Every job id of ``account``, deleted ones included (an account's audit trail)."""
    rows = await conn.fetchall(
        "SELECT id FROM jobs WHERE tenant = ? AND account = ? ORDER BY seq", (tenant, account)
    )
    return [r[0] for r in rows]
