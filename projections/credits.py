"""Credits read models: prices in force, grants per account, usage per account and agent.

Usage sums every charge ever made, deleted jobs included (deleting never refunds); it is a
delta of each job's ``credits_used``, which the ledger's fold computes from the job's history.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from ledger.credits import to_units
from ledger.events import CreditsGranted, Price, PriceSet
from ledger.records import Batch, CreditTotals, TableSpec
from ledger.sql import Conn
from projections.base import SqlProjector


class CreditsProjector(SqlProjector):
    name = "credits"
    tables = ("credit_usage", "credit_grants", "prices")
    specs = (
        TableSpec(
            "credit_usage",
            ("tenant", "project", "account", "agent", "used"),
            ("tenant", "project", "account", "agent"),
            counters=("used",),
        ),
        TableSpec("credit_grants", ("tenant", "account", "granted"), ("tenant", "account")),
        TableSpec(
            "prices",
            (
                "tenant",
                "agent",
                "per_job",
                "per_row",
                "per_execution",
                "per_second",
                "position",
                "updated_at",
            ),
            ("tenant", "agent"),
        ),
    )
    table_ddl = (
        """CREATE TABLE IF NOT EXISTS {credit_usage} (
            tenant TEXT NOT NULL,
            project TEXT NOT NULL,
            account TEXT NOT NULL,
            agent TEXT NOT NULL,
            used INTEGER NOT NULL
                CHECK (used BETWEEN -4611686018427387904 AND 4611686018427387904),
            PRIMARY KEY (tenant, project, account, agent)
        )""",
        """CREATE TABLE IF NOT EXISTS {credit_grants} (
            tenant TEXT NOT NULL,
            account TEXT NOT NULL,
            granted INTEGER NOT NULL
                CHECK (granted BETWEEN -4611686018427387904 AND 4611686018427387904),
            PRIMARY KEY (tenant, account)
        )""",
        """CREATE TABLE IF NOT EXISTS {prices} (
            tenant TEXT NOT NULL,
            agent TEXT NOT NULL,
            per_job TEXT NOT NULL,
            per_row TEXT NOT NULL,
            per_execution TEXT NOT NULL,
            per_second TEXT NOT NULL,
            position INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (tenant, agent)
        )""",
    )

    def __init__(self, suffix: str = "") -> None:
        super().__init__(suffix)
        u, g, p = self.t["credit_usage"], self.t["credit_grants"], self.t["prices"]
        self._usage = (
            f"INSERT INTO {u} (tenant, project, account, agent, used) VALUES (?, ?, ?, ?, ?) "
            f"ON CONFLICT (tenant, project, account, agent) DO UPDATE SET "
            f"used = {u}.used + excluded.used"
        )
        self._grant = (
            f"INSERT INTO {g} (tenant, account, granted) VALUES (?, ?, ?) "
            f"ON CONFLICT (tenant, account) DO UPDATE SET granted = {g}.granted + excluded.granted"
        )
        self._price = (
            f"INSERT INTO {p} (tenant, agent, per_job, per_row, per_execution, per_second, "
            "position, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, agent) "
            "DO UPDATE SET per_job = excluded.per_job, per_row = excluded.per_row, "
            "per_execution = excluded.per_execution, per_second = excluded.per_second, "
            "position = excluded.position, updated_at = excluded.updated_at"
        )

    async def apply(self, conn: Conn, batch: Batch) -> None:
        usage: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for change in batch.changes.values():
            before = change.before.credits_used if change.before is not None else 0
            delta = change.after.credits_used - before
            if delta:
                job = change.after
                usage[(change.tenant, job.project or "", job.account, job.agent)] += delta
        if usage:
            await conn.executemany(self._usage, [(*k, v) for k, v in usage.items()])
        grants: dict[tuple[str, str], int] = defaultdict(int)
        prices = []
        for recorded, event in batch.events:
            if isinstance(event, CreditsGranted):
                grants[(recorded.tenant, event.account)] += to_units(
                    event.amount, field="amount", allow_negative=True
                )
            elif isinstance(event, PriceSet):
                pr = event.price
                prices.append(
                    (
                        recorded.tenant,
                        event.agent,
                        str(pr.per_job),
                        str(pr.per_row),
                        str(pr.per_execution),
                        str(pr.per_second),
                        recorded.position,
                        recorded.recorded_at,
                    )
                )
        if grants:
            await conn.executemany(self._grant, [(*k, v) for k, v in grants.items()])
        if prices:
            await conn.executemany(self._price, prices)

    async def totals(self, conn: Conn, tenant: str, account: str) -> CreditTotals:
        """The ``CreditBalances`` port of the ledger: an account's committed totals."""
        totals = await balance(conn, tenant, account=account)
        return CreditTotals(totals.granted, totals.used)


# -- reads ---------------------------------------------------------------------------------


async def prices(conn: Conn, tenant: str) -> list[tuple[str, Price, str]]:
    rows = await conn.fetchall(
        "SELECT agent, per_job, per_row, per_execution, per_second, updated_at FROM prices "
        "WHERE tenant = ? ORDER BY agent",
        (tenant,),
    )
    return [
        (
            r[0],
            Price(
                per_job=Decimal(r[1]),
                per_row=Decimal(r[2]),
                per_execution=Decimal(r[3]),
                per_second=Decimal(r[4]),
            ),
            r[5],
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Balance:
    """Credits in units (ten-thousandths): granted, used, and the usage of each agent."""

    granted: int
    used: int
    by_agent: dict[str, int]


async def balance(
    conn: Conn, tenant: str, *, account: str | None = None, project: str | None = None
) -> Balance:
    """``granted``, ``used`` (units) and ``by_agent`` usage, for one account or all."""
    where, params = "tenant = ?", [tenant]
    if account is not None:
        where += " AND account = ?"
        params.append(account)
    # Every sum is made here, with Python's unbounded ints: a row holds up to 2^62 units, and
    # SQLite's sum() of a few such rows overflows. An account's rows are few.
    granted = sum(
        int(g)
        for (g,) in await conn.fetchall(f"SELECT granted FROM credit_grants WHERE {where}", params)
    )
    usage_where, usage_params = where, list(params)
    if project is not None:
        usage_where += " AND project = ?"
        usage_params.append(project)
    sums: dict[str, int] = defaultdict(int)
    for agent, used in await conn.fetchall(
        f"SELECT agent, used FROM credit_usage WHERE {usage_where}", usage_params
    ):
        sums[agent] += int(used)
    by_agent = {agent: sums[agent] for agent in sorted(sums) if sums[agent]}
    used = sum(by_agent.values())
    return Balance(granted, used, by_agent)


async def accounts_usage(
    conn: Conn, tenant: str, *, project: str | None = None
) -> dict[str, tuple[int, int]]:
    """``{account: (granted, used)}`` in units, for every account with grants or usage."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for account, granted in await conn.fetchall(
        "SELECT account, granted FROM credit_grants WHERE tenant = ?", (tenant,)
    ):
        out[account][0] += int(granted)
    sql, params = "SELECT account, used FROM credit_usage WHERE tenant = ?", [tenant]
    if project is not None:
        sql += " AND project = ?"
        params.append(project)
    for account, used in await conn.fetchall(sql, params):  # summed exactly, as in balance
        out[account][1] += int(used)
    return {a: (g, u) for a, (g, u) in out.items()}
