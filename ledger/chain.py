"""The tamper-evident hash chain of section 7 of the contract.

``data_hash = sha256_hex(canonical(data))`` and
``hash = sha256_hex(prev_hash + "\\n" + canonical(header))`` where the header is the event
object without ``hash``, ``prev_hash``, ``data`` and ``redacted``. ``canonical`` is Python's own
JSON with sorted keys and no spaces, so the README's fifteen-line verifier is the reference.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64
HEADER_FIELDS = (
    "position",
    "event_id",
    "stream",
    "version",
    "type",
    "occurred_at",
    "recorded_at",
    "actor",
    "data_hash",
)


def canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_hash(prev_hash: str, header: dict[str, Any]) -> str:
    return sha256_hex(prev_hash.encode() + b"\n" + canonical(header))


def event_hash(
    prev_hash: str,
    *,
    position: int,
    event_id: str,
    stream: str,
    version: int,
    type: str,
    occurred_at: str,
    recorded_at: str,
    actor: str,
    data_hash: str,
) -> str:
    header = {
        "position": position,
        "event_id": event_id,
        "stream": stream,
        "version": version,
        "type": type,
        "occurred_at": occurred_at,
        "recorded_at": recorded_at,
        "actor": actor,
        "data_hash": data_hash,
    }
    return header_hash(prev_hash, header)
