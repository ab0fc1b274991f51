"""The content address and the validation rules of ARCHITECTURE.md, checked against fixed vectors.

Each vector names the canonical (RFC 8785) bytes by hand and the hash computed once from them by the
definition, so a change to canonicalisation or framing fails here, not silently in every stored address.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest

from ctxgraph.model import MAX_KEY_CHARS, MAX_NESTING, Draft, canonical_value, hash_hex, validate_agent, validate_key
from nullbox.wire import ErrorCode, WireError

VECTORS: list[tuple[str, str, Any, bytes, str]] = [
    # framing: the same concatenation, split differently, must hash differently
    ("a", "bc", 1, b"1", "8bde8b9f5dfc6e478e16c0fe4514933975f20ca3f27ba772acd649c91504da3c"),
    ("ab", "c", 1, b"1", "e8ac73f1e1fc97a78e760a8bd8868b9080eec10d650610bc32e7831892220733"),
    ("agent-1", "notes/today", "hello", b'"hello"', "82b81697bbbcbac1a6233616c7ab0efe26ea3d8f8dbd09244dc01838f9669a17"),
    (
        "researcher",
        "papers/\u00e9t\u00e9 \U0001f600",
        {"b": 2, "a": 1},
        b'{"a":1,"b":2}',
        "93b7ba3f48f88eb29fee0bdd0af9709904254db0b0b35510893ce72a2a464424",
    ),
    (
        "x",
        "floats",
        [1e20, -0.0, 0.1, 1.5e-7, 123456789012],
        b"[100000000000000000000,0,0.1,1.5e-7,123456789012]",
        "1746475a56ba5ea53f881c37aa7fd36a556190c9ad8e48c28ee1cd3d4e88d8f8",
    ),
    (
        "x",
        "nested",
        {"z": {"y": [True, False, None], "\u00e9": "\u2028"}, "a": []},
        '{"a":[],"z":{"y":[true,false,null],"\u00e9":"\u2028"}}'.encode(),
        "87b09fbb171a2b35f4877cde4a0b5b7c2576b01a294e892cb1af3ec875f0422d",
    ),
    (
        "_",
        "k",
        '\u0000\n"\\',
        b'"\\u0000\\n\\"\\\\"',
        "44ede304e3be3e2c53f6cfebba535c72d0686f901153791a3d495bd9fee5d5a1",
    ),
    (
        "op",
        "emoji-key-\U0001f600",
        {"\U0001f600": 1, "\u20ac": 2, "\r": 3},
        '{"\\r":3,"\u20ac":2,"\U0001f600":1}'.encode(),
        "987d7adb66bc4500936b29fcd89690ccaf97516291ab850eea3f7be01d16c181",
    ),
    # RFC 8785 sorts keys by UTF-16 code units: U+1F600 (D83D DE00) sorts before U+FF61
    (
        "utf16",
        "order",
        {"\uff61": 1, "\U0001f600": 2},
        '{"\U0001f600":2,"\uff61":1}'.encode(),
        "d7fe0c50acc23d4481fcc6d8c1e45507f8ea3afeb2d31b0bba68aba830513e3f",
    ),
    (
        "big",
        "n",
        [2**53 - 1, -(2**53 - 1), 1e21, 5e-324],
        b"[9007199254740991,-9007199254740991,1e+21,5e-324]",
        "8996297de84bc8d97a62b249c3e6365525f863d62dc93bec324792267b519b4b",
    ),
]


@pytest.mark.parametrize(("agent", "key", "value", "canonical", "expected"), VECTORS)
def test_hash_vectors(agent: str, key: str, value: Any, canonical: bytes, expected: str) -> None:
    assert canonical_value(value) == canonical
    assert hash_hex(agent, key, value) == expected
    draft = Draft.make(agent, key, value)
    assert draft.hash.hex() == expected
    assert draft.canonical == canonical


def test_vectors_follow_the_definition() -> None:
    """The table itself is consistent with the written definition (domain tag, u32be lengths, JCS bytes)."""
    for agent, key, _value, canonical, expected in VECTORS:
        a, k = agent.encode(), key.encode()
        framed = b"ctxgraph/v1\x00" + struct.pack(">I", len(a)) + a + struct.pack(">I", len(k)) + k + canonical
        assert hashlib.sha256(framed).hexdigest() == expected


def test_framing_separates_agent_and_key() -> None:
    assert hash_hex("a", "bc", 1) != hash_hex("ab", "c", 1)


def test_hash_ignores_object_key_order_and_number_spelling() -> None:
    assert hash_hex("a", "k", {"x": 1.0, "y": [0.5]}) == hash_hex("a", "k", {"y": [0.5], "x": 1})


def _code(exc: pytest.ExceptionInfo[WireError]) -> str:
    return str(exc.value.code)


@pytest.mark.parametrize(
    "agent", ["", "a" * 65, "with/slash", "sp ace", "dot.ted", "\u00e9", "new\n", 7, None, ["a"], "a\u0000"]
)
def test_bad_agent_names(agent: Any) -> None:
    with pytest.raises(WireError) as exc:
        validate_agent(agent)
    assert _code(exc) == ErrorCode.INVALID_REQUEST
    assert "'agent'" in exc.value.message


@pytest.mark.parametrize("agent", ["a", "A-z_0", "x" * 64])
def test_good_agent_names(agent: str) -> None:
    assert validate_agent(agent) == agent


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("k" * (MAX_KEY_CHARS + 1), "longer"),
        ("a\u0000b", "control"),
        ("tab\there", "control"),
        ("del\u007f", "control"),
        ("c1\u0085", "control"),
        ("lone\ud800", "surrogate"),
        (5, "string"),
    ],
)
def test_bad_keys(key: Any, reason: str) -> None:
    with pytest.raises(WireError) as exc:
        validate_key(key)
    assert _code(exc) == ErrorCode.INVALID_REQUEST
    assert reason in exc.value.message


@pytest.mark.parametrize("key", ["k", "\u00e9t\u00e9/\U0001f600", "a%b_c", "k" * MAX_KEY_CHARS, "zero\u200bwidth"])
def test_good_keys(key: str) -> None:
    assert validate_key(key) == key


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "NaN"),
        (float("inf"), "NaN or Infinity"),
        (2**53, "integer"),
        (-(2**60), "integer"),
        (_nested(MAX_NESTING + 1), "nests deeper"),
        ({"k": _nested(MAX_NESTING)}, "nests deeper"),
        ("x" * (1 << 20), "larger"),
        ("\ud800", "canonical"),
        ({1, 2}, "unsupported type"),
    ],
)
def test_bad_values(value: Any, reason: str) -> None:
    with pytest.raises(WireError) as exc:
        canonical_value(value)
    assert _code(exc) == ErrorCode.INVALID_REQUEST
    assert reason in exc.value.message


def test_value_limits_are_inclusive() -> None:
    assert canonical_value(_nested(MAX_NESTING)).startswith(b"[" * MAX_NESTING)
    at_limit = "x" * ((1 << 20) - 2)  # two quotes make it exactly 1 MiB
    assert len(canonical_value(at_limit)) == 1 << 20
