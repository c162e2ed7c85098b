"""API keys: who may call, for which tenant, with which role. Only secret hashes are kept."""

from __future__ import annotations

from dataclasses import dataclass

from ledger.events import KeyCreated, KeyRevoked
from ledger.records import Batch, TableSpec
from ledger.sql import Conn
from projections.base import SqlProjector


class KeysProjector(SqlProjector):
    name = "keys"
    tables = ("api_keys",)
    specs = (
        TableSpec(
            "api_keys",
            (
                "key_id",
                "tenant",
                "role",
                "name",
                "project",
                "secret_sha256",
                "created_at",
                "revoked_at",
            ),
            ("key_id",),
        ),
    )
    table_ddl = (
        """CREATE TABLE IF NOT EXISTS {api_keys} (
            key_id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            role TEXT NOT NULL,
            name TEXT,
            project TEXT,
            secret_sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        )""",
    )
    index_ddl = ("CREATE UNIQUE INDEX IF NOT EXISTS api_keys_secret ON {api_keys} (secret_sha256)",)

    async def apply(self, conn: Conn, batch: Batch) -> None:
        t = self.t["api_keys"]
        for recorded, event in batch.events:
            if isinstance(event, KeyCreated):
                await conn.execute(
                    f"INSERT INTO {t} (key_id, tenant, role, name, project, secret_sha256, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.key_id,
                        recorded.tenant,
                        event.role,
                        event.name,
                        event.project,
                        event.secret_sha256,
                        recorded.recorded_at,
                    ),
                )
            elif isinstance(event, KeyRevoked):
                await conn.execute(
                    f"UPDATE {t} SET revoked_at = ? WHERE key_id = ? AND tenant = ?",
                    (recorded.recorded_at, event.key_id, recorded.tenant),
                )


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    tenant: str
    role: str
    name: str | None
    project: str | None
    secret_sha256: str
    created_at: str
    revoked_at: str | None


_COLUMNS = "key_id, tenant, role, name, project, secret_sha256, created_at, revoked_at"


async def by_secret_hash(conn: Conn, secret_sha256: str) -> ApiKey | None:
    row = await conn.fetchone(
        f"SELECT {_COLUMNS} FROM api_keys WHERE secret_sha256 = ?", (secret_sha256,)
    )
    return None if row is None else ApiKey(*row)


async def by_id(conn: Conn, key_id: str) -> ApiKey | None:
    row = await conn.fetchone(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))
    return None if row is None else ApiKey(*row)


async def listing(conn: Conn, tenant: str | None = None) -> list[ApiKey]:
    sql, params = f"SELECT {_COLUMNS} FROM api_keys", []
    if tenant is not None:
        sql += " WHERE tenant = ?"
        params.append(tenant)
    rows = await conn.fetchall(sql + " ORDER BY created_at, key_id", params)
    return [ApiKey(*r) for r in rows]
