"""The chain's canonical JSON is byte for byte the README verifier's ``json.dumps``."""

from __future__ import annotations

import hashlib
import json
from enum import IntEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import chain


def verifier_canonical(value: Any) -> bytes:
    """The line of docs/audit.md's stand-alone verifier."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# every code point but the surrogates (which no UTF-8 text holds), so unicode of every plane,
# control characters, quotes, backslashes, U+2028/U+2029 and noncharacters all come up
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**200), 2**200),  # beyond 64 bits too
    st.floats(allow_nan=False, allow_infinity=False),  # 1e16, 1e-05, -0.0, 5e-324 ...
    st.sampled_from([0.0, -0.0, 1e16, 1e-5, 1e22, 1.5e300, 5e-324, 0.1, 100.0, 123456789.123]),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=5)),
    max_leaves=40,
)
PLAIN = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**200), 2**200), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=5)),
    max_leaves=40,
)


def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = {f"k{i}": [value, i]} if i % 2 else [value, {"é": i}]
    return value


@settings(max_examples=600, deadline=None)
@given(JSON)
def test_canonical_is_the_verifiers_json(value: Any) -> None:
    assert chain.canonical(value) == verifier_canonical(value)


@settings(max_examples=400, deadline=None)
@given(PLAIN)
def test_the_msgspec_path_writes_the_verifiers_bytes(value: Any) -> None:
    """Values without floats take the msgspec path; it must agree on its own, too."""
    assert chain._plain(value)
    assert chain._ENCODE_SORTED(value) == verifier_canonical(value)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), JSON)
def test_deep_nesting(depth: int, leaf: Any) -> None:
    value = nested(depth, leaf)
    assert chain.canonical(value) == verifier_canonical(value)


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": 2, "B": 3, "é": 4, "\U0001f600": 5, "\uffff": 6, "": 7},
        {"x": 1e16, "y": [1e-05, -0.0, 2.5]},  # floats: json.dumps's own form
        {"n": 2**64, "m": -(2**63) - 1, "big": 10**40},
        {"t": True, "f": False, "z": None, "s": 'a"b\\c\n\t\x00\x1f\x7f\u2028\u2029'},
        ["tuple", (1, 2)],  # a tuple is a list to json.dumps
        {"enum": IntEnum("E", "A B").B},  # an int subclass
        nested(300, "deep"),
    ],
)
def test_canonical_examples(value: Any) -> None:
    assert chain.canonical(value) == verifier_canonical(value)


@pytest.mark.parametrize("value", [float("nan"), {"a": float("inf")}, [float("-inf")]])
def test_nan_and_infinities_are_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        chain.canonical(value)


@pytest.mark.parametrize("value", ["\ud800", {"a": ["x\udfff"]}, {"\ud83d": 1}])
def test_lone_surrogates_are_refused(value: Any) -> None:
    with pytest.raises(UnicodeError):
        chain.canonical(value)


def test_non_string_keys_take_json_dumps() -> None:
    assert chain.canonical({1: "a", 2: "b"}) == verifier_canonical({1: "a", 2: "b"})


HEADERS = st.fixed_dictionaries(
    {
        "position": st.integers(1, 2**62),
        "event_id": TEXT,
        "stream": TEXT,
        "version": st.integers(1, 2**40),
        "type": TEXT,
        "occurred_at": TEXT,
        "recorded_at": TEXT,
        "actor": TEXT,
        "data_hash": st.text("0123456789abcdef", min_size=64, max_size=64),
    }
)


@settings(max_examples=300, deadline=None)
@given(st.text("0123456789abcdef", min_size=64, max_size=64), HEADERS)
def test_event_hash_is_the_verifiers_hash(prev: str, header: dict[str, Any]) -> None:
    expected = hashlib.sha256(prev.encode() + b"\n" + verifier_canonical(header)).hexdigest()
    assert chain.event_hash(prev, **header) == expected
    assert chain.header_hash(prev, header) == expected
