"""The ``inet nullbox`` table built by egress.ruleset, applied through egress.nft to a fresh network namespace's
real nftables, and read back with nft(8): layout, atomicity, isolation from other tables, and the packet path."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from egress import defaults, ruleset
from egress.blocked import BLOCKED_V4, METADATA_V4
from egress.ruleset import AgentNet, JSONObject
from tests.egress.conftest import PYTHON, Netns

NetnsFactory = Callable[[], Netns]

AGENT = AgentNet("bot", "nb-bot", IPv4Address("10.200.1.1"))
OTHER = AgentNet("other", "nb-other", IPv4Address("10.200.2.1"))
UPLINK = "up0"

_APPLY = """
import json, sys
from egress.nft import Nft, NftError
try:
    Nft().apply(json.load(sys.stdin))
except NftError as exc:
    print(json.dumps(str(exc)))
else:
    print(json.dumps(None))
"""

OTHER_TABLES = """
table ip keep {
    set friends {
        type ipv4_addr
        elements = { 192.0.2.1, 192.0.2.2 }
    }
    chain fwdk {
        type filter hook forward priority -10; policy accept;
        ip saddr @friends counter accept
    }
}
table inet keep6 {
    chain outk {
        type filter hook output priority 10; policy accept;
        meta l4proto udp counter
    }
}
"""


def apply(ns: Netns, commands: list[JSONObject]) -> str | None:
    """Apply ``commands`` as one transaction inside ``ns`` with egress.nft; the error text, or None on success."""
    result: str | None = ns.python(_APPLY, stdin=json.dumps(commands))
    return result


def objects(table: list[dict[str, Any]] | None) -> dict[tuple[str, str], dict[str, Any]]:
    assert table is not None, "table inet nullbox is missing"
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for item in table:
        ((kind, body),) = item.items()
        if kind != "rule":
            found[(kind, body["name"])] = body
    return found


def rules(table: list[dict[str, Any]] | None, chain: str) -> list[list[dict[str, Any]]]:
    assert table is not None
    return [item["rule"]["expr"] for item in table if "rule" in item and item["rule"]["chain"] == chain]


def kinds(expr: list[dict[str, Any]]) -> list[str]:
    return [next(iter(statement)) for statement in expr]


def without_handles(value: Any) -> Any:
    """A listing with kernel handles removed, so two builds of the same table compare equal."""
    if isinstance(value, dict):
        return {k: without_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [without_handles(v) for v in value]
    return value


def element_expiry(ns: Netns, agent: AgentNet) -> dict[tuple[str, int], int]:
    body = objects(ns.table())[("set", agent.allow_set)]
    return {
        (e["elem"]["val"]["concat"][0], e["elem"]["val"]["concat"][1]): e["elem"]["expires"]
        for e in body.get("elem", [])
    }


def test_layout_of_the_table(netns: NetnsFactory) -> None:
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    table = ns.table()
    found = objects(table)
    a = AGENT

    forward, inp, post = found[("chain", "forward")], found[("chain", "input")], found[("chain", "postrouting")]
    assert (forward["type"], forward["hook"], forward["prio"], forward["policy"]) == ("filter", "forward", 0, "drop")
    assert (inp["type"], inp["hook"], inp["prio"], inp["policy"]) == ("filter", "input", 0, "accept")
    assert (post["type"], post["hook"], post["prio"]) == ("nat", "postrouting", 100)

    blocked = found[("set", ruleset.BLOCKED_SET)]
    assert blocked["flags"] == ["interval"]
    networks = [IPv4Network(f"{e['prefix']['addr']}/{e['prefix']['len']}") for e in blocked["elem"]]
    assert networks == ruleset.blocked_prefixes()
    for network in (*BLOCKED_V4, *METADATA_V4):  # every listed range is covered by some element
        assert any(network.subnet_of(n) for n in networks), network

    allow = found[("set", a.allow_set)]
    assert (allow["type"], allow["flags"], allow["size"]) == (["ipv4_addr", "inet_service"], ["timeout"], 65536)
    denied = found[("set", a.denied_set)]
    assert denied["type"] == ["ipv4_addr", "inet_service"]
    assert (denied["size"], denied["timeout"]) == (defaults.DENIED_SIZE, defaults.DENIED_TIMEOUT_S)
    assert found[("set", ruleset.AGENT_IFS)]["elem"] == [a.interface]
    assert found[("map", ruleset.FORWARD_MAP)]["elem"] == [[a.interface, {"jump": {"target": a.forward_chain}}]]
    assert found[("map", ruleset.INPUT_MAP)]["elem"] == [[a.interface, {"jump": {"target": a.input_chain}}]]
    assert ("counter", a.accepted_counter) in found
    assert ("counter", a.dropped_counter) in found

    assert rules(table, "forward") == [
        [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@fwd_agents"}}],
        [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": UPLINK}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@agent_ifs"}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": None},
        ],
    ]
    assert rules(table, "input") == [[{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@in_agents"}}]]
    assert rules(table, "postrouting") == [
        [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@agent_ifs"}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": UPLINK}},
            {"masquerade": None},
        ]
    ]

    goto_deny = {"goto": {"target": a.deny_chain}}
    fwd = rules(table, a.forward_chain)
    assert fwd[0] == [{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}, goto_deny]
    assert fwd[1][0]["match"]["right"] == "@blocked4" and fwd[1][1] == goto_deny
    assert kinds(fwd[2]) == ["match", "counter", "accept"] and fwd[2][0]["match"]["left"] == {"ct": {"key": "state"}}
    assert fwd[3][0]["match"]["right"] == f"@{a.allow_set}"
    assert fwd[3][0]["match"]["left"]["concat"][1] == {"payload": {"protocol": "tcp", "field": "dport"}}
    assert fwd[3][1:] == [{"counter": a.accepted_counter}, {"accept": None}]
    assert fwd[4] == [goto_deny]

    inp_rules = rules(table, a.input_chain)
    assert len(inp_rules) == 3 and inp_rules[2] == [goto_deny]
    for expr, proto in zip(inp_rules[:2], ("udp", "tcp"), strict=True):
        assert expr[0]["match"]["right"] == str(a.gateway)
        assert expr[1]["match"] == {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}}, "right": 53}
        assert expr[2:] == [{"counter": a.accepted_counter}, {"accept": None}]

    deny = rules(table, a.deny_chain)
    assert deny[0] == [{"counter": a.dropped_counter}]
    assert deny[1][-1]["set"]["op"] == "update" and deny[1][-1]["set"]["set"] == f"@{a.denied_set}"
    assert deny[2][0]["limit"] == {"rate": defaults.LOG_RATE_PER_S, "burst": defaults.LOG_BURST, "per": "second"}
    assert deny[2][1]["log"]["prefix"] == "nullbox-egress drop bot: "
    assert deny[3] == [{"drop": None}]

    # Set, chain, map and counter names carry the derived id, never the agent's name.
    names = [name for (_, name) in found]
    assert not any("bot" in name for name in names)
    assert a.id == ruleset.agent_id("bot") and len(a.id) == 12


def test_values_are_data_never_nft_syntax(netns: NetnsFactory) -> None:
    """Even values the validators would refuse reach the kernel as plain data: nothing they contain is executed."""
    ns = netns()
    assert ns.nft("-f", "-", stdin=OTHER_TABLES).returncode == 0
    assert apply(ns, ruleset.replace_table(UPLINK)) is None
    hostile = AgentNet('x"; flush ruleset; add table ip pwn; "', 'n"b;x', IPv4Address("10.200.9.1"))
    assert apply(ns, ruleset.add_agent(hostile)) is None
    table = ns.table()
    found = objects(table)
    assert found[("map", ruleset.FORWARD_MAP)]["elem"] == [['n"b;x', {"jump": {"target": hostile.forward_chain}}]]
    assert rules(table, hostile.deny_chain)[2][1]["log"]["prefix"] == hostile.log_prefix
    tables = ns.nft("list", "tables").stdout.splitlines()
    assert sorted(tables) == ["table inet keep6", "table inet nullbox", "table ip keep"]

    before = ns.ruleset()
    too_long = AgentNet("y", "nb-a; flush ruleset", IPv4Address("10.200.8.1"))  # over IFNAMSIZ: the kernel refuses
    assert apply(ns, ruleset.add_agent(too_long)) is not None
    assert ns.ruleset() == before


def test_a_failed_transaction_leaves_the_previous_ruleset_in_force(netns: NetnsFactory) -> None:
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert apply(ns, ruleset.admit(AGENT, [(IPv4Address("192.0.2.10"), 443, 300)])) is None
    before = ns.ruleset()
    # A whole agent plus one command the kernel rejects, at the end: none of the agent may appear.
    error = apply(ns, [*ruleset.add_agent(OTHER), ruleset.forced_failure()])
    assert error is not None and "No such file or directory" in error
    assert ns.ruleset() == before
    # A failure in the middle of a removal: the agent stays whole.
    error = apply(ns, [*ruleset.remove_agent(AGENT)[:5], ruleset.forced_failure(), *ruleset.remove_agent(AGENT)[5:]])
    assert error is not None
    assert ns.ruleset() == before
    # Adding an agent that exists fails as a whole too.
    assert apply(ns, ruleset.add_agent(AGENT)) is not None
    assert ns.ruleset() == before


def test_other_tables_are_never_touched(netns: NetnsFactory) -> None:
    ns = netns()
    assert ns.nft("-f", "-", stdin=OTHER_TABLES).returncode == 0

    def others() -> tuple[str, str]:
        return (
            ns.nft("-j", "list", "table", "ip", "keep").stdout,
            ns.nft("-j", "list", "table", "inet", "keep6").stdout,
        )

    before = others()
    assert all(before)
    for commands in (
        ruleset.replace_table(UPLINK, [AGENT]),
        ruleset.add_agent(OTHER),
        ruleset.admit(OTHER, [(IPv4Address("192.0.2.10"), 443, 60)]),
        ruleset.revoke(OTHER, [(IPv4Address("192.0.2.10"), 443)]),
        ruleset.remove_agent(OTHER),
        ruleset.replace_table(UPLINK),
    ):
        assert apply(ns, commands) is None
        assert others() == before


def test_a_stale_table_is_replaced_in_the_same_transaction(netns: NetnsFactory) -> None:
    ns = netns()
    fresh = netns()
    assert apply(fresh, ruleset.replace_table(UPLINK, [AGENT])) is None
    stale = """
    table inet nullbox {
        set old {
            type ipv4_addr
            elements = { 192.0.2.99 }
        }
        chain junk {
            type filter hook forward priority 0; policy accept;
            ip daddr @old accept
        }
    }
    """
    assert ns.nft("-f", "-", stdin=stale).returncode == 0
    before = ns.ruleset()
    # The deletion of the stale table travels with the rebuild: when the rebuild fails, the stale table stays whole.
    assert apply(ns, [*ruleset.replace_table(UPLINK, [AGENT]), ruleset.forced_failure()]) is not None
    assert ns.ruleset() == before
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert without_handles(ns.table()) == without_handles(fresh.table())
    # Replacing again (a restart) gives the same table once more.
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert without_handles(ns.table()) == without_handles(fresh.table())


def test_removing_an_agent_leaves_exactly_the_base_table(netns: NetnsFactory) -> None:
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK)) is None
    base = without_handles(ns.table())
    assert apply(ns, ruleset.add_agent(AGENT)) is None
    assert apply(ns, ruleset.add_agent(OTHER)) is None
    assert apply(ns, ruleset.admit(AGENT, [(IPv4Address("192.0.2.10"), 443, 60)])) is None
    assert apply(ns, ruleset.remove_agent(AGENT)) is None
    assert apply(ns, ruleset.remove_agent(OTHER)) is None
    assert without_handles(ns.table()) == base


def test_admit_sets_the_timeout_it_names_and_revoke_tolerates_absent_elements(netns: NetnsFactory) -> None:
    ns = netns()
    web, api = IPv4Address("192.0.2.10"), IPv4Address("198.51.100.10")
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert apply(ns, ruleset.admit(AGENT, [(web, 443, 100), (web, 8443, 100), (api, 443, 200)])) is None
    expiry = element_expiry(ns, AGENT)
    assert 95 <= expiry[(str(web), 443)] <= 100 and 195 <= expiry[(str(api), 443)] <= 200
    assert (str(web), 8443) in expiry
    # Re-admitting an element sets its timeout to the new value, shorter or longer (kernels before 6.10 keep the
    # old expiry on a plain re-add, hence add + delete + add in one batch).
    assert apply(ns, ruleset.admit(AGENT, [(web, 443, 30)])) is None
    assert element_expiry(ns, AGENT)[(str(web), 443)] <= 30
    assert apply(ns, ruleset.admit(AGENT, [(web, 443, 250)])) is None
    assert element_expiry(ns, AGENT)[(str(web), 443)] >= 245
    # Revoking present and absent elements in one batch succeeds and removes exactly the present ones.
    assert apply(ns, ruleset.revoke(AGENT, [(web, 443), (IPv4Address("203.0.113.5"), 443)])) is None
    assert set(element_expiry(ns, AGENT)) == {(str(web), 8443), (str(api), 443)}


def test_elements_expire_on_their_own(netns: NetnsFactory) -> None:
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert apply(ns, ruleset.admit(AGENT, [(IPv4Address("192.0.2.10"), 443, 1)])) is None
    assert element_expiry(ns, AGENT)
    deadline = time.monotonic() + 5
    while element_expiry(ns, AGENT) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert element_expiry(ns, AGENT) == {}


_LISTEN = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
s.settimeout(20)
conn, peer = s.accept()
print(peer[0], flush=True)
conn.close()
"""

_PROBE = """
import json, socket, sys
results = {}
for target in sys.argv[1:]:
    kind, host, port = target.split(":")
    try:
        if kind == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", (host, int(port)))
            results[target] = "sent"
            continue
        with socket.create_connection((host, int(port)), timeout=1.0):
            results[target] = "connected"
    except OSError as exc:
        results[target] = type(exc).__name__
print(json.dumps(results))
"""


def test_packet_path_allows_admitted_destinations_and_counts_remembers_and_drops_the_rest(
    netns: NetnsFactory,
) -> None:
    """A real forwarded packet path: agent ns -- appliance ns (the table) -- internet ns."""
    app, agent, internet = netns(), netns(), netns()
    app.veth(AGENT.interface, agent, address=f"{AGENT.gateway}/30")
    agent.ip("addr", "add", "10.200.1.2/30", "dev", "eth0")
    agent.ip("route", "add", "default", "via", str(AGENT.gateway))
    app.veth(UPLINK, internet, address="198.51.100.2/24")
    app.ip("route", "add", "default", "via", "198.51.100.1")
    internet.ip("addr", "add", "198.51.100.1/24", "dev", "eth0")
    internet.ip("addr", "add", "203.0.113.7/32", "dev", "lo")
    assert app.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"]).returncode == 0
    assert apply(app, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert apply(app, ruleset.admit(AGENT, [(IPv4Address("203.0.113.7"), 443, 60)])) is None

    server = subprocess.Popen(
        ["ip", "netns", "exec", internet.name, PYTHON, "-c", _LISTEN, "203.0.113.7", "443"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        targets = [
            "tcp:203.0.113.7:443",  # admitted
            "tcp:203.0.113.7:80",  # admitted address, other port
            "udp:203.0.113.8:5353",  # never admitted
            "tcp:169.254.169.254:80",  # metadata
            "tcp:10.200.1.1:22",  # an appliance service on the gateway
            "tcp:10.200.1.1:53",  # DNS on the gateway: let through (nothing listens here, so refused)
        ]
        result = agent.python(_PROBE, *targets)
        peer = server.stdout.readline().strip()
    finally:
        server.kill()
        server.wait()
    assert result == {
        "tcp:203.0.113.7:443": "connected",
        "tcp:203.0.113.7:80": "TimeoutError",
        "udp:203.0.113.8:5353": "sent",
        "tcp:169.254.169.254:80": "TimeoutError",
        "tcp:10.200.1.1:22": "TimeoutError",
        "tcp:10.200.1.1:53": "ConnectionRefusedError",
    }
    assert peer == "198.51.100.2", "agent traffic leaves masqueraded as the uplink address"

    found = objects(app.table())
    denied = {
        (e["elem"]["val"]["concat"][0], e["elem"]["val"]["concat"][1]): e["elem"]["expires"]
        for e in found[("set", AGENT.denied_set)]["elem"]
    }
    assert set(denied) == {("203.0.113.7", 80), ("203.0.113.8", 5353), ("169.254.169.254", 80), ("10.200.1.1", 22)}
    assert all(defaults.DENIED_TIMEOUT_S - 30 <= v <= defaults.DENIED_TIMEOUT_S for v in denied.values())
    assert found[("counter", AGENT.dropped_counter)]["packets"] >= 4
    assert found[("counter", AGENT.accepted_counter)]["packets"] >= 3  # SYN, ACK, ... and the DNS SYN


@pytest.mark.parametrize("agent", ["bot", "x" * 64, "a-b_c"])
def test_agent_ids_are_stable_short_hex(agent: str) -> None:
    assert ruleset.agent_id(agent) == ruleset.agent_id(agent)
    assert len(ruleset.agent_id(agent)) == 12 and int(ruleset.agent_id(agent), 16) >= 0
    assert ruleset.agent_id(agent) != ruleset.agent_id(agent + "x")
