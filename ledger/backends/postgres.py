"""PostgreSQL: several stateless server processes over one database (asyncpg).

The SQL the store and the projections write once (``?`` placeholders, SQLite's types) is
translated per statement and cached: ``?`` becomes ``$1..$n`` (never inside string literals,
quoted names or comments), ``INTEGER`` becomes ``BIGINT`` (times are epoch microseconds),
``LIKE`` becomes ``ILIKE`` (SQLite's ``LIKE`` ignores case) and ``TEXT`` columns are created
``COLLATE "C"`` so text sorts by bytes, as in SQLite.

Writes are serialised per *tenant*, not per deployment: a write transaction first calls
``jobledger_begin_append`` (created with the schema), which takes one transaction-level advisory
lock per tenant of the batch, in a fixed order, answers their chain heads (and which streams
other processes appended to since the writer's cache last saw them) and reserves positions from
the ``event_positions`` sequence. Positions are taken under the tenant's lock, which is held
until COMMIT, so each tenant's events commit in position order: a reader tailing one tenant's
``position > N`` never sees a later position of that tenant commit before an earlier one.
Across tenants positions are unique and increasing per tenant, but not dense and not in commit
order (docs/postgres.md).

The writes of a batch wait in a buffer and go to the server as one script together with the
``COMMIT``, so a batch holds its locks for two round trips: the lock call and the script. The
script runs statements this connection has ``PREPARE``d (outside any lock, when the connection
first meets them) with their values rendered as SQL literals.

Reads are not locked and scale with processes and pool connections. After a committed batch a
``NOTIFY jobledger`` wakes the long polls, event streams and webhook scanners of every other
process: at most one per ``NOTIFY_SECONDS`` per process (a burst of batches sends one), in a
transaction of its own that does not wait for the disk (the events it announces are durable
already), and carrying this process's token so that its own listener ignores it.

With read replicas (``replicas=``, hot standbys of this database) a read whose request allows
it (``ledger/routing.py``) goes to a standby that has replayed far enough
(``ledger/backends/replicas.py``); if the standby fails before the read's first answer, the
read runs on the primary instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from ledger.backends.bulk import PostgresBulk
from ledger.backends.replicas import CHECK_TIMEOUT, Replica, ReplicaSet
from ledger.errors import (
    CommitFailed,
    Rejected,
    StoreConflict,
    StoreUnavailable,
    total_out_of_range,
)
from ledger.routing import READ_ROUTE
from ledger.sql import Conn, Reservation, Row, WriteConn

log = structlog.get_logger(__name__)

CHANNEL = "jobledger"
TENANT_LOCKS = 0x6A6C_6170  # "jlap": the advisory lock class of the per-tenant write locks
WRITE_LOCK = 0x6A6C_7772  # "jlwr": shared by tenant appends, exclusive for whole-ledger writes
SCHEMA_LOCK = 0x6A6C_7363  # "jlsc": held while the schema is created or upgraded
SCHEMA_DIGEST = "pg_schema_digest"
POOL_MIN = 1
POOL_MAX = 10
CONNECT_TIMEOUT = 10.0
NOTIFY_SECONDS = 0.02  # one NOTIFY per process per 20 ms at most, however many batches commit
STATEMENT_CACHE = 512
PREPARED_MAX = 256  # write statements PREPAREd per connection, at most
STALE_MAX = 10_000  # streams another process appended to; more and the tenant is forgotten

# Created with the ledger's schema (PostgreSQL only). The function takes the tenants' write
# locks in the order of their lock keys (so two batches that share tenants never deadlock),
# then answers, in one round trip: how long the locks took ('w'), the tenants' chain heads
# ('h'), the streams appended to after the position the caller knows ('s', at most p_limit)
# and p_count fresh positions ('p'), drawn while the locks are held.
POSITIONS_SEQUENCE = "CREATE SEQUENCE IF NOT EXISTS event_positions AS bigint"
# Only ever moves the sequence forward: past events written without it (before this schema,
# or by an import that keeps its positions).
ADVANCE_POSITIONS = (
    "SELECT setval('event_positions', s.m) FROM (SELECT max(position) AS m FROM events) s "
    "WHERE s.m > (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END "
    "FROM event_positions)"
)
BEGIN_APPEND_FUNCTION = f"""CREATE OR REPLACE FUNCTION jobledger_begin_append(
    p_tenants text[], p_known bigint[], p_count bigint, p_limit bigint)
RETURNS TABLE (kind text, tenant text, stream text, n bigint, hash text, cnt bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    k int;
    started timestamptz := clock_timestamp();
BEGIN
    PERFORM pg_advisory_xact_lock_shared({WRITE_LOCK});
    FOR k IN SELECT DISTINCT hashtext(t.x) FROM unnest(p_tenants) AS t(x) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock({TENANT_LOCKS}, k);
    END LOOP;
    RETURN QUERY SELECT 'w'::text, NULL::text, NULL::text,
        (extract(epoch FROM clock_timestamp() - started) * 1000000)::bigint,
        NULL::text, NULL::bigint;
    RETURN QUERY SELECT 'h'::text, h.tenant::text, NULL::text, h.position, h.hash::text, h.count
        FROM chain_heads h WHERE h.tenant = ANY (p_tenants);
    RETURN QUERY SELECT 's'::text, c.tenant, s.stream::text, NULL::bigint, NULL::text,
        NULL::bigint
        FROM unnest(p_tenants, p_known) AS c(tenant, known)
        CROSS JOIN LATERAL (
            SELECT e.stream FROM events e
            WHERE e.tenant = c.tenant AND e.position > c.known
            ORDER BY e.position LIMIT p_limit
        ) s
        WHERE c.known >= 0;
    RETURN QUERY SELECT 'p'::text, NULL::text, NULL::text, nextval('event_positions'),
        NULL::text, NULL::bigint FROM generate_series(1, p_count);
END
$fn$"""
POSTGRES_SCHEMA = (POSITIONS_SEQUENCE, ADVANCE_POSITIONS, BEGIN_APPEND_FUNCTION)
_BEGIN_APPEND = "SELECT * FROM jobledger_begin_append($1::text[], $2::bigint[], $3, $4)"
_LOCK_ALL = f"SELECT pg_advisory_xact_lock({WRITE_LOCK})"
_MORE_POSITIONS = "SELECT nextval('event_positions') FROM generate_series(1, $1::bigint)"

# Errors that mean the server went away (restart, network, pg_terminate_backend), not that the
# SQL was wrong. asyncpg's client-side errors belong here: when the server ends a session, it
# sends an ErrorResponse (FATAL, 57P01) and then closes the socket. A pooled connection idle at
# that moment parses the message in a state that expects none and puts its protocol into
# ``ERROR_CONSUME`` (waiting for a ReadyForQuery that never comes); until the end of the socket
# is read in a later turn of the event loop the connection is not ``is_closed()``, so the pool
# hands it out, and its first query fails before sending anything: InternalClientError "cannot
# switch to state 12; another operation (2) is in progress". InterfaceError is asyncpg's
# "connection is closed" (and "another operation is in progress"). A connection that raised any of
# these is terminated, never put back in the pool (``PostgresBackend._acquire``).
_GONE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def _lost_connection(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, says the connection is gone."""
    seen: BaseException | None = exc
    for _ in range(8):  # the ledger's error, raised from (or while handling) asyncpg's
        if seen is None:
            return False
        if isinstance(seen, _GONE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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


# Statements written in a buffered write, PREPAREd per connection under these names.
_PARAM = re.compile(
    r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|--[^\n]*|/\*.*?(?:\*/|\Z)|\$[0-9]+""", re.DOTALL
)
_PREPARABLE = re.compile(r"\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
_NAMES: dict[str, str] = {}  # translated statement -> name, for every statement seen
_UNPREPARABLE: set[str] = set()  # statements PREPARE refused: always sent as literal SQL
_REFUSALS: dict[str, int] = {}  # PREPAREs refused for another reason, by statement
REFUSALS_KEPT = 3  # then the statement is sent as literal SQL for good
# What PREPARE says of a statement whose parameter types the server cannot infer: for good
_NEVER_PREPARABLE = (asyncpg.IndeterminateDatatypeError, asyncpg.AmbiguousParameterError)
_PREPARED: weakref.WeakKeyDictionary[asyncpg.Connection, set[str]] = weakref.WeakKeyDictionary()


class Unrenderable(ValueError):
    """A value the literal renderer will not put into SQL text."""


def literal(value: Any) -> str:
    """``value`` as a PostgreSQL literal (``standard_conforming_strings`` is on: the backslash
    is an ordinary character, a quote is doubled)."""
    if value is None:
        return "NULL"
    if isinstance(value, int):  # bool too: stored as 0/1, as on SQLite
        return _number(str(int(value)))
    if isinstance(value, str):
        if "\x00" in value:
            raise Unrenderable("text holds a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeError:
            raise Unrenderable("text is not valid Unicode (a lone surrogate)") from None
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise Unrenderable(f"{value} is not a finite number")
        return _number(repr(value) if isinstance(value, float) else str(value))
    raise Unrenderable(f"cannot render a {type(value).__name__} as SQL")


def _number(text: str) -> str:
    """A negative number in parentheses: after an operator (``x - $1``) a bare ``-5`` would
    start a ``--`` comment, and ``-9223372036854775808::bigint`` would negate an out-of-range
    literal; ``(-5)`` is one value wherever it stands."""
    return f"({text})" if text.startswith("-") else text


def inline(translated: str, params: Sequence[Any]) -> str:
    """``translated`` with each ``$n`` replaced by the literal of ``params[n - 1]``."""

    def token(match: re.Match[str]) -> str:
        text = match.group()
        if text.startswith("$"):
            return literal(params[int(text[1:]) - 1])
        return text

    return _PARAM.sub(token, translated) if params else translated


def _prepared_on(conn: asyncpg.Connection) -> set[str]:
    """The names PREPAREd on this server session (a pool hands out proxies of it)."""
    raw = getattr(conn, "_con", None) or conn  # asyncpg's PoolConnectionProxy holds it there
    names = _PREPARED.get(raw)
    if names is None:
        names = _PREPARED[raw] = set()
    return names


# ``INSERT INTO t (cols) VALUES ($1, ..., $n) [ON CONFLICT (keys) ...]``: several rows of it
# go as one statement with several VALUES rows (one parse, one plan, one executor start).
_INSERT = re.compile(
    r"\s*INSERT\s+INTO\s+(\S+)\s*\(([^)]*)\)\s*VALUES\s*\(([$0-9,\s]*)\)"
    r"(\s*|\s+ON\s+CONFLICT\s*\(([^)]*)\)\s.*)$",
    re.IGNORECASE | re.DOTALL,
)


class _Insert(NamedTuple):
    head: str  # "INSERT INTO t (cols) VALUES "
    tail: str  # "" or " ON CONFLICT (...) DO ..."
    keys: tuple[int, ...] | None  # the conflict key's columns; None: no ON CONFLICT


@lru_cache(maxsize=512)
def _multi_row(translated: str) -> _Insert | None:
    """How rows of ``translated`` combine into one INSERT; ``None``: they do not."""
    match = _INSERT.match(translated)
    if match is None:
        return None
    table, cols, values, tail, conflict = match.groups()
    columns = [c.strip() for c in cols.split(",")]
    if [v.strip() for v in values.split(",")] != [f"${i + 1}" for i in range(len(columns))]:
        return None
    keys: tuple[int, ...] | None = None
    if conflict is not None:
        try:
            keys = tuple(columns.index(k.strip()) for k in conflict.split(","))
        except ValueError:
            return None
    return _Insert(f"INSERT INTO {table} ({cols}) VALUES ", tail, keys)


def _rendered(translated: str, rows: list[Sequence[Any]], prepared: set[str]) -> list[str]:
    """The statements that write ``rows`` of ``translated``, values as literals.

    Several rows of a plain INSERT become one statement; of an upsert too, when no two rows
    share the conflict key (an upsert may not touch a row twice). Otherwise one ``EXECUTE``
    per row of the statement this connection PREPAREd, or the statement itself, inlined.
    """
    shape = _multi_row(translated) if len(rows) > 1 else None
    if shape is not None and (
        shape.keys is None or len({tuple(r[i] for i in shape.keys) for r in rows}) == len(rows)
    ):
        values = ", ".join(f"({', '.join(literal(v) for v in row)})" for row in rows)
        return [shape.head + values + shape.tail]
    name = _statement_name(translated)
    if name in prepared:
        return [f"EXECUTE {name}({', '.join(literal(v) for v in row)})" for row in rows]
    return [inline(translated, row) for row in rows]


def _statement_name(translated: str) -> str | None:
    """The name a write statement is PREPAREd under; ``None``: always sent as text."""
    name = _NAMES.get(translated)
    if name is None:
        if (
            _PREPARABLE.match(translated) is None
            or "$1" not in translated
            or len(_NAMES) >= PREPARED_MAX  # statements built per call (IN lists): inlined
        ):
            return None
        name = _NAMES[translated] = "jlw_" + hashlib.sha1(translated.encode()).hexdigest()[:24]
    return None if translated in _UNPREPARABLE else name


class PostgresConn:
    """A pooled asyncpg connection behind the shared ``Conn`` protocol.

    In PostgreSQL a failed statement aborts its transaction, where SQLite only undoes the one
    statement: once any statement fails, ``failed`` is true and every later statement raises,
    until ``rollback_savepoint`` (or the end of the transaction).

    A write transaction (``write``) locks on its first request. ``reserve`` takes the named
    tenants' locks (and the whole-ledger lock in shared mode) and makes the connection
    *buffered*: ``execute`` and ``executemany`` then wait in a buffer that goes to the server as
    one script with the next read, ``sync`` or the ``COMMIT``. Any other first request takes the
    whole-ledger lock exclusively (rebuilds, imports): it waits for every tenant's appends.
    """

    dialect = "postgres"

    def __init__(self, conn: asyncpg.Connection, *, write: bool = False) -> None:
        self._conn = conn
        self._failure: str | None = None
        self._unlocked = write  # a write transaction that has taken no lock yet
        self._buffered = False
        self._pending: list[tuple[str, list[Sequence[Any]]]] = []
        self._trips = 0
        self.committed = False

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def round_trips(self) -> int:
        return self._trips

    def _check(self) -> None:
        if self._failure is not None:
            raise StoreConflict(f"the transaction is aborted ({self._failure})")

    async def _lock(self) -> None:
        """Before a write transaction's first request that is not ``reserve``: lock it all."""
        if self._unlocked:
            self._unlocked = False
            self._trips += 1
            try:
                await self._conn.execute(_LOCK_ALL)
            except Exception as exc:
                raise self._failed(exc) from exc

    def _failed(self, exc: Exception) -> Exception:
        translated = translate_error(exc)
        if isinstance(exc, (asyncpg.PostgresError, *_GONE)):
            self._failure = str(translated) or type(exc).__name__
        return translated

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._check()
        if self._buffered:
            self._pending.append((sql, [params]))
            return
        await self._lock()
        self._trips += 1
        try:
            await self._conn.execute(translate(sql), *params)
        except Exception as exc:
            raise self._failed(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._check()
        batch = list(rows)
        if not batch:
            return
        if self._buffered:
            self._pending.append((sql, batch))
            return
        await self._lock()
        self._trips += 1
        try:
            await self._conn.executemany(translate(sql), batch)
        except Exception as exc:
            raise self._failed(exc) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        await self._send()
        await self._lock()
        self._trips += 1
        try:
            records = await self._conn.fetch(translate(sql), *params)
        except Exception as exc:
            raise self._failed(exc) from exc
        return [tuple(r) for r in records]

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        await self._send()
        await self._lock()
        self._trips += 1
        try:
            record = await self._conn.fetchrow(translate(sql), *params)
        except Exception as exc:
            raise self._failed(exc) from exc
        return None if record is None else tuple(record)

    async def sync(self, *, last: bool = False) -> None:
        """Send what is buffered; ``last``: with the ``COMMIT`` (see ``WriteConn.sync``)."""
        if not last:
            await self._send()
            return
        status = await self._send("COMMIT")
        if status != "COMMIT":  # PostgreSQL answers ROLLBACK for an aborted transaction
            self._failure = f"the database answered {status} to COMMIT"
            raise CommitFailed(self._failure)
        self.committed = True

    async def _send(self, final: str | None = None) -> str | None:
        """Run the buffered statements (and ``final``) in one round trip; the last status."""
        self._check()
        pending = self._pending
        if not pending and final is None:
            return None
        if final is None or pending:
            await self._lock()
        prepared = _prepared_on(self._conn)
        try:
            script = [
                statement
                for sql, rows in pending
                for statement in _rendered(translate(sql), rows, prepared)
            ]
        except Unrenderable as exc:  # nothing was sent: the buffer stays for a rollback
            raise Rejected(
                f"the database cannot store a value ({exc}); nothing was written"
            ) from None
        self._pending = []
        if final is not None:
            script.append(final)
        self._trips += 1
        try:
            status: str = await self._conn.execute(";\n".join(script))
        except Exception as exc:
            if final is not None and isinstance(exc, _GONE):
                self._failure = str(exc) or type(exc).__name__
                raise CommitFailed(f"the connection was lost during the COMMIT: {exc}") from exc
            # a statement (or the COMMIT itself) failed: the transaction is aborted and
            # nothing of it was committed
            raise self._failed(exc) from exc
        return status

    async def reserve(
        self, tenants: Sequence[str], known: Sequence[int], count: int
    ) -> Reservation | None:
        if not self._unlocked:
            raise RuntimeError("reserve() must be a write transaction's first request")
        self._unlocked = False
        self._buffered = True
        self._trips += 1
        try:
            rows = await self._conn.fetch(
                _BEGIN_APPEND, list(tenants), list(known), count, STALE_MAX + 1
            )
        except Exception as exc:
            raise self._failed(exc) from exc
        heads: dict[str, tuple[int, str, int]] = {}
        stale: dict[str, set[str] | None] = {}
        positions: list[int] = []
        wait_us = streams = 0
        for kind, tenant, stream, n, digest, count_ in rows:
            if kind == "p":
                positions.append(n)
            elif kind == "h":
                heads[tenant] = (n, digest, count_)
            elif kind == "s":
                streams += 1
                seen = stale.setdefault(tenant, set())
                if seen is not None:
                    seen.add(stream)
            elif kind == "w":
                wait_us = n
        if streams > STALE_MAX:
            stale = dict.fromkeys(stale)
        positions.sort()
        return Reservation(heads, stale, positions, wait_us / 1e6)

    async def more_positions(self, count: int) -> list[int]:
        if self._buffered:
            await self._send()
        self._trips += 1
        try:
            rows = await self._conn.fetch(_MORE_POSITIONS, count)
        except Exception as exc:
            raise self._failed(exc) from exc
        return sorted(r[0] for r in rows)

    async def savepoint(self) -> None:
        await self.execute("SAVEPOINT command")

    async def release_savepoint(self) -> None:
        await self.execute("RELEASE SAVEPOINT command")

    async def rollback_savepoint(self) -> None:
        unsent = [i for i, (sql, _) in enumerate(self._pending) if sql == "SAVEPOINT command"]
        if unsent:  # the savepoint itself is still in the buffer: drop it and what followed
            del self._pending[unsent[-1] :]
            return
        self._pending.clear()  # statements after the savepoint: they are undone unsent
        self._trips += 1
        try:
            await self._conn.execute("ROLLBACK TO SAVEPOINT command; RELEASE SAVEPOINT command")
        except Exception as exc:
            raise CommitFailed(f"the write transaction was lost: {exc}") from exc
        self._failure = None


_BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# What a standby may answer instead of rows: it went away, or it cancelled the query because
# replay needed what the query held (a recovery conflict, SQLSTATE 40001).
_REPLICA_FAILED: tuple[type[Exception], ...] = (
    *_GONE,  # InternalClientError among them: a connection the server cut while idle, used next
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
        finally:
            try:
                conn, self._conn = self._conn, None
                if conn is not None:
                    if self._snapshot:
                        await _end_snapshot(conn)
                    with contextlib.suppress(Exception):  # a connection the server cut
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
                if self._snapshot and self._answered:  # too late to move: 503, never a 500
                    self._failure = str(exc) or type(exc).__name__
                    raise StoreUnavailable(f"the standby failed mid-read: {exc}") from exc
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


async def _prepare_known(conn: asyncpg.Connection) -> None:
    """PREPARE the write statements this connection has not met yet (outside any lock).

    PREPARE outlives transactions. A statement whose parameter types the server cannot infer
    is sent as literal SQL from then on; one refused for another reason (a table not created
    yet, a statement timeout) is tried again by later transactions, up to ``REFUSALS_KEPT``
    times. Either way the transaction goes on: the statement runs as literal SQL.
    """
    prepared = _prepared_on(conn)
    if len(prepared) + len(_UNPREPARABLE) >= len(_NAMES):
        return  # the usual case: nothing new since this connection's last transaction
    missing = [(t, n) for t, n in list(_NAMES.items()) if n not in prepared]
    for translated, name in missing:
        if translated in _UNPREPARABLE:
            continue
        try:
            await conn.execute(f"PREPARE {name} AS {translated}")
        except asyncpg.DuplicatePreparedStatementError:
            pass
        except asyncpg.PostgresError as exc:
            if isinstance(exc, _GONE):
                raise
            log.warning("postgres.prepare_refused", statement=translated[:80], error=str(exc))
            refusals = _REFUSALS[translated] = _REFUSALS.get(translated, 0) + 1
            if isinstance(exc, _NEVER_PREPARABLE) or refusals >= REFUSALS_KEPT:
                _UNPREPARABLE.add(translated)
            continue
        prepared.add(name)


def translate_error(exc: Exception) -> Exception:
    """The ledger's error for what PostgreSQL (or asyncpg) refused."""
    if isinstance(exc, asyncpg.CheckViolationError):
        return total_out_of_range(exc.constraint_name or "")
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
        self._notified = -NOTIFY_SECONDS  # when the last NOTIFY started (time.monotonic())
        self._token = os.urandom(8).hex()  # our NOTIFY payload: our listener skips our own
        self._notify_sql = (
            f"BEGIN; SET LOCAL synchronous_commit TO off; NOTIFY {CHANNEL}, '{self._token}'; COMMIT"
        )
        self._vacuum_task: asyncio.Task[None] | None = None
        self._vacuum_again = False
        self._vacuum_tables: set[str] = set()

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
                # literal rendering relies on it (the default since PostgreSQL 9.1)
                server_settings={
                    "application_name": "jobledger",
                    "standard_conforming_strings": "on",
                },
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
        except BaseException as exc:
            if not _lost_connection(exc):
                raise
            # its protocol may be stuck mid-operation (see _GONE): never hand it out again
            # (asyncpg refuses to terminate it when it detached it from the pool already)
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
            if isinstance(exc, _GONE):  # raised by asyncpg itself, e.g. opening a transaction
                raise translate_error(exc) from exc
            raise
        finally:
            await self._pool.release(conn)

    # -- transactions ----------------------------------------------------------------------

    @asynccontextmanager
    async def write(self) -> AsyncIterator[WriteConn]:
        """A buffered write transaction; it takes no lock until ``reserve`` names tenants."""
        async with self._acquire() as conn:
            try:
                await _prepare_known(conn)  # only statements new to this connection
                await conn.execute("BEGIN")
            except _GONE as exc:
                raise StoreUnavailable(f"lost the connection to PostgreSQL: {exc}") from None
            pg = PostgresConn(conn, write=True)
            try:
                yield pg
                if pg.failed:
                    # COMMIT would quietly roll back the aborted transaction: never report
                    # success for it, even if the caller swallowed the error
                    raise CommitFailed(f"the transaction was aborted ({pg._failure})")
                if not pg.committed:
                    try:
                        await pg.sync(last=True)
                    except CommitFailed:
                        raise
                    except Exception as exc:
                        raise CommitFailed(f"the COMMIT failed: {exc}") from exc
            except BaseException:
                if not pg.committed:
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
                raise

    def committed_version(self) -> None:
        return None  # no cheap way to know: every read asks the server

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
        statements = [*statements, *POSTGRES_SCHEMA]
        digest = hashlib.sha256("\n;\n".join(statements).encode()).hexdigest()
        async with self._acquire() as conn:
            if await self._schema_digest(conn) == digest:
                return
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                    for sql in statements:
                        await conn.execute(sql if sql in POSTGRES_SCHEMA else translate(sql))
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

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != self._token:
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

    async def wait_for_signal(self, seconds: float) -> bool:
        if await self._listen() is None:
            await asyncio.sleep(seconds)  # polling the head position still finds new events
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._signalled.wait(), seconds)
        signalled = self._signalled.is_set()
        self._signalled.clear()
        return signalled

    async def signal(self) -> None:
        """``NOTIFY`` in the background; signals within ``NOTIFY_SECONDS`` collapse into one."""
        if self._notify_task is not None and not self._notify_task.done():
            self._notify_again = True
            return
        self._notify_task = asyncio.create_task(self._notify(), name="postgres-notify")

    async def _notify(self) -> None:
        # The NOTIFY is a transaction of its own, and PostgreSQL serialises the commits of
        # notifying transactions: not waiting for the disk keeps that lock short. Nothing is
        # lost: the events it announces were durable before it was sent.
        while True:
            await asyncio.sleep(max(0.0, self._notified + NOTIFY_SECONDS - time.monotonic()))
            self._notify_again = False
            self._notified = time.monotonic()
            try:
                listener = self._listener
                if listener is not None and not listener.is_closed():
                    await listener.execute(self._notify_sql)  # no pool checkout: one round trip
                else:
                    async with self._acquire() as conn:
                        await conn.execute(self._notify_sql)
            except Exception as exc:  # the others still poll the head position
                log.warning("postgres.notify_failed", error=str(exc))
            if not self._notify_again:
                return

    # -- erasure ---------------------------------------------------------------------------

    async def set_durable(self, durable: bool) -> None:
        return None  # each transaction's commit is cheap next to the work; nothing to relax

    async def erase_residue(self, tables: Sequence[str]) -> None:
        """``VACUUM`` ``tables``, which held erased data, in the background (best effort).

        This removes the old row versions, so no query can read them; reclaiming the very disk
        blocks takes ``VACUUM FULL``, which locks the tables and is left to maintenance.
        """
        self._vacuum_tables.update(tables)
        if self._vacuum_task is not None and not self._vacuum_task.done():
            self._vacuum_again = True
            return
        self._vacuum_task = asyncio.create_task(self._vacuum(), name="postgres-vacuum")

    async def _vacuum(self) -> None:
        while True:
            self._vacuum_again = False
            for table in sorted(self._vacuum_tables):
                try:
                    async with self._acquire() as conn:
                        await conn.execute(f"VACUUM {table}")
                except Exception as exc:
                    log.warning("postgres.vacuum_failed", table=table, error=str(exc))
            if not self._vacuum_again:
                return
