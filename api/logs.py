"""structlog configuration: JSON lines (pretty on a terminal), buffered for the server.

structlog's loggers flush after every line, which is a write syscall per request; the server
instead hands them a stream whose ``flush`` is a no-op and writes the buffer out every 200 ms,
when it grows large, and at exit.

The request's fields (``request_id``, method, path, then key and tenant) live in one context
variable the middleware sets once per request (``bind_request``) and every line of that request
carries. The access line, one per request, is written by ``access`` straight to the stream in
the same JSON form structlog's chain would give it, without running that chain (a third of the
middleware's cost); on a terminal, or with the info level filtered out, it goes through
structlog like any other line.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog

FLUSH_SECONDS = 0.2
MAX_BUFFERED = 512


class BufferedLines:
    """A text stream that writes in blocks; ``sync`` is the real flush."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        if len(self._parts) > MAX_BUFFERED:
            self.sync()
        return len(text)

    def flush(self) -> None:
        """Loggers call this after every line; the buffer is written by ``sync``."""

    def sync(self) -> None:
        if self._parts:
            text, self._parts = "".join(self._parts), []
            with contextlib.suppress(OSError, ValueError):
                self._stream.write(text)
                self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.sync()


_ENCODER = msgspec.json.Encoder(enc_hook=str)
_seconds: dict[int, str] = {}
_REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("jobledger_request", default=None)
_access_stream: Any = None  # where ``access`` writes its lines itself (JSON lines at info)
_access_enabled = True
ACCESS_EVENT = "http.request"


def _serialize(event: Any, **_: Any) -> str:
    return _ENCODER.encode(event).decode()


_DIGITS = [f"{n:03d}" for n in range(1000)]


def _now_text() -> str:
    """RFC 3339 UTC with microseconds; the date part is formatted once a second, the
    microseconds from two lookups (a format spec costs more than the rest of the line)."""
    ns = time.time_ns()
    second = ns // 1_000_000_000
    prefix = _seconds.get(second)
    if prefix is None:
        _seconds.clear()
        prefix = _seconds[second] = datetime.fromtimestamp(second, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S."
        )
    micros = ns // 1000 % 1_000_000
    return prefix + _DIGITS[micros // 1000] + _DIGITS[micros % 1000] + "Z"


def _timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["timestamp"] = _now_text()
    return event


def bind_request(**fields: Any) -> dict[str, Any]:
    """Make ``fields`` part of every line logged until the next request; the dict stays live
    (the middleware adds the caller's key and tenant to it once they are known)."""
    _REQUEST.set(fields)
    return fields


def _merge_request(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    fields = _REQUEST.get()
    if fields:
        for name, value in fields.items():
            event.setdefault(name, value)
    return event


def access(status: int, ms: float) -> None:
    """The request's one access line: what ``log.info("http.request", status=, ms=)`` writes."""
    stream = _access_stream
    if stream is None:
        if _access_enabled:
            structlog.get_logger("api.access").info(ACCESS_EVENT, status=status, ms=ms)
        return
    fields = _REQUEST.get() or {}  # request fields never name status, ms or event
    line = {"status": status, "ms": ms, "event": ACCESS_EVENT, **fields, "level": "info"}
    line["timestamp"] = _now_text()
    stream.write(_ENCODER.encode(line).decode() + "\n")


def configure(stream: Any = None, level: int = logging.INFO) -> None:
    """JSON lines on ``stream`` (stderr by default); pretty output only on a terminal."""
    global _access_stream, _access_enabled
    stream = sys.stderr if stream is None else stream
    tty = stream.isatty()
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if tty
        else structlog.processors.JSONRenderer(serializer=_serialize)
    )
    _access_enabled = level <= logging.INFO
    _access_stream = stream if _access_enabled and not tty else None
    structlog.configure(
        processors=[
            _merge_request,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


class _LibraryLogs(logging.Handler):
    """Lines that libraries log through ``logging`` (aiohttp's), as structlog JSON lines.

    Only the message template is kept, never its arguments or the exception's text: aiohttp
    logs "Unhandled exception" with the exception that quotes the offending request bytes,
    which may hold an API key. The exception's type says what happened.
    """

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = type(record.exc_info[1]).__name__
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        structlog.get_logger(record.name).log(record.levelno, template, **fields)


def route_library_logs(names: tuple[str, ...] = ("aiohttp", "asyncio")) -> None:
    """Send these ``logging`` loggers' warnings and errors through structlog, and only there."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _LibraryLogs) for h in logger.handlers):
            logger.addHandler(_LibraryLogs())
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def configure_buffered() -> BufferedLines:
    """Buffered JSON lines on stderr for the server; written out at exit too."""
    buffered = BufferedLines(sys.stderr)
    atexit.register(buffered.sync)
    configure(buffered)
    route_library_logs()
    return buffered
