"""A warm interpreter that forks ``jobledger`` processes, so they start without the imports.

A ``jobledger`` process spends 0.2 s (a CLI command) to 0.45 s (``serve``) of CPU importing
the package and its libraries before its first line of work; the suite starts hundreds. The
zygote imports them once, in a process of its own (started on first use by each pytest worker,
single-threaded, no event loop), and forks a child per command. The child is a real, separate
process: its own pid, signals, file descriptors and exit code, running the same
``api.cli.main`` the ``jobledger`` console script runs, with the argv, environment, working
directory and standard streams it is given. What differs from an ``exec`` is only what was
done before the fork: the imports (modules read nothing of the environment at import that the
tests change) and the random state (re-seeded at fork by ``random`` and by ``ledger.ids``).
The warm heap is frozen (``gc.freeze``) before the first fork, as the ``gc`` documentation
advises for a process that forks without exec: a child's garbage collections then never walk
(or copy, page by page, on write) the hundreds of thousands of objects it inherited. A forked
command costs half the CPU it cost without (``verify`` on a small database: 26 ms, not 50).

Tests that are about the start itself (which modules a command imports, the console script)
run the real executable, not this.

The protocol, over a Unix socket: the client sends one JSON request (``argv``, ``env``,
``cwd``) with three file descriptors (stdin, stdout, stderr) attached; the zygote answers a
line with the child's pid, and, when the child has exited, a line with its exit code in
``subprocess``'s convention (negative: the signal that ended it). The zygote exits when the
pytest worker that started it closes its end of the lifeline pipe.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

# What ``jobledger`` commands import between them: ``serve``'s app, the read commands, the
# importer, rebuild and the audit log, the PostgreSQL driver.
WARM = (
    "api.app",
    "api.cli",
    "api.cli_reads",
    "api.metrics",
    "ledger.audit",
    "ledger.importer",
    "ledger.rebuild",
    "ledger.backends.postgres",
)


# ---------------------------------------------------------------------------- the zygote


def _child(request: dict[str, Any], fds: list[int], close: list[int]) -> None:
    """In the forked child: become ``jobledger ARGV`` and exit with its code; never returns."""
    code: Any = 1
    try:
        for fd in close:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["jobledger", *request["argv"]]
        from api.cli import main

        try:
            main(request["argv"])
        except SystemExit as exc:
            code = exc.code
    except BaseException:  # what an interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    try:  # what the interpreter does at exit: join threads, run atexit, flush
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(path: str, lifeline: int) -> None:
    """Accept requests on the Unix socket ``path`` until ``lifeline`` reads end of file."""
    for name in WARM:
        __import__(name)
    gc.collect()
    gc.freeze()  # the inherited heap: never collected again, in the zygote or its children
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(lifeline, selectors.EVENT_READ, "lifeline")
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the client's socket)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in selector.select():
            if key.data == "lifeline":
                return
            if key.data == "accept":
                conn, _ = listener.accept()
                try:
                    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                    request = json.loads(message)
                except (OSError, ValueError) as exc:  # a client that went away: not fatal
                    sys.stderr.write(f"zygote: a request was not read: {exc!r}\n")
                    conn.close()
                    continue
                keep = [listener.fileno(), lifeline, selector.fileno()]
                keep += [c.fileno() for _, c in children.values()] + list(children)
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, [*keep, conn.fileno()])
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, conn)
                selector.register(pidfd, selectors.EVENT_READ, "child")
                try:
                    conn.sendall(f"{pid}\n".encode())
                except OSError:
                    pass  # the client went away; the child still runs and is waited for
                continue
            pidfd = key.fd
            pid, conn = children.pop(pidfd)
            selector.unregister(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass  # the client went away; the exit code has no reader
            conn.close()


# ---------------------------------------------------------------------------- the client


class Forked:
    """A child of the zygote, driven like a ``subprocess.Popen``."""

    def __init__(
        self,
        pid: int,
        args: list[str],
        conn: socket.socket,
        pipes: tuple[int | None, int | None],
    ) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._conn = conn
        self._pipes = pipes  # read ends of the child's stdout and stderr, when captured

    def _read_code(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self._conn.settimeout(timeout)
        try:
            data = self._conn.recv(64)
        except (TimeoutError, BlockingIOError):
            return None
        if not data.strip():
            raise AssertionError(f"the zygote exited before its child {self.pid}")
        self.returncode = int(data)
        self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read_code(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._read_code(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(["jobledger", *self.args], timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """Read the captured stdout and stderr to their end, then wait for the exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: dict[int, list[bytes]] = {fd: [] for fd in self._pipes if fd is not None}
        with selectors.DefaultSelector() as selector:
            for fd in chunks:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(["jobledger", *self.args], timeout or 0.0)
                for key, _ in selector.select(left):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
        for fd in chunks:
            os.close(fd)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        out, err = self._pipes
        return (
            b"".join(chunks[out]) if out is not None else b"",
            b"".join(chunks[err]) if err is not None else b"",
        )


class Zygote:
    """One zygote process for this pytest worker, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lifeline = -1
        self._dir = tempfile.mkdtemp(prefix="jobledger-zygote-")
        self.path = str(Path(self._dir) / "socket")
        atexit.register(self.close)

    def _ensure(self, env: dict[str, str]) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if self._proc is not None:  # it died: a new one binds the socket's path again
                os.close(self._lifeline)
                Path(self.path).unlink(missing_ok=True)
            readable, self._lifeline = os.pipe()
            with open(os.devnull, "rb") as null:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.zygote", self.path, str(readable)],
                    stdin=null,
                    stdout=subprocess.PIPE,
                    pass_fds=(readable,),
                    env=env,
                    cwd=Path(__file__).resolve().parent.parent,
                )
            os.close(readable)
            assert self._proc.stdout is not None
            if self._proc.stdout.readline().strip() != b"ready":
                raise AssertionError("the zygote did not start")

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        stdin: int,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> Forked:
        """Fork ``jobledger ARGV``; ``stdout``/``stderr`` are descriptors, or ``None`` for pipes."""
        self._ensure(env)
        ends: list[int] = []
        pipes: list[int | None] = []
        given: list[int] = []
        for fd in (stdout, stderr):
            if fd is None:
                read, write = os.pipe()
                pipes.append(read)
                ends.append(write)
                given.append(write)
            else:
                pipes.append(None)
                given.append(fd)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            request = {"argv": argv, "env": env, "cwd": os.getcwd()}
            socket.send_fds(conn, [json.dumps(request).encode()], [stdin, *given])
        except BaseException:
            conn.close()
            for fd in pipes:
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in ends:  # the child has its own copies now (or never will)
                os.close(fd)
        line = b""
        while not line.endswith(b"\n"):
            part = conn.recv(1)
            if not part:
                raise AssertionError("the zygote closed the connection before the child's pid")
            line += part
        return Forked(int(line), list(argv), conn, (pipes[0], pipes[1]))

    def close(self) -> None:
        """Stop the zygote (its children are the harness's to stop) and remove its socket."""
        if self._proc is not None and self._proc.poll() is None:
            os.close(self._lifeline)
            self._proc.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
