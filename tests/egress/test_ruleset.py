"""The ``inet nullbox`` table built by egress.ruleset, applied through egress.nft to a fresh network namespace's
real nftables, and read back with nft(8): layout, atomicity, isolation from other tables, and the packet path."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

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


def grant(agent: AgentNet, address: str, port: int, timeout_s: int) -> tuple[ruleset.Element, int]:
    """One (element, timeout) pair for ruleset.admit: ``address:port`` for ``agent``."""
    return (agent.interface, IPv4Address(address), port), timeout_s


def set_elements(ns: Netns, name: str, agent: AgentNet) -> dict[tuple[str, int], int]:
    """(address, port) -> seconds left, of the elements set ``name`` holds for ``agent``'s interface."""
    body = objects(ns.table())[("set", name)]
    found = {}
    for e in body.get("elem", []):
        interface, address, port = e["elem"]["val"]["concat"]
        if interface == agent.interface:
            found[(address, port)] = e["elem"]["expires"]
    return found


def element_expiry(ns: Netns, agent: AgentNet) -> dict[tuple[str, int], int]:
    return set_elements(ns, ruleset.ALLOW_SET, agent)


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

    allow = found[("set", ruleset.ALLOW_SET)]
    element_type = ["ifname", "ipv4_addr", "inet_service"]
    assert (allow["type"], allow["flags"], allow["size"]) == (element_type, ["timeout"], defaults.ALLOW_SIZE)
    denied = found[("set", ruleset.DENIED_SET)]
    assert denied["type"] == element_type
    assert (denied["size"], denied["timeout"]) == (defaults.DENIED_SIZE, defaults.DENIED_TIMEOUT_S)
    assert found[("set", ruleset.AGENT_IFS)]["elem"] == [a.interface]
    assert found[("set", ruleset.GATEWAYS)]["elem"] == [{"concat": [a.interface, str(a.gateway)]}]
    for counting in (ruleset.ACCEPTED_SET, ruleset.DROPPED_SET):
        body = found[("set", counting)]
        assert (body["type"], body["stmt"]) == ("ifname", [{"counter": None}])
        assert body["elem"] == [{"elem": {"val": a.interface, "counter": {"packets": 0, "bytes": 0}}}]
    # Nothing the agent is called appears in the table: it is known there only by its interface.
    assert "bot" not in json.dumps(table).replace(a.interface, "")

    iifname = {"meta": {"key": "iifname"}}
    assert rules(table, "forward") == [
        [
            {"match": {"op": "==", "left": iifname, "right": "@agent_ifs"}},
            {"jump": {"target": ruleset.FORWARD_CHAIN}},
        ],
        [
            {"match": {"op": "==", "left": iifname, "right": UPLINK}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@agent_ifs"}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": None},
        ],
    ]
    assert rules(table, "input") == [
        [
            {"match": {"op": "==", "left": iifname, "right": "@agent_ifs"}},
            {"jump": {"target": ruleset.INPUT_CHAIN}},
        ]
    ]
    assert rules(table, "postrouting") == [
        [
            {"match": {"op": "==", "left": iifname, "right": "@agent_ifs"}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": UPLINK}},
            {"masquerade": None},
        ]
    ]


def test_the_agent_chains_send_everything_not_allowed_to_deny(netns: NetnsFactory) -> None:
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    table = ns.table()
    iifname = {"meta": {"key": "iifname"}}
    goto_deny = {"goto": {"target": ruleset.DENY_CHAIN}}
    count_accepted = {"match": {"op": "==", "left": iifname, "right": f"@{ruleset.ACCEPTED_SET}"}}
    fwd = rules(table, ruleset.FORWARD_CHAIN)
    assert fwd[0] == [{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}, goto_deny]
    assert fwd[1][0]["match"]["right"] == "@blocked4" and fwd[1][1] == goto_deny
    assert fwd[2] == [fwd[2][0], count_accepted, {"accept": None}] and fwd[2][0]["match"]["left"] == {
        "ct": {"key": "state"}
    }
    assert fwd[3][-3]["match"]["right"] == f"@{ruleset.ALLOW_SET}"
    assert fwd[3][-3]["match"]["left"]["concat"] == [
        iifname,
        {"payload": {"protocol": "ip", "field": "daddr"}},
        {"payload": {"protocol": "tcp", "field": "dport"}},
    ]
    assert fwd[3][-2:] == [count_accepted, {"accept": None}]
    assert fwd[4] == [goto_deny]

    inp_rules = rules(table, ruleset.INPUT_CHAIN)
    assert len(inp_rules) == 3 and inp_rules[2] == [goto_deny]
    # replies within connections the appliance opened (cage's health probes), and only those
    established = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
    assert inp_rules[0] == [established, {"accept": None}]
    dns = inp_rules[1]
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}} in dns
    assert dns[-3]["match"] == {
        "op": "==",
        "left": {"concat": [iifname, {"payload": {"protocol": "ip", "field": "daddr"}}]},
        "right": f"@{ruleset.GATEWAYS}",
    }
    assert dns[-2:] == [count_accepted, {"accept": None}]

    deny = rules(table, ruleset.DENY_CHAIN)
    assert deny[0] == [{"match": {"op": "==", "left": iifname, "right": f"@{ruleset.DROPPED_SET}"}}]
    assert deny[1][-1]["set"]["op"] == "update" and deny[1][-1]["set"]["set"] == f"@{ruleset.DENIED_SET}"
    meter = deny[2][0]["set"]
    assert (meter["op"], meter["elem"], meter["set"]) == ("update", iifname, f"@{ruleset.LOG_LIMITS}")
    assert meter["stmt"] == [{"limit": {"rate": defaults.LOG_RATE_PER_S, "burst": defaults.LOG_BURST, "per": "second"}}]
    assert deny[2][1]["log"]["prefix"] == ruleset.LOG_PREFIX
    assert deny[3] == [{"drop": None}]


def test_agents_add_elements_never_rules_chains_sets_or_objects(netns: NetnsFactory) -> None:
    """libnftables reads every rule and object into its cache before each batch: they must not grow with agents."""
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK)) is None
    bare = ns.table()
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT, OTHER])) is None
    full = ns.table()

    def shape(table: list[dict[str, Any]] | None) -> list[Any]:
        """The table without set elements."""
        assert table is not None
        return [without_handles({k: {f: v for f, v in b.items() if f != "elem"} for k, b in i.items()}) for i in table]

    assert shape(full) == shape(bare)
    assert {kind for item in full or [] for kind in item} == {"table", "set", "chain", "rule"}
    assert len(full or []) == len(bare or [])


def test_values_are_data_never_nft_syntax(netns: NetnsFactory) -> None:
    """Even values the validators would refuse reach the kernel as plain data: nothing they contain is executed."""
    ns = netns()
    assert ns.nft("-f", "-", stdin=OTHER_TABLES).returncode == 0
    assert apply(ns, ruleset.replace_table(UPLINK)) is None
    hostile = AgentNet('x"; flush ruleset; add table ip pwn; "', 'n"b;x', IPv4Address("10.200.9.1"))
    assert apply(ns, ruleset.add_agent(hostile)) is None
    assert apply(ns, ruleset.admit([((hostile.interface, IPv4Address("192.0.2.1"), 443), 60)])) is None
    found = objects(ns.table())
    assert found[("set", ruleset.AGENT_IFS)]["elem"] == ['n"b;x']
    assert found[("set", ruleset.GATEWAYS)]["elem"] == [{"concat": ['n"b;x', "10.200.9.1"]}]
    assert element_expiry(ns, hostile).keys() == {("192.0.2.1", 443)}
    tables = ns.nft("list", "tables").stdout.splitlines()
    assert sorted(tables) == ["table inet keep6", "table inet nullbox", "table ip keep"]

    before = ns.ruleset()
    too_long = AgentNet("y", "nb-a; flush ruleset", IPv4Address("10.200.8.1"))  # over IFNAMSIZ: the kernel refuses
    assert apply(ns, ruleset.add_agent(too_long)) is not None
    assert ns.ruleset() == before


def test_a_failed_transaction_leaves_the_previous_ruleset_in_force(netns: NetnsFactory) -> None:
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert apply(ns, ruleset.admit([grant(AGENT, "192.0.2.10", 443, 300)])) is None
    before = ns.ruleset()
    # A whole agent plus one command the kernel rejects, at the end: none of the agent may appear.
    error = apply(ns, [*ruleset.add_agent(OTHER), ruleset.forced_failure()])
    assert error is not None and "No such file or directory" in error
    assert ns.ruleset() == before
    # A failure in the middle of a removal: the agent stays whole.
    removal = ruleset.remove_agent(AGENT, [(ruleset.ALLOW_SET, grant(AGENT, "192.0.2.10", 443, 0)[0])])
    error = apply(ns, [*removal[:4], ruleset.forced_failure(), *removal[4:]])
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
        ruleset.admit([grant(OTHER, "192.0.2.10", 443, 60)]),
        ruleset.revoke([grant(OTHER, "192.0.2.10", 443, 0)[0]]),
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
    assert apply(ns, ruleset.admit([grant(AGENT, "192.0.2.10", 443, 60), grant(OTHER, "192.0.2.11", 443, 60)])) is None
    # The agent's elements go with it (the controller lists them from the kernel); the other agent's stay.
    assert apply(ns, ruleset.remove_agent(AGENT, [(ruleset.ALLOW_SET, grant(AGENT, "192.0.2.10", 443, 0)[0])])) is None
    assert element_expiry(ns, OTHER).keys() == {("192.0.2.11", 443)}
    assert apply(ns, ruleset.remove_agent(OTHER, [(ruleset.ALLOW_SET, grant(OTHER, "192.0.2.11", 443, 0)[0])])) is None
    assert without_handles(ns.table()) == base


def test_admit_sets_the_timeout_it_names_and_revoke_tolerates_absent_elements(netns: NetnsFactory) -> None:
    ns = netns()
    web, api = IPv4Address("192.0.2.10"), IPv4Address("198.51.100.10")
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert (
        apply(
            ns,
            ruleset.admit(
                [((AGENT.interface, w, p), t) for w, p, t in ((web, 443, 100), (web, 8443, 100), (api, 443, 200))]
            ),
        )
        is None
    )
    expiry = element_expiry(ns, AGENT)
    assert 95 <= expiry[(str(web), 443)] <= 100 and 195 <= expiry[(str(api), 443)] <= 200
    assert (str(web), 8443) in expiry
    # Re-admitting an element sets its timeout to the new value, shorter or longer (kernels before 6.10 keep the
    # old expiry on a plain re-add, hence add + delete + add in one batch).
    assert apply(ns, ruleset.admit([((AGENT.interface, web, 443), 30)])) is None
    assert element_expiry(ns, AGENT)[(str(web), 443)] <= 30
    assert apply(ns, ruleset.admit([((AGENT.interface, web, 443), 250)])) is None
    assert element_expiry(ns, AGENT)[(str(web), 443)] >= 245
    # Revoking present and absent elements in one batch succeeds and removes exactly the present ones.
    assert (
        apply(ns, ruleset.revoke([(AGENT.interface, web, 443), (AGENT.interface, IPv4Address("203.0.113.5"), 443)]))
        is None
    )
    assert set(element_expiry(ns, AGENT)) == {(str(web), 8443), (str(api), 443)}


def test_elements_expire_on_their_own(netns: NetnsFactory) -> None:
    ns = netns()
    assert apply(ns, ruleset.replace_table(UPLINK, [AGENT])) is None
    assert apply(ns, ruleset.admit([grant(AGENT, "192.0.2.10", 443, 1)])) is None
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
    assert apply(app, ruleset.replace_table(UPLINK, [AGENT, OTHER])) is None
    # OTHER may reach 203.0.113.7:8443; that element is keyed by OTHER's interface and does nothing for AGENT.
    assert (
        apply(app, ruleset.admit([grant(AGENT, "203.0.113.7", 443, 60), grant(OTHER, "203.0.113.7", 8443, 60)])) is None
    )

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
            "tcp:203.0.113.7:8443",  # admitted for the other agent only
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
        "tcp:203.0.113.7:8443": "TimeoutError",
        "udp:203.0.113.8:5353": "sent",
        "tcp:169.254.169.254:80": "TimeoutError",
        "tcp:10.200.1.1:22": "TimeoutError",
        "tcp:10.200.1.1:53": "ConnectionRefusedError",
    }
    assert peer == "198.51.100.2", "agent traffic leaves masqueraded as the uplink address"

    found = objects(app.table())
    denied = set_elements(app, ruleset.DENIED_SET, AGENT)
    assert set(denied) == {
        ("203.0.113.7", 80),
        ("203.0.113.7", 8443),
        ("203.0.113.8", 5353),
        ("169.254.169.254", 80),
        ("10.200.1.1", 22),
    }
    assert set_elements(app, ruleset.DENIED_SET, OTHER) == {}
    assert all(defaults.DENIED_TIMEOUT_S - 30 <= v <= defaults.DENIED_TIMEOUT_S for v in denied.values())

    def packets(counting: str) -> dict[str, int]:
        return {e["elem"]["val"]: e["elem"]["counter"]["packets"] for e in found[("set", counting)]["elem"]}

    dropped, accepted = packets(ruleset.DROPPED_SET), packets(ruleset.ACCEPTED_SET)
    assert dropped[AGENT.interface] >= 5
    assert accepted[AGENT.interface] >= 3  # SYN, ACK, ... and the DNS SYN
    assert dropped[OTHER.interface] == accepted[OTHER.interface] == 0  # each agent's packets count for it alone
