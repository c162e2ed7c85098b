"""A real streaming hot standby of the test PostgreSQL server, for as long as a block runs.

``pg_basebackup -R`` copies the server named by ``JOBLEDGER_TEST_POSTGRES`` into a temporary
directory and configures it to stream from it; ``pg_ctl`` starts it on a free loopback port.
It replays every database of the server, so a test's own database (created on the primary)
appears on the standby a moment later (``Standby.replica_of``). The block always stops the
standby and removes its directory, whatever happened.

PostgreSQL refuses ``pg_ctl`` to root: run as root, every command runs as the ``postgres``
user (``runuser``), who owns the directory. ``Unavailable`` says why no standby can be made
here (no server binaries, replication refused by ``pg_hba.conf``); the tests skip with that
reason, except in CI (``CI=true``), where it fails them. Used by ``tests/test_replica.py``
and the benchmark (``bench/``); it imports no pytest.

    with standby(primary_url) as sb:
        replica_url = sb.replica_of(db_url)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tests.serverproc import free_port

START_SECONDS = 60
COMMAND_SECONDS = 300.0
PORT_ATTEMPTS = 3
# settings a hot standby must hold at least as high as its primary's
_AT_LEAST_PRIMARY = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)
HBA_LINE = "host replication all 127.0.0.1/32 trust"
SLOT_PREFIX = "jobledger_standby_"
T = TypeVar("T")


class Unavailable(Exception):
    """No standby can be made on this machine; the message says why and what to do."""


def bindir() -> Path | None:
    """Where ``pg_basebackup`` and ``pg_ctl`` are (Debian keeps them off the PATH)."""
    candidates: list[Path] = []
    for tool in ("pg_ctl", "pg_basebackup"):
        found = shutil.which(tool)
        if found:
            candidates.append(Path(found).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for directory in candidates:
        if (directory / "pg_basebackup").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


@dataclass(frozen=True, slots=True)
class Standby:
    """A running standby: its port and how to reach a database on it."""

    directory: Path
    port: int
    user: str

    def replica_of(self, db_url: str) -> str:
        """The URL of the same database (as ``db_url`` names it on the primary) here."""
        database = urlsplit(db_url).path.lstrip("/")
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        return self.directory / "standby.log"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def wait_for_database(self, db_url: str, seconds: float = 30.0) -> None:
        """Until the standby has replayed the creation of ``db_url``'s database."""
        import asyncpg

        url = self.replica_of(db_url)
        deadline = time.monotonic() + seconds
        while True:
            try:
                conn = await asyncpg.connect(url, timeout=5)
            except (OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the standby never had {url}: {exc}") from None
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return

    async def sql(self, db_url: str, statement: str) -> object:
        """One statement on the standby, in ``db_url``'s database; its first value."""
        import asyncpg

        conn = await asyncpg.connect(self.replica_of(db_url), timeout=10)
        try:
            return await conn.fetchval(statement)
        finally:
            await conn.close()


def _as_owner() -> list[str]:
    """The prefix that runs a command as the data directory's owner (``postgres`` for root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_as_owner(), *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _on_primary(primary: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """``work(connection)`` on the primary, from synchronous code (even inside a running
    event loop: it runs in a thread of its own)."""
    import asyncpg

    async def run() -> T:
        conn = await asyncpg.connect(primary, timeout=10)
        try:
            return await work(conn)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def _primary_settings(primary: str) -> dict[str, str]:
    async def read(conn: Any) -> dict[str, str]:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            list(_AT_LEAST_PRIMARY),
        )
        return {r["name"]: r["setting"] for r in rows}

    return _on_primary(primary, read)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_slots(primary: str, *, mine: str | None) -> None:
    """Drop the replication slot ``mine`` and the slots of standbys whose process died.

    A slot makes the primary keep its WAL until the standby has it (without one, a busy
    primary may recycle a segment before the new standby asks for it). A slot left behind
    would keep WAL forever: each is named after the process that made it, and a later run
    drops those whose process is gone.
    """

    async def drop(conn: Any) -> None:
        rows = await conn.fetch(
            "SELECT slot_name, active FROM pg_replication_slots WHERE slot_name LIKE $1",
            f"{SLOT_PREFIX}%",
        )
        for row in rows:
            name = row["slot_name"]
            pid = name.removeprefix(SLOT_PREFIX).split("_")[0]
            stale = pid.isdigit() and not _alive(int(pid)) and not row["active"]
            if name != mine and not stale:
                continue
            for _ in range(100):  # a standby just stopped: its WAL sender ends a moment later
                try:
                    await conn.execute("SELECT pg_drop_replication_slot($1)", name)
                    break
                except Exception as exc:  # asyncpg.ObjectInUseError while it is still active
                    if "active" not in str(exc):
                        break
                    await asyncio.sleep(0.1)

    _on_primary(primary, drop)


def _write_config(data: Path, port: int, settings: dict[str, str]) -> None:
    lines = [
        f"port = {port}",
        "listen_addresses = '127.0.0.1'",
        f"unix_socket_directories = '{data.parent}'",
        "hot_standby = on",
        "shared_buffers = 32MB",
        "logging_collector = off",
        *(f"{name} = {value}" for name, value in settings.items()),
    ]
    (data / "postgresql.conf").write_text("\n".join(lines) + "\n")
    (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    if os.geteuid() == 0:
        for name in ("postgresql.conf", "pg_hba.conf"):
            shutil.chown(data / name, "postgres", "postgres")


@contextlib.contextmanager
def standby(primary: str) -> Iterator[Standby]:
    """A hot standby of the server ``primary`` names, for the block (``Unavailable`` if none
    can be made here). ``primary`` is a server URL such as ``JOBLEDGER_TEST_POSTGRES``."""
    tools = bindir()
    if tools is None:
        raise Unavailable(
            "PostgreSQL's server binaries (pg_basebackup, pg_ctl) are not installed "
            "(Debian: apt-get install postgresql)"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise Unavailable("running as root, but runuser is missing to run pg_ctl as postgres")
    parts = urlsplit(primary)
    host, port, user = parts.hostname or "127.0.0.1", parts.port or 5432, parts.username
    user = user or "postgres"
    directory = Path(tempfile.mkdtemp(prefix="jobledger-standby-"))
    data = directory / "data"
    slot = f"{SLOT_PREFIX}{os.getpid()}_{directory.name.rsplit('-', 1)[-1].lower()}"
    started = False
    _drop_slots(primary, mine=None)
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
        directory.chmod(0o700)
        backup = _run(
            [
                str(tools / "pg_basebackup"),
                *("-D", str(data), "-h", host, "-p", str(port), "-U", user),
                *("-R", "-X", "stream", "-c", "fast", "-w", "-C", "-S", slot),
            ]
        )
        if backup.returncode != 0:
            err = backup.stderr.strip()
            if "replication" in err and ("pg_hba" in err or "no pg_hba.conf entry" in err):
                raise Unavailable(
                    f"the PostgreSQL server refuses replication connections: add "
                    f"'{HBA_LINE}' to its pg_hba.conf and reload it (.ci/run does): {err}"
                )
            raise AssertionError(f"pg_basebackup failed ({backup.returncode}): {err}")
        settings = _primary_settings(primary)
        for _ in range(PORT_ATTEMPTS):
            standby_port = free_port()
            _write_config(data, standby_port, settings)
            start = _run(
                [
                    str(tools / "pg_ctl"),
                    *("-D", str(data), "-l", str(directory / "standby.log")),
                    *("-w", "-t", str(START_SECONDS), "start"),
                ]
            )
            started = True  # stop it in any case: a timed-out start may still come up
            if start.returncode == 0:
                break
            log = (directory / "standby.log").read_text(errors="replace")
            if "could not bind" not in log and "already in use" not in log:
                raise AssertionError(f"the standby did not start:\n{start.stderr}\n{log[-3000:]}")
            _stop(tools, data)
            started = False
        else:
            raise AssertionError("the standby found no free port")
        yield Standby(directory=directory, port=standby_port, user=user)
    finally:
        if started:
            _stop(tools, data)
        shutil.rmtree(directory, ignore_errors=True)
        _drop_slots(primary, mine=slot)


def _stop(tools: Path, data: Path) -> None:
    """Stop the standby (``immediate``: a standby has nothing to flush worth waiting for)."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _run([str(tools / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "60", "stop"])
