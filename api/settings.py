"""Server settings, from the command line (and ``JOBLEDGER_DB``)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DB = "./jobledger.db"
DEFAULT_RETENTION_S = 7 * 86400
DEFAULT_MAX_BODY = 10 * 1024 * 1024


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
