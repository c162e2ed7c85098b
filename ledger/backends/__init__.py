"""Backends of the event store, chosen by the database URL."""

from __future__ import annotations

from ledger.errors import StoreUnavailable
from ledger.sql import Backend


def backend_for(url: str, *, create: bool = True) -> Backend:
    """``postgresql://...`` for PostgreSQL; a path or ``sqlite:///path`` for SQLite."""
    if url.startswith(("postgresql://", "postgres://")):
        from ledger.backends.postgres import PostgresBackend

        return PostgresBackend(url)
    if "://" in url and not url.startswith("sqlite://"):
        raise StoreUnavailable(
            f"unsupported database URL {url!r} (use a path, sqlite:///path or postgresql://...)"
        )
    from ledger.backends.sqlite import SqliteBackend

    return SqliteBackend(url, create=create)
