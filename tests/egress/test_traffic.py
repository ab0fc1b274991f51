"""Real traffic from agent namespaces through the appliance, with the live egress daemon enforcing its ruleset.

Every test builds its own :class:`~tests.egress.topology.Topology` (the table stays in force after the daemon stops,
so namespaces are not shared between tests) and starts ``python -m egress serve`` in its appliance namespace.  The
first test shows that without the daemon every destination used below is reachable, so whatever stops a packet in
the other tests is the ruleset.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from egress import ruleset
from tests.egress.conftest import EgressFactory, EgressProcess
from tests.egress.topology import (
    DNS_SERVER,
    METADATA,
    PRIVATE,
    PYTHON,
    SERVER6,
    UPLINK,
    AgentLink,
    Answer,
    Topology,
    attempt,
    connect,
    dig,
    python,
    served,
)

ZONE: dict[str, list[tuple[str, str, int]]] = {
    "api.example.com": [("A", "192.0.2.10", 300), ("A", "192.0.2.11", 300)],
    "other.example.com": [("A", "192.0.2.12", 300)],
    "evil.example.com": [("A", "192.0.2.13", 300)],
    "alias.example.com": [("CNAME", "edge.cdn.example.net", 300)],
    "edge.cdn.example.net": [("A", "203.0.113.10", 300)],
    "private.example.com": [("A", str(PRIVATE), 300)],
    "metadata.example.com": [("A", str(METADATA), 300)],
    "rebind.example.com": [("A", str(PRIVATE), 300), ("A", "198.51.100.10", 300)],
    "short.example.com": [("A", "203.0.113.11", 1)],
}
#: How long a dropped connection attempt waits: a drop shows as a timeout, never as a refusal.
DROP_WAIT = 1.0


@dataclass
class Net:
    topo: Topology
    egress: EgressProcess

    def agent(self, name: str = "a1") -> AgentLink:
        return self.topo.links[name]

    def add(self, name: str, allow: list[str], agent: str | None = None) -> dict[str, Any]:
        """Register the agent on link ``name`` (the agent is called ``bot-<name>`` unless named)."""
        return self.egress.call(
            "add_agent", agent=agent or f"bot-{name}", interface=self.agent(name).iface, allow=allow
        )

    def resolve(self, name: str, link: str = "a1", **options: Any) -> Answer:
        agent = self.agent(link)
        return dig(agent.netns, agent.gateway, name, **options)

    def reach(self, address: IPv4Address | IPv6Address | str, port: int = 443, link: str = "a1") -> str | None:
        """What the server answered, or None; a connection that is refused (not dropped) fails the test."""
        answer, error = attempt(self.agent(link).netns, address, port, DROP_WAIT)
        assert error in (None, "TimeoutError"), f"{address}:{port} was not dropped but failed with {error}"
        return answer

    def nft_table(self) -> str:
        result = subprocess.run(
            ["ip", "netns", "exec", self.topo.appliance, "nft", "-j", "list", "table", "inet", ruleset.TABLE],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout


NetFactory = Callable[..., Net]


@pytest.fixture
def network(egress_factory: EgressFactory) -> Iterator[NetFactory]:
    """``start(agents=("a1",), min_ttl=..., max_ttl=...)``: a topology with the egress daemon running in it."""
    built: list[Topology] = []

    def start(agents: tuple[str, ...] = ("a1",), **options: Any) -> Net:
        topo = Topology(zone=ZONE, agents=agents)
        built.append(topo)
        topo.__enter__()
        resolv = topo.dir / "resolv.conf"
        resolv.write_text(f"nameserver {DNS_SERVER}\n")
        return Net(topo, egress_factory(topo.appliance, uplink=UPLINK, resolv_conf=resolv, **options))

    yield start
    for topo in built:
        topo.close()


def test_without_the_controller_every_destination_is_reachable() -> None:
    """The control: the topology routes everything, so only the ruleset can stop what the other tests expect."""
    with Topology(zone=ZONE) as topo:
        agent = topo.agent()
        for address in ("192.0.2.13", METADATA, PRIVATE, SERVER6):
            assert attempt(agent.netns, address, 443, DROP_WAIT) == (served(address, 443), None)
        assert dig(agent.netns, DNS_SERVER, "evil.example.com").addresses == ["192.0.2.13"]


def test_an_allowed_name_resolves_and_connects_only_on_its_ports(network: NetFactory) -> None:
    net = network()
    net.add("a1", ["api.example.com", "alias.example.com:8443"])
    assert net.reach("192.0.2.10") is None  # not before the agent has resolved it
    answer = net.resolve("api.example.com")
    assert answer.rcode == "NOERROR" and sorted(answer.addresses) == ["192.0.2.10", "192.0.2.11"]
    for address in answer.addresses:
        assert net.reach(address) == served(address, 443)
    assert net.reach("192.0.2.10", 80) is None  # port 443 only
    assert net.reach("192.0.2.10", 8443) is None
    # Through a CNAME, on the entry's own port.
    assert net.resolve("alias.example.com").addresses == ["203.0.113.10"]
    assert net.reach("203.0.113.10", 8443) == served("203.0.113.10", 8443)
    assert net.reach("203.0.113.10", 443) is None


def test_an_unlisted_name_gets_no_answer_and_its_address_is_dropped(network: NetFactory) -> None:
    net = network()
    net.add("a1", ["api.example.com"])
    answer = net.resolve("evil.example.com")
    assert (answer.rcode, answer.addresses) == ("REFUSED", [])
    assert net.reach("192.0.2.13") is None
    status = net.egress.call("status", agent="bot-a1")["agent"]
    assert [d["name"] for d in status["denied_names"]] == ["evil.example.com"]
    assert {(d["address"], d["port"]) for d in status["denied"]} >= {("192.0.2.13", 443)}
    assert status["counters"]["dropped"]["packets"] >= 1


def test_metadata_private_and_ipv6_destinations_are_dropped(network: NetFactory) -> None:
    net = network()
    net.add("a1", ["api.example.com", "metadata.example.com:80", "private.example.com", "rebind.example.com"])
    for port in (80, 443):
        assert net.reach(METADATA, port) is None
    assert net.reach(PRIVATE) is None
    assert net.reach(SERVER6) is None
    # Allowed names whose answers fall in blocked ranges: the addresses are stripped, and stay unreachable.
    for name in ("metadata.example.com", "private.example.com"):
        answer = net.resolve(name)
        assert (answer.rcode, answer.addresses) == ("NOERROR", []), name
    assert net.resolve("rebind.example.com").addresses == ["198.51.100.10"]
    assert net.reach(METADATA, 80) is None
    assert net.reach(PRIVATE) is None
    assert net.reach("198.51.100.10") == served("198.51.100.10", 443)
    status = net.egress.call("status", agent="bot-a1")["agent"]
    assert {a["address"] for a in status["addresses"]} == {"198.51.100.10"}


def test_only_the_gateway_resolver_answers(network: NetFactory) -> None:
    net = network()
    net.add("a1", ["api.example.com"])
    assert net.resolve("api.example.com").rcode == "NOERROR"
    agent = net.agent()
    for tcp in (False, True):
        assert dig(agent.netns, DNS_SERVER, "api.example.com", tcp=tcp, timeout=DROP_WAIT).rcode == "TIMEOUT"
    # The gateway answers DNS and nothing else.
    assert attempt(agent.netns, agent.gateway, 22, DROP_WAIT) == (None, "TimeoutError")


_LISTEN_ONCE = """
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
    print("listening", flush=True)
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"agent answered\\n")
"""


def test_the_appliance_reaches_an_agent_but_the_agent_cannot_open_connections_to_it(network: NetFactory) -> None:
    """agent_input lets in replies to what the appliance opened (cage's health probes), nothing the agent opens."""
    net = network()
    net.add("a1", [])
    agent = net.agent()
    argv = ["ip", "netns", "exec", agent.netns, PYTHON, "-c", _LISTEN_ONCE, str(agent.address), "8080"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        assert connect(net.topo.appliance, agent.address, 8080, timeout=5) == "agent answered"
    finally:
        server.kill()
        server.wait()
    for port in (22, 8080):  # the other direction: dropped at the first packet, so never established
        assert attempt(agent.netns, agent.gateway, port, DROP_WAIT) == (None, "TimeoutError")


def test_an_admission_expires_with_its_clamped_ttl(network: NetFactory) -> None:
    net = network(min_ttl=2, max_ttl=3)
    net.add("a1", ["api.example.com", "short.example.com"])
    answer = net.resolve("api.example.com")  # TTL 300, clamped to 3
    assert answer.ttl is not None and answer.ttl <= 3
    assert net.reach("192.0.2.10") == served("192.0.2.10", 443)
    assert net.resolve("short.example.com").addresses == ["203.0.113.11"]  # TTL 1, raised to 2
    assert net.reach("203.0.113.11") == served("203.0.113.11", 443)
    time.sleep(4.5)
    assert net.reach("192.0.2.10") is None
    assert net.reach("203.0.113.11") is None
    # Resolving again admits it again.
    net.resolve("api.example.com")
    assert net.reach("192.0.2.10") == served("192.0.2.10", 443)


def test_remove_agent_removes_everything(network: NetFactory) -> None:
    net = network()
    net.add("a1", ["api.example.com"])
    assert net.resolve("api.example.com").addresses
    assert net.reach("192.0.2.10") == served("192.0.2.10", 443)
    iface = net.agent("a1").iface
    assert f'"{iface}"' in net.nft_table()
    net.egress.call("remove_agent", agent="bot-a1")
    assert f'"{iface}"' not in net.nft_table()  # no element of any set names its interface
    assert net.egress.call("list") == {"agents": []}
    assert net.reach("192.0.2.10") is None
    assert net.resolve("api.example.com", timeout=DROP_WAIT).rcode != "NOERROR"
    # The interface is free again, and a new agent on it starts from nothing.
    net.add("a1", ["other.example.com"], agent="bot-again")
    assert net.reach("192.0.2.10") is None
    assert net.resolve("api.example.com").rcode == "REFUSED"


def test_two_agents_cannot_use_each_others_addresses_or_resolvers(network: NetFactory) -> None:
    net = network(agents=("a1", "b2"))
    net.add("a1", ["api.example.com"])
    net.add("b2", ["other.example.com"])
    assert sorted(net.resolve("api.example.com", "a1").addresses) == ["192.0.2.10", "192.0.2.11"]
    assert net.resolve("other.example.com", "b2").addresses == ["192.0.2.12"]
    assert net.reach("192.0.2.10", link="a1") == served("192.0.2.10", 443)
    assert net.reach("192.0.2.12", link="b2") == served("192.0.2.12", 443)
    assert net.reach("192.0.2.12", link="a1") is None
    assert net.reach("192.0.2.10", link="b2") is None
    assert net.resolve("api.example.com", "b2").rcode == "REFUSED"
    # b2 cannot ask a1's proxy (which would admit into a1's set, not b2's) either.
    b2, a1 = net.agent("b2"), net.agent("a1")
    assert dig(b2.netns, a1.gateway, "api.example.com", timeout=DROP_WAIT).rcode == "TIMEOUT"
    assert net.reach("192.0.2.10", link="b2") is None


_LATENCY = """
import json, socket, sys, time
import dns.message
server, count = sys.argv[1], int(sys.argv[2])
wire = dns.message.make_query("api.example.com", "A").to_wire()
times = []
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(2)
    s.connect((server, 53))
    for _ in range(count):
        started = time.perf_counter()
        s.send(wire)
        s.recv(4096)
        times.append(time.perf_counter() - started)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def test_resolving_through_the_controller_costs_little(network: NetFactory) -> None:
    """p50 of a question through proxy and admission (an nftables transaction), against upstream directly."""
    net = network()
    agent = net.agent()
    # Measured from the appliance: the agent may not query upstream itself once the ruleset is in force.
    direct = python(net.topo.appliance, _LATENCY, str(DNS_SERVER), "200", timeout=120)
    net.add("a1", ["api.example.com"])
    through = python(agent.netns, _LATENCY, str(agent.gateway), "200", timeout=120)
    print(f"p50 through proxy and controller {through * 1e3:.2f} ms, upstream directly {direct * 1e3:.2f} ms")
    assert through - direct < 10e-3
