"""Validation of everything a caller names: agents, interfaces and allow-list entries.

Nothing reaches nftables as text, but names still end up in set and chain names, in logs and in DNS matching, so
each is checked against a narrow grammar here and refused with a message that quotes the offending value.
Hostnames are normalised with IDNA 2008 (UTS #46 mapping) so ``Bücher.example`` and ``xn--bcher-kva.example`` are
one name, compared in lower-case ASCII without a trailing dot.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import idna

AGENT_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Linux IFNAMSIZ is 16 including the NUL; '/' and whitespace are impossible, ':' means an alias, '.' a VLAN.
INTERFACE_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,14}")
LABEL_RE: Final = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
DEFAULT_PORT: Final = 443
MAX_ALLOW_ENTRIES: Final = 256
MAX_NAME_LENGTH: Final = 253


class InvalidName(ValueError):
    """A name or allow entry that is refused; the message names the value."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_agent(value: object) -> str:
    if not isinstance(value, str) or AGENT_RE.fullmatch(value) is None:
        raise InvalidName(f"agent name {_shown(value)} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def validate_interface(value: object) -> str:
    if not isinstance(value, str) or INTERFACE_RE.fullmatch(value) is None:
        raise InvalidName(f"interface name {_shown(value)} must be 1-15 characters of A-Z a-z 0-9 _ - .")
    return value


def normalise_hostname(value: object) -> str:
    """Lower-case ASCII (punycode) form of a hostname; refuses IP literals and anything that is not a hostname."""
    if not isinstance(value, str) or not value:
        raise InvalidName(f"hostname {_shown(value)} must be a non-empty string")
    text = value[:-1] if value.endswith(".") else value
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        pass
    else:
        raise InvalidName(f"hostname {_shown(value)} is an IP address; allow lists name hosts, not addresses")
    try:
        ascii_name = idna.encode(text, uts46=True, std3_rules=False).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise InvalidName(f"hostname {_shown(value)} is not a valid domain name ({exc})") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > MAX_NAME_LENGTH or len(labels) < 2:
        raise InvalidName(f"hostname {_shown(value)} must have at least two labels and at most 253 characters")
    for label in labels:
        if LABEL_RE.fullmatch(label) is None:
            raise InvalidName(f"hostname {_shown(value)} has an invalid label {label!r}")
    if labels[-1].isdigit():
        raise InvalidName(f"hostname {_shown(value)} has a numeric top-level label")
    return ascii_name


def normalise_query(qname: str) -> str | None:
    """A DNS question name in the form allow entries use, or None when it cannot match any entry."""
    try:
        return normalise_hostname(qname)
    except InvalidName:
        return None


@dataclass(frozen=True, order=True)
class AllowEntry:
    """``host`` (TCP 443), ``host:port``, ``*.suffix`` or ``*.suffix:port``."""

    host: str
    port: int = DEFAULT_PORT
    wildcard: bool = False

    @classmethod
    def parse(cls, value: object) -> AllowEntry:
        if not isinstance(value, str):
            raise InvalidName(f"allow entry {_shown(value)} must be a string like 'api.example.com' or 'host:8443'")
        text = value.strip()
        if text != value or not text:
            raise InvalidName(f"allow entry {_shown(value)} must not be empty or carry surrounding spaces")
        port = DEFAULT_PORT
        host = text
        if text.startswith("[") or text.count(":") > 1:
            raise InvalidName(f"allow entry {_shown(value)} looks like an IPv6 address; agents get no IPv6")
        if ":" in text:
            host, _, port_text = text.rpartition(":")
            if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise InvalidName(f"allow entry {_shown(value)} has port {port_text!r}; ports are 1-65535")
            port = int(port_text)
        wildcard = host.startswith("*.")
        if wildcard:
            host = host[2:]
        if "*" in host:
            raise InvalidName(f"allow entry {_shown(value)}: '*' is only allowed as a whole leading label ('*.suffix')")
        try:
            name = normalise_hostname(host)
        except InvalidName as exc:
            raise InvalidName(f"allow entry {_shown(value)}: {exc}") from None
        return cls(host=name, port=port, wildcard=wildcard)

    def matches(self, qname: str) -> bool:
        """Whether a normalised question name falls under this entry (``*.x`` covers subdomains, not ``x`` itself)."""
        if self.wildcard:
            return qname.endswith("." + self.host)
        return qname == self.host

    def __str__(self) -> str:
        prefix = "*." if self.wildcard else ""
        suffix = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{prefix}{self.host}{suffix}"


@dataclass(frozen=True)
class AllowList:
    entries: tuple[AllowEntry, ...] = ()

    @classmethod
    def parse(cls, values: object) -> AllowList:
        if not isinstance(values, list | tuple):
            raise InvalidName(f"allow must be a list of host entries, not {_shown(values)}")
        if len(values) > MAX_ALLOW_ENTRIES:
            raise InvalidName(f"allow has {len(values)} entries; at most {MAX_ALLOW_ENTRIES} are accepted")
        return cls(tuple(sorted({AllowEntry.parse(v) for v in values})))

    def ports_for(self, qname: str) -> frozenset[int]:
        """Ports the agent may reach on addresses ``qname`` resolves to; empty when the name is not allowed."""
        name = normalise_query(qname)
        if name is None:
            return frozenset()
        return frozenset(e.port for e in self.entries if e.matches(name))

    def allows(self, qname: str) -> bool:
        return bool(self.ports_for(qname))

    def texts(self) -> list[str]:
        return [str(e) for e in self.entries]

    def __iter__(self) -> Iterator[AllowEntry]:
        return iter(self.entries)
