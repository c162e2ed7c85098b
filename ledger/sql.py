"""The small SQL surface the store and the projections share across backends.

SQL is written once, with ``?`` placeholders and the subset both SQLite and PostgreSQL accept
(``INSERT ... ON CONFLICT ... DO UPDATE``, ``INTEGER`` columns that PostgreSQL widens to
``BIGINT``). Each backend adapts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

Row = Sequence[Any]


class Reservation(NamedTuple):
    """What a backend with per-tenant write locks answers when it has taken them.

    ``heads``: each locked tenant's committed chain head ``(position, hash, count)`` (absent:
    no events yet); ``stale``: the streams of each tenant that gained events after the position
    the caller said it knew (``None``: too many to list, forget the tenant); ``positions``:
    fresh event positions, increasing, unique across tenants; ``wait_seconds``: how long the
    locks took to get.
    """

    heads: dict[str, tuple[int, str, int]]
    stale: dict[str, set[str] | None]
    positions: list[int]
    wait_seconds: float


@dataclass(frozen=True, slots=True)
class TableSwap:
    """A rebuilt ``shadow`` table that replaces ``live`` (same ``columns``, keyed by ``key``)."""

    live: str
    shadow: str
    columns: tuple[str, ...]
    key: tuple[str, ...]


class Conn(Protocol):
    """One database connection, inside or outside a transaction."""

    dialect: str

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...


class WriteConn(Conn, Protocol):
    """The connection of a write transaction.

    ``failed`` is true once a statement failed in a way that poisons the transaction (every
    statement on PostgreSQL; on SQLite, an error that rolled the transaction back): only a
    rollback to a savepoint, or of the whole transaction, can follow. A COMMIT of a failed
    transaction raises instead of silently rolling back.
    """

    @property
    def failed(self) -> bool: ...

    async def sync(self, *, last: bool = False) -> None:
        """Run every statement buffered so far; their errors surface here.

        ``last``: only the COMMIT follows, so a backend may send the statements together with
        it. If it does, an error of theirs still surfaces here (nothing was committed), and a
        failed or lost COMMIT raises ``CommitFailed`` here.
        """
        ...

    async def reserve(
        self, tenants: Sequence[str], known: Sequence[int], count: int
    ) -> Reservation | None:
        """Lock ``tenants`` for writing and reserve ``count`` positions (``known``: the head
        position the caller holds per tenant, -1 for none); ``None`` when the backend's
        ``write()`` already serialises every writer (positions then follow ``max(position)``).
        """
        ...

    async def more_positions(self, count: int) -> list[int]:
        """``count`` more positions after a ``reserve`` ran short (the locks are still held)."""
        ...

    @property
    def round_trips(self) -> int:
        """Requests this connection sent to the database server so far."""
        ...

    async def savepoint(self) -> None: ...

    async def release_savepoint(self) -> None: ...

    async def rollback_savepoint(self) -> None:
        """Undo everything since ``savepoint()``; ``failed`` is false again after it."""
        ...


class Backend(Protocol):
    """A database the event store runs on."""

    dialect: str
    url: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def write(self) -> AbstractAsyncContextManager[WriteConn]:
        """An exclusive write transaction: one writer at a time across every process.

        Leaving the block commits; if the COMMIT does not succeed it raises ``CommitFailed``.
        """
        ...

    def read(
        self, *, snapshot: bool = False, bulk: bool = False
    ) -> AbstractAsyncContextManager[Conn]:
        """A connection for reads; ``snapshot`` holds one consistent view for several queries.

        ``bulk`` marks reads that may scan many rows (exports, searches, replays); a backend may
        serve short indexed reads more cheaply than those.
        """
        ...

    def committed_version(self) -> int | None:
        """A number that changes whenever a transaction commits to the database, from any
        connection of any process, known without a query; ``None`` when the backend cannot
        tell that way (then only a read says what is current).

        Taken before a read, an equal number later means the read's answer still stands.
        """
        ...

    async def ensure_schema(self, statements: Sequence[str]) -> None: ...

    async def wait_for_signal(self, seconds: float) -> bool:
        """Sleep until another process signals new events, or ``seconds`` pass.

        ``True``: another process said it committed events (no need to look); ``False``: the
        time ran out, or the backend cannot tell, and the caller must look for itself.
        """
        ...

    async def signal(self) -> None:
        """Tell other processes that events were committed."""
        ...

    async def set_durable(self, durable: bool) -> None:
        """``False`` lets bulk writes of disposable tables skip waiting for the disk.

        The database must stay consistent across a crash, but the last commits may be lost, so
        use it only where losing them is harmless (a rebuild can run again), and never around
        writes that erase data (redactions rely on freed pages being zeroed).
        """
        ...

    async def erase_residue(self, tables: Sequence[str]) -> None:
        """Make erased bytes unreadable in the database files (after a redaction); ``tables``
        are those that held them (the ledger's own and the read models' erasable ones)."""
        ...

    def json_text(self, expr: str) -> str:
        """SQL that renders the text ``expr`` as a JSON string, escaped exactly as
        ``json.dumps(ensure_ascii=False)`` and msgspec escape it."""
        ...

    async def set_bulk(self, bulk: bool) -> None:
        """``True`` lets the writer use more memory for bulk loads and index builds."""
        ...

    async def swap_tables(self, conn: Conn, swaps: Sequence[TableSwap]) -> None:
        """Inside ``conn``'s write transaction, put each shadow in place of its live table.

        Once the transaction commits, every reader, whatever its isolation level and however
        old its snapshot, sees either the old tables whole or the new ones whole.
        """
        ...

    async def fetch_lines(self, sql: str, params: Sequence[Any]) -> tuple[bytes, int, int]:
        """The rows ``(position, line)`` of ``sql`` as one block of lines (each ended by a
        newline), the last row's position and the number of rows; ``b""`` when none."""
        ...

    def loading(self) -> AbstractAsyncContextManager[None]:
        """Around a bulk load into a new, empty database: the backend may write it more cheaply
        (no concurrent readers of this process meanwhile); every transaction stays atomic."""
        ...

    async def copy_rows(
        self, conn: Conn, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Insert many ``rows`` into ``table`` inside ``conn``'s write transaction, fast."""
        ...
