"""Server settings, from the command line (and ``JOBLEDGER_DB``)."""

from __future__ import annotations

from dataclasses import dataclass

from ledger.webhooks import DEFAULT_DISABLE_AFTER_S, DEFAULT_SCHEDULE

DEFAULT_DB = "./jobledger.db"
DEFAULT_RETENTION_S = 7 * 86400
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_REPLICA_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class Settings:
    db_url: str = DEFAULT_DB
    host: str = "127.0.0.1"
    port: int = 8080
    result_retention_s: int = DEFAULT_RETENTION_S
    rate_limit: int | None = None  # requests per minute per key
    max_body: int = DEFAULT_MAX_BODY
    enforce_credits: bool = False
    metrics_token: str | None = None  # GET /metrics wants it as a Bearer; None: loopback only
    # read replicas (docs/postgres.md): PostgreSQL hot standbys that may answer reads
    replicas: tuple[str, ...] = ()
    replica_wait_s: float = DEFAULT_REPLICA_WAIT_S  # for the caller's last write, then primary
    # webhooks (docs/webhooks.md)
    webhook_allow_hosts: tuple[str, ...] = ()  # hosts plain http:// may reach besides loopback
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_SCHEDULE  # seconds before each attempt
    webhook_disable_after_s: float = DEFAULT_DISABLE_AFTER_S  # failing this long disables
    webhook_timeout_s: float = 10.0  # one attempt, connect to last byte read
    webhook_concurrency: int = 32  # attempts in flight per process
    webhook_lease_s: float = 60.0  # how long a process owns an endpoint without news from it
    webhooks: bool = True  # run the delivery worker in this process
