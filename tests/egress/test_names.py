"""Validation of agent, interface and allow-entry names (egress.names) and the blocked ranges (egress.blocked)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from egress.blocked import BLOCKED_V4, METADATA_V4, METADATA_V6, blocked_reason, is_blocked
from egress.names import (
    MAX_ALLOW_ENTRIES,
    AllowEntry,
    AllowList,
    InvalidName,
    normalise_hostname,
    validate_agent,
    validate_interface,
)

HOSTILE = [
    'a"; flush ruleset',
    "a; flush ruleset",
    "bot\nflush ruleset",
    "bot\r",
    "bot\x00",
    "bot ",
    " bot",
    "$(reboot)",
    "`id`",
    "a/b",
    "../etc",
    "a{b}",
    "ünïcode",
    "",
]


@pytest.mark.parametrize("name", ["bot", "A-1_b", "x" * 64, "0", "-", "_"])
def test_valid_agent_names(name: str) -> None:
    assert validate_agent(name) == name


@pytest.mark.parametrize("name", [*HOSTILE, "x" * 65, "a.b", "a:b", 5, None, ["bot"]])
def test_hostile_or_malformed_agent_names_are_refused_with_the_value_in_the_message(name: object) -> None:
    with pytest.raises(InvalidName) as info:
        validate_agent(name)
    assert "agent name" in str(info.value)
    assert repr(name)[:20] in str(info.value)
    assert "\n" not in str(info.value)  # the repr quotes control characters; the message stays one line


@pytest.mark.parametrize("name", ["eth0", "nb-1a2b3c4d5e6f", "x" * 15, "br.10", "a_b"])
def test_valid_interface_names(name: str) -> None:
    assert validate_interface(name) == name


@pytest.mark.parametrize("name", [*HOSTILE, "x" * 16, "eth0:1", ".hidden", 7, None])
def test_hostile_or_malformed_interface_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidName, match="interface name"):
        validate_interface(name)


@pytest.mark.parametrize(
    ("text", "host", "port", "wildcard"),
    [
        ("api.example.com", "api.example.com", 443, False),
        ("API.Example.COM.", "api.example.com", 443, False),
        ("api.example.com:8443", "api.example.com", 8443, False),
        ("*.github.com", "github.com", 443, True),
        ("*.github.com:22", "github.com", 22, True),
        ("Bücher.example", "xn--bcher-kva.example", 443, False),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", 443, False),
        ("*.bücher.example:1", "xn--bcher-kva.example", 1, True),
        ("a.b:65535", "a.b", 65535, False),
    ],
)
def test_allow_entries_parse(text: str, host: str, port: int, wildcard: bool) -> None:
    entry = AllowEntry.parse(text)
    assert (entry.host, entry.port, entry.wildcard) == (host, port, wildcard)
    assert AllowEntry.parse(str(entry)) == entry  # the canonical text round-trips


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1.2.3.4", "IP address"),
        ("1.2.3.4:443", "IP address"),
        ("169.254.169.254:80", "IP address"),
        ("[::1]:443", "IPv6"),
        ("::1", "IPv6"),
        ("fd00:ec2::254", "IPv6"),
        ("example.com:0", "port"),
        ("example.com:65536", "port"),
        ("example.com:-1", "port"),
        ("example.com:", "port"),
        ("example.com:https", "port"),
        ("example.com:٤٤٣", "port"),  # Arabic-Indic digits: isdigit() but not ASCII
        ("*.*.example.com", "'*'"),
        ("a*.example.com", "'*'"),
        ("*", "'*'"),
        ("*.", "hostname"),
        ("localhost", "two labels"),
        ("example.123", "numeric"),
        ("exa mple.com", "not a valid domain name"),
        ('a"; flush ruleset', "not a valid domain name"),
        ("a.com\nflush ruleset", "not a valid domain name"),
        ("a.com;b.com", "not a valid domain name"),
        (" a.com", "surrounding spaces"),
        ("a.com ", "surrounding spaces"),
        ("", "empty"),
        ("-bad.example.com", "hyphen"),
        ("a..example.com", "Empty Label"),
        ("x" * 64 + ".com", "not a valid domain name"),
        (".".join(["abcdefghi"] * 26) + ".com", "too long"),
    ],
)
def test_bad_allow_entries_are_refused_naming_the_entry(text: str, fragment: str) -> None:
    with pytest.raises(InvalidName) as info:
        AllowEntry.parse(text)
    message = str(info.value)
    assert fragment in message
    assert message.startswith("allow entry ")
    assert "\n" not in message


@pytest.mark.parametrize("value", [None, 443, b"example.com", ["example.com"], {"host": "example.com"}])
def test_allow_entries_must_be_strings(value: object) -> None:
    with pytest.raises(InvalidName, match="must be a string"):
        AllowEntry.parse(value)


def test_allow_list_normalises_sorts_and_deduplicates() -> None:
    allow = AllowList.parse(["b.example.com", "A.example.com", "a.example.com.", "*.x.org:8443", "a.example.com:443"])
    assert allow.texts() == ["a.example.com", "b.example.com", "*.x.org:8443"]
    assert AllowList.parse(allow.texts()) == allow


@pytest.mark.parametrize("value", ["a.com", None, {"a.com": 443}, 5])
def test_allow_list_must_be_a_list(value: object) -> None:
    with pytest.raises(InvalidName, match="allow must be a list"):
        AllowList.parse(value)


def test_allow_list_is_bounded_and_one_bad_entry_refuses_all() -> None:
    assert len(AllowList.parse([f"h{i}.example.com" for i in range(MAX_ALLOW_ENTRIES)]).entries) == MAX_ALLOW_ENTRIES
    with pytest.raises(InvalidName, match="at most"):
        AllowList.parse([f"h{i}.example.com" for i in range(MAX_ALLOW_ENTRIES + 1)])
    with pytest.raises(InvalidName, match=r"10\.0\.0\.1"):
        AllowList.parse(["ok.example.com", "10.0.0.1"])


def test_matching_and_ports() -> None:
    allow = AllowList.parse(["api.example.com", "api.example.com:8443", "*.github.com:22", "bücher.example"])
    assert allow.ports_for("api.example.com") == {443, 8443}
    assert allow.ports_for("API.example.com.") == {443, 8443}
    assert allow.ports_for("x.api.example.com") == frozenset()  # exact entries do not cover subdomains
    assert allow.ports_for("a.b.github.com") == {22}
    assert allow.ports_for("github.com") == frozenset()  # "*.x" covers subdomains, not x itself
    assert allow.ports_for("evilgithub.com") == frozenset()
    assert allow.ports_for("xn--bcher-kva.example") == {443}
    assert allow.ports_for("BÜCHER.example") == {443}
    assert not allow.allows("192.0.2.1")
    assert not allow.allows('api.example.com"; flush ruleset')
    assert not allow.allows("")


def test_hostnames_refuse_ip_literals_in_every_spelling() -> None:
    for text in ("10.0.0.1", "10.0.0.1.", "[::1]", "::ffff:10.0.0.1", "fd00:ec2::254"):
        with pytest.raises(InvalidName, match="IP address"):
            normalise_hostname(text)


def test_blocked_ranges_cover_what_no_agent_may_reach() -> None:
    for address in (
        "169.254.169.254",
        "100.100.100.200",
        "10.1.2.3",
        "172.31.255.255",
        "192.168.0.1",
        "100.64.0.1",
        "127.0.0.1",
        "169.254.1.1",
        "224.0.0.251",
        "239.255.255.250",
        "255.255.255.255",
        "0.0.0.0",
    ):
        assert is_blocked(address), address
    assert blocked_reason(IPv4Address("169.254.169.254")) == "cloud metadata service"
    assert blocked_reason("100.100.100.200") == "cloud metadata service"
    for address in ("fd00:ec2::254", "2606:4700::1111", "::ffff:1.1.1.1"):
        assert is_blocked(IPv6Address(address)), address
    for address in ("1.1.1.1", "192.0.2.10", "198.51.100.10", "203.0.113.10", "8.8.8.8", "100.128.0.1"):
        assert blocked_reason(address) is None, address
    assert set(METADATA_V4) <= set(BLOCKED_V4)
    assert METADATA_V6[0].network_address == IPv6Address("fd00:ec2::254")
