"""PostgreSQL: several stateless server processes over one database (asyncpg).

The SQL the store and the projections write once (``?`` placeholders, SQLite's types) is
translated per statement and cached: ``?`` becomes ``$1..$n`` (never inside string literals,
quoted names or comments), ``INTEGER`` becomes ``BIGINT`` (times are epoch microseconds),
``LIKE`` becomes ``ILIKE`` (SQLite's ``LIKE`` ignores case) and ``TEXT`` columns are created
``COLLATE "C"`` so text sorts by bytes, as in SQLite.

Every write transaction first takes one transaction-level advisory lock, so appends from every
process are serialised: positions are assigned as ``max(position) + 1`` under the lock, and commit
order is position order. A reader tailing ``position > N`` can never see a later position commit
before an earlier one (the gap a sequence would open between concurrent transactions). Reads are
not locked and scale with processes and pool connections. After each committed batch a
``NOTIFY jobledger`` wakes the long polls and event streams of every other process.

With read replicas (``replicas=``, hot standbys of this database) a read whose request allows
it (``ledger/routing.py``) goes to a standby that has replayed far enough
(``ledger/backends/replicas.py``); if the standby fails before the read's first answer, the
read runs on the primary instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from ledger.backends.bulk import PostgresBulk
from ledger.backends.replicas import CHECK_TIMEOUT, Replica, ReplicaSet
from ledger.errors import CommitFailed, Rejected, StoreConflict, StoreUnavailable
from ledger.routing import READ_ROUTE
from ledger.sql import Conn, Row, WriteConn

log = structlog.get_logger(__name__)

CHANNEL = "jobledger"
APPEND_LOCK = 0x6A6C_6170  # "jlap": held by every write transaction, in every process
SCHEMA_LOCK = 0x6A6C_7363  # "jlsc": held while the schema is created or upgraded
SCHEMA_DIGEST = "pg_schema_digest"
POOL_MIN = 1
POOL_MAX = 10
CONNECT_TIMEOUT = 10.0
RESIDUE_TABLES = ("events", "results", "idempotency", "jobs")
STATEMENT_CACHE = 512
_BEGIN_WRITE = f"BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK})"

# Errors that mean the server went away (restart, network), not that the SQL was wrong.
_GONE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

# One token the translation cares about: a literal, a quoted name, a comment, ``?`` or a word.
_TOKEN = re.compile(
    r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|--[^\n]*|/\*.*?(?:\*/|\Z)|\?|[A-Za-z_][A-Za-z0-9_$]*""",
    re.DOTALL,
)
_DDL = re.compile(r"\s*(CREATE|ALTER)\s+TABLE\b", re.IGNORECASE)


@lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """The PostgreSQL form of one statement written for both backends (cached per string)."""
    ddl = _DDL.match(sql) is not None
    count = 0

    def token(match: re.Match[str]) -> str:
        nonlocal count
        text = match.group()
        if text == "?":
            count += 1
            return f"${count}"
        if text == "INTEGER":
            return "BIGINT"
        if text == "LIKE":
            return "ILIKE"
        if text == "TEXT" and ddl:
            return 'TEXT COLLATE "C"'
        return text

    return _TOKEN.sub(token, sql)


def _decode_numeric(text: str) -> int | Decimal:
    """``sum()`` over BIGINT answers NUMERIC: give back an ``int`` when it is whole, as SQLite."""
    value = Decimal(text)
    return int(value) if value == value.to_integral_value() else value


def _reason(exc: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('::1', 5432)``."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc) or type(exc).__name__
    return os.strerror(exc.errno)


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset on release: we leave no session state behind.

    asyncpg still rolls back an open transaction first; its default reset would cost one more
    round trip per checkout (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``).
    """


class PostgresConn:
    """A pooled asyncpg connection behind the shared ``Conn`` protocol.

    In PostgreSQL a failed statement aborts its transaction, where SQLite only undoes the one
    statement: once any statement fails, ``failed`` is true and every later statement raises,
    until ``rollback_savepoint`` (or the end of the transaction).
    """

    dialect = "postgres"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._failure: str | None = None

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def _check(self) -> None:
        if self._failure is not None:
            raise StoreConflict(f"the transaction is aborted ({self._failure})")

    def _failed(self, exc: Exception) -> Exception:
        translated = translate_error(exc)
        if isinstance(exc, (asyncpg.PostgresError, *_GONE)):
            self._failure = str(translated) or type(exc).__name__
        return translated

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._check()
        try:
            await self._conn.execute(translate(sql), *params)
        except Exception as exc:
            raise self._failed(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._check()
        batch = list(rows)
        if not batch:
            return
        try:
            await self._conn.executemany(translate(sql), batch)
        except Exception as exc:
            raise self._failed(exc) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._check()
        try:
            records = await self._conn.fetch(translate(sql), *params)
        except Exception as exc:
            raise self._failed(exc) from exc
        return [tuple(r) for r in records]

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._check()
        try:
            record = await self._conn.fetchrow(translate(sql), *params)
        except Exception as exc:
            raise self._failed(exc) from exc
        return None if record is None else tuple(record)

    async def sync(self) -> None:
        self._check()  # statements ran as they were sent

    async def savepoint(self) -> None:
        await self.execute("SAVEPOINT command")

    async def release_savepoint(self) -> None:
        await self.execute("RELEASE SAVEPOINT command")

    async def rollback_savepoint(self) -> None:
        try:
            await self._conn.execute("ROLLBACK TO SAVEPOINT command; RELEASE SAVEPOINT command")
        except Exception as exc:
            raise CommitFailed(f"the write transaction was lost: {exc}") from exc
        self._failure = None


_BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# What a standby may answer instead of rows: it went away, or it cancelled the query because
# replay needed what the query held (a recovery conflict, SQLSTATE 40001).
_REPLICA_FAILED: tuple[type[Exception], ...] = (
    *_GONE,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection the server cut while idle, used next
    asyncpg.TransactionRollbackError,
)


async def _end_snapshot(conn: asyncpg.Connection) -> None:
    """End a read-only snapshot; on a connection that died there is nothing to end."""
    with contextlib.suppress(Exception):
        await conn.execute("ROLLBACK")


def _terminate(conn: asyncpg.Connection) -> None:
    """Close a replica connection that failed, whatever state it is in: its pool connects
    afresh next time (asyncpg may have detached it from the pool already)."""
    with contextlib.suppress(Exception):
        conn.terminate()


class _ReplicaRead:
    """One read on a replica: its connection, and the primary's if the replica fails first.

    Plain acquire and release rather than nested context managers: this runs for every read
    a replica answers.
    """

    __slots__ = ("_backend", "_conn", "_primary", "_replica", "_snapshot")

    def __init__(self, backend: PostgresBackend, replica: Replica, *, snapshot: bool) -> None:
        self._backend = backend
        self._replica = replica
        self._snapshot = snapshot
        self._conn: asyncpg.Connection | None = None
        self._primary: asyncpg.Connection | None = None

    async def open(self) -> Conn:
        """The read's connection; the caller calls ``close`` in any case, also on failure."""
        replica = self._replica
        replicas = self._backend.replicas
        assert replicas is not None
        replica.in_flight += 1
        try:
            self._conn = await replica.pool.acquire(timeout=CHECK_TIMEOUT)
            if self._snapshot:
                await self._conn.execute(_BEGIN_SNAPSHOT)
        except (*_REPLICA_FAILED, TimeoutError, asyncpg.PostgresError) as exc:
            await self._drop_replica()
            replicas.failed(replica, exc)
            replicas.fell_back("failed")
            return PostgresConn(await self.on_primary())
        return _ReplicaConn(self._conn, replicas, replica, self.on_primary, snapshot=self._snapshot)

    async def on_primary(self) -> asyncpg.Connection:
        """Move the read to a primary connection (a snapshot starts afresh there)."""
        conn = self._primary = await self._backend._primary_conn()
        if self._snapshot:
            await conn.execute(_BEGIN_SNAPSHOT)
        return conn

    async def _drop_replica(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _terminate(conn)
            with contextlib.suppress(Exception):
                await self._replica.pool.release(conn)

    async def close(self) -> None:
        try:
            primary, self._primary = self._primary, None
            if primary is not None:
                if self._snapshot:
                    await _end_snapshot(primary)
                await self._backend._release_primary(primary)
            conn, self._conn = self._conn, None
            if conn is not None:
                if self._snapshot:
                    await _end_snapshot(conn)
                with contextlib.suppress(Exception):  # a connection the server cut: gone already
                    await self._replica.pool.release(conn)
        finally:
            self._replica.in_flight = max(0, self._replica.in_flight - 1)


class _ReplicaConn(PostgresConn):
    """A connection to a replica that moves to the primary if the replica fails.

    A statement the replica cannot answer (it went away, or cancelled the query in a recovery
    conflict) runs again on a primary connection, and so does every later statement of the
    block. In a snapshot, that is only sound before the first answer: after it, the error
    stands (``503``, as for a primary that went away).
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        replicas: ReplicaSet,
        replica: Replica,
        on_primary: Callable[[], Awaitable[asyncpg.Connection]],
        *,
        snapshot: bool,
    ) -> None:
        super().__init__(conn)
        self._replicas = replicas
        self._replica: Replica | None = replica
        self._on_primary = on_primary
        self._snapshot = snapshot
        self._answered = False

    async def _run(self, method: str, sql: str, params: Sequence[Any]) -> Any:
        self._check()
        text = translate(sql)
        if self._replica is not None:
            try:
                answer = await getattr(self._conn, method)(text, *params)
                self._answered = True
                return answer
            except _REPLICA_FAILED as exc:
                if self._snapshot and self._answered:
                    raise self._failed(exc) from exc
                if not isinstance(exc, asyncpg.TransactionRollbackError):
                    _terminate(self._conn)
                    self._replicas.failed(self._replica, exc)
                self._replicas.fell_back("failed")
                self._replica = None
                self._conn = await self._on_primary()
            except Exception as exc:
                raise self._failed(exc) from exc
        try:
            return await getattr(self._conn, method)(text, *params)
        except Exception as exc:
            raise self._failed(exc) from exc

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._run("execute", sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self._run("fetch", sql, params)]

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        record = await self._run("fetchrow", sql, params)
        return None if record is None else tuple(record)


def translate_error(exc: Exception) -> Exception:
    """The ledger's error for what PostgreSQL (or asyncpg) refused."""
    if isinstance(exc, asyncpg.CheckViolationError):
        return Rejected("a total would leave the ledger's range; nothing was written")
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return StoreConflict(exc.args[0] if exc.args else type(exc).__name__)
    if isinstance(exc, asyncpg.DataError | UnicodeError | OverflowError):
        return Rejected(f"the database refused a value ({exc}); nothing was written")
    if isinstance(exc, _GONE):
        return StoreUnavailable(f"lost the connection to PostgreSQL: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreUnavailable(f"PostgreSQL failed: {exc}")
    return exc


class PostgresBackend(PostgresBulk):
    """An asyncpg pool, an advisory lock for appends and LISTEN/NOTIFY for wake-ups."""

    dialect = "postgres"

    def __init__(
        self,
        url: str,
        *,
        min_size: int = POOL_MIN,
        max_size: int = POOL_MAX,
        replicas: Sequence[str] = (),
    ) -> None:
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self.replicas = ReplicaSet(replicas, self._replica_pool) if replicas else None
        self._listener: asyncpg.Connection | None = None
        self._signalled = asyncio.Event()
        self._notify_task: asyncio.Task[None] | None = None
        self._notify_again = False
        self._vacuum_task: asyncio.Task[None] | None = None
        self._vacuum_again = False

    # -- life ------------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        """One readable line for a database that cannot be reached or used."""
        where = redact_url(self.url)
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return StoreUnavailable(f"cannot open {where}: {exc} (create it first: createdb)")
        if isinstance(
            exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
        ):
            return StoreUnavailable(f"PostgreSQL refused the login: {exc} ({where})")
        if isinstance(exc, ValueError):  # asyncpg's ClientConfigurationError is one too
            return StoreUnavailable(f"invalid PostgreSQL URL {where}: {exc}")
        if isinstance(exc, TimeoutError):
            return StoreUnavailable(f"cannot reach PostgreSQL at {where}: timed out")
        if isinstance(exc, OSError):
            return StoreUnavailable(f"cannot reach PostgreSQL at {where}: {_reason(exc)}")
        return StoreUnavailable(f"cannot open PostgreSQL database {where}: {exc}")

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        await conn.set_type_codec(
            "numeric",
            encoder=str,
            decoder=_decode_numeric,
            schema="pg_catalog",
            format="text",
        )

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=CONNECT_TIMEOUT,
                init=self._init_connection,
                max_inactive_connection_lifetime=300.0,
                statement_cache_size=STATEMENT_CACHE,
                reset=_keep_session,
                server_settings={"application_name": "jobledger"},
            )
        except Exception as exc:
            raise self._unavailable(exc) from None
        if self.replicas is not None:
            await self.replicas.open()

    async def _replica_pool(self, url: str) -> asyncpg.Pool:
        """A standby's pool: no connection until a read needs one, so a standby that is
        down at start does not stop the server."""
        pool: asyncpg.Pool = await asyncpg.create_pool(
            url,
            min_size=0,
            max_size=self.max_size,
            timeout=CHECK_TIMEOUT,
            init=self._init_connection,
            max_inactive_connection_lifetime=300.0,
            statement_cache_size=STATEMENT_CACHE,
            reset=_keep_session,
            server_settings={"application_name": "jobledger-replica-read"},
        )
        return pool

    async def close(self) -> None:
        for task in (self._notify_task, self._vacuum_task):
            if task is not None and not task.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(task), 30.0)
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        self._notify_task = self._vacuum_task = None
        if self._listener is not None:
            listener, self._listener = self._listener, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 5.0)
            if not listener.is_closed():
                listener.terminate()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except (TimeoutError, Exception):
                pool.terminate()
        if self.replicas is not None:
            await self.replicas.close()

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise RuntimeError("backend not open")
        try:
            conn = await self._pool.acquire(timeout=60.0)
        except _GONE as exc:
            raise StoreUnavailable(f"lost the connection to PostgreSQL: {exc}") from None
        except TimeoutError:
            raise StoreUnavailable("no PostgreSQL connection free within 60 s") from None
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    # -- transactions ----------------------------------------------------------------------

    @asynccontextmanager
    async def write(self) -> AsyncIterator[WriteConn]:
        async with self._acquire() as conn:
            try:
                await conn.execute(_BEGIN_WRITE)  # one round trip: BEGIN and the lock
            except _GONE as exc:
                raise StoreUnavailable(f"lost the connection to PostgreSQL: {exc}") from None
            pg = PostgresConn(conn)
            try:
                yield pg
                if pg.failed:
                    # COMMIT would quietly roll back the aborted transaction: never report
                    # success for it, even if the caller swallowed the error
                    raise CommitFailed(f"the transaction was aborted ({pg._failure})")
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
            try:
                status = await conn.execute("COMMIT")
            except Exception as exc:
                raise CommitFailed(f"the COMMIT failed: {exc}") from exc
            if status != "COMMIT":  # PostgreSQL answers ROLLBACK for an aborted transaction
                raise CommitFailed(f"the database answered {status} to COMMIT")

    @asynccontextmanager
    async def read(self, *, snapshot: bool = False, bulk: bool = False) -> AsyncIterator[Conn]:
        route = READ_ROUTE.get()
        if route is not None and self.replicas is not None:
            replica = self.replicas.ready(route)  # no wait: known far enough, or a first pick
            if replica is None and not route.decided:
                replica = await self.replicas.choose(route)
            if replica is not None:
                reading = _ReplicaRead(self, replica, snapshot=snapshot)
                try:
                    yield await reading.open()
                finally:
                    await reading.close()
                return
        async with self._acquire() as conn:
            if not snapshot:
                yield PostgresConn(conn)
                return
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                yield PostgresConn(conn)

    async def _primary_conn(self) -> asyncpg.Connection:
        """A primary connection for a read a replica could not finish (``_ReplicaRead``)."""
        if self._pool is None:
            raise RuntimeError("backend not open")
        try:
            conn: asyncpg.Connection = await self._pool.acquire(timeout=60.0)
        except _GONE as exc:
            raise StoreUnavailable(f"lost the connection to PostgreSQL: {exc}") from None
        except TimeoutError:
            raise StoreUnavailable("no PostgreSQL connection free within 60 s") from None
        return conn

    async def _release_primary(self, conn: asyncpg.Connection) -> None:
        if self._pool is not None:
            await self._pool.release(conn)

    # -- schema ----------------------------------------------------------------------------

    async def ensure_schema(self, statements: Sequence[str]) -> None:
        """Create what is missing; one process at a time, and not at all when up to date."""
        digest = hashlib.sha256("\n;\n".join(statements).encode()).hexdigest()
        async with self._acquire() as conn:
            if await self._schema_digest(conn) == digest:
                return
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                    for sql in statements:
                        await conn.execute(translate(sql))
                    await conn.execute(
                        translate(
                            "INSERT INTO ledger_meta (name, value) VALUES (?, ?) "
                            "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                        ),
                        SCHEMA_DIGEST,
                        digest,
                    )
            except _GONE as exc:
                raise StoreUnavailable(f"lost the connection to PostgreSQL: {exc}") from None
            except asyncpg.InsufficientPrivilegeError as exc:
                raise StoreUnavailable(f"cannot create the schema: {exc}") from None

    @staticmethod
    async def _schema_digest(conn: asyncpg.Connection) -> str | None:
        try:
            value: str | None = await conn.fetchval(
                "SELECT value FROM ledger_meta WHERE name = $1", SCHEMA_DIGEST
            )
        except asyncpg.UndefinedTableError:
            return None
        return value

    # -- cross-process wake-ups ------------------------------------------------------------

    def _on_notify(self, *_: Any) -> None:
        self._signalled.set()

    async def _listen(self) -> asyncpg.Connection | None:
        if self._listener is not None and not self._listener.is_closed():
            return self._listener
        self._listener = None
        try:
            listener = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
        except Exception as exc:
            log.warning("postgres.listen_failed", error=str(exc))
            return None
        try:
            await listener.add_listener(CHANNEL, self._on_notify)
        except BaseException as exc:  # a cancellation (the store stopping) too: never leak it
            listener.terminate()
            if not isinstance(exc, Exception):
                raise
            log.warning("postgres.listen_failed", error=str(exc))
            return None
        self._listener = listener
        self._signalled.set()  # events may have been committed while nobody listened
        return listener

    async def wait_for_signal(self, seconds: float) -> None:
        if await self._listen() is None:
            await asyncio.sleep(seconds)  # polling the head position still finds new events
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._signalled.wait(), seconds)
        self._signalled.clear()

    async def signal(self) -> None:
        """``NOTIFY`` in the background; concurrent signals collapse into one."""
        if self._notify_task is not None and not self._notify_task.done():
            self._notify_again = True
            return
        self._notify_task = asyncio.create_task(self._notify(), name="postgres-notify")

    async def _notify(self) -> None:
        while True:
            self._notify_again = False
            try:
                async with self._acquire() as conn:
                    await conn.execute(f"NOTIFY {CHANNEL}")
            except Exception as exc:  # the others still poll the head position
                log.warning("postgres.notify_failed", error=str(exc))
            if not self._notify_again:
                return

    # -- erasure ---------------------------------------------------------------------------

    async def set_durable(self, durable: bool) -> None:
        return None  # each transaction's commit is cheap next to the work; nothing to relax

    async def erase_residue(self) -> None:
        """``VACUUM`` the tables that held erased data, in the background (best effort).

        This removes the old row versions, so no query can read them; reclaiming the very disk
        blocks takes ``VACUUM FULL``, which locks the tables and is left to maintenance.
        """
        if self._vacuum_task is not None and not self._vacuum_task.done():
            self._vacuum_again = True
            return
        self._vacuum_task = asyncio.create_task(self._vacuum(), name="postgres-vacuum")

    async def _vacuum(self) -> None:
        while True:
            self._vacuum_again = False
            for table in RESIDUE_TABLES:
                try:
                    async with self._acquire() as conn:
                        await conn.execute(f"VACUUM {table}")
                except Exception as exc:
                    log.warning("postgres.vacuum_failed", table=table, error=str(exc))
            if not self._vacuum_again:
                return
