"""Processes the benchmark starts: ledger servers, the echo baseline, the ``jobledger`` CLI.

Every process started here is remembered and stopped by ``stop_all()`` (run.py calls it on
exit, also on Ctrl-C), by its own pid only. Servers listen on 127.0.0.1, on a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOBLEDGER = str(BIN / "jobledger") if (BIN / "jobledger").exists() else "jobledger"
ECHO_SERVER = ROOT / "bench" / "baselines" / "echo_server.py"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0

_started: dict[int, subprocess.Popen[bytes]] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def memory(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process, in MiB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """One HTTP server process; ``url`` once ``ready()``."""

    def __init__(
        self, argv: Sequence[str], *, port: int, log_path: Path, probe: str, name: str
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.probe = probe
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        finally:
            log.close()
        _started[self.proc.pid] = self.proc
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.probe, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.probe} in {STARTUP_TIMEOUT} s")

    def memory(self) -> dict[str, float]:
        return memory(self.pid)

    def measure(self, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``load()``; add the server's CPU share and CPU per request to its result."""
        cpu0, t0 = cpu_seconds(self.pid), time.perf_counter()
        result = load()
        cpu = cpu_seconds(self.pid) - cpu0
        wall = time.perf_counter() - t0
        result["server_cpu_percent"] = round(100 * cpu / wall, 1) if wall else None
        requests = result.get("requests") or 0
        result["server_cpu_us_per_request"] = round(1e6 * cpu / requests, 1) if requests else None
        return result

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait (the ledger finishes in-flight appends), SIGKILL as a last resort."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        _started.pop(proc.pid, None)
        return proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ledger_server(db: str, log_dir: Path, *, name: str = "ledger") -> Server:
    port = free_port()
    argv = [JOBLEDGER, "serve", "--db", db, "--host", HOST, "--port", str(port)]
    return Server(
        argv,
        port=port,
        log_path=log_dir / f"{name}-{port}.log",
        probe="/healthz",
        name=f"jobledger serve ({name})",
    )


def echo_server(log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(ECHO_SERVER), "--host", HOST, "--port", str(port)]
    return Server(
        argv, port=port, log_path=log_dir / f"echo-{port}.log", probe="/ping", name="echo server"
    )


def stop_all() -> None:
    for pid, proc in list(_started.items()):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        _started.pop(pid, None)


def cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``jobledger ARGS``; (stdout, wall seconds). Raises with stderr on a non-zero exit."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [JOBLEDGER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    _started[proc.pid] = proc
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _started.pop(proc.pid, None)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"jobledger {' '.join(args)} exited {proc.returncode}: {err.decode()}")
    return out.decode(), seconds


def create_key(db: str, tenant: str, role: str = "admin") -> str:
    """``jobledger keys create``: the secret is alone on the last line of stdout."""
    out, _ = cli("keys", "create", "--db", db, "--tenant", tenant, "--role", role)
    return out.strip().splitlines()[-1]


def rebuild(db: str) -> dict[str, Any]:
    """``jobledger rebuild``: its JSON summary (last line) plus the process's wall time."""
    out, seconds = cli("rebuild", "--db", db)
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    summary["wall_seconds"] = round(seconds, 3)
    return summary


def count_stream(argv: Sequence[str], timeout: float = 900) -> tuple[int, int, float]:
    """Run a command, counting its stdout's lines and bytes as they stream; (lines, bytes, s)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    _started[proc.pid] = proc
    lines = size = 0
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            lines += chunk.count(b"\n")
            size += len(chunk)
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{argv[0]} ran past {timeout} s")
        proc.wait(timeout)
        err = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _started.pop(proc.pid, None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}: {err}")
    return lines, size, time.perf_counter() - started


@contextlib.contextmanager
def servers(*items: Server) -> Iterator[tuple[Server, ...]]:
    started: list[Server] = []
    try:
        for item in items:
            started.append(item.start())
        yield tuple(started)
    finally:
        for item in reversed(started):
            item.stop()
