"""The ``inet nullbox`` table as libnftables JSON commands: built here, applied by :mod:`egress.nft`.

Layout (see docs/egress.md).  The table's rules, chains and sets are the same whatever the number of agents: an
agent is only set elements.  That is what keeps a DNS admission cheap: libnftables reads every rule and named
object of the table into its cache before each batch, so per-agent chains made each admission cost ~1.1 ms with
100 agents, and per-agent named counters still ~0.3 ms::

    set blocked4     ipv4_addr, interval                       destinations no agent may reach, always dropped
    set agent_ifs    ifname                                    every agent interface: dispatch and masquerade
    set gateways     ifname . ipv4_addr                        each agent interface's gateway (its DNS proxy)
    set allow        ifname . ipv4_addr . inet_service, timeout   filled only by the DNS proxies through ``admit``
    set denied       ifname . ipv4_addr . inet_service, timeout   filled by the packet path with dropped destinations
    set log_limits   ifname, timeout                           each agent interface's own log rate limit (a meter)
    set accepted_by_if, dropped_by_if  ifname, counter         each agent interface with a packet/byte counter,
                                                               counted by a lookup in the accept/deny rules
    chain forward     filter/forward, policy drop: agent interfaces -> agent_forward; replies from the uplink
    chain input       filter/input, policy accept: agent interfaces -> agent_input; other interfaces untouched
    chain postrouting nat/postrouting: from an agent interface out of the uplink -> masquerade
    chain agent_forward  IPv6 / blocked -> deny; established,related -> accept; tcp to @allow -> accept; deny
    chain agent_input    established,related (replies to the appliance's own connections: cage's health probes)
                         -> accept; DNS (udp, tcp 53) to the interface's own gateway -> accept; deny
    chain deny           count, remember the destination, log (rate limited per interface), drop

Everything a caller names reaches the kernel as a JSON value (an interface name, an address), never as nft text;
nothing an agent is called appears in the table at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Any, Final

from egress import defaults
from egress.blocked import BLOCKED_V4

JSONObject = dict[str, Any]

FAMILY: Final = defaults.FAMILY
TABLE: Final = defaults.TABLE
BLOCKED_SET: Final = "blocked4"
AGENT_IFS: Final = "agent_ifs"
GATEWAYS: Final = "gateways"
ALLOW_SET: Final = "allow"
DENIED_SET: Final = "denied"
LOG_LIMITS: Final = "log_limits"
ACCEPTED_SET: Final = "accepted_by_if"
DROPPED_SET: Final = "dropped_by_if"
FORWARD_CHAIN: Final = "agent_forward"
INPUT_CHAIN: Final = "agent_input"
DENY_CHAIN: Final = "deny"
LOG_PREFIX: Final = "nullbox-egress drop: "
DNS_PORT: Final = 53
#: A chain that never exists: the forced-failure test hook deletes it so the kernel rejects the whole batch.
MISSING_CHAIN: Final = "egress_test_missing_chain"

#: (interface, address, port): one element of the allow or denied set.
Element = tuple[str, IPv4Address, int]


@dataclass(frozen=True)
class AgentNet:
    """What the ruleset needs to know about one agent: its interface and that interface's gateway address."""

    agent: str
    interface: str
    gateway: IPv4Address


# ------------------------------------------------------------------------------------------------ expressions


def _obj(**fields: Any) -> JSONObject:
    return {"family": FAMILY, "table": TABLE, **fields}


def _match(left: JSONObject, right: Any, op: str = "==") -> JSONObject:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> JSONObject:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> JSONObject:
    return {"payload": {"protocol": protocol, "field": field}}


def _rule(chain: str, *expr: JSONObject) -> JSONObject:
    return {"add": {"rule": _obj(chain=chain, expr=list(expr))}}


_ACCEPT: Final[JSONObject] = {"accept": None}
_DROP: Final[JSONObject] = {"drop": None}
_GOTO_DENY: Final[JSONObject] = {"goto": {"target": DENY_CHAIN}}
_ESTABLISHED: Final = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
_IPV4: Final = _match(_meta("nfproto"), "ipv4")
_IPV6: Final = _match(_meta("nfproto"), "ipv6")
_TCP_OR_UDP: Final = _match(_meta("l4proto"), {"set": ["tcp", "udp"]})
_IIFNAME: Final = _meta("iifname")


def _count(counting_set: str) -> JSONObject:
    """Count the packet in the counter of its input interface's element (the agent's own): a lookup in a set with
    ``counter`` updates the matching element's counter.  Fails closed: an interface missing there ends the rule."""
    return _match(_IIFNAME, f"@{counting_set}")


def _elem(element: Element, timeout_s: int | None = None) -> JSONObject:
    interface, address, port = element
    value: JSONObject = {"concat": [interface, str(address), port]}
    if timeout_s is None:
        return value
    return {"elem": {"val": value, "timeout": timeout_s}}


def blocked_prefixes() -> list[IPv4Network]:
    """egress.blocked's ranges without overlaps (an interval set refuses overlapping elements)."""
    return list(collapse_addresses(BLOCKED_V4))


# -------------------------------------------------------------------------------------------------- the table


def base(uplink: str) -> list[JSONObject]:
    """The whole table without agents: every set, map and chain, and every rule there will ever be."""
    blocked = [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in blocked_prefixes()]
    element_type = ["ifname", "ipv4_addr", "inet_service"]
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"set": _obj(name=BLOCKED_SET, type="ipv4_addr", flags=["interval"])}},
        {"add": {"element": _obj(name=BLOCKED_SET, elem=blocked)}},
        {"add": {"set": _obj(name=AGENT_IFS, type="ifname")}},
        {"add": {"set": _obj(name=GATEWAYS, type=["ifname", "ipv4_addr"])}},
        {"add": {"set": _obj(name=ALLOW_SET, type=element_type, flags=["timeout"], size=defaults.ALLOW_SIZE)}},
        {
            "add": {
                "set": _obj(
                    name=DENIED_SET,
                    type=element_type,
                    flags=["timeout"],
                    size=defaults.DENIED_SIZE,
                    timeout=defaults.DENIED_TIMEOUT_S,
                )
            }
        },
        {
            "add": {
                "set": _obj(
                    name=LOG_LIMITS,
                    type="ifname",
                    flags=["timeout"],
                    size=defaults.LOG_LIMITS_SIZE,
                    timeout=defaults.LOG_LIMIT_IDLE_S,
                )
            }
        },
        {"add": {"set": _obj(name=ACCEPTED_SET, type="ifname", stmt=[{"counter": None}])}},
        {"add": {"set": _obj(name=DROPPED_SET, type="ifname", stmt=[{"counter": None}])}},
        {"add": {"chain": _obj(name=DENY_CHAIN)}},
        {"add": {"chain": _obj(name=FORWARD_CHAIN)}},
        {"add": {"chain": _obj(name=INPUT_CHAIN)}},
        {"add": {"chain": _obj(name="forward", type="filter", hook="forward", prio=0, policy="drop")}},
        {"add": {"chain": _obj(name="input", type="filter", hook="input", prio=0, policy="accept")}},
        {"add": {"chain": _obj(name="postrouting", type="nat", hook="postrouting", prio=100, policy="accept")}},
        # deny: every packet an agent may not send ends here.
        _rule(DENY_CHAIN, _count(DROPPED_SET)),
        # Its own rule: when the set is full the update fails and ends this rule only, not the drop.
        _rule(
            DENY_CHAIN,
            _IPV4,
            _TCP_OR_UDP,
            {
                "set": {
                    "op": "update",
                    "elem": {"concat": [_IIFNAME, _payload("ip", "daddr"), _payload("th", "dport")]},
                    "set": f"@{DENIED_SET}",
                }
            },
        ),
        # Logged within each interface's own rate limit: one noisy agent cannot silence the others' log lines.
        _rule(
            DENY_CHAIN,
            {
                "set": {
                    "op": "update",
                    "elem": _IIFNAME,
                    "set": f"@{LOG_LIMITS}",
                    "stmt": [
                        {"limit": {"rate": defaults.LOG_RATE_PER_S, "per": "second", "burst": defaults.LOG_BURST}}
                    ],
                }
            },
            {"log": {"prefix": LOG_PREFIX, "level": "info"}},
        ),
        _rule(DENY_CHAIN, _DROP),
        # agent_forward: what an agent sends through the appliance.
        _rule(FORWARD_CHAIN, _IPV6, _GOTO_DENY),
        _rule(FORWARD_CHAIN, _match(_payload("ip", "daddr"), f"@{BLOCKED_SET}"), _GOTO_DENY),
        _rule(FORWARD_CHAIN, _ESTABLISHED, _count(ACCEPTED_SET), _ACCEPT),
        _rule(
            FORWARD_CHAIN,
            _match(_meta("l4proto"), "tcp"),
            _match({"concat": [_IIFNAME, _payload("ip", "daddr"), _payload("tcp", "dport")]}, f"@{ALLOW_SET}"),
            _count(ACCEPTED_SET),
            _ACCEPT,
        ),
        _rule(FORWARD_CHAIN, _GOTO_DENY),
        # agent_input: what an agent sends to the appliance itself: DNS to its own gateway, and the replies within
        # connections the appliance opened (cage's health probes); an agent's own connection to anything else is
        # dropped at its first packet, so it never becomes established.
        _rule(INPUT_CHAIN, _ESTABLISHED, _ACCEPT),
        _rule(
            INPUT_CHAIN,
            _TCP_OR_UDP,
            _match(_payload("th", "dport"), DNS_PORT),
            _match({"concat": [_IIFNAME, _payload("ip", "daddr")]}, f"@{GATEWAYS}"),
            _count(ACCEPTED_SET),
            _ACCEPT,
        ),
        _rule(INPUT_CHAIN, _GOTO_DENY),
        # The hooks last: the chains they send agent traffic to exist before anything can reach them.
        _rule("forward", _match(_IIFNAME, f"@{AGENT_IFS}"), {"jump": {"target": FORWARD_CHAIN}}),
        _rule(
            "forward",
            _match(_IIFNAME, uplink),
            _match(_meta("oifname"), f"@{AGENT_IFS}"),
            _ESTABLISHED,
            _ACCEPT,
        ),
        _rule("input", _match(_IIFNAME, f"@{AGENT_IFS}"), {"jump": {"target": INPUT_CHAIN}}),
        _rule(
            "postrouting",
            _match(_IIFNAME, f"@{AGENT_IFS}"),
            _match(_meta("oifname"), uplink),
            {"masquerade": None},
        ),
    ]


def replace_table(uplink: str, agents: Iterable[AgentNet] = ()) -> list[JSONObject]:
    """Start-up: create-or-keep, delete, rebuild, all in one batch, so a stale table is never briefly missing."""
    commands: list[JSONObject] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
        *base(uplink),
    ]
    for agent in agents:
        commands += add_agent(agent)
    return commands


def add_agent(agent: AgentNet, stale: Iterable[tuple[str, Element]] = ()) -> list[JSONObject]:
    """An agent's elements: its interface for dispatch and counting, its interface and gateway for DNS.

    ``stale``: (set, element) pairs an earlier agent on the same interface left behind (denied destinations the
    packet path recorded after that agent was removed), taken out in the same batch so they are not this agent's.
    """
    a = agent
    # "create", not "add": an interface that is already there fails the batch instead of being merged.
    return [
        *_purge(stale),
        {"create": {"element": _obj(name=ACCEPTED_SET, elem=[a.interface])}},
        {"create": {"element": _obj(name=DROPPED_SET, elem=[a.interface])}},
        {"create": {"element": _obj(name=GATEWAYS, elem=[{"concat": [a.interface, str(a.gateway)]}])}},
        # Dispatch last: the counting sets hold the interface before any of its packets can look it up.
        {"create": {"element": _obj(name=AGENT_IFS, elem=[a.interface])}},
    ]


def remove_agent(agent: AgentNet, elements: Iterable[tuple[str, Element]] = ()) -> list[JSONObject]:
    """The reverse of :func:`add_agent`: dispatch first, then the agent's (set, element) pairs, then its counters."""
    a = agent
    return [
        {"delete": {"element": _obj(name=AGENT_IFS, elem=[a.interface])}},
        {"delete": {"element": _obj(name=GATEWAYS, elem=[{"concat": [a.interface, str(a.gateway)]}])}},
        *_purge(elements),
        {"delete": {"element": _obj(name=ACCEPTED_SET, elem=[a.interface])}},
        {"delete": {"element": _obj(name=DROPPED_SET, elem=[a.interface])}},
    ]


def admit(elements: Sequence[tuple[Element, int]]) -> list[JSONObject]:
    """Put ``(element, timeout_s)`` pairs in the allow set with exactly that timeout.

    Re-adding an element that exists keeps its old expiry on kernels before 6.10, so the element is added (a
    no-op when present), deleted and added again, all in one batch: no moment without it, and the new timeout holds.
    """
    if not elements:
        return []
    timed = [_elem(element, timeout) for element, timeout in elements]
    plain = [_elem(element) for element, _ in elements]
    return [
        {"add": {"element": _obj(name=ALLOW_SET, elem=timed)}},
        {"delete": {"element": _obj(name=ALLOW_SET, elem=plain)}},
        {"add": {"element": _obj(name=ALLOW_SET, elem=timed)}},
    ]


def revoke(elements: Iterable[Element]) -> list[JSONObject]:
    """Take elements out of the allow set, whether or not they are still there."""
    return _purge((ALLOW_SET, element) for element in elements)


def _purge(pairs: Iterable[tuple[str, Element]]) -> list[JSONObject]:
    """Delete (set, element) pairs that may or may not still exist.

    An element may expire between the decision and the batch, and deleting a missing element fails the whole
    batch; adding it first (a no-op when present, with a short timeout when not) makes the delete always valid.
    """
    by_set: dict[str, list[Element]] = {}
    for name, element in pairs:
        by_set.setdefault(name, []).append(element)
    commands: list[JSONObject] = []
    for name, elements in by_set.items():
        commands += [
            {"add": {"element": _obj(name=name, elem=[_elem(e, 1) for e in elements])}},
            {"delete": {"element": _obj(name=name, elem=[_elem(e) for e in elements])}},
        ]
    return commands


def forced_failure() -> JSONObject:
    """A command the kernel always rejects, for the test hook that proves a failed batch changes nothing."""
    return {"delete": {"chain": _obj(name=MISSING_CHAIN)}}
