"""What each backend adds for bulk work (rebuilds, imports, exports), kept beside its write path.

``SqliteBulk`` and ``PostgresBulk`` are mixed into ``SqliteBackend`` and ``PostgresBackend``:
swapping rebuilt read models in, loading many rows at once, the writer's memory for bulk loads,
and the SQL that renders a text as a JSON string.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any

from ledger.sql import Conn, TableSwap


class SqliteBulk:
    """Bulk work on SQLite (mixed into ``SqliteBackend``, whose writer it uses)."""

    _writer: sqlite3.Connection | None
    _write_lock: asyncio.Lock

    async def _in_writer(self, fn: Any, *args: Any) -> Any:
        raise NotImplementedError

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
                await self._in_writer(writer.execute, "PRAGMA wal_checkpoint(PASSIVE)")

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


class PostgresBulk:
    """Bulk work on PostgreSQL (mixed into ``PostgresBackend``)."""

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
