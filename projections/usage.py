"""Credits used over time: daily buckets per agent, read from the jobs read model.

A job is charged once, when it finishes as ``completed`` or ``partial_failed`` (the ledger's fold
computes ``credits_used`` then), so a day's usage is the sum of ``credits_used`` of the jobs that
finished that UTC day, deleted ones included (deleting never refunds). The same jobs make up the
credits statement, so the buckets add up to the statement's total for the same window.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from ledger.jobs import JobState
from ledger.sql import Conn

DAY_US = 86_400 * 1_000_000
_DECODE = msgspec.json.Decoder(JobState).decode


@dataclass(slots=True)
class DailyUsage:
    """``days`` in order (``YYYY-MM-DD``), and per agent one amount in units per day."""

    days: list[str] = field(default_factory=list)
    by_agent: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(sum(v) for v in self.by_agent.values())


def day_of(us: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).strftime("%Y-%m-%d")


def day_start(us: int) -> int:
    return us - us % DAY_US


async def daily(
    conn: Conn,
    tenant: str,
    *,
    since: int,
    until: int,
    account: str | None = None,
    project: str | None = None,
) -> DailyUsage:
    """Usage per agent and UTC day for the jobs finished in ``[since, until)``.

    Every day of the window is present (zero where nothing was charged), so a plot's x axis
    needs no gap filling.
    """
    sql = (
        "SELECT state FROM jobs WHERE tenant = ? AND status IN ('completed', 'partial_failed') "
        "AND finished_us >= ? AND finished_us < ?"
    )
    params: list[Any] = [tenant, since, until]
    if account is not None:
        sql += " AND account = ?"
        params.append(account)
    if project is not None:
        sql += " AND project = ?"
        params.append(project)
    rows = await conn.fetchall(sql, params)
    days: list[str] = []
    start = day_start(since)
    while start < until:
        days.append(day_of(start))
        start += DAY_US
    index = {d: i for i, d in enumerate(days)}
    sums: dict[str, list[int]] = defaultdict(lambda: [0] * len(days))
    for (state,) in rows:
        job = _DECODE(state)
        if job.credits_used and job.finished_at is not None:
            sums[job.agent][index[day_of(job.finished_at)]] += job.credits_used
    return DailyUsage(days=days, by_agent={a: sums[a] for a in sorted(sums)})
