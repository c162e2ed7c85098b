"""The examples in README.md and docs/*.md are tests: they run as written, so they cannot rot.

A fenced block preceded by an HTML comment is an example:

- ``<!-- runnable -->`` before a ``sh`` block: run it with bash (``set -euo pipefail``);
  before a ``python`` block: run it with ``python3``.
- ``<!-- runnable file=NAME -->``: write the block to ``NAME`` in the working directory (a
  script a later block runs, as a reader would save it).
- ``<!-- output -->`` before a ``json`` block: the last line the previous runnable block printed
  is JSON that matches it. Objects match when every key shown matches (the answer may hold more);
  the string ``"..."`` matches anything.

Each document runs on its own, top to bottom, in one shell (variables carry from block to block),
in a fresh temporary directory, against a real ``jobledger serve`` on a fresh database, with
``jobledger`` on PATH. The server's address and database are in ``JOBLEDGER_URL`` and
``JOBLEDGER_DB`` (the CLI's own variable), which the examples use with the defaults of
``make run``, so a reader runs the same text against their own server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.serverproc import env, running

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*(runnable|output)(?:\s+file=(\S+))?\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)")
SCRIPT_SECONDS = 300


class _AnyInt:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int)


ANY_INT: Any = _AnyInt()


@dataclass(frozen=True, slots=True)
class Block:
    kind: str  # "runnable" or "output"
    language: str
    code: str
    line: int  # where the block starts in its document (1-based)
    file: str | None = None


def blocks(text: str) -> list[Block]:
    """The marked blocks of a Markdown text, in order."""
    lines = text.splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        marker = MARKER.match(lines[index])
        if marker is None:
            index += 1
            continue
        start = index + 1
        fence = FENCE.match(lines[start]) if start < len(lines) else None
        assert fence is not None, f"line {index + 1}: a marker must sit right above a fence"
        end = start + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        assert end < len(lines), f"line {start + 1}: the block never closes"
        code = "\n".join(lines[start + 1 : end]) + "\n"
        found.append(Block(marker.group(1), fence.group(1), code, start + 1, marker.group(2)))
        index = end + 1
    return found


def script(name: str, found: list[Block]) -> str:
    """One bash script running the document's examples; each block's stdout to its own file."""
    parts = ["set -euo pipefail"]
    for number, block in enumerate(found):
        if block.kind != "runnable":
            continue
        where = f"{name}:{block.line}"
        parts.append(f"echo {shlex.quote('>>> ' + where)} >&2")
        quoted = f"JOBLEDGER_DOC_EOF_{number}"
        if block.file is not None:
            parts.append(f"cat > {shlex.quote(block.file)} <<'{quoted}'\n{block.code}{quoted}")
        elif block.language in ("sh", "bash", "shell"):
            parts.append(f"{{\n{block.code}}} > .block-{number}.out")
        elif block.language == "python":
            parts.append(f"python3 - > .block-{number}.out <<'{quoted}'\n{block.code}{quoted}")
        else:
            raise AssertionError(f"{where}: cannot run a {block.language!r} block")
    return "\n".join(parts) + "\n"


def matches(expected: Any, actual: Any) -> bool:
    if expected == "...":
        return True
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and matches(value, actual[key]) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual and type(expected) is type(actual))


def last_json_line(path: Path) -> Any:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name}: the block printed nothing"
    return json.loads(lines[-1])


def test_every_document_marks_its_examples() -> None:
    """The README's first five minutes and each reference page carry runnable examples."""
    readme = (ROOT / "README.md").read_text()
    assert "## The first five minutes" in readme
    assert len(readme.splitlines()) <= 200
    for name in ("README.md", "api.md", "lifecycle.md", "credits.md", "audit.md"):
        path = ROOT / name if name == "README.md" else ROOT / "docs" / name
        assert any(b.kind == "runnable" for b in blocks(path.read_text())), name


def test_docs_say_nothing_about_files_outside_the_project() -> None:
    """The project documents itself: no pointers to a contract a clone does not have."""
    for path in DOCUMENTS:
        text = path.read_text()
        assert "../shared" not in text and "CONTRACT.md" not in text, path.name
        assert not re.search(r"\bsection \d", text), f"{path.name} refers to a numbered section"


def _with_examples() -> list[Path]:
    return [p for p in DOCUMENTS if any(b.kind == "runnable" for b in blocks(p.read_text()))]


@pytest.mark.parametrize("path", _with_examples(), ids=lambda p: p.name)
def test_examples_run_as_written(path: Path, tmp_path: Path) -> None:
    """Every runnable block of the document runs, in order, against a real server."""
    found = blocks(path.read_text())
    work = tmp_path / "work"
    work.mkdir()
    db = str(tmp_path / "ledger.db")
    with running(db, log_dir=tmp_path) as server:
        environment = env()
        environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
        environment["JOBLEDGER_URL"] = server.base
        environment["JOBLEDGER_DB"] = db
        done = subprocess.run(
            ["bash", "-c", script(path.name, found)],
            cwd=work,
            env=environment,
            capture_output=True,
            text=True,
            timeout=SCRIPT_SECONDS,
            check=False,
        )
        log = server.log_text()
    assert done.returncode == 0, f"{path.name}: exit {done.returncode}\n{done.stderr[-4000:]}"
    assert '"http.unhandled"' not in log
    previous: int | None = None
    for number, block in enumerate(found):
        if block.kind == "runnable" and block.file is None:
            previous = number
        elif block.kind == "output":
            assert previous is not None, f"{path.name}:{block.line}: output of nothing"
            actual = last_json_line(work / f".block-{previous}.out")
            expected = json.loads(block.code)
            assert matches(expected, actual), f"{path.name}:{block.line}: got {actual}"
    if path.name == "README.md":  # the five minutes end with an export verified up to the head
        out = (work / f".block-{previous}.out").read_text().splitlines()
        verdict = next(line for line in out if line.startswith("OK "))
        _, count, head = verdict.split()
        assert json.loads(out[-1]) == {"position": ANY_INT, "hash": head, "count": int(count)}
