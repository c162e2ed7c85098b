"""The embedded default: SQLite in WAL mode, one writer connection, a few readers.

Writes run inside ``BEGIN IMMEDIATE`` with ``synchronous=FULL``, so an acknowledged append
survives power loss; the store batches concurrent appends into one such transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from ledger.errors import StoreConflict, StoreUnavailable
from ledger.sql import Conn, Row

READERS = 3


class SqliteConn:
    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            await self._conn.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise StoreConflict(str(exc)) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(sql, rows)
        except sqlite3.IntegrityError as exc:
            raise StoreConflict(str(exc)) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(await self._conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async with self._conn.execute(sql, params) as cur:
            row: Row | None = await cur.fetchone()
            return row


def sqlite_path(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") - 1 :] if url.startswith("sqlite:////") else url[10:]
    if url.startswith("sqlite://"):
        return url[len("sqlite://") :]
    return url


class SqliteBackend:
    dialect = "sqlite"

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self._create = create
        self._writer: aiosqlite.Connection | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []
        self._write_lock = asyncio.Lock()

    async def _connect(self, *, reader: bool) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.daemon = True  # type: ignore[attr-defined]
        await conn.execute("PRAGMA busy_timeout = 10000")
        if reader:
            await conn.execute("PRAGMA query_only = 1")
        else:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA secure_delete = ON")
        self._all.append(conn)
        return conn

    def check_path(self) -> None:
        path = Path(self.path)
        if not self._create and not path.exists():
            raise StoreUnavailable(f"database {self.path} does not exist")
        if not path.parent.is_dir():
            raise StoreUnavailable(f"directory {path.parent} does not exist")

    async def open(self) -> None:
        await asyncio.to_thread(self.check_path)
        try:
            self._writer = await self._connect(reader=False)
            for _ in range(READERS):
                self._readers.put_nowait(await self._connect(reader=True))
        except sqlite3.Error as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open database {self.path}: {exc}") from None

    async def close(self) -> None:
        for conn in self._all:
            try:
                await conn.close()
            except Exception:  # closing is best effort; the file stays consistent
                pass
        self._all.clear()
        self._writer = None

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Conn]:
        assert self._writer is not None, "backend not open"
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteConn(self._writer)
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")

    @asynccontextmanager
    async def read(self, *, snapshot: bool = False) -> AsyncIterator[Conn]:
        conn = await self._readers.get()
        try:
            if snapshot:
                await conn.execute("BEGIN")
                try:
                    yield SqliteConn(conn)
                finally:
                    await conn.execute("COMMIT")
            else:
                yield SqliteConn(conn)
        finally:
            self._readers.put_nowait(conn)

    async def ensure_schema(self, statements: Sequence[str]) -> None:
        async with self.write() as conn:
            for sql in statements:
                await conn.execute(sql)

    async def wait_for_signal(self, seconds: float) -> None:
        # Other processes on one SQLite file are found by polling the head position.
        await asyncio.sleep(seconds)

    async def signal(self) -> None:
        return None

    async def erase_residue(self) -> None:
        assert self._writer is not None
        async with self._write_lock:
            await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
