"""The agent catalog read model: the definition in force of every agent, per tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ledger.events import AgentDefined
from ledger.records import Batch, TableSpec
from ledger.sql import Conn
from projections.base import SqlProjector

_ENCODE = msgspec.json.Encoder().encode


class AgentsProjector(SqlProjector):
    name = "agents"
    tables = ("agents",)
    table_ddl = (
        """CREATE TABLE IF NOT EXISTS {agents} (
            tenant TEXT NOT NULL,
            agent TEXT NOT NULL,
            agent_group TEXT NOT NULL,
            slug TEXT NOT NULL,
            title TEXT,
            description TEXT NOT NULL,
            params_schema TEXT NOT NULL,
            position INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (tenant, agent)
        )""",
    )
    specs = (
        TableSpec(
            "agents",
            (
                "tenant",
                "agent",
                "agent_group",
                "slug",
                "title",
                "description",
                "params_schema",
                "position",
                "updated_at",
            ),
            ("tenant", "agent"),
        ),
    )
    index_ddl = ("CREATE INDEX IF NOT EXISTS agents_group ON {agents} (tenant, agent_group, slug)",)

    def __init__(self, suffix: str = "") -> None:
        super().__init__(suffix)
        t = self.t["agents"]
        self._upsert = (
            f"INSERT INTO {t} (tenant, agent, agent_group, slug, title, description, "
            "params_schema, position, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant, agent) DO UPDATE SET title = excluded.title, "
            "description = excluded.description, params_schema = excluded.params_schema, "
            "position = excluded.position, updated_at = excluded.updated_at"
        )

    async def apply(self, conn: Conn, batch: Batch) -> None:
        rows = []
        for recorded, event in batch.events:
            if isinstance(event, AgentDefined):
                group, _, slug = event.agent.partition("/")
                rows.append(
                    (
                        recorded.tenant,
                        event.agent,
                        group,
                        slug,
                        event.title,
                        event.description,
                        _ENCODE(event.params_schema).decode(),
                        recorded.position,
                        recorded.recorded_at,
                    )
                )
        if rows:
            await conn.executemany(self._upsert, rows)


@dataclass(frozen=True, slots=True)
class Agent:
    """One catalog entry as the read model holds it."""

    agent: str
    group: str
    slug: str
    title: str | None
    description: str
    params_schema: dict[str, Any]
    position: int
    updated_at: str


_COLUMNS = "agent, agent_group, slug, title, description, params_schema, position, updated_at"


def _agent(row: Any) -> Agent:
    return Agent(
        agent=row[0],
        group=row[1],
        slug=row[2],
        title=row[3],
        description=row[4],
        params_schema=msgspec.json.decode(row[5]),
        position=row[6],
        updated_at=row[7],
    )


async def listing(conn: Conn, tenant: str, group: str | None = None) -> list[Agent]:
    """The tenant's agents (of one group), ordered by group and slug."""
    sql, params = f"SELECT {_COLUMNS} FROM agents WHERE tenant = ?", [tenant]
    if group is not None:
        sql += " AND agent_group = ?"
        params.append(group)
    rows = await conn.fetchall(sql + " ORDER BY agent_group, slug", params)
    return [_agent(r) for r in rows]


async def get(conn: Conn, tenant: str, agent: str) -> Agent | None:
    row = await conn.fetchone(
        f"SELECT {_COLUMNS} FROM agents WHERE tenant = ? AND agent = ?", (tenant, agent)
    )
    return None if row is None else _agent(row)
