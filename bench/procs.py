"""What the benchmark adds to the server harness it shares with the tests (tests/serverproc.py).

Servers and CLI runs come from that one harness (free ports on 127.0.0.1, bounded waits, every
process remembered and stopped by ``stop_all()``, by its own pid only; run.py calls it on exit,
also on Ctrl-C). This module adds what only a benchmark needs: the echo baseline server, the
memory and CPU time of a server process, and commands whose output is counted as it streams.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tests import serverproc
from tests.serverproc import HOST, JOBLEDGER, free_port, stop_all, track, untrack

__all__ = ["HOST", "JOBLEDGER", "ROOT", "free_port", "stop_all", "track", "untrack"]

ROOT = Path(__file__).resolve().parent.parent
ECHO_SERVER = ROOT / "bench" / "baselines" / "echo_server.py"
FLOOR_SERVER = ROOT / "bench" / "baselines" / "floor_server.py"
STARTUP_TIMEOUT = 60.0


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


def named_cpu_seconds(name: str) -> float:
    """User + system CPU time so far of every process called ``name`` (e.g. ``postgres``)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            comm, _, rest = stat.read_text().partition(") ")
            if comm.split("(", 1)[-1] == name:
                fields = rest.split()
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """``(busy, all)`` CPU seconds of the machine so far, over every core (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


class Server(serverproc.Server):
    """A ``jobledger serve`` of the harness, measured: its memory and its CPU under a load."""

    start_seconds = STARTUP_TIMEOUT  # big histories take a while to open

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


class EchoServer(Server):
    """The bare aiohttp + msgspec baseline (bench/baselines/echo_server.py)."""

    probe = "/ping"

    def __init__(self, log_dir: Path) -> None:
        super().__init__("", log_dir=log_dir, name="echo")

    def command(self, port: int) -> list[str]:
        return [sys.executable, str(ECHO_SERVER), "--host", HOST, "--port", str(port)]


class FloorServer(Server):
    """The bare aiohttp + sqlite3 baseline (bench/baselines/floor_server.py): a durable append
    and a read by key, nothing else."""

    probe = "/ping"

    def __init__(self, log_dir: Path, append_db: Path, read_db: str | None) -> None:
        super().__init__("", log_dir=log_dir, name="floor")
        self.append_db, self.read_db = append_db, read_db

    def command(self, port: int) -> list[str]:
        read = [] if self.read_db is None else ["--read-db", self.read_db]
        return [
            sys.executable,
            str(FLOOR_SERVER),
            "--host",
            HOST,
            "--port",
            str(port),
            "--append-db",
            str(self.append_db),
            *read,
        ]


def floor_server(log_dir: Path, append_db: Path, read_db: str | None = None) -> Server:
    return FloorServer(log_dir, append_db, read_db)


def ledger_server(db: str, log_dir: Path, *extra: str, name: str = "ledger") -> Server:
    """``jobledger serve --db db *extra``, its log in ``log_dir``."""
    return Server(db, *extra, log_dir=log_dir, name=name)


def echo_server(log_dir: Path) -> Server:
    return EchoServer(log_dir)


def cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``jobledger ARGS``; (stdout, wall seconds). Raises with stderr on a non-zero exit."""
    done = serverproc.cli(*args, timeout=timeout, extra_env=env)
    if done.code != 0:
        raise RuntimeError(f"jobledger {' '.join(args)} exited {done.code}: {done.err}")
    return done.out, done.seconds


def create_key(db: str, tenant: str, role: str = "admin") -> str:
    """``jobledger keys create``: the new key's secret."""
    return serverproc.create_key(db, tenant, role).secret


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
    track(proc)
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
        untrack(proc)
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
