"""What a ctxgraph entry is: validation of its parts and its content address.

The hash is the contract every agent relies on to name an entry, so it is defined here once, exactly as
ARCHITECTURE.md says: SHA-256 over a domain tag, the length-framed agent and key, and the RFC 8785 (JCS)
canonical form of the value.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import rfc8785

from nullbox.wire import MAX_LINE, invalid

HASH_DOMAIN: Final = b"ctxgraph/v1\x00"
AGENT_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_KEY_CHARS: Final = 1024
MAX_VALUE_BYTES: Final = 1 << 20
MAX_NESTING: Final = 64
MAX_ENTRY_WIRE: Final = MAX_LINE - 2048
"""The largest entry as sent in a reply; what is left of a line holds the reply's id and framing."""
PAGE_BUDGET: Final = MAX_LINE - 1024
HASH_PATTERN: Final = re.compile(r"[0-9a-f]{64}")


def validate_agent(agent: Any, field: str = "agent") -> str:
    if not isinstance(agent, str) or not AGENT_PATTERN.fullmatch(agent):
        raise invalid(f"'{field}' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return agent


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc"


def validate_key(key: Any, field: str = "key", *, allow_empty: bool = False) -> str:
    """A key (or, with ``allow_empty``, a key prefix): 1-1024 characters of UTF-8 without control characters."""
    if not isinstance(key, str):
        raise invalid(f"'{field}' must be a string")
    if not key and not allow_empty:
        raise invalid(f"'{field}' must not be empty")
    if len(key) > MAX_KEY_CHARS:
        raise invalid(f"'{field}' is longer than {MAX_KEY_CHARS} characters")
    if key.isprintable():  # fast path: no control, separator or format characters at all
        return key
    if any(_is_control(c) for c in key):
        raise invalid(f"'{field}' contains a control character")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{field}' is not valid Unicode (lone surrogate)") from None
    return key


def validate_hash(value: Any, field: str = "hash") -> str:
    if not isinstance(value, str) or not HASH_PATTERN.fullmatch(value):
        raise invalid(f"'{field}' must be 64 lowercase hex characters")
    return value


def _check_nesting(value: Any) -> None:
    """Reject containers nested deeper than MAX_NESTING, without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_NESTING:
            raise invalid(f"'value' nests deeper than {MAX_NESTING} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def canonical_value(value: Any) -> bytes:
    """The RFC 8785 form of a JSON value, after the limits of the contract are checked."""
    _check_nesting(value)
    try:
        canonical: bytes = rfc8785.dumps(value)
    except rfc8785.IntegerDomainError:
        raise invalid("'value' holds an integer beyond ±(2**53-1); JSON numbers are IEEE doubles") from None
    except rfc8785.FloatDomainError:
        raise invalid("'value' holds NaN or Infinity, which JSON cannot carry") from None
    except rfc8785.CanonicalizationError as exc:
        raise invalid(f"'value' cannot be canonicalized: {exc}") from None
    except UnicodeEncodeError:
        raise invalid("'value' holds a string that is not valid Unicode (lone surrogate)") from None
    except (TypeError, RecursionError):
        raise invalid("'value' is not a JSON value") from None
    if len(canonical) > MAX_VALUE_BYTES:
        raise invalid(f"'value' is larger than {MAX_VALUE_BYTES} bytes in canonical form")
    return canonical


def entry_hash(agent: str, key: str, canonical: bytes) -> bytes:
    """The 32-byte content address of (agent, key, canonical value)."""
    agent_bytes = agent.encode("utf-8")
    key_bytes = key.encode("utf-8")
    digest = hashlib.sha256(HASH_DOMAIN)
    digest.update(struct.pack(">I", len(agent_bytes)))
    digest.update(agent_bytes)
    digest.update(struct.pack(">I", len(key_bytes)))
    digest.update(key_bytes)
    digest.update(canonical)
    return digest.digest()


def hash_hex(agent: str, key: str, value: Any) -> str:
    """Convenience for clients: the hash a put of (agent, key, value) will return."""
    return entry_hash(validate_agent(agent), validate_key(key), canonical_value(value)).hex()


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated entry not yet stored: everything but its creation time."""

    hash: bytes
    agent: str
    key: str
    canonical: bytes

    @classmethod
    def make(cls, agent: Any, key: Any, value: Any) -> Draft:
        a = validate_agent(agent)
        k = validate_key(key)
        canonical = canonical_value(value)
        draft = cls(entry_hash(a, k, canonical), a, k, canonical)
        if draft.wire_size() > MAX_ENTRY_WIRE:
            # Every stored entry must be readable back: one entry has to fit in one reply line.
            raise invalid(f"the entry (key and value) is larger than the {MAX_ENTRY_WIRE} bytes one reply can carry")
        return draft

    def wire_size(self) -> int:
        key = len(_json_string(self.key).encode())
        return (
            len('{"hash":"","agent":"","key":,"value":,"created_ns":}')
            + 64
            + len(self.agent)
            + key
            + len(self.canonical)
            + 20
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry.  The value is kept as its canonical JSON text and sent to clients byte for byte."""

    hash: str
    agent: str
    key: str
    canonical: str
    created_ns: int

    @property
    def value(self) -> Any:
        return json.loads(self.canonical)

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "agent": self.agent,
            "key": self.key,
            "value": self.value,
            "created_ns": self.created_ns,
        }

    def to_wire(self) -> str:
        """The entry as a JSON object text, without decoding and re-encoding the value."""
        return (
            f'{{"hash":"{self.hash}","agent":"{self.agent}","key":{_json_string(self.key)},'
            f'"value":{self.canonical},"created_ns":{self.created_ns:d}}}'
        )


def _json_string(text: str) -> str:
    # json.dumps(text, ensure_ascii=False) without its per-call overhead: the same C escaping function.
    return _encode_basestring(text)


_encode_basestring: Callable[[str], str] = json.encoder.encode_basestring


@dataclass(frozen=True, slots=True)
class PutResult:
    hash: str
    created: bool
    created_ns: int


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry]
    next: str | None
    cursors: list[str]
    """``cursors[i]`` continues the listing after ``entries[i]``; used to cut a page that would not fit a line."""

    def to_json(self) -> dict[str, Any]:
        return {"entries": [e.to_json() for e in self.entries], "next": self.next}

    def to_wire(self, budget: int = PAGE_BUDGET) -> str:
        """The page as JSON text of at most ``budget`` bytes: entries that do not fit move to the next page."""
        texts: list[str] = []
        size = 64  # the page's own framing and cursor
        following = self.next
        for index, entry in enumerate(self.entries):
            text = entry.to_wire()
            size += len(text.encode()) + 1
            if texts and size > budget:
                following = self.cursors[index - 1]
                break
            texts.append(text)
        cursor = "null" if following is None else _json_string(following)
        return f'{{"entries":[{",".join(texts)}],"next":{cursor}}}'
