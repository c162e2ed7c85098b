"""What each backend adds for bulk work (rebuilds, imports, exports), kept beside its write path.

``SqliteBulk`` and ``PostgresBulk`` are mixed into ``SqliteBackend`` and ``PostgresBackend``:
swapping rebuilt read models in, loading many rows at once, the writer's memory for bulk loads,
and the SQL that renders a text as a JSON string.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ledger.sql import Conn, TableSwap


class SqliteBulk:
    """Bulk work on SQLite (mixed into ``SqliteBackend``, whose writer it uses)."""

    _writer: sqlite3.Connection | None
    _write_lock: asyncio.Lock

    async def _in_writer(self, fn: Any, *args: Any) -> Any:
        raise NotImplementedError

    async def _open_readers(self) -> None:
        raise NotImplementedError

    async def _close_readers(self) -> None:
        raise NotImplementedError

    path: str
    _line_readers: list[sqlite3.Connection]

    async def fetch_lines(self, sql: str, params: Sequence[Any]) -> tuple[bytes, int, int]:
        """Rows ``(position, line)`` of ``sql`` as one block of lines, the last position and
        the row count. A connection of its own runs the query and joins the lines in a
        worker thread, as bytes: the text never becomes a Python string per row."""
        conn = self._line_readers.pop() if self._line_readers else None
        if conn is None:
            conn = await asyncio.to_thread(_line_reader, self.path)
        found = await asyncio.to_thread(_lines, conn, sql, params)
        # not on an error or a cancellation: the thread may still be using the connection
        self._line_readers.append(conn)
        return found

    def _close_line_readers(self) -> None:
        while self._line_readers:
            self._line_readers.pop().close()

    @asynccontextmanager
    async def loading(self) -> AsyncIterator[None]:
        """A load into a new, empty database (``jobledger import``), written once.

        In WAL mode a transaction's pages all go to the WAL first and are copied into the
        database afterwards: a million events are written twice. While the load lasts, this
        process's readers are closed and the file uses a rollback journal instead, which holds
        only the pages the file had before (a transaction that appends pages need not journal
        them): the loaded pages are written once, and the load is still one atomic, durable
        transaction (a crash in the middle leaves a journal that the next open rolls back, to
        the empty database). If another process has the file open, it stays in WAL (slower,
        as safe). Afterwards the file is in WAL mode again and the readers are reopened.
        """
        assert self._writer is not None, "backend not open"
        writer = self._writer
        async with self._write_lock:
            await self._close_readers()
            switched = await self._in_writer(_journal_mode, writer, "DELETE")
        try:
            yield
        finally:
            async with self._write_lock:
                if switched:
                    await self._in_writer(_journal_mode, writer, "WAL")
                await self._open_readers()

    def json_text(self, expr: str) -> str:
        # json_quote escapes '"', '\\', \b \f \n \r \t and other controls as \u00xx, keeps
        # every other character as UTF-8: byte for byte what json.dumps(ensure_ascii=False) does
        return f"json_quote({expr})"

    async def set_bulk(self, bulk: bool) -> None:
        """On: a 256 MiB page cache and sorts in memory, so loading and indexing a million
        rows does not spill to temporary files, and no checkpoint after every commit (one
        when it is switched off); off: SQLite's defaults again."""
        assert self._writer is not None, "backend not open"
        writer = self._writer
        cache, temp, pages = (-262144, "MEMORY", 0) if bulk else (-2000, "DEFAULT", 1000)
        async with self._write_lock:
            await self._in_writer(writer.execute, f"PRAGMA cache_size = {cache}")
            await self._in_writer(writer.execute, f"PRAGMA temp_store = {temp}")
            await self._in_writer(writer.execute, f"PRAGMA wal_autocheckpoint = {pages}")
            if not bulk:
                await self._in_writer(_pragma, writer, "wal_checkpoint(PASSIVE)")

    async def swap_tables(self, conn: Conn, swaps: Sequence[TableSwap]) -> None:
        """Drop each live table and rename its shadow in its place.

        A SQLite reader sees the schema of its own snapshot with the rows of that snapshot, so
        it reads the old tables or the new ones, never a mix; the caller indexes afterwards.
        """
        for swap in swaps:
            await conn.execute(f"DROP TABLE IF EXISTS {swap.live}")
            await conn.execute(f"ALTER TABLE {swap.shadow} RENAME TO {swap.live}")

    async def copy_rows(
        self, conn: Conn, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """One ``executemany`` on the writer's thread, run now (not left in the buffer)."""
        marks = ", ".join("?" * len(columns))
        await conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
        await conn.fetchone("SELECT 1")


def _line_reader(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA query_only = 1")
    conn.text_factory = bytes
    return conn


def _lines(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> tuple[bytes, int, int]:
    from ledger.backends.sqlite import translate_error  # that module imports this one

    try:
        rows = conn.execute(sql, params).fetchall()
    except Exception as exc:
        raise translate_error(exc) from exc
    if not rows:
        return b"", 0, 0
    return b"\n".join([r[1] for r in rows]) + b"\n", rows[-1][0], len(rows)


def _pragma(conn: sqlite3.Connection, pragma: str) -> list[Any]:
    # every row read: a statement left with rows to give keeps a read transaction open,
    # and then the journal mode cannot change
    return conn.execute(f"PRAGMA {pragma}").fetchall()


def _journal_mode(conn: sqlite3.Connection, mode: str) -> bool:
    """Switch ``conn``'s file to journal ``mode`` now (no waiting); whether it did."""
    _pragma(conn, "busy_timeout = 0")
    try:
        rows = _pragma(conn, f"journal_mode = {mode}")
    except sqlite3.OperationalError:  # another connection has the file open
        return False
    finally:
        _pragma(conn, "busy_timeout = 10000")
    return bool(rows) and str(rows[0][0]).upper() == mode


class PostgresBulk:
    """Bulk work on PostgreSQL (mixed into ``PostgresBackend``)."""

    @asynccontextmanager
    async def loading(self) -> AsyncIterator[None]:
        yield  # COPY writes the rows once already

    def read(
        self, *, snapshot: bool = False, bulk: bool = False
    ) -> AbstractAsyncContextManager[Conn]:
        raise NotImplementedError

    async def fetch_lines(self, sql: str, params: Sequence[Any]) -> tuple[bytes, int, int]:
        """Rows ``(position, line)`` of ``sql`` as one block of lines, the last position and
        the row count."""
        async with self.read(bulk=True) as conn:
            rows = await conn.fetchall(sql, params)
        if not rows:
            return b"", 0, 0
        return ("\n".join([r[1] for r in rows]) + "\n").encode(), rows[-1][0], len(rows)

    def json_text(self, expr: str) -> str:
        # to_json escapes '"', '\\', \b \f \n \r \t and other controls as \u00xx, keeps
        # every other character: byte for byte what json.dumps(ensure_ascii=False) does
        return f"to_json({expr})::text"

    async def set_bulk(self, bulk: bool) -> None:
        return None  # the server's own memory settings apply

    async def swap_tables(self, conn: Conn, swaps: Sequence[TableSwap]) -> None:
        """Merge each shadow's rows into its live table (see ``merge_statements``)."""
        for swap in swaps:
            for sql in merge_statements(swap):
                await conn.execute(sql)

    async def copy_rows(
        self, conn: Conn, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """``COPY`` through asyncpg's binary protocol, on the transaction's own connection."""
        from ledger.backends.postgres import ADVANCE_POSITIONS, PostgresConn

        assert isinstance(conn, PostgresConn), "a connection of this backend"
        conn._check()
        await conn._lock()  # a bulk write holds the whole ledger
        try:
            await conn._conn.copy_records_to_table(table, records=rows, columns=list(columns))
            if table == "events":  # events that keep their positions: the sequence follows
                await conn._conn.execute(ADVANCE_POSITIONS)
        except Exception as exc:
            failed = conn._failed(exc)
            if failed is exc:
                raise
            raise failed from exc


def merge_statements(swap: TableSwap) -> list[str]:
    """Statements that make ``swap.live`` hold exactly the rows of ``swap.shadow`` (PostgreSQL).

    Why not drop and rename, as on SQLite: PostgreSQL resolves table names in the current
    catalog, not in the reader's snapshot. A ``REPEATABLE READ`` reader whose snapshot was
    taken before the swap committed (its first statement ran earlier, or waited for the swap's
    lock after taking it) would read the renamed shadow through that old snapshot, which cannot
    see the rows the swap transaction wrote: the jobs of the last events would be missing (and
    locking the tables first does not help, the snapshot is older than the lock). Changing rows
    keeps the table (and its indexes) and is ordinary MVCC: an older snapshot sees the old
    rows, a newer one the new rows, and no reader waits. Only rows that differ are written.
    """
    live, shadow = swap.live, swap.shadow
    on = " AND ".join(f"s.{k} = l.{k}" for k in swap.key)
    values = [c for c in swap.columns if c not in swap.key]
    columns = ", ".join(swap.columns)
    statements = [
        f"DELETE FROM {live} AS l WHERE NOT EXISTS (SELECT 1 FROM {shadow} AS s WHERE {on})",
    ]
    if values:
        statements.append(
            f"UPDATE {live} AS l SET {', '.join(f'{c} = s.{c}' for c in values)} "
            f"FROM {shadow} AS s WHERE {on} AND "
            f"({', '.join(f'l.{c}' for c in values)}) IS DISTINCT FROM "
            f"({', '.join(f's.{c}' for c in values)})"
        )
    statements += [
        f"INSERT INTO {live} ({columns}) SELECT {columns} FROM {shadow} AS s "
        f"WHERE NOT EXISTS (SELECT 1 FROM {live} AS l WHERE {on})",
        f"DROP TABLE {shadow}",
    ]
    return statements
