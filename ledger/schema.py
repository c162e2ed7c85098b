"""The ledger's own tables: the append-only events, chain heads, results, idempotency."""

from __future__ import annotations

LEDGER_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        stream TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        type TEXT NOT NULL,
        occurred_at TEXT NOT NULL,
        occurred_us INTEGER NOT NULL,
        recorded_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        data TEXT,
        data_hash TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        redacted INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS events_stream ON events (tenant, stream, version)",
    "CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (tenant, event_id)",
    "CREATE INDEX IF NOT EXISTS events_tenant ON events (tenant, position)",
    """CREATE TABLE IF NOT EXISTS chain_heads (
        tenant TEXT PRIMARY KEY,
        position INTEGER NOT NULL,
        hash TEXT NOT NULL,
        count INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS results (
        result_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        job_id TEXT NOT NULL,
        expires_us INTEGER,
        payload TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS results_expiry ON results (expires_us)",
    """CREATE TABLE IF NOT EXISTS idempotency (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        body TEXT NOT NULL,
        job_id TEXT,
        created_us INTEGER NOT NULL,
        PRIMARY KEY (tenant, key)
    )""",
    """CREATE TABLE IF NOT EXISTS ledger_meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
]
