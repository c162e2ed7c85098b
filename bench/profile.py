"""Summarise a py-spy profile: the functions where the samples are, self and inclusive.

Record one with py-spy's collapsed ("raw") format, against a running server under load::

    py-spy record -f raw -o /tmp/server.txt -r 200 -d 10 --pid <server pid>

or around a whole command::

    py-spy record -f raw -o /tmp/datagen.txt -- python -m bench.datagen /tmp/x.db --events 50000

then ``python -m bench.profile /tmp/server.txt [--thread MainThread] [-n 25]``.
Idle frames (the event loop's ``select``, a worker thread waiting on its queue, found by
reading the sampled source line) are counted apart, so the percentages are shares of the busy
samples across all threads (the server's main thread plus its SQLite threads).
"""

from __future__ import annotations

import argparse
import functools
import linecache
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# A leaf frame whose source line does one of these is a thread waiting, not working:
# the event loop's epoll, a worker thread's queue.get(), a lock or condition wait.
PROJECT = ("ledger/", "projections/", "api/", "backends/", "bench/")
_WAITING = re.compile(r"\.(get|select|poll|wait|acquire|sleep)\(|\bsleep\(")


def _name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (to/file.py)``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = m.group("file").replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else parts[0]
    if "site-packages" in parts:
        short = "/".join(parts[parts.index("site-packages") + 1 :])
    return f"{m.group('func')} ({short})"


@functools.lru_cache(maxsize=4096)
def _source_line(file: str, line: int) -> str:
    """The text of ``file:line``; py-spy gives paths relative to site-packages or the root."""
    path = Path(file)
    candidates = [path] if path.is_absolute() else [Path(p) / path for p in sys.path if p]
    candidates.append(Path.cwd() / path)
    for candidate in candidates:
        if candidate.is_file():
            return linecache.getline(str(candidate), line)
    return ""


def _idle(frame: str) -> bool:
    m = _FRAME.match(frame.strip())
    if not m or m.group("line") is None:
        return False
    return bool(_WAITING.search(_source_line(m.group("file"), int(m.group("line")))))


def summarise(path: str | Path, *, thread: str | None = None, top: int = 25) -> dict[str, object]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    busy = idle = 0
    for raw in Path(path).read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        head = frames[0]
        if head.startswith(("thread", "process")):
            threads[head] += count
            if thread is not None and thread not in head:
                continue
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("process ")]
        if not frames:
            continue
        if _idle(frames[-1]):
            idle += count
            continue
        leaf = _name(frames[-1])
        busy += count
        self_time[leaf] += count
        for name in dict.fromkeys(_name(f) for f in frames):
            inclusive[name] += count
    total = busy or 1
    ours = [(n, c) for n, c in inclusive.most_common() if n.split("(")[-1].startswith(PROJECT)]
    return {
        "busy_samples": busy,
        "idle_samples": idle,
        "threads": dict(threads.most_common()),
        "self": [(n, c, round(100 * c / total, 1)) for n, c in self_time.most_common(top)],
        "inclusive": [(n, c, round(100 * c / total, 1)) for n, c in inclusive.most_common(top)],
        "inclusive_project": [(n, c, round(100 * c / total, 1)) for n, c in ours[:top]],
    }


def render(summary: dict[str, object]) -> str:
    lines = [f"busy samples {summary['busy_samples']}, idle {summary['idle_samples']}"]
    for label in ("self", "inclusive", "inclusive_project"):
        lines.append(f"-- top {label} --")
        for name, count, pct in summary[label]:  # type: ignore[attr-defined]
            lines.append(f"{pct:6.1f}% {count:7d}  {name}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--thread", default=None, help="only stacks of threads matching this")
    parser.add_argument("-n", "--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(render(summarise(args.path, thread=args.thread, top=args.top)))


if __name__ == "__main__":
    main()
