"""The tamper-evident hash chain of section 7 of the contract.

``data_hash = sha256_hex(canonical(data))`` and
``hash = sha256_hex(prev_hash + "\\n" + canonical(header))`` where the header is the event
object without ``hash``, ``prev_hash``, ``data`` and ``redacted``. ``canonical`` is Python's own
JSON with sorted keys and no spaces, so the README's fifteen-line verifier is the reference.

msgspec writes the same bytes ten times faster for every value but one kind: it writes some
floats in another (equally valid) form (``1e16`` where Python writes ``1e+16``, ``0.00001``
for ``1e-05``) and NaN as ``null`` where Python refuses it. So a value holding only strings,
integers, booleans, ``None``, lists and dicts with string keys goes through msgspec, and
anything else (a float, a tuple, a subclass) through ``json.dumps`` itself;
``tests/test_chain.py`` compares the two byte for byte over random values.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

import msgspec

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

_ENCODE_SORTED = msgspec.json.Encoder(order="sorted").encode


class Header(msgspec.Struct):
    """The header's fields in sorted order: msgspec writes every string exactly as
    ``json.dumps(ensure_ascii=False)`` does, so its encoding is ``canonical`` of the header dict
    (the importer encodes it into a reused buffer)."""

    actor: str
    data_hash: str
    event_id: str
    occurred_at: str
    position: int
    recorded_at: str
    stream: str
    type: str
    version: int


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only types msgspec writes exactly as ``json.dumps`` does."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _plain(item):
                return False
        return True
    if kind is list:
        for item in value:
            if not _plain(item):
                return False
        return True
    return False


def canonical(value: Any) -> bytes:
    """JSON with sorted keys, no spaces, UTF-8; ``ValueError`` for NaN and infinities."""
    if _plain(value):
        return _ENCODE_SORTED(value)  # a lone surrogate raises UnicodeEncodeError, as below
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


_DECODE = msgspec.json.Decoder().decode
# floats decode as ``Decimal``, which msgspec writes as a quoted string: a text holding a float
# can never equal the sorted re-encoding of what this decodes
_DECODE_NO_FLOAT = msgspec.json.Decoder(float_hook=Decimal).decode


def canonical_text(raw: bytes) -> bytes:
    """``canonical`` of the JSON value ``raw`` encodes (decoded as a verifier decodes it: a
    repeated key keeps its last value); ``ValueError`` when ``raw`` is not such a value.

    The shortcut returns ``raw`` itself when it is byte for byte msgspec's sorted encoding of a
    value without floats: such a value holds only strings, integers, booleans, ``None``,
    lists and dicts, so that encoding is ``canonical`` of it (see above), and decoding it
    without the float hook gives the same value. Anything else (a repeated key, spaces, an
    escape, a float, unsorted keys) takes the long way: decode, then ``canonical``.
    """
    try:
        if _ENCODE_SORTED(_DECODE_NO_FLOAT(raw)) == raw:
            return raw
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError):
        pass
    try:
        return canonical(_DECODE(raw))
    except (msgspec.DecodeError, TypeError, OverflowError) as exc:  # DecodeError: ValueError
        raise ValueError(str(exc)) from None


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
    if position.__class__ is not int or version.__class__ is not int:  # `type` is a field
        return header_hash(
            prev_hash,
            {
                "position": position,
                "event_id": event_id,
                "stream": stream,
                "version": version,
                "type": type,
                "occurred_at": occurred_at,
                "recorded_at": recorded_at,
                "actor": actor,
                "data_hash": data_hash,
            },
        )
    header = Header(
        actor=actor,
        data_hash=data_hash,
        event_id=event_id,
        occurred_at=occurred_at,
        position=position,
        recorded_at=recorded_at,
        stream=stream,
        type=type,
        version=version,
    )
    return sha256_hex(b"%s\n%s" % (prev_hash.encode(), _ENCODE_SORTED(header)))
