"""Time as the ledger keeps it: integer microseconds since the epoch, shown as RFC 3339 UTC."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from ledger.errors import Invalid

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The times the ledger stores: years 1000 to 9999, so every time has one RFC 3339 form
MIN_US = -30610224000 * 1_000_000  # 1000-01-01T00:00:00Z
MAX_US = 253402300799_999_999  # 9999-12-31T23:59:59.999999Z
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def now_us() -> int:
    return time.time_ns() // 1000


_second_cache: dict[int, str] = {}


def format_us(us: int) -> str:
    """RFC 3339 UTC ending in ``Z``; fractions only when there are any."""
    seconds, fraction = divmod(us, 1_000_000)
    prefix = _second_cache.get(seconds)
    if prefix is None:
        t = _EPOCH + timedelta(seconds=seconds)
        prefix = (
            f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        )
        if len(_second_cache) > 4096:
            _second_cache.clear()
        _second_cache[seconds] = prefix
    if fraction:
        return f"{prefix}.{fraction:06d}".rstrip("0") + "Z"
    return prefix + "Z"


def format_opt(us: int | None) -> str | None:
    return None if us is None else format_us(us)


def parse_us(text: str, *, field: str) -> int:
    """Parse RFC 3339 (``Z`` or an offset; a bare date or naive time is taken as UTC)."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise Invalid(f"{field} is not an RFC 3339 time: {text!r}", field=field) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        delta = dt - _EPOCH
    except OverflowError:
        raise Invalid(f"{field} is outside the years 1000 to 9999", field=field) from None
    us = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    if not MIN_US <= us <= MAX_US:
        raise Invalid(f"{field} is outside the years 1000 to 9999", field=field)
    return us


def parse_duration(text: str) -> int:
    """``7d``, ``12h``, ``30m``, ``90s`` or bare seconds, as seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m, 90s)")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]
