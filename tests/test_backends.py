"""The backend contract: what the store and the projections rely on, on SQLite and PostgreSQL.

Every test here runs against each backend through ``backend_name``/``db_url`` (PostgreSQL when
``JOBLEDGER_TEST_POSTGRES`` names a server), on a fresh database with the whole schema. What
only one backend does (PostgreSQL's SQL translation, its aborted transactions, its wake-ups
across processes) is in tests/test_postgres.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ledger.backends import backend_for
from ledger.errors import StoreConflict, StoreUnavailable
from ledger.sql import Backend
from tests.conftest import all_statements, pg_server_url, schema_backend
from tests.serverproc import acli, free_port


@pytest.fixture
async def backend(db_url: str) -> AsyncIterator[Backend]:
    """An open backend over the test's own database, with the whole schema."""
    async with schema_backend(db_url) as made:
        yield made


async def opened(db_url: str) -> Backend:
    made = backend_for(db_url)
    await made.open()
    return made


META = "INSERT INTO ledger_meta (name, value) VALUES (?, ?)"


async def meta(backend: Backend, prefix: str) -> list[tuple[str, str]]:
    async with backend.read() as conn:
        found = await conn.fetchall(
            "SELECT name, value FROM ledger_meta WHERE name LIKE ? ORDER BY name", (prefix + "%",)
        )
    return [(str(name), str(value)) for name, value in found]


# -- schema ----------------------------------------------------------------------------------


async def test_schema_creation_races_safely(db_url: str) -> None:
    """Several processes creating the schema at once all succeed; running it again is a no-op."""
    backends = [await opened(db_url) for _ in range(4)]
    try:
        await asyncio.gather(*(b.ensure_schema(all_statements()) for b in backends))
        await backends[0].ensure_schema(all_statements())
        async with backends[1].write() as conn:
            await conn.execute(
                "INSERT INTO chain_heads (tenant, position, hash, count) VALUES (?, ?, ?, ?)",
                ("acme", 5 * 10**15, "h", 1),
            )
        async with backends[2].read() as conn:
            row = await conn.fetchone("SELECT position FROM chain_heads WHERE tenant = 'acme'")
    finally:
        for b in backends:
            await b.close()
    assert row is not None and row[0] == 5 * 10**15  # positions are 64-bit everywhere


# -- transactions ------------------------------------------------------------------------------


async def test_a_write_commits_as_a_whole(backend: Backend) -> None:
    """Statements of one write() are visible to readers together, after it returns."""
    async with backend.write() as conn:
        await conn.execute(META, ("w1", "a"))
        await conn.executemany(META, [("w2", "b"), ("w3", "c")])
        await conn.executemany(META, [])  # an empty batch is no statement at all
        inside = await conn.fetchall("SELECT name FROM ledger_meta WHERE name LIKE 'w%'")
        async with backend.read() as other:
            outside = await other.fetchall("SELECT name FROM ledger_meta WHERE name LIKE 'w%'")
    assert sorted(r[0] for r in inside) == ["w1", "w2", "w3"]  # the writer sees its own rows
    assert outside == []  # no reader sees them before the commit
    assert await meta(backend, "w") == [("w1", "a"), ("w2", "b"), ("w3", "c")]


async def test_an_exception_rolls_the_write_back(backend: Backend) -> None:
    """Any exception out of write() leaves nothing of it, and the backend stays usable."""
    with pytest.raises(ZeroDivisionError):
        async with backend.write() as conn:
            await conn.execute(META, ("gone", "1"))
            await conn.fetchone("SELECT count(*) FROM ledger_meta")
            raise ZeroDivisionError
    assert await meta(backend, "gone") == []
    async with backend.write() as conn:
        await conn.execute(META, ("kept", "1"))
    assert await meta(backend, "kept") == [("kept", "1")]


async def test_a_unique_violation_is_a_store_conflict(backend: Backend) -> None:
    """A duplicate key raises StoreConflict; escaping write(), it leaves nothing behind."""
    with pytest.raises(StoreConflict):
        async with backend.write() as conn:
            await conn.execute(META, ("dup", "1"))
            await conn.executemany(META, [("other", "2"), ("dup", "3")])
            await conn.fetchone("SELECT 1")  # a buffering backend has run the batch by now
    assert await meta(backend, "dup") == [] and await meta(backend, "other") == []
    event = (
        "INSERT INTO events (position, tenant, stream, version, event_id, type, occurred_at, "
        "occurred_us, recorded_at, actor, data, data_hash, prev_hash, hash) "
        "VALUES (?, 'acme', 's', ?, ?, 't', 'x', 0, 'x', 'a', NULL, 'd', 'p', 'h')"
    )
    async with backend.write() as conn:
        await conn.execute(event, (1, 1, "e1"))
    for clash in ((1, 2, "e2"), (2, 1, "e2"), (2, 2, "e1")):  # position, version, event id
        with pytest.raises(StoreConflict):
            async with backend.write() as conn:
                await conn.execute(event, clash)
                await conn.fetchone("SELECT 1")
    async with backend.read() as conn:
        assert await conn.fetchall("SELECT position FROM events") == [(1,)]


async def test_writes_from_several_processes_are_serialised(db_url: str) -> None:
    """Read-then-write transactions of two backends on one database never interleave."""
    a, b = await opened(db_url), await opened(db_url)
    try:
        await a.ensure_schema(all_statements())

        async def bump(backend: Backend, n: int) -> None:
            for _ in range(n):
                async with backend.write() as conn:
                    row = await conn.fetchone(
                        "SELECT count(*) FROM ledger_meta WHERE name LIKE 'n%'"
                    )
                    assert row is not None
                    await conn.execute(META, (f"n{row[0] + 1:04d}", backend.dialect))

        await asyncio.gather(bump(a, 25), bump(b, 25))
        names = [name for name, _ in await meta(a, "n")]
    finally:
        await a.close()
        await b.close()
    assert names == [f"n{i:04d}" for i in range(1, 51)]  # no lost update, no conflict


async def test_committed_version_moves_with_every_commit_from_anywhere(
    backend: Backend, db_url: str
) -> None:
    """Where a backend knows its committed version, reads leave it as it is and a commit from
    another connection or another process changes it; PostgreSQL never claims to know."""
    if backend.dialect == "postgres":
        assert backend.committed_version() is None
        return
    other = await opened(db_url)
    try:
        seen = [backend.committed_version()]
        for n in range(3):
            assert await meta(backend, "v") == [(f"v{i}", "x") for i in range(n)]
            assert backend.committed_version() == seen[-1]  # reads commit nothing
            async with other.write() as conn:  # another connection
                await conn.execute(META, (f"v{n}", "x"))
            seen.append(backend.committed_version())
        async with backend.write() as conn:  # this backend's own writer
            await conn.execute(META, ("own", "x"))
        seen.append(backend.committed_version())
        made = await acli("keys", "create", "--db", db_url, "--tenant", "t", "--role", "reader")
        assert made.code == 0, made.err  # another process
        seen.append(backend.committed_version())
        raw = sqlite3.connect(db_url)  # the WAL starts over after a full checkpoint
        try:
            busy = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            raw.close()
        assert busy == 0
        async with other.write() as conn:
            await conn.execute(META, ("after", "x"))
        assert backend.committed_version() not in seen
        assert None not in seen and len(set(seen)) == len(seen)
    finally:
        await other.close()


async def test_snapshot_reads_hold_one_view(backend: Backend) -> None:
    """A snapshot read sees the same rows throughout, while another connection commits."""
    count = "SELECT count(*) FROM ledger_meta WHERE name LIKE 'snap%'"
    for bulk in (False, True):
        async with backend.read(snapshot=True, bulk=bulk) as conn:
            before = await conn.fetchone(count)
            async with backend.write() as writer:
                await writer.execute(META, (f"snap{bulk}", "x"))
            during = await conn.fetchone(count)
        async with backend.read(bulk=bulk) as conn:
            after = await conn.fetchone(count)
        assert before == during
        assert after is not None and before is not None and after[0] == before[0] + 1


# -- values and SQL ------------------------------------------------------------------------------


async def test_values_round_trip_with_their_types(backend: Backend) -> None:
    """Big integers, sums, NULL and unicode text come back as the Python values written."""
    async with backend.write() as conn:
        await conn.executemany(
            "INSERT INTO credit_grants (tenant, account, granted) VALUES (?, ?, ?)",
            [("acme", "a", 5 * 10**15), ("acme", "b", 7), ("acme", "Zürich ✓ 😀", -3)],
        )
        await conn.execute(
            "INSERT INTO results (result_id, tenant, job_id, expires_us, payload) "
            "VALUES (?, ?, ?, ?, ?)",
            ("r1", "acme", "j", None, "x" * 100_000),
        )
    async with backend.read() as conn:
        total = await conn.fetchone("SELECT sum(granted), count(*) FROM credit_grants")
        accounts = await conn.fetchall("SELECT account FROM credit_grants ORDER BY granted")
        result = await conn.fetchone("SELECT expires_us, payload FROM results")
        nothing = await conn.fetchone("SELECT account FROM credit_grants WHERE granted = 0")
    assert total == (5 * 10**15 + 4, 3) and all(type(v) is int for v in total)
    assert [r[0] for r in accounts] == ["Zürich ✓ 😀", "b", "a"]
    assert result == (None, "x" * 100_000)
    assert nothing is None


async def test_text_sorts_by_bytes_and_like_ignores_ascii_case(backend: Backend) -> None:
    """ORDER BY on text is byte order (as SQLite sorts); LIKE matches ASCII case-insensitively."""
    names = ["b", "B", "a", "A", "é", "Z", "_", "a b", "ab"]
    async with backend.write() as conn:
        await conn.executemany(META, [(f"s:{n}", "v") for n in names])
    assert [n for n, _ in await meta(backend, "s:")] == sorted(f"s:{n}" for n in names)
    async with backend.read() as conn:
        found = await conn.fetchall(
            "SELECT name FROM ledger_meta WHERE name LIKE ? ORDER BY name", ("S:A%",)
        )
        literal = await conn.fetchone("SELECT '?', ?", ("v",))
    assert [r[0] for r in found] == ["s:A", "s:a", "s:a b", "s:ab"]
    assert literal is not None and tuple(literal) == ("?", "v")  # a ? in a literal stays one


# -- durability switches, erasure, signals ----------------------------------------------------


async def test_durability_can_be_relaxed_and_restored(backend: Backend) -> None:
    """Writes work with durability off and on again; erasing residue leaves the rows intact."""
    await backend.set_durable(False)
    async with backend.write() as conn:
        await conn.execute(META, ("fast", "1"))
    await backend.set_durable(True)
    async with backend.write() as conn:
        await conn.execute("DELETE FROM ledger_meta WHERE name = 'fast'")
        await conn.execute(META, ("slow", "1"))
    await backend.erase_residue(["ledger_meta"])
    assert await meta(backend, "fast") == [] and await meta(backend, "slow") == [("slow", "1")]


async def test_waiting_for_a_signal_is_bounded(db_url: str) -> None:
    """``wait_for_signal`` returns by its deadline; ``signal`` never fails, listened to or not."""
    a, b = await opened(db_url), await opened(db_url)
    try:
        await a.signal()
        await asyncio.wait_for(b.wait_for_signal(0.05), 30)
        await a.signal()
        await a.signal()  # signals in a row collapse; none is an error
        await asyncio.wait_for(b.wait_for_signal(0.05), 30)
    finally:
        await a.close()
        await b.close()


# -- opening ----------------------------------------------------------------------------------


async def test_a_database_that_cannot_be_opened_is_one_line(
    backend_name: str, tmp_path: Path
) -> None:
    """Unreachable, missing or malformed databases fail ``open()`` with one readable line."""
    if backend_name == "sqlite":
        cases = {
            "/no/such/dir/ledger.db": "does not exist",
            "sqlite:////no/such/dir/ledger.db": "does not exist",
        }
        with pytest.raises(StoreUnavailable) as caught:
            await backend_for(str(tmp_path / "missing.db"), create=False).open()
        assert "does not exist" in caught.value.message
    else:
        base = pg_server_url()
        assert base is not None
        server = base.partition("://")[2].split("/", 1)[0]
        cases = {
            f"postgresql://postgres@127.0.0.1:{free_port()}/jobledger": "cannot reach PostgreSQL",
            f"postgresql://{server}/jl_no_such_database_here": "does not exist (create it first",
            "postgresql://postgres@127.0.0.1:notaport/x": "invalid PostgreSQL URL",
        }
    for url, words in cases.items():
        with pytest.raises(StoreUnavailable) as caught:
            await backend_for(url).open()
        assert words in caught.value.message
        assert "\n" not in caught.value.message
