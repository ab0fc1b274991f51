"""The ``inet nullbox`` table as libnftables JSON commands: built here, applied by :mod:`egress.nft`.

Layout (see docs/egress.md)::

    set blocked4      ipv4_addr, interval      destinations no agent may reach (egress.blocked), always dropped
    set agent_ifs     ifname                   every agent interface, for masquerade
    map fwd_agents    ifname : verdict         iifname -> jump fwd_<id>
    map in_agents     ifname : verdict         iifname -> jump in_<id>
    chain forward     filter/forward, policy drop: agent traffic -> its chain; replies from the uplink; nothing else
    chain input       filter/input, policy accept: agent interfaces -> their chain; other interfaces untouched
    chain postrouting nat/postrouting: from an agent interface out of the uplink -> masquerade

    per agent <id> (first 12 hex digits of sha256(agent name); never the name itself):
    set allow_<id>    ipv4_addr . inet_service, timeout   filled only by the DNS proxy through ``admit``
    set denied_<id>   ipv4_addr . inet_service, timeout   filled by the packet path with dropped destinations
    counter accepted_<id>, dropped_<id>
    chain fwd_<id>    IPv6 / blocked -> deny; established,related -> accept; tcp to @allow_<id> -> accept; deny
    chain in_<id>     DNS (udp, tcp 53) to the gateway address -> accept; deny
    chain deny_<id>   count, remember the destination, log (rate limited), drop

Everything a caller names reaches the kernel as a JSON value (an interface name, an address), never as nft text,
and set and chain names carry only the derived id.
"""

from __future__ import annotations

import hashlib
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
FORWARD_MAP: Final = "fwd_agents"
INPUT_MAP: Final = "in_agents"
DNS_PORT: Final = 53
#: Elements one agent's allow set may hold; a wildcard entry cannot make the kernel hold an unbounded set.
ALLOW_SIZE: Final = 65536
#: A chain that never exists: the forced-failure test hook deletes it so the kernel rejects the whole batch.
MISSING_CHAIN: Final = "egress_test_missing_chain"


def agent_id(agent: str) -> str:
    """A stable short id for set, chain and counter names: they must not carry the agent name itself."""
    return hashlib.sha256(agent.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class AgentNet:
    """What the ruleset needs to know about one agent: its interface and that interface's gateway address."""

    agent: str
    interface: str
    gateway: IPv4Address

    @property
    def id(self) -> str:
        return agent_id(self.agent)

    @property
    def allow_set(self) -> str:
        return f"allow_{self.id}"

    @property
    def denied_set(self) -> str:
        return f"denied_{self.id}"

    @property
    def accepted_counter(self) -> str:
        return f"accepted_{self.id}"

    @property
    def dropped_counter(self) -> str:
        return f"dropped_{self.id}"

    @property
    def forward_chain(self) -> str:
        return f"fwd_{self.id}"

    @property
    def input_chain(self) -> str:
        return f"in_{self.id}"

    @property
    def deny_chain(self) -> str:
        return f"deny_{self.id}"

    @property
    def log_prefix(self) -> str:
        # Agent names are [A-Za-z0-9_-]{1,64}, so the prefix stays within the kernel's 127 characters.
        return f"nullbox-egress drop {self.agent}: "


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
_ESTABLISHED: Final = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
_IPV4: Final = _match(_meta("nfproto"), "ipv4")
_IPV6: Final = _match(_meta("nfproto"), "ipv6")
_DADDR_DPORT: Final[JSONObject] = {"concat": [_payload("ip", "daddr"), _payload("th", "dport")]}


def _elem(address: IPv4Address, port: int, timeout_s: int | None = None) -> JSONObject:
    value: JSONObject = {"concat": [str(address), port]}
    if timeout_s is None:
        return value
    return {"elem": {"val": value, "timeout": timeout_s}}


def blocked_prefixes() -> list[IPv4Network]:
    """egress.blocked's ranges without overlaps (an interval set refuses overlapping elements)."""
    return list(collapse_addresses(BLOCKED_V4))


# -------------------------------------------------------------------------------------------------- the table


def base(uplink: str) -> list[JSONObject]:
    """The table's shared part: the blocked set, the dispatch maps, the three base chains."""
    blocked = [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in blocked_prefixes()]
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"set": _obj(name=BLOCKED_SET, type="ipv4_addr", flags=["interval"])}},
        {"add": {"element": _obj(name=BLOCKED_SET, elem=blocked)}},
        {"add": {"set": _obj(name=AGENT_IFS, type="ifname")}},
        {"add": {"map": _obj(name=FORWARD_MAP, type="ifname", map="verdict")}},
        {"add": {"map": _obj(name=INPUT_MAP, type="ifname", map="verdict")}},
        {"add": {"chain": _obj(name="forward", type="filter", hook="forward", prio=0, policy="drop")}},
        {"add": {"chain": _obj(name="input", type="filter", hook="input", prio=0, policy="accept")}},
        {"add": {"chain": _obj(name="postrouting", type="nat", hook="postrouting", prio=100, policy="accept")}},
        _rule("forward", {"vmap": {"key": _meta("iifname"), "data": f"@{FORWARD_MAP}"}}),
        _rule(
            "forward",
            _match(_meta("iifname"), uplink),
            _match(_meta("oifname"), f"@{AGENT_IFS}"),
            _ESTABLISHED,
            _ACCEPT,
        ),
        _rule("input", {"vmap": {"key": _meta("iifname"), "data": f"@{INPUT_MAP}"}}),
        _rule(
            "postrouting",
            _match(_meta("iifname"), f"@{AGENT_IFS}"),
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


def add_agent(agent: AgentNet) -> list[JSONObject]:
    """An agent's sets, counters and chains, and the map elements that send its interface's traffic there."""
    a = agent
    return [
        {"add": {"counter": _obj(name=a.accepted_counter)}},
        {"add": {"counter": _obj(name=a.dropped_counter)}},
        {
            "add": {
                "set": _obj(name=a.allow_set, type=["ipv4_addr", "inet_service"], flags=["timeout"], size=ALLOW_SIZE)
            }
        },
        {
            "add": {
                "set": _obj(
                    name=a.denied_set,
                    type=["ipv4_addr", "inet_service"],
                    flags=["timeout"],
                    size=defaults.DENIED_SIZE,
                    timeout=defaults.DENIED_TIMEOUT_S,
                )
            }
        },
        {"add": {"chain": _obj(name=a.deny_chain)}},
        {"add": {"chain": _obj(name=a.forward_chain)}},
        {"add": {"chain": _obj(name=a.input_chain)}},
        # deny_<id>: every packet an agent may not send ends here.
        _rule(a.deny_chain, {"counter": a.dropped_counter}),
        # Its own rule: when the set is full the update fails and ends this rule only, not the drop.
        _rule(
            a.deny_chain,
            _IPV4,
            _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
            {"set": {"op": "update", "elem": _DADDR_DPORT, "set": f"@{a.denied_set}"}},
        ),
        _rule(
            a.deny_chain,
            {"limit": {"rate": defaults.LOG_RATE_PER_S, "per": "second", "burst": defaults.LOG_BURST}},
            {"log": {"prefix": a.log_prefix, "level": "info"}},
        ),
        _rule(a.deny_chain, _DROP),
        # fwd_<id>: what the agent sends through the appliance.
        _rule(a.forward_chain, _IPV6, {"goto": {"target": a.deny_chain}}),
        _rule(a.forward_chain, _match(_payload("ip", "daddr"), f"@{BLOCKED_SET}"), {"goto": {"target": a.deny_chain}}),
        _rule(a.forward_chain, _ESTABLISHED, {"counter": a.accepted_counter}, _ACCEPT),
        _rule(
            a.forward_chain,
            _match(_meta("l4proto"), "tcp"),
            _match({"concat": [_payload("ip", "daddr"), _payload("tcp", "dport")]}, f"@{a.allow_set}"),
            {"counter": a.accepted_counter},
            _ACCEPT,
        ),
        _rule(a.forward_chain, {"goto": {"target": a.deny_chain}}),
        # in_<id>: what the agent sends to the appliance itself: DNS to its gateway, nothing else.
        *(
            _rule(
                a.input_chain,
                _match(_payload("ip", "daddr"), str(a.gateway)),
                _match(_payload(proto, "dport"), DNS_PORT),
                {"counter": a.accepted_counter},
                _ACCEPT,
            )
            for proto in ("udp", "tcp")
        ),
        _rule(a.input_chain, {"goto": {"target": a.deny_chain}}),
        # Dispatch last: the chains exist before anything can jump to them.
        {"add": {"element": _obj(name=AGENT_IFS, elem=[a.interface])}},
        {"add": {"element": _obj(name=FORWARD_MAP, elem=[[a.interface, {"jump": {"target": a.forward_chain}}]])}},
        {"add": {"element": _obj(name=INPUT_MAP, elem=[[a.interface, {"jump": {"target": a.input_chain}}]])}},
    ]


def remove_agent(agent: AgentNet) -> list[JSONObject]:
    """The reverse of :func:`add_agent`: dispatch first, then the chains, then what the chains referenced."""
    a = agent
    return [
        {"delete": {"element": _obj(name=FORWARD_MAP, elem=[a.interface])}},
        {"delete": {"element": _obj(name=INPUT_MAP, elem=[a.interface])}},
        {"delete": {"element": _obj(name=AGENT_IFS, elem=[a.interface])}},
        {"delete": {"chain": _obj(name=a.forward_chain)}},
        {"delete": {"chain": _obj(name=a.input_chain)}},
        {"delete": {"chain": _obj(name=a.deny_chain)}},
        {"delete": {"set": _obj(name=a.allow_set)}},
        {"delete": {"set": _obj(name=a.denied_set)}},
        {"delete": {"counter": _obj(name=a.accepted_counter)}},
        {"delete": {"counter": _obj(name=a.dropped_counter)}},
    ]


def admit(agent: AgentNet, elements: Sequence[tuple[IPv4Address, int, int]]) -> list[JSONObject]:
    """Put ``(address, port, timeout_s)`` elements in the allow set with exactly that timeout.

    Re-adding an element that exists keeps its old expiry on kernels before 6.10, so the element is added (a
    no-op when present), deleted and added again, all in one batch: no moment without it, and the new timeout holds.
    """
    if not elements:
        return []
    timed = [_elem(address, port, timeout) for address, port, timeout in elements]
    plain = [_elem(address, port) for address, port, _ in elements]
    return [
        {"add": {"element": _obj(name=agent.allow_set, elem=timed)}},
        {"delete": {"element": _obj(name=agent.allow_set, elem=plain)}},
        {"add": {"element": _obj(name=agent.allow_set, elem=timed)}},
    ]


def revoke(agent: AgentNet, elements: Iterable[tuple[IPv4Address, int]]) -> list[JSONObject]:
    """Take elements out of the allow set, whether or not they are still there.

    An element may expire between the decision and the batch, and deleting a missing element fails the whole
    batch; adding it first (a no-op when present) makes the delete always valid.
    """
    pairs = list(elements)
    if not pairs:
        return []
    return [
        {"add": {"element": _obj(name=agent.allow_set, elem=[_elem(a, p, 1) for a, p in pairs])}},
        {"delete": {"element": _obj(name=agent.allow_set, elem=[_elem(a, p) for a, p in pairs])}},
    ]


def forced_failure() -> JSONObject:
    """A command the kernel always rejects, for the test hook that proves a failed batch changes nothing."""
    return {"delete": {"chain": _obj(name=MISSING_CHAIN)}}
