"""The ledger's own tables: the append-only events, chain heads, results, idempotency.

Beside them, the operational tables of webhook delivery (``ledger/webhooks.py``): signing
secrets, one cursor per endpoint and the delivery log. They are not events and never exported.
"""

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
    # webhook delivery: operational state, not events (see ledger/webhooks.py)
    """CREATE TABLE IF NOT EXISTS webhook_secrets (
        tenant TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        expires_us INTEGER,
        PRIMARY KEY (tenant, webhook_id, created_us)
    )""",
    """CREATE TABLE IF NOT EXISTS webhook_cursors (
        tenant TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        generation INTEGER NOT NULL DEFAULT 0,
        attempt INTEGER NOT NULL DEFAULT 0,
        next_us INTEGER NOT NULL DEFAULT 0,
        failing_since_us INTEGER,
        lease_owner TEXT,
        lease_until_us INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, webhook_id)
    )""",
    """CREATE TABLE IF NOT EXISTS webhook_attempts (
        attempt_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        stream TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        at_us INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        response_status INTEGER,
        latency_us INTEGER NOT NULL,
        error TEXT,
        response_body TEXT,
        next_us INTEGER,
        worker TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS webhook_attempts_log "
    "ON webhook_attempts (tenant, webhook_id, attempt_id)",
    "CREATE INDEX IF NOT EXISTS webhook_attempts_age ON webhook_attempts (at_us)",
    "CREATE INDEX IF NOT EXISTS webhook_attempts_stream ON webhook_attempts (tenant, stream)",
]
