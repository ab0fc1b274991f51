"""Destinations no agent may ever reach, whatever its allow list and whatever DNS answers.

One list serves two places: the forward chain drops these ranges outright, and the DNS proxy strips answers that fall
in them (DNS rebinding: a public name answering 10.0.0.5 must not open a path to the LAN).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final

#: Cloud metadata services, listed apart so status and tests can name them.
METADATA_V4: Final = (IPv4Network("169.254.169.254/32"), IPv4Network("100.100.100.200/32"))
METADATA_V6: Final = (IPv6Network("fd00:ec2::254/128"),)

BLOCKED_V4: Final[tuple[IPv4Network, ...]] = (
    *METADATA_V4,
    IPv4Network("0.0.0.0/8"),  # "this network"
    IPv4Network("10.0.0.0/8"),  # RFC 1918
    IPv4Network("100.64.0.0/10"),  # carrier-grade NAT (RFC 6598)
    IPv4Network("127.0.0.0/8"),  # loopback
    IPv4Network("169.254.0.0/16"),  # link-local
    IPv4Network("172.16.0.0/12"),  # RFC 1918
    IPv4Network("192.0.0.0/24"),  # IETF protocol assignments
    IPv4Network("192.168.0.0/16"),  # RFC 1918
    IPv4Network("198.18.0.0/15"),  # benchmarking
    IPv4Network("224.0.0.0/4"),  # multicast
    IPv4Network("240.0.0.0/4"),  # reserved, and 255.255.255.255 broadcast
)

#: Agents get no IPv6 at all; the list is kept for the DNS proxy's rebinding check and for status output.
BLOCKED_V6: Final[tuple[IPv6Network, ...]] = (IPv6Network("::/0"),)


def blocked_reason(address: IPv4Address | IPv6Address | str) -> str | None:
    """Why an agent may not reach ``address`` (a short phrase), or None when it may."""
    addr = ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, IPv6Address):
        if addr.ipv4_mapped is not None:
            return "IPv6 (IPv4-mapped)"
        return "IPv6 is not routed for agents"
    for network in METADATA_V4:
        if addr in network:
            return "cloud metadata service"
    for network in BLOCKED_V4:
        if addr in network:
            return f"blocked range {network}"
    return None


def is_blocked(address: IPv4Address | IPv6Address | str) -> bool:
    return blocked_reason(address) is not None
