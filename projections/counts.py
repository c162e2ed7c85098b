"""Job counts by tenant, project, account, agent, status and archived flag.

Stats and account summaries sum these few rows, so they answer in time that grows with the
number of accounts and agents, never with the number of jobs. Deleted jobs leave the counts.
The sums are made in Python, exact whatever the backend (one row's credits reach 2^62 units).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ledger.jobs import STATUSES, JobState
from ledger.records import Batch, TableSpec
from ledger.sql import Conn
from projections.base import SqlProjector

Key = tuple[str, str, str, str, str, int]


class CountsProjector(SqlProjector):
    name = "counts"
    tables = ("job_counts",)
    specs = (
        TableSpec(
            "job_counts",
            ("tenant", "project", "account", "agent", "status", "archived", "n", "credits"),
            ("tenant", "project", "account", "agent", "status", "archived"),
            counters=("n", "credits"),
        ),
    )
    table_ddl = (
        """CREATE TABLE IF NOT EXISTS {job_counts} (
            tenant TEXT NOT NULL,
            project TEXT NOT NULL,
            account TEXT NOT NULL,
            agent TEXT NOT NULL,
            status TEXT NOT NULL,
            archived INTEGER NOT NULL,
            n INTEGER NOT NULL,
            credits INTEGER NOT NULL
                CHECK (credits BETWEEN -4611686018427387904 AND 4611686018427387904),
            PRIMARY KEY (tenant, project, account, agent, status, archived)
        )""",
    )

    def __init__(self, suffix: str = "") -> None:
        super().__init__(suffix)
        t = self.t["job_counts"]
        self._upsert = (
            f"INSERT INTO {t} (tenant, project, account, agent, status, archived, n, credits) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, project, account, agent, "
            f"status, archived) DO UPDATE SET n = {t}.n + excluded.n, "
            f"credits = {t}.credits + excluded.credits"
        )

    async def apply(self, conn: Conn, batch: Batch) -> None:
        deltas: dict[Key, list[int]] = defaultdict(lambda: [0, 0])
        for change in batch.changes.values():
            for job, sign in ((change.before, -1), (change.after, 1)):
                if job is None or job.deleted:
                    continue
                delta = deltas[_key(change.tenant, job)]
                delta[0] += sign
                delta[1] += sign * job.credits_used
        rows = [(*k, n, c) for k, (n, c) in deltas.items() if n or c]
        if rows:
            await conn.executemany(self._upsert, rows)


def _key(tenant: str, job: JobState) -> Key:
    return (
        tenant,
        job.project or "",
        job.account,
        job.agent,
        job.status,
        int(job.archived_at is not None),
    )


def _scope(tenant: str, project: str | None, account: str | None = None) -> tuple[str, list[Any]]:
    sql, params = "tenant = ?", [tenant]
    if project is not None:
        sql += " AND project = ?"
        params.append(project)
    if account is not None:
        sql += " AND account = ?"
        params.append(account)
    return sql, params


def empty_by_status() -> dict[str, int]:
    return dict.fromkeys(STATUSES, 0)


@dataclass(frozen=True, slots=True)
class AgentTotals:
    total: int
    by_status: dict[str, int]


@dataclass(frozen=True, slots=True)
class JobTotals:
    """Job counts by status and by agent, the archived count and live credits (in units)."""

    total_jobs: int
    by_status: dict[str, int]
    by_agent: dict[str, AgentTotals]
    archived: int
    credits_units: int


async def stats(conn: Conn, tenant: str, *, project: str | None = None) -> JobTotals:
    """Totals by status and by agent, archived count and live credits (in units)."""
    where, params = _scope(tenant, project)
    # Summed here, with Python's unbounded ints: each row holds up to 2^62 units, and SQLite's
    # sum() of a few such rows overflows (PostgreSQL's numeric sum would not). The rows are few.
    rows = await conn.fetchall(
        f"SELECT agent, status, archived, n, credits FROM job_counts WHERE {where}", params
    )
    by_status = empty_by_status()
    agents: dict[str, dict[str, int]] = {}
    archived = credits = 0
    for agent, status, is_archived, n, units in rows:
        n, units = int(n), int(units)
        by_status[status] += n
        agents.setdefault(agent, empty_by_status())[status] += n
        if is_archived:
            archived += n
        credits += units
    by_agent = {
        agent: AgentTotals(sum(counted.values()), counted)
        for agent, counted in sorted(agents.items())
        if sum(counted.values())
    }
    return JobTotals(sum(by_status.values()), by_status, by_agent, archived, credits)


async def by_account(
    conn: Conn, tenant: str, *, project: str | None = None, account: str | None = None
) -> dict[str, dict[str, int]]:
    """``{account: {status: n}}`` for every account that has a (live) job."""
    where, params = _scope(tenant, project, account)
    rows = await conn.fetchall(
        f"SELECT account, status, sum(n) FROM job_counts WHERE {where} "
        "GROUP BY account, status ORDER BY account",
        params,
    )
    out: dict[str, dict[str, int]] = {}
    for acct, status, n in rows:
        if int(n):  # rows summing to nothing (every job deleted) are no account, as in a replay
            out.setdefault(acct, empty_by_status())[status] += int(n)
    return out
