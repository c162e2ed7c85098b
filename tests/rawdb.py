"""Direct access to a test database, around the ledger: to read what it stored and to tamper.

The tests use it the way an intruder (or a careless operator) would: plain ``sqlite3`` on the
file, plain ``asyncpg`` on the PostgreSQL database, none of the project's code. SQL is written
once with ``?`` placeholders; for PostgreSQL each ``?`` becomes ``$1..$n`` (the statements here
carry no ``?`` inside literals).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Statement = tuple[str, Sequence[Any]]


def is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def _sqlite_path(db: str) -> str:
    return db.removeprefix("sqlite://") if db.startswith("sqlite://") else db


def _numbered(sql: str) -> str:
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _count(status: str) -> int:
    """``UPDATE 3`` / ``DELETE 0`` / ``INSERT 0 1``: the number of rows touched."""
    last = status.split()[-1] if status else ""
    return int(last) if last.isdigit() else 0


async def _pg_connect(db: str) -> Any:
    import asyncpg

    return await asyncpg.connect(db)


async def rows(db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Every row of one query, as tuples."""
    if is_postgres(db):
        conn = await _pg_connect(db)
        try:
            return [tuple(r) for r in await conn.fetch(_numbered(sql), *args)]
        finally:
            await conn.close()

    def query() -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(_sqlite_path(db))
        try:
            return [tuple(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    return await asyncio.to_thread(query)


async def tamper(db: str, *statements: Statement) -> list[int]:
    """Run the statements in one committed transaction; the rows each one touched."""
    if is_postgres(db):
        conn = await _pg_connect(db)
        try:
            async with conn.transaction():
                return [
                    _count(await conn.execute(_numbered(sql), *args)) for sql, args in statements
                ]
        finally:
            await conn.close()

    def run() -> list[int]:
        conn = sqlite3.connect(_sqlite_path(db))
        try:
            with conn:
                return [conn.execute(sql, tuple(args)).rowcount for sql, args in statements]
        finally:
            conn.close()

    return await asyncio.to_thread(run)


async def vacuumed(db: str) -> set[str]:
    """PostgreSQL: the tables a ``VACUUM`` has run on (``pg_stat_user_tables``)."""
    conn = await _pg_connect(db)
    try:
        rows = await conn.fetch(
            "SELECT relname FROM pg_stat_user_tables WHERE last_vacuum IS NOT NULL"
        )
        return {r[0] for r in rows}
    finally:
        await conn.close()


async def stored_bytes(db: str) -> bytes:
    """Everything the database holds where a reader of its storage could find it.

    SQLite: every byte of the file, its WAL and its shared-memory index. PostgreSQL: every row
    of every table, as text (dead row versions are out of a client's reach; the backend
    vacuums the tables that held erased data).
    """
    if is_postgres(db):
        conn = await _pg_connect(db)
        try:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
            parts = []
            for (table,) in tables:
                quoted = '"' + table.replace('"', '""') + '"'
                parts.extend(r[0] for r in await conn.fetch(f"SELECT t::text FROM {quoted} t"))
            return "\n".join(parts).encode()
        finally:
            await conn.close()
    path = _sqlite_path(db)

    def read() -> bytes:
        files = [Path(path + suffix) for suffix in ("", "-wal", "-shm")]
        return b"".join(f.read_bytes() for f in files if f.exists())

    return await asyncio.to_thread(read)
