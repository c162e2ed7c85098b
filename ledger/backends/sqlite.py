"""The embedded default: SQLite in WAL mode, one writer connection, a few readers.

Writes run inside ``BEGIN IMMEDIATE`` with ``synchronous=FULL``, so an acknowledged append
survives power loss; the store batches concurrent appends into one such transaction.

Readers are aiosqlite connections; short indexed reads run on the event loop's own thread,
on one more connection (``InlineConn``), which never waits long for a lock: if SQLite answers
busy within ``INLINE_BUSY_MS``, the read runs on an aiosqlite reader instead. Whether anything
committed since a read is known without a query, from the WAL index (``committed_version``).
The writer is a stdlib ``sqlite3`` connection on a thread of
its own, behind a ``Conn`` that *buffers* statements and runs them together with the next read
or the ``COMMIT``: a whole batch costs two thread hops instead of one per statement (each hop
pays a GIL hand-off, about 0.3 ms on this machine, which aiosqlite's public API cannot batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from ledger.backends.bulk import SqliteBulk
from ledger.backends.walindex import WalIndex
from ledger.errors import (
    CommitFailed,
    Rejected,
    StoreConflict,
    StoreUnavailable,
    total_out_of_range,
)
from ledger.sql import Conn, Reservation, Row, WriteConn

READERS = 3
# The longest a read on the event loop's thread waits for a lock before it moves to a reader
# thread. WAL readers wait only while another connection recovers the WAL after a crash, or
# changes the journal mode, so this is rare; what matters is that the loop is never held long.
INLINE_BUSY_MS = 5
# How long the writer and the pooled readers wait for a lock another connection holds
WRITER_BUSY_SECONDS = 10.0
_BUSY_MS = int(WRITER_BUSY_SECONDS * 1000)
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock held elsewhere (``database is locked``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY


class SqliteConn:
    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            await self._conn.execute(sql, params)
        except Exception as exc:
            raise translate_error(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(sql, rows)
        except Exception as exc:
            raise translate_error(exc) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return list(await self._conn.execute_fetchall(sql, params))
        except Exception as exc:
            raise translate_error(exc) from exc

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, params)  # one thread hop, not three
        return rows[0] if rows else None


class _InlineRead:
    """``async with backend.read()`` for a point read on the loop's thread."""

    __slots__ = ("_conn",)

    def __init__(self, conn: InlineConn) -> None:
        self._conn = conn

    async def __aenter__(self) -> Conn:
        return self._conn

    async def __aexit__(self, *_: object) -> None:
        return None


Pooled = Callable[[], AbstractAsyncContextManager[Conn]]


class InlineConn:
    """Short indexed reads run right on the event loop's thread.

    A point query takes ~7 µs in-thread against ~40-120 µs through a worker thread (a futex
    wake, a GIL hand-off and a self-pipe write each way). WAL readers do not wait for the
    writer; the rare lock they do wait for (another connection recovering the WAL) is waited
    for at most ``INLINE_BUSY_MS``, then the statement runs on a reader thread from ``pooled``
    (``None`` inside a snapshot, which cannot move). Anything that may scan goes to
    ``read(bulk=True)``.
    """

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, pooled: Pooled | None) -> None:
        self._conn = conn
        self._pooled = pooled

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self.fetchall(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._conn.executemany(sql, rows)
        except Exception as exc:
            raise translate_error(exc) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except Exception as exc:
            pooled = self._pooled_for(exc)
        async with pooled() as conn:  # busy: the statement waits on a reader thread instead
            return await conn.fetchall(sql, params)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        try:
            row: Row | None = self._conn.execute(sql, params).fetchone()
            return row
        except Exception as exc:
            pooled = self._pooled_for(exc)
        async with pooled() as conn:
            return await conn.fetchone(sql, params)

    def _pooled_for(self, exc: Exception) -> Pooled:
        """Where a statement that raised ``exc`` runs again (busy, outside a snapshot); any
        other error is raised as the ledger's own."""
        pooled = self._pooled
        if pooled is None or not isinstance(exc, sqlite3.OperationalError) or not is_busy(exc):
            raise translate_error(exc) from exc
        return pooled


class BufferedWriteConn:
    """The writer's connection: statements wait in a buffer until something needs an answer."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor
        self._pending: list[tuple[str, Any, bool]] = []
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._pending.append((sql, params, False))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._pending.append((sql, list(rows), True))

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._run(sql, params, all_rows=True)  # type: ignore[no-any-return]

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return await self._run(sql, params, all_rows=False)  # type: ignore[no-any-return]

    async def sync(self, *, last: bool = False) -> None:
        await self._run(None)  # the COMMIT is in-process: nothing to gain by joining it

    async def reserve(
        self, tenants: Sequence[str], known: Sequence[int], count: int
    ) -> Reservation | None:
        return None  # BEGIN IMMEDIATE already admits one writer at a time

    async def more_positions(self, count: int) -> list[int]:
        raise RuntimeError("SQLite positions follow max(position); nothing is reserved")

    @property
    def round_trips(self) -> int:
        return 0  # no server: statements run in this process

    async def savepoint(self) -> None:
        await self.execute("SAVEPOINT command")

    async def release_savepoint(self) -> None:
        await self.execute("RELEASE command")

    async def rollback_savepoint(self) -> None:
        await self.execute("ROLLBACK TO command")
        await self.execute("RELEASE command")
        try:
            await self._run(None)
        except Exception as exc:  # the transaction itself is gone
            raise CommitFailed(f"the write transaction was lost: {exc}") from exc
        self._failed = False

    async def _run(
        self, sql: str | None, params: Sequence[Any] = (), *, all_rows: bool = True
    ) -> Any:
        pending, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, _run_statements, self._conn, pending, sql, params, all_rows
            )
        except BaseException:
            # SQLite undoes one failed statement, except where it rolls the whole
            # transaction back (a full disk, an I/O error): then nothing may commit
            self._failed = self._failed or not self._conn.in_transaction
            raise

    async def flush(self, final: str | None = None) -> None:
        await self._run(final)


def _run_statements(
    conn: sqlite3.Connection,
    pending: list[tuple[str, Any, bool]],
    sql: str | None,
    params: Sequence[Any],
    all_rows: bool,
) -> Any:
    try:
        for statement, args, many in pending:
            if many:
                conn.executemany(statement, args)
            else:
                conn.execute(statement, args)
        if sql is None:
            return None
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if all_rows else cursor.fetchone()
    except Exception as exc:
        raise translate_error(exc) from exc


def translate_error(exc: Exception) -> Exception:
    """The ledger's error for what SQLite (or its driver) refused."""
    if isinstance(exc, sqlite3.IntegrityError):
        if "CHECK constraint" in str(exc):
            return total_out_of_range(str(exc))
        return StoreConflict(str(exc))
    if isinstance(exc, OverflowError | sqlite3.DataError | UnicodeError | ValueError):
        return Rejected(f"the database refused a value ({exc}); nothing was written")
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailable(f"the database failed: {exc}")
    return exc


def sqlite_path(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") - 1 :] if url.startswith("sqlite:////") else url[10:]
    if url.startswith("sqlite://"):
        return url[len("sqlite://") :]
    return url


class SqliteBackend(SqliteBulk):
    dialect = "sqlite"

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self._create = create
        self._writer: sqlite3.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self._wal_index: WalIndex | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []
        self._write_lock = asyncio.Lock()
        self._residue: asyncio.Task[None] | None = None
        self._line_readers: list[sqlite3.Connection] = []

    async def _connect_reader(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.daemon = True  # type: ignore[attr-defined]
        await conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        await conn.execute("PRAGMA query_only = 1")
        self._all.append(conn)
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")
        return conn

    async def _in_writer(self, fn: Any, *args: Any) -> Any:
        assert self._executor is not None, "backend not open"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def check_path(self) -> None:
        path = Path(self.path)
        if not self._create and not path.exists():
            raise StoreUnavailable(f"database {self.path} does not exist")
        if not path.parent.is_dir():
            raise StoreUnavailable(f"directory {path.parent} does not exist")

    async def open(self) -> None:
        await asyncio.to_thread(self.check_path)
        try:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            self._writer = await self._in_writer(self._connect_writer)
            await self._open_readers()
        except sqlite3.Error as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open database {self.path}: {exc}") from None

    async def _open_readers(self) -> None:
        self._readers = asyncio.Queue()
        for _ in range(READERS):
            self._readers.put_nowait(await self._connect_reader())
        inline = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        inline.execute("PRAGMA query_only = 1")
        # a read in WAL mode: from now on this connection holds the shared lock that keeps the
        # file in WAL mode and its WAL index in place (ledger/backends/walindex.py)
        mode = inline.execute("PRAGMA journal_mode").fetchone()[0]
        page_size = inline.execute("PRAGMA page_size").fetchone()[0]
        inline.execute("PRAGMA schema_version").fetchone()
        inline.execute(f"PRAGMA busy_timeout = {INLINE_BUSY_MS}")
        self._inline = inline
        if str(mode).lower() == "wal":
            self._wal_index = WalIndex.open(self.path, int(page_size))

    async def _close_readers(self) -> None:
        for conn in self._all:
            try:
                await conn.close()
            except Exception:  # closing is best effort; the file stays consistent
                pass
        self._all.clear()
        self._close_line_readers()
        if self._wal_index is not None:
            self._wal_index.close()  # before the connection whose lock keeps it valid
            self._wal_index = None
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    async def close(self) -> None:
        residue = self._residue is not None and not self._residue.done()
        if self._residue is not None and residue:
            self._residue.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._residue
        await self._close_readers()
        if self._writer is not None:
            if residue:  # the last try, now that this process's readers are gone
                with contextlib.suppress(sqlite3.Error):
                    await self._in_writer(_checkpoint, self._writer)
            await self._in_writer(self._writer.close)
            self._writer = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @asynccontextmanager
    async def write(self) -> AsyncIterator[WriteConn]:
        assert self._writer is not None and self._executor is not None, "backend not open"
        async with self._write_lock:
            conn = BufferedWriteConn(self._writer, self._executor)
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                if conn.failed:
                    raise CommitFailed("the write transaction was lost before its COMMIT")
                try:
                    await conn.flush("COMMIT")
                except Exception as exc:
                    raise CommitFailed(f"the COMMIT failed: {exc}") from exc
            except BaseException:
                await self._in_writer(_rollback, self._writer)
                raise

    def committed_version(self) -> int | None:
        """A number that changes whenever a transaction commits to the database, from any
        connection of any process, read without a query (``ledger/backends/walindex.py``);
        ``None`` when it cannot be known that way (not in WAL mode, or not now)."""
        index = self._wal_index
        return None if index is None else index.version()

    def read(
        self, *, snapshot: bool = False, bulk: bool = False
    ) -> AbstractAsyncContextManager[Conn]:
        if not bulk and not snapshot and self._inline is not None:
            # the common point read: a plain object, not a generator-based context manager
            # (which costs a GET about 5 % of its time)
            return _InlineRead(InlineConn(self._inline, self._pooled))
        return self._read(snapshot=snapshot, bulk=bulk)

    def _pooled(self) -> AbstractAsyncContextManager[Conn]:
        return self._read(snapshot=False, bulk=True)

    @asynccontextmanager
    async def _read(self, *, snapshot: bool, bulk: bool) -> AsyncIterator[Conn]:
        if not bulk and self._inline is not None:
            inline = self._inline
            if snapshot and _begin_snapshot(inline):
                try:
                    yield InlineConn(inline, None)
                finally:
                    inline.execute("COMMIT")
                return
            if not snapshot:
                yield InlineConn(inline, self._pooled)
                return
            # busy: the snapshot is taken on a reader thread instead
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

    async def wait_for_signal(self, seconds: float) -> bool:
        # Other processes on one SQLite file are found by polling the head position.
        await asyncio.sleep(seconds)
        return False

    async def signal(self) -> None:
        return None

    async def set_durable(self, durable: bool) -> None:
        """Off: WAL ``synchronous=NORMAL`` (never corrupt, but a crash may roll back the last
        commits) and no zeroing of freed pages, for disposable or replaced tables."""
        assert self._writer is not None
        level, secure = ("FULL", "ON") if durable else ("NORMAL", "OFF")
        async with self._write_lock:
            await self._in_writer(self._writer.execute, f"PRAGMA synchronous = {level}")
            await self._in_writer(self._writer.execute, f"PRAGMA secure_delete = {secure}")

    async def erase_residue(self, tables: Sequence[str]) -> None:
        """Checkpoint the WAL into the database file and truncate it (erased bytes go, from
        every table at once: ``secure_delete`` zeroed the freed pages already).

        A reader holding an older snapshot (a rebuild, an export) keeps the checkpoint from
        finishing; it is then retried in the background until it does.
        """
        if not await self._checkpoint() and (self._residue is None or self._residue.done()):
            self._residue = asyncio.create_task(self._checkpoint_until_done(), name="wal-erase")

    async def _checkpoint(self) -> bool:
        if self._writer is None:
            return True
        async with self._write_lock:
            busy, _, _ = await self._in_writer(_checkpoint, self._writer)
        return bool(busy == 0)

    async def _checkpoint_until_done(self) -> None:
        delay = 0.05
        while self._writer is not None:
            await asyncio.sleep(delay)
            if await self._checkpoint():
                return
            delay = min(delay * 2, 1.0)


def _begin_snapshot(conn: sqlite3.Connection) -> bool:
    """Begin a read transaction on ``conn`` and take its snapshot now (a read of the header);
    ``False``, with nothing begun, if SQLite answered busy."""
    conn.execute("BEGIN")
    try:
        conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.OperationalError as exc:
        conn.execute("ROLLBACK")
        if is_busy(exc):
            return False
        raise translate_error(exc) from exc
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Checkpoint and truncate the WAL without waiting: busy (first value 1) at once when a
    reader still holds an older snapshot. Waiting for it in the busy handler would hold the
    writer, and every tenant's writes behind it, for up to the busy timeout."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
    return int(row[0]), int(row[1]), int(row[2])


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
