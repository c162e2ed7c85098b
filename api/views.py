"""Answers built from read models, shared by the HTTP routes and the CLI's reads.

``scoped``: the caller is a key confined to a project. Grants belong to an account in every
project, so such a caller sees its project's usage with ``granted`` and ``balance`` null. The
CLI reads the database as the operator, so ``--project`` there filters and is never a scope.
"""

from __future__ import annotations

from api import schemas as s
from ledger.credits import from_units
from projections.counts import JobTotals, empty_by_status
from projections.credits import Balance


def stats_view(totals: JobTotals, position: int) -> s.Stats:
    return s.Stats(
        total_jobs=totals.total_jobs,
        by_status=totals.by_status,
        by_agent={
            a: s.ByAgent(total=e.total, by_status=e.by_status) for a, e in totals.by_agent.items()
        },
        archived=totals.archived,
        credits_used=from_units(totals.credits_units),
        position=position,
    )


def credits_view(balance: Balance, *, scoped: bool) -> s.Credits:
    return s.Credits(
        granted=None if scoped else from_units(balance.granted),
        used=from_units(balance.used),
        balance=None if scoped else from_units(balance.granted - balance.used),
        by_agent={a: from_units(u) for a, u in balance.by_agent.items()},
    )


def account_views(
    job_counts: dict[str, dict[str, int]],
    money: dict[str, tuple[int, int]],
    *,
    account: str | None,
    scoped: bool,
) -> list[s.AccountView]:
    """One summary per account with jobs (or, unscoped, with credits), or just ``account``."""
    names = sorted(set(job_counts) | (set() if scoped else set(money)))
    if account is not None:
        names = [n for n in names if n == account]
    views = []
    for name in names:
        by_status = job_counts.get(name, empty_by_status())
        granted, used = money.get(name, (0, 0))
        views.append(
            s.AccountView(
                account=name,
                jobs=s.JobCounts(total=sum(by_status.values()), by_status=by_status),
                executing=by_status["running"],
                credits=s.Balance(
                    granted=None if scoped else from_units(granted),
                    used=from_units(used),
                    balance=None if scoped else from_units(granted - used),
                ),
            )
        )
    return views
