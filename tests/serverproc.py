"""Real ``jobledger serve`` subprocesses on free loopback ports, and the ``jobledger`` CLI.

The one harness for running servers, shared by the tests and the benchmark (``bench/`` builds
its measuring on it). It imports nothing of the tests' and no pytest.

A ``Server`` is started and stopped explicitly (``start``/``astart``, ``kill``, ``terminate``)
so a test can crash it, restart it on the same database, or stop it while requests are in
flight; its stdout and stderr go to one log file that survives restarts (``log_text()``).
``served()``/``running()`` (or ``with Server(...)``) wrap a server in a block that always stops
it. Every wait is bounded: a hung server fails the test instead of hanging it. A port another
process took between ``free_port()`` and the server's bind is retried on a new port, so
parallel test workers never collide. Every process started here is remembered and stopped by
``stop_all()`` (and at exit), by its own pid only.

    async with served(db_url) as server:
        key = await acreate_key(db_url, "acme")
        async with aiohttp.ClientSession(server.base, headers=key.headers) as http: ...
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.waits import wait_until, wait_until_sync
from tests.zygote import Forked, Zygote

_BIN = Path(sys.executable).parent
JOBLEDGER = str(_BIN / "jobledger") if (_BIN / "jobledger").exists() else "jobledger"
HOST = "127.0.0.1"
START_SECONDS = 30.0  # a server that is not healthy by then fails the test
STOP_SECONDS = 40.0  # longer than serve's own 30 s shutdown timeout
CLI_SECONDS = 120.0
PORT_ATTEMPTS = 5  # spawns on fresh ports when another process took the chosen one

Process = subprocess.Popen[bytes] | Forked
_LIVE: set[Process] = set()
# When set (the test suite sets it), ``jobledger`` processes are forked from a warm interpreter
# instead of started from scratch (``tests/zygote.py``); the benchmark keeps real starts.
_zygote: Zygote | None = None


def fork_from_zygote() -> None:
    """Start ``jobledger`` processes of this process from a zygote from now on."""
    global _zygote
    if _zygote is None:
        _zygote = Zygote()


def _start(argv: list[str], env: dict[str, str], *, out: int | None, err: int | None) -> Process:
    """``jobledger ARGV`` as a new process: forked from the zygote if there is one.

    ``out``/``err`` are descriptors to write to, or ``None`` to capture through a pipe.
    """
    if _zygote is not None:
        with open(os.devnull, "rb") as null:
            return _zygote.spawn(argv, env, stdin=null.fileno(), stdout=out, stderr=err)
    return subprocess.Popen(
        [JOBLEDGER, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if out is None else out,
        stderr=subprocess.PIPE if err is None else err,
        env=env,
    )


def track(proc: Process) -> None:
    """Remember a process started elsewhere, so that ``stop_all()`` stops it too."""
    _LIVE.add(proc)


def untrack(proc: Process) -> None:
    _LIVE.discard(proc)


def stop_all(seconds: float = 15.0) -> None:
    """SIGTERM every process still running, then SIGKILL what did not exit in ``seconds``."""
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LIVE.discard(proc)


def _kill_leftovers() -> None:
    """The last guard: no server outlives the test run, whatever happened."""
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


atexit.register(_kill_leftovers)


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``jobledger`` subprocess: no inherited ``JOBLEDGER_DB``."""
    out = {k: v for k, v in os.environ.items() if k != "JOBLEDGER_DB"}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(extra or {})
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Done:
    """A finished CLI command: exit code and output."""

    code: int
    out: str
    err: str
    seconds: float = 0.0  # wall time of the process

    @property
    def last_line(self) -> str:
        lines = self.out.splitlines()
        return lines[-1] if lines else ""


@dataclass(frozen=True, slots=True)
class Key:
    """An API key made by ``jobledger keys create``."""

    key_id: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def cli(*args: str, timeout: float = CLI_SECONDS, extra_env: dict[str, str] | None = None) -> Done:
    """Run ``jobledger ARGS...`` to completion (blocking)."""
    started = time.perf_counter()
    proc = _start(list(args), env(extra_env), out=None, err=None)
    track(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        untrack(proc)
    return Done(proc.returncode, out.decode(), err.decode(), time.perf_counter() - started)


def start(*args: str) -> Process:
    """``jobledger ARGS...`` in the background, its output discarded; ``stop_all`` stops it if
    the caller does not."""
    with open(os.devnull, "wb") as null:
        proc = _start(list(args), env(), out=null.fileno(), err=null.fileno())
    track(proc)
    return proc


async def acli(*args: str, seconds: float = CLI_SECONDS) -> Done:
    """Run ``jobledger ARGS...`` to completion without blocking the event loop."""
    if _zygote is not None:
        return await asyncio.to_thread(cli, *args, timeout=seconds)
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        JOBLEDGER,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode(), time.perf_counter() - started)


def _key_of(done: Done, args: tuple[str, ...]) -> Key:
    assert done.code == 0, f"jobledger {' '.join(args)}: {done.code} {done.err}"
    key_id = next(w for w in done.out.split() if w.startswith("key_"))
    return Key(key_id=key_id, secret=done.last_line.strip())


def _key_args(db: str, tenant: str, role: str, project: str | None) -> tuple[str, ...]:
    args = ("keys", "create", "--db", db, "--tenant", tenant, "--role", role)
    return (*args, "--project", project) if project is not None else args


def create_key(db: str, tenant: str, role: str = "admin", project: str | None = None) -> Key:
    """A new key made with the CLI (which also creates the schema on a new database)."""
    args = _key_args(db, tenant, role, project)
    return _key_of(cli(*args), args)


async def acreate_key(db: str, tenant: str, role: str = "admin", project: str | None = None) -> Key:
    args = _key_args(db, tenant, role, project)
    return _key_of(await acli(*args), args)


class _PortTaken(Exception):
    """Another process bound the chosen port first."""


class Server:
    """One ``jobledger serve`` process at a time over ``db``; restartable on a new port.

    Subclasses serve something else by overriding ``command`` (and ``probe``, the path that
    answers 200 once the server is up).
    """

    probe = "/healthz"
    start_seconds = START_SECONDS

    def __init__(
        self,
        db: str,
        *extra: str,
        log_dir: str | Path | None = None,
        name: str = "jobledger-serve",
    ) -> None:
        self.db = db
        self.extra = extra
        self.name = name
        directory = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
        fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=directory)
        os.close(fd)
        self.log_path = Path(path)
        self.port = 0
        self.proc: Process | None = None
        self.returncodes: list[int] = []  # exit codes of earlier runs, in order
        self._log_start = 0  # where the current run's output begins in the log

    def command(self, port: int) -> list[str]:
        return [
            JOBLEDGER,
            "serve",
            "--db",
            self.db,
            "--host",
            HOST,
            "--port",
            str(port),
            *self.extra,
        ]

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return self.base

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything every run of this server wrote to stdout and stderr."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def has_read_request_from(self, port: int) -> bool:
        """Whether the server accepted a connection from local ``port`` and read all it was sent.

        The way to know a request is being handled (say, a long poll that is now held) without
        sleeping: the kernel's view of the server's own sockets (Linux ``/proc``). The client
        binds that port itself, e.g. ``aiohttp.TCPConnector(local_addr=("127.0.0.1", port))``.
        """
        if self.proc is None or self.proc.poll() is not None:
            return False
        return _holds_read_connection(self.proc.pid, port)

    def _spawn(self) -> None:
        assert not self.alive, "the server is already running"
        self.port = free_port()
        self._log_start = self.log_path.stat().st_size
        command = self.command(self.port)
        with open(self.log_path, "ab") as log:
            if command[0] == JOBLEDGER:
                self.proc = _start(command[1:], env(), out=log.fileno(), err=log.fileno())
            else:
                self.proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env()
                )
        track(self.proc)

    def _check_alive(self) -> None:
        """Raise if this run has ended: ``_PortTaken`` when its port was taken."""
        if self.alive:
            return
        this_run = self.log_path.read_bytes()[self._log_start :]
        if b"address already in use" in this_run.lower():
            self._reap()
            raise _PortTaken
        raise AssertionError("the server exited")

    def _not_started(self) -> AssertionError:
        self.kill()
        return AssertionError(f"{self.name} did not become healthy:\n{self.log_text()[-3000:]}")

    def _healthy(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(f"{self.base}{self.probe}", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> Server:
        """Start and wait (blocking) until ``probe`` answers."""
        for _ in range(PORT_ATTEMPTS):
            self._spawn()
            try:
                wait_until_sync(self._healthy, self.start_seconds, f"{self.name} is healthy")
                return self
            except _PortTaken:
                continue
            except AssertionError:
                raise self._not_started() from None
        raise self._not_started()

    async def astart(self) -> Server:
        """Start and wait (without blocking the loop) until ``probe`` answers."""
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def healthy() -> bool:
                self._check_alive()
                try:
                    async with http.get(f"{self.base}{self.probe}") as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            for _ in range(PORT_ATTEMPTS):
                self._spawn()
                try:
                    await wait_until(healthy, self.start_seconds, f"{self.name} is healthy")
                    return self
                except _PortTaken:
                    continue
                except AssertionError:
                    raise self._not_started() from None
        raise self._not_started()

    def _reap(self) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=STOP_SECONDS)
        untrack(self.proc)
        self.returncodes.append(code)
        self.proc = None
        return code

    def kill(self) -> int | None:
        """SIGKILL: the crash. Its exit code (``-9``), or ``None`` if it was not running."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self._reap()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` and return at once (the process may still be finishing requests)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    async def wait(self, seconds: float = STOP_SECONDS) -> int:
        """Wait (without blocking the loop) for the process to exit; its exit code."""
        proc = self.proc
        assert proc is not None
        try:
            await wait_until(lambda: proc.poll() is not None, seconds, f"{self.name} exits")
        except AssertionError:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {seconds} s:\n{self.log_text()[-3000:]}"
            ) from None
        return self._reap()

    async def terminate(self, seconds: float = STOP_SECONDS) -> int:
        """SIGTERM and wait for a clean exit; its exit code."""
        self.signal(signal.SIGTERM)
        return await self.wait(seconds)

    def stop(self, timeout: float = STOP_SECONDS) -> int | None:
        """Stop whatever runs, politely first (blocking); its exit code, ``None`` if none ran.

        Never raises on a dead server.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self._reap()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _holds_read_connection(pid: int, port: int) -> bool:
    """An ESTABLISHED socket of ``pid`` whose peer is ``port``, with nothing left unread."""
    inodes = _socket_inodes(pid)
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                peer_port = int(fields[2].rsplit(":", 1)[1], 16)
                unread = int(fields[4].split(":")[1], 16)
                if peer_port == port and fields[3] == "01" and fields[9] in inodes:
                    return unread == 0
    return False


@contextlib.asynccontextmanager
async def served(db: str, *extra: str, log_dir: str | Path | None = None) -> AsyncIterator[Server]:
    """A started server for the block; always stopped afterwards.

    Without ``log_dir`` the log lives in a temporary directory removed after the block.
    """
    with tempfile.TemporaryDirectory(prefix="jobledger-serve-") as scratch:
        server = Server(db, *extra, log_dir=log_dir or scratch)
        try:
            yield await server.astart()
        finally:
            server.stop()


@contextlib.contextmanager
def running(db: str, *extra: str, log_dir: str | Path | None = None) -> Iterator[Server]:
    """``served`` for synchronous tests."""
    with tempfile.TemporaryDirectory(prefix="jobledger-serve-") as scratch:
        server = Server(db, *extra, log_dir=log_dir or scratch)
        try:
            yield server.start()
        finally:
            server.stop()
