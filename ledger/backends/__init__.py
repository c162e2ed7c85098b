"""Backends of the event store, chosen by the database URL."""

from __future__ import annotations

from collections.abc import Sequence

from ledger.errors import StoreUnavailable
from ledger.sql import Backend


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def backend_for(url: str, *, create: bool = True, replicas: Sequence[str] = ()) -> Backend:
    """``postgresql://...`` for PostgreSQL; a path or ``sqlite:///path`` for SQLite.

    ``replicas``: hot standbys of a PostgreSQL database that may answer reads
    (``ledger/routing.py``); SQLite has none.
    """
    for replica in replicas:
        if not is_postgres(replica):
            raise StoreUnavailable(f"a read replica must be a postgresql:// URL, not {replica!r}")
    if is_postgres(url):
        from ledger.backends.postgres import PostgresBackend

        return PostgresBackend(url, replicas=replicas)
    if replicas:
        raise StoreUnavailable("read replicas need a PostgreSQL database; SQLite has none")
    if "://" in url and not url.startswith("sqlite://"):
        raise StoreUnavailable(
            f"unsupported database URL {url!r} (use a path, sqlite:///path or postgresql://...)"
        )
    from ledger.backends.sqlite import SqliteBackend

    return SqliteBackend(url, create=create)
