"""Webhook endpoints as they stand, folded from the ``webhook.*`` events (never the secret).

The delivery worker's scans join this read model with the ledger's delivery cursors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ledger.events import (
    UNSET,
    JobRedacted,
    WebhookDeleted,
    WebhookDisabled,
    WebhookRegistered,
    WebhookSecretRotated,
    WebhookUpdated,
)
from ledger.records import Batch, TableSpec
from ledger.sql import Conn
from ledger.webhooks import forget_responses
from projections.base import SqlProjector

_TYPES = msgspec.json.Decoder(list[str] | None)


def _types_text(types: list[str] | None) -> str | None:
    return None if types is None else msgspec.json.encode(types).decode()


class WebhooksProjector(SqlProjector):
    name = "webhooks"
    tables = ("webhooks",)
    table_ddl = (
        """CREATE TABLE IF NOT EXISTS {webhooks} (
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            url TEXT NOT NULL,
            event_types TEXT,
            project TEXT,
            description TEXT,
            enabled INTEGER NOT NULL,
            disabled_reason TEXT,
            secret_sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (tenant, id)
        )""",
    )
    specs = (
        TableSpec(
            "webhooks",
            (
                "tenant",
                "id",
                "url",
                "event_types",
                "project",
                "description",
                "enabled",
                "disabled_reason",
                "secret_sha256",
                "created_at",
                "updated_at",
            ),
            ("tenant", "id"),
        ),
    )

    async def apply(self, conn: Conn, batch: Batch) -> None:
        t = self.t["webhooks"]
        for recorded, event in batch.events:
            at = recorded.recorded_at
            if isinstance(event, WebhookRegistered):
                await conn.execute(
                    f"INSERT INTO {t} (tenant, id, url, event_types, project, description, "
                    "enabled, secret_sha256, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                    (
                        recorded.tenant,
                        event.webhook_id,
                        event.url,
                        _types_text(event.event_types),
                        event.project,
                        event.description,
                        event.secret_sha256,
                        at,
                        at,
                    ),
                )
            elif isinstance(event, WebhookUpdated):
                sets: list[str] = ["updated_at = ?"]
                params: list[Any] = [at]
                changes: dict[str, Any] = {
                    "url": event.url,
                    "event_types": event.event_types,
                    "project": event.project,
                    "description": event.description,
                }
                for column, value in changes.items():
                    if value is not UNSET:
                        sets.append(f"{column} = ?")
                        params.append(_types_text(value) if column == "event_types" else value)
                if event.enabled is not UNSET:
                    sets.append("enabled = ?")
                    params.append(int(event.enabled))
                    if event.enabled:
                        sets.append("disabled_reason = NULL")
                await conn.execute(
                    f"UPDATE {t} SET {', '.join(sets)} WHERE tenant = ? AND id = ?",
                    (*params, recorded.tenant, event.webhook_id),
                )
            elif isinstance(event, WebhookSecretRotated):
                await conn.execute(
                    f"UPDATE {t} SET secret_sha256 = ?, updated_at = ? WHERE tenant = ? AND id = ?",
                    (event.secret_sha256, at, recorded.tenant, event.webhook_id),
                )
            elif isinstance(event, WebhookDisabled):
                await conn.execute(
                    f"UPDATE {t} SET enabled = 0, disabled_reason = ?, updated_at = ? "
                    "WHERE tenant = ? AND id = ?",
                    (event.reason, at, recorded.tenant, event.webhook_id),
                )
            elif isinstance(event, WebhookDeleted):
                await conn.execute(
                    f"DELETE FROM {t} WHERE tenant = ? AND id = ?",
                    (recorded.tenant, event.webhook_id),
                )
            elif isinstance(event, JobRedacted) and not self.suffix:
                # erasure reaches the delivery log in the redaction's own transaction (events
                # are never copied there; a receiver's answer may have echoed them)
                await forget_responses(conn, recorded.tenant, recorded.stream)


@dataclass(frozen=True, slots=True)
class Endpoint:
    tenant: str
    id: str
    url: str
    event_types: list[str] | None
    project: str | None
    description: str | None
    enabled: bool
    disabled_reason: str | None
    created_at: str
    updated_at: str
    position: int | None  # the delivery cursor
    attempt: int
    next_us: int
    failing_since_us: int | None
    head: int  # the tenant's last position


_SELECT = (
    "SELECT w.tenant, w.id, w.url, w.event_types, w.project, w.description, w.enabled, "
    "w.disabled_reason, w.created_at, w.updated_at, c.position, c.attempt, c.next_us, "
    "c.failing_since_us, h.position FROM webhooks w "
    "LEFT JOIN webhook_cursors c ON c.tenant = w.tenant AND c.webhook_id = w.id "
    "LEFT JOIN chain_heads h ON h.tenant = w.tenant"
)


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(
        tenant=row[0],
        id=row[1],
        url=row[2],
        event_types=None if row[3] is None else _TYPES.decode(row[3]),
        project=row[4],
        description=row[5],
        enabled=bool(row[6]),
        disabled_reason=row[7],
        created_at=row[8],
        updated_at=row[9],
        position=row[10],
        attempt=row[11] or 0,
        next_us=row[12] or 0,
        failing_since_us=row[13],
        head=row[14] or 0,
    )


async def get(
    conn: Conn, tenant: str, webhook_id: str, *, project: str | None = None
) -> Endpoint | None:
    sql, params = f"{_SELECT} WHERE w.tenant = ? AND w.id = ?", [tenant, webhook_id]
    if project is not None:
        sql += " AND w.project = ?"
        params.append(project)
    row = await conn.fetchone(sql, params)
    return None if row is None else _endpoint(row)


async def listing(conn: Conn, tenant: str, *, project: str | None = None) -> list[Endpoint]:
    sql, params = f"{_SELECT} WHERE w.tenant = ?", [tenant]
    if project is not None:
        sql += " AND w.project = ?"
        params.append(project)
    rows = await conn.fetchall(sql + " ORDER BY w.created_at, w.id", params)
    return [_endpoint(r) for r in rows]


async def any_enabled(conn: Conn) -> bool:
    """Whether any tenant has an enabled endpoint (else no commit can make work to send)."""
    return await conn.fetchone("SELECT 1 FROM webhooks WHERE enabled = 1 LIMIT 1") is not None


async def due(conn: Conn, *, now: int, owner: str, limit: int = 1000) -> list[tuple[str, str]]:
    """Enabled endpoints with events to send now, not leased by another process."""
    rows = await conn.fetchall(
        "SELECT c.tenant, c.webhook_id FROM webhook_cursors c "
        "JOIN webhooks w ON w.tenant = c.tenant AND w.id = c.webhook_id "
        "JOIN chain_heads h ON h.tenant = c.tenant "
        "WHERE w.enabled = 1 AND c.position < h.position AND c.next_us <= ? "
        "AND (c.lease_until_us < ? OR c.lease_owner = ?) ORDER BY c.next_us LIMIT ?",
        (now, now, owner, limit),
    )
    return [(r[0], r[1]) for r in rows]


async def soonest(conn: Conn, *, now: int) -> int | None:
    """When the next scheduled retry (or lease expiry) of an enabled endpoint falls due."""
    row = await conn.fetchone(
        "SELECT min(CASE WHEN c.next_us > c.lease_until_us THEN c.next_us "
        "ELSE c.lease_until_us END) FROM webhook_cursors c "
        "JOIN webhooks w ON w.tenant = c.tenant AND w.id = c.webhook_id "
        "JOIN chain_heads h ON h.tenant = c.tenant "
        "WHERE w.enabled = 1 AND c.position < h.position "
        "AND (c.next_us > ? OR c.lease_until_us > ?)",
        (now, now),
    )
    return None if row is None or row[0] is None else int(row[0])
