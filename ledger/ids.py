"""Identifiers: time-ordered ULIDs behind a prefix, and the rule for caller-chosen job ids."""

from __future__ import annotations

import os
import random
import re
import secrets
import threading
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
JOB_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# Words that are routes under /v1/jobs, and "." and "..", which URL normalisation removes from
# a path: a job with one of these ids could never be addressed over HTTP.
RESERVED_JOB_IDS = frozenset({"stats", "running", ".", ".."})

_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _new_random() -> random.Random:
    return random.SystemRandom() if os.environ.get("JOBLEDGER_CRYPTO_IDS") else random.Random()


_random = _new_random()


def _after_fork() -> None:
    """A forked child draws its own ids: the parent's PRNG state and last id are not its own.

    Without this, processes forked after import (a pre-loading process manager, a zygote)
    would draw the same random bits and, within one millisecond, the same ids.
    """
    global _lock, _last_ms, _last_rand, _random, _head
    _lock = threading.Lock()
    _last_ms, _last_rand, _head = 0, 0, (-1, -1, "")
    _random = _new_random()


os.register_at_fork(after_in_child=_after_fork)

# 10-bit groups as two Crockford characters: a 128-bit ULID is 13 lookups.
_PAIRS = [_CROCKFORD[i >> 5] + _CROCKFORD[i & 31] for i in range(1024)]
_MASK80 = (1 << 80) - 1
# the last id's first 24 characters, with the millisecond and random bits they encode: ids of
# one millisecond count up from a random start, so most share all but their last two characters
_head: tuple[int, int, str] = (-1, -1, "")


def ulid() -> str:
    """A 26-character ULID, strictly increasing within this process.

    The 80 random bits make ids unique, not secret (secrets come from ``secrets``), so a fast
    PRNG seeded from the OS serves; ``os.urandom`` per id costs ~60 µs on this kind of VM.
    Within a millisecond the random part counts up by one (the ULID spec's monotonic form), so
    the first 24 characters are formatted again only when they change.
    """
    global _last_ms, _last_rand, _head
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            rand = _last_rand + 1
        else:
            rand = _random.getrandbits(79)
        _last_ms, _last_rand = ms, rand
    r = rand & _MASK80
    high = r >> 10
    head_ms, head_high, head = _head
    if head_ms != ms or head_high != high:
        p = _PAIRS  # written out: a comprehension's frame and range cost more than the lookups
        head = (
            f"{p[ms >> 40 & 1023]}{p[ms >> 30 & 1023]}{p[ms >> 20 & 1023]}{p[ms >> 10 & 1023]}"
            f"{p[ms & 1023]}{p[high >> 60 & 1023]}{p[high >> 50 & 1023]}{p[high >> 40 & 1023]}"
            f"{p[high >> 30 & 1023]}{p[high >> 20 & 1023]}{p[high >> 10 & 1023]}{p[high & 1023]}"
        )
        _head = (ms, high, head)
    return head + _PAIRS[r & 1023]


def new_job_id() -> str:
    return "job_" + ulid()


def new_event_id() -> str:
    return "evt_" + ulid()


def new_key_id() -> str:
    return "key_" + ulid()


def new_result_id() -> str:
    return secrets.token_hex(12)
