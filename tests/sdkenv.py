"""Official client SDKs from PyPI, each in a virtual environment of its own, driven as scripts.

An SDK is installed once into ``.venv-sdk-<name>`` at the repository root (gitignored) and
reused by later runs: a stamp file records what was installed, so a new pin reinstalls. The
environment's interpreter is the first one found that is new enough (``JOBLEDGER_SDK_PYTHON``
names one explicitly); without one the test skips and says why. A test runs a driver script
in that environment as a subprocess against a real ``jobledger serve``; the script prints one
JSON object on its last line, which the test asserts on.

    python = sdk_python("mcrit", "mcrit==1.16.0", minimum=(3, 12))
    report = await run_driver(python, SCRIPT, {"BASE": server.base, "KEY": key.secret})
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SECONDS = 900.0
DRIVER_SECONDS = 240.0
PYTHON_ENV = "JOBLEDGER_SDK_PYTHON"


def _version(python: str) -> tuple[int, int] | None:
    try:
        done = subprocess.run(
            [python, "-c", "import sys, venv; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    major, minor = done.stdout.split()
    return int(major), int(minor)


def _candidates() -> Iterator[str]:
    explicit = os.environ.get(PYTHON_ENV)
    if explicit:
        yield explicit
        return
    yield sys.executable
    for minor in range(20, 11, -1):
        found = shutil.which(f"python3.{minor}")
        if found:
            yield found
        yield f"/usr/bin/python3.{minor}"
        yield f"/usr/local/bin/python3.{minor}"
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    yield from sorted(glob.glob(f"{pyenv}/versions/3.*/bin/python3"), reverse=True)


def find_python(minimum: tuple[int, int]) -> str | None:
    """An interpreter at least ``minimum`` that can make a venv, or ``None``."""
    seen: set[str] = set()
    for candidate in _candidates():
        real = os.path.realpath(candidate)
        if real in seen or not os.path.exists(real):
            continue
        seen.add(real)
        version = _version(candidate)
        if version is not None and version >= minimum:
            return candidate
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time per environment, also across parallel test processes."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_install(python: Path, requirement: str) -> list[str]:
    """Our own pip installs into the SDK's environment (``pip --python``), uncompiled.

    A new environment then needs no pip of its own (``ensurepip`` costs seconds of CPU), and
    ``--no-compile`` skips compiling every module of every dependency (MCRIT's numpy and scipy:
    most of the install's CPU); the driver compiles the few modules it imports, once, and
    later runs reuse that bytecode.
    """
    return [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "-q",
        "--no-compile",
        "--disable-pip-version-check",
        requirement,
    ]


def sdk_python(name: str, requirement: str, *, minimum: tuple[int, int] = (3, 8)) -> str:
    """The interpreter of ``.venv-sdk-<name>`` with ``requirement`` installed (once)."""
    directory = ROOT / f".venv-sdk-{name}"
    python = directory / "bin" / "python"
    stamp = directory / ".installed"
    with _locked(ROOT / f".venv-sdk-{name}.lock"):
        if python.exists() and stamp.exists() and stamp.read_text() == requirement:
            return str(python)
        base = find_python(minimum)
        if base is None:
            wanted = ".".join(map(str, minimum))
            where = (
                f"{PYTHON_ENV}={os.environ[PYTHON_ENV]} is older or not an interpreter"
                if os.environ.get(PYTHON_ENV)
                else f"looked on PATH, /usr/bin, /usr/local/bin, pyenv; set {PYTHON_ENV}"
            )
            pytest.skip(f"{requirement} needs Python >= {wanted} and none was found ({where})")
        shutil.rmtree(directory, ignore_errors=True)
        steps = [
            [base, "-m", "venv", "--without-pip", str(directory)],
            _pip_install(python, requirement),
        ]
        for step in steps:
            done = subprocess.run(
                step, capture_output=True, text=True, timeout=INSTALL_SECONDS, check=False
            )
            if done.returncode != 0:
                shutil.rmtree(directory, ignore_errors=True)
                raise AssertionError(
                    f"installing {requirement} failed: {' '.join(step)}\n{done.stderr[-3000:]}"
                )
        stamp.write_text(requirement)
    return str(python)


async def run_driver(python: str, script: str, env: dict[str, str]) -> dict[str, Any]:
    """Run ``script`` with the SDK's interpreter; the JSON object it prints last."""
    proc = await asyncio.create_subprocess_exec(
        python,
        "-c",
        script,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, **env},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DRIVER_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode()
    assert proc.returncode == 0, f"the driver failed ({proc.returncode}):\n{err.decode()[-4000:]}"
    lines = text.strip().splitlines()
    assert lines, f"the driver printed nothing:\n{err.decode()[-4000:]}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report
