"""The egress controller as a live daemon in a network namespace of its own, driven over its socket.

Agent interfaces are veth pairs into agent namespaces; the uplink is a veth into an "internet" namespace.  What
the kernel holds is read back with nft(8).  The bookkeeping of which name justifies which element is also tested
in-process with a recording stand-in for libnftables, where exact commands can be asserted.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from egress import defaults, ruleset
from egress.controller import Controller, ControllerConfig
from egress.names import AllowList
from egress.nft import JSONObject, NftError
from nullbox.wire import ErrorCode, WireError
from tests.egress.conftest import EgressFactory, EgressProcess, Netns
from tests.egress.topology import Topology, dig

NetnsFactory = Callable[[], Netns]


@dataclass
class Appliance:
    app: Netns
    egress: EgressProcess
    agents: dict[str, Netns]


def _build(netns: NetnsFactory) -> tuple[Netns, dict[str, Netns]]:
    app, internet = netns(), netns()
    app.veth("up0", internet, address="198.51.100.2/24")
    agents = {}
    for n, iface in enumerate(("nb-a", "nb-b", "nb-c"), start=1):
        agents[iface] = netns()
        app.veth(iface, agents[iface], address=f"10.200.{n}.1/30")
    agents["nb-noaddr"] = netns()
    app.veth("nb-noaddr", agents["nb-noaddr"])
    return app, agents


@pytest.fixture
def appliance(netns: NetnsFactory, egress_factory: EgressFactory) -> Iterator[Appliance]:
    app, agents = _build(netns)
    yield Appliance(app, egress_factory(app.name, uplink="up0", min_ttl=2, max_ttl=10), agents)


def _agent_interfaces(table: list[dict[str, Any]] | None) -> set[str]:
    """The interfaces the table sends through the agent chains (set agent_ifs)."""
    assert table is not None
    (body,) = [i["set"] for i in table if "set" in i and i["set"]["name"] == ruleset.AGENT_IFS]
    return set(body.get("elem", []))


def _counted(table: list[dict[str, Any]] | None) -> set[str]:
    """The interfaces the counting sets hold (both must agree)."""
    assert table is not None
    counting = {ruleset.ACCEPTED_SET, ruleset.DROPPED_SET}
    found = [
        {e["elem"]["val"] for e in i["set"].get("elem", [])}
        for i in table
        if "set" in i and i["set"]["name"] in counting
    ]
    assert len(found) == 2 and found[0] == found[1]
    return found[0]


def test_ready_means_the_base_ruleset_is_in_force(appliance: Appliance) -> None:
    table = appliance.app.table()
    assert table is not None
    chains = {i["chain"]["name"]: i["chain"] for i in table if "chain" in i}
    assert chains["forward"]["policy"] == "drop"
    assert set(chains) == {"forward", "input", "postrouting", ruleset.FORWARD_CHAIN, ruleset.INPUT_CHAIN, "deny"}
    assert _agent_interfaces(table) == set() and _counted(table) == set()
    assert not [i for i in table if "counter" in i or "map" in i]
    assert appliance.egress.call("list") == {"agents": []}
    status = appliance.egress.call("status")
    assert status["table"] == "inet nullbox" and status["uplink"] == "up0"
    assert status["ttl"] == {"min": 2, "max": 10} and status["agents"] == []
    assert oct(appliance.egress.socket.stat().st_mode & 0o777) == "0o600"


def test_add_list_status_update_remove(appliance: Appliance) -> None:
    eg, app = appliance.egress, appliance.app
    added = eg.call("add_agent", agent="bot", interface="nb-a", allow=["api.example.com", "*.github.com:8443"])
    assert added == {
        "agent": "bot",
        "interface": "nb-a",
        "gateway": "10.200.1.1",
        "allow": ["*.github.com:8443", "api.example.com"] if False else added["allow"],
    }
    assert added["allow"] == AllowList.parse(["api.example.com", "*.github.com:8443"]).texts()
    eg.call("add_agent", agent="other", interface="nb-b")  # allow defaults to nothing at all
    listed = eg.call("list")["agents"]
    assert [(a["agent"], a["interface"], a["gateway"]) for a in listed] == [
        ("bot", "nb-a", "10.200.1.1"),
        ("other", "nb-b", "10.200.2.1"),
    ]
    table = app.table()
    assert _agent_interfaces(table) == {"nb-a", "nb-b"}
    assert _counted(table) == {"nb-a", "nb-b"}

    status = eg.call("status", agent="bot")["agent"]
    assert status["addresses"] == [] and status["denied"] == [] and status["denied_names"] == []
    assert status["counters"] == {"accepted": {"packets": 0, "bytes": 0}, "dropped": {"packets": 0, "bytes": 0}}

    # Traffic from the agent to something not allowed shows up in the counters and as a denied destination.
    appliance.agents["nb-a"].ip("addr", "add", "10.200.1.2/30", "dev", "eth0")
    probe = (
        "import socket\ntry: socket.create_connection(('10.200.1.1', 22), timeout=0.5)\nexcept OSError: pass\nprint(1)"
    )
    appliance.agents["nb-a"].python(probe)
    status = eg.call("status", agent="bot")["agent"]
    assert status["counters"]["dropped"]["packets"] >= 1
    assert [(d["address"], d["port"]) for d in status["denied"]] == [("10.200.1.1", 22)]
    assert 0 < status["denied"][0]["expires_s"] <= defaults.DENIED_TIMEOUT_S

    updated = eg.call("update_agent", agent="bot", allow=["api.example.com:8443"])
    assert updated["allow"] == ["api.example.com:8443"] and updated["revoked"] == []
    assert eg.call("status")["agents"][0]["allow"] == ["api.example.com:8443"]

    assert eg.call("remove_agent", agent="bot") == {"agent": "bot", "removed": True}
    assert [a["agent"] for a in eg.call("list")["agents"]] == ["other"]
    table = app.table()
    assert _agent_interfaces(table) == {"nb-b"}
    assert _counted(table) == {"nb-b"}
    # Its denied destinations went with it: nothing in the shared sets is keyed by its interface any more.
    shared = [i["set"] for i in table or [] if "set" in i and i["set"]["name"] in (ruleset.ALLOW_SET, "denied")]
    assert [e for body in shared for e in body.get("elem", []) if e["elem"]["val"]["concat"][0] == "nb-a"] == []
    # The interface is free again; so is the name.
    eg.call("add_agent", agent="bot", interface="nb-c", allow=[])
    assert eg.error("status", agent="ghost").code == ErrorCode.NOT_FOUND


def test_bad_requests_get_one_clear_error_and_change_nothing(appliance: Appliance) -> None:
    eg, app = appliance.egress, appliance.app
    eg.call("add_agent", agent="bot", interface="nb-a", allow=["api.example.com"])
    before = app.ruleset()
    state_before = (eg.state_dir / defaults.STATE_FILE).read_text()
    cases: Sequence[tuple[str, dict[str, Any], ErrorCode, str]] = [
        (
            "add_agent",
            {"agent": 'a"; flush ruleset', "interface": "nb-b", "allow": []},
            ErrorCode.INVALID_REQUEST,
            "agent name 'a\"; flush ruleset'",
        ),
        ("add_agent", {"agent": "bot\nflush ruleset", "interface": "nb-b"}, ErrorCode.INVALID_REQUEST, "agent name"),
        ("add_agent", {"agent": "x" * 65, "interface": "nb-b"}, ErrorCode.INVALID_REQUEST, "1-64 characters"),
        ("add_agent", {"agent": 5, "interface": "nb-b"}, ErrorCode.INVALID_REQUEST, "agent name 5"),
        ("add_agent", {"interface": "nb-b"}, ErrorCode.INVALID_REQUEST, "needs 'agent'"),
        ("add_agent", {"agent": "b2"}, ErrorCode.INVALID_REQUEST, "needs 'interface'"),
        ("add_agent", {"agent": "b2", "interface": "nb-b; reboot"}, ErrorCode.INVALID_REQUEST, "interface name"),
        ("add_agent", {"agent": "b2", "interface": "x" * 16}, ErrorCode.INVALID_REQUEST, "1-15 characters"),
        ("add_agent", {"agent": "b2", "interface": "nb-*"}, ErrorCode.INVALID_REQUEST, "interface name 'nb-*'"),
        ("add_agent", {"agent": "b2", "interface": "nope0"}, ErrorCode.NOT_FOUND, "interface 'nope0' does not exist"),
        ("add_agent", {"agent": "b2", "interface": "nb-noaddr"}, ErrorCode.INVALID_REQUEST, "no IPv4 address"),
        ("add_agent", {"agent": "b2", "interface": "lo"}, ErrorCode.INVALID_REQUEST, "loopback"),
        ("add_agent", {"agent": "b2", "interface": "up0"}, ErrorCode.CONFLICT, "is the uplink"),
        ("add_agent", {"agent": "bot", "interface": "nb-b"}, ErrorCode.CONFLICT, "agent 'bot' already exists"),
        ("add_agent", {"agent": "b2", "interface": "nb-a"}, ErrorCode.CONFLICT, "already used by agent 'bot'"),
        (
            "add_agent",
            {"agent": "b2", "interface": "nb-b", "allow": ["1.2.3.4"]},
            ErrorCode.INVALID_REQUEST,
            "allow entry '1.2.3.4'",
        ),
        ("add_agent", {"agent": "b2", "interface": "nb-b", "allow": ["[::1]:443"]}, ErrorCode.INVALID_REQUEST, "IPv6"),
        (
            "add_agent",
            {"agent": "b2", "interface": "nb-b", "allow": ["a.com:70000"]},
            ErrorCode.INVALID_REQUEST,
            "port '70000'",
        ),
        ("add_agent", {"agent": "b2", "interface": "nb-b", "allow": ["*.*.a.com"]}, ErrorCode.INVALID_REQUEST, "'*'"),
        (
            "add_agent",
            {"agent": "b2", "interface": "nb-b", "allow": ['a"; flush ruleset']},
            ErrorCode.INVALID_REQUEST,
            "not a valid domain name",
        ),
        (
            "add_agent",
            {"agent": "b2", "interface": "nb-b", "allow": "a.com"},
            ErrorCode.INVALID_REQUEST,
            "allow must be a list",
        ),
        (
            "add_agent",
            {"agent": "b2", "interface": "nb-b", "allow": [1]},
            ErrorCode.INVALID_REQUEST,
            "must be a string",
        ),
        ("add_agent", {"agent": "b2", "interface": "nb-b", "extra": 1}, ErrorCode.INVALID_REQUEST, "'extra'"),
        ("update_agent", {"agent": "bot", "allow": ["10.0.0.1"]}, ErrorCode.INVALID_REQUEST, "IP address"),
        ("update_agent", {"agent": "bot"}, ErrorCode.INVALID_REQUEST, "needs 'allow'"),
        ("update_agent", {"agent": "ghost", "allow": []}, ErrorCode.NOT_FOUND, "no agent 'ghost'"),
        ("remove_agent", {"agent": "ghost"}, ErrorCode.NOT_FOUND, "no agent 'ghost'"),
        ("remove_agent", {"agent": "../bot"}, ErrorCode.INVALID_REQUEST, "agent name"),
        ("status", {"agent": "ghost"}, ErrorCode.NOT_FOUND, "no agent 'ghost'"),
        ("status", {"agent": ["bot"]}, ErrorCode.INVALID_REQUEST, "agent name"),
        ("list", {"agent": "bot"}, ErrorCode.INVALID_REQUEST, "does not take 'agent'"),
        ("flush_ruleset", {}, ErrorCode.INVALID_REQUEST, "unknown op 'flush_ruleset'"),
    ]
    for op, params, code, fragment in cases:
        error = eg.error(op, **params)
        assert error.code == code, (op, params, error)
        assert fragment in error.message, (op, params, error.message)
        assert "\n" not in error.message
    # A line that is not JSON at all gets one error, and the connection stays usable.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(str(eg.socket))
        raw.sendall(b'add_agent bot nb-b "; flush ruleset\n{"id":7,"op":"list"}\n')
        reader = raw.makefile("rb")
        first, second = reader.readline(), reader.readline()
    assert b'"ok":false' in first and b"invalid_request" in first
    assert b'"id":7' in second and b'"ok":true' in second
    assert eg.alive()
    assert app.ruleset() == before
    assert (eg.state_dir / defaults.STATE_FILE).read_text() == state_before
    assert [a["agent"] for a in eg.call("list")["agents"]] == ["bot"]


def test_a_failed_transaction_reaches_the_caller_and_changes_nothing(appliance: Appliance) -> None:
    eg, app = appliance.egress, appliance.app
    eg.call("add_agent", agent="bot", interface="nb-a", allow=["api.example.com"])
    before, listed = app.ruleset(), eg.call("list")

    for op, params in (
        ("add_agent", {"agent": "b2", "interface": "nb-b", "allow": ["x.example.com"]}),
        ("update_agent", {"agent": "bot", "allow": ["y.example.com"]}),
        ("remove_agent", {"agent": "bot"}),
    ):
        assert eg.call("test_fail_next") == {"armed": True}
        error = eg.error(op, **params)
        assert error.code == ErrorCode.UNAVAILABLE
        assert "nftables refused the change; nothing was applied" in error.message
        assert app.ruleset() == before
        assert eg.call("list") == listed
    # The hook fires once; the same requests now succeed.
    eg.call("add_agent", agent="b2", interface="nb-b", allow=["x.example.com"])
    assert app.ruleset() != before
    assert "nftables refused a transaction" in eg.log_text()


def test_without_test_hooks_there_is_no_failure_hook(netns: NetnsFactory, egress_factory: EgressFactory) -> None:
    app = netns()
    eg = egress_factory(app.name, hooks=False)
    assert eg.error("test_fail_next").code == ErrorCode.INVALID_REQUEST


def test_restart_restores_agents_and_skips_vanished_interfaces(
    appliance: Appliance, egress_factory: EgressFactory
) -> None:
    eg, app = appliance.egress, appliance.app
    eg.call("add_agent", agent="bot", interface="nb-a", allow=["api.example.com", "*.x.org:8443"])
    eg.call("add_agent", agent="other", interface="nb-b", allow=["b.example.com"])
    listed = eg.call("list")
    table = app.table()
    assert eg.stop() == 0
    # Stopping keeps the table: without it, agent traffic would not be filtered at all.
    assert app.table() == table

    again = egress_factory(app.name, root=eg.root, uplink="up0", min_ttl=2, max_ttl=10)
    assert again.call("list") == listed
    assert _agent_interfaces(app.table()) == _agent_interfaces(table) == {"nb-a", "nb-b"}
    again.call("update_agent", agent="other", allow=["c.example.com"])
    assert again.stop() == 0

    app.ip("link", "del", "nb-a")
    third = egress_factory(app.name, root=eg.root, uplink="up0", min_ttl=2, max_ttl=10)
    assert [(a["agent"], a["allow"]) for a in third.call("list")["agents"]] == [("other", ["c.example.com"])]
    assert "not restoring agent bot: interface 'nb-a' does not exist" in third.log_text()
    assert _agent_interfaces(app.table()) == {"nb-b"}
    assert _counted(app.table()) == {"nb-b"}


def test_a_second_instance_does_not_touch_the_running_ones_table(
    appliance: Appliance, egress_factory: EgressFactory
) -> None:
    appliance.egress.call("add_agent", agent="bot", interface="nb-a")
    before = appliance.app.ruleset()
    with pytest.raises(RuntimeError, match="is in use by another running server"):
        egress_factory(appliance.app.name, root=appliance.egress.root, uplink="up0", timeout=5)
    assert appliance.app.ruleset() == before
    assert appliance.egress.call("list")["agents"][0]["agent"] == "bot"


# --- admissions through the real DNS proxy ------------------------------------------------------------------------

ZONE = {
    "api.example.com": [("A", "192.0.2.10", 300), ("A", "192.0.2.11", 300)],
    "short.example.com": [("A", "192.0.2.10", 1)],
    "other.example.com": [("A", "192.0.2.12", 300)],
}


def test_dns_answers_admit_timed_elements_refresh_them_and_update_revokes(egress_factory: EgressFactory) -> None:
    with Topology(zone=ZONE, agents=("a1",)) as topo:
        resolv = topo.dir / "resolv.conf"
        resolv.write_text("nameserver 198.51.100.53\n")
        eg = egress_factory(topo.appliance, uplink="up0", resolv_conf=resolv, min_ttl=4, max_ttl=20)
        link = topo.agent()
        eg.call("add_agent", agent="bot", interface=link.iface, allow=["api.example.com", "short.example.com:8443"])

        answer = dig(link.netns, link.gateway, "api.example.com")
        assert answer.rcode == "NOERROR" and sorted(answer.addresses) == ["192.0.2.10", "192.0.2.11"]
        status = eg.call("status", agent="bot")["agent"]
        addresses = {(a["address"], a["port"]): a for a in status["addresses"]}
        assert set(addresses) == {("192.0.2.10", 443), ("192.0.2.11", 443)}
        assert all(15 <= a["expires_s"] <= 20 for a in addresses.values())  # TTL 300 clamped to 20
        assert addresses[("192.0.2.10", 443)]["names"] == ["api.example.com"]

        # A TTL under the minimum is raised to it; the same address on another port is another element.
        assert dig(link.netns, link.gateway, "short.example.com").addresses == ["192.0.2.10"]
        status = eg.call("status", agent="bot")["agent"]
        addresses = {(a["address"], a["port"]): a for a in status["addresses"]}
        assert 1 <= addresses[("192.0.2.10", 8443)]["expires_s"] <= 4
        assert addresses[("192.0.2.10", 8443)]["names"] == ["short.example.com"]

        # Asking again once more than half the timeout has passed refreshes it.
        time.sleep(11)
        status = eg.call("status", agent="bot")["agent"]
        before = {(a["address"], a["port"]): a["expires_s"] for a in status["addresses"]}
        assert before[("192.0.2.10", 443)] <= 9
        again = dig(link.netns, link.gateway, "api.example.com")
        assert again.ttl is not None and again.ttl <= 19
        after = {
            (a["address"], a["port"]): a["expires_s"] for a in eg.call("status", agent="bot")["agent"]["addresses"]
        }
        assert after[("192.0.2.10", 443)] >= 18 and after[("192.0.2.11", 443)] >= 18

        # A refused name is listed; nothing is admitted for it.
        assert dig(link.netns, link.gateway, "other.example.com").rcode == "REFUSED"
        status = eg.call("status", agent="bot")["agent"]
        assert [d["name"] for d in status["denied_names"]] == ["other.example.com"]
        assert ("192.0.2.12", 443) not in {(a["address"], a["port"]) for a in status["addresses"]}

        # Dropping api.example.com from the allow list revokes its elements at once, keeping the others.
        updated = eg.call("update_agent", agent="bot", allow=["short.example.com:8443", "other.example.com"])
        assert {(r["address"], r["port"]) for r in updated["revoked"]} == {("192.0.2.10", 443), ("192.0.2.11", 443)}
        remaining = {(a["address"], a["port"]) for a in eg.call("status", agent="bot")["agent"]["addresses"]}
        assert ("192.0.2.10", 443) not in remaining and ("192.0.2.11", 443) not in remaining

        # Removing the agent stops its proxy.
        eg.call("remove_agent", agent="bot")
        assert dig(link.netns, link.gateway, "api.example.com", timeout=1.0).rcode == "TIMEOUT"


# --- bookkeeping, in-process ---------------------------------------------------------------------------------------


class RecordingNft:
    """Stand-in for egress.nft.Nft in the in-process tests: records each transaction; can be told to refuse one."""

    def __init__(self) -> None:
        self.transactions: list[list[JSONObject]] = []
        self.refuse = False

    def apply(self, commands: Sequence[JSONObject]) -> None:
        if self.refuse:
            raise NftError("refused by the test")
        self.transactions.append(list(commands))

    def listing(self, kind: str, **names: str) -> list[JSONObject] | None:
        return []


class StandInProxy:
    """Stand-in for egress.dnsproxy.DnsProxy: the in-process tests call ``admit`` themselves."""

    def __init__(self) -> None:
        self.allow: AllowList | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def set_allow(self, allow: AllowList) -> None:
        self.allow = allow


@dataclass(frozen=True)
class Adm:
    address: IPv4Address
    port: int
    timeout_s: int
    name: str


def _controller(tmp_path: Path) -> tuple[Controller, RecordingNft]:
    nft = RecordingNft()

    async def lookup(interface: str) -> IPv4Address:
        return IPv4Address("10.200.1.1")

    config = ControllerConfig(state_dir=tmp_path, min_ttl=10, max_ttl=100)
    controller = Controller(config, nft, lambda *args: StandInProxy(), lookup)
    return controller, nft


def _elements(commands: list[JSONObject], verb: str) -> list[tuple[str, int, int | None]]:
    found = []
    for command in commands:
        body = command.get(verb, {}).get("element")
        if body is None or body["name"] != ruleset.ALLOW_SET:
            continue
        for elem in body["elem"]:
            timeout = elem["elem"]["timeout"] if "elem" in elem else None
            value = elem["elem"]["val"] if "elem" in elem else elem
            interface, address, port = value["concat"]
            assert interface == "nb-a"
            found.append((address, port, timeout))
    return found


def test_admission_bookkeeping_and_update_revocation(tmp_path: Path) -> None:
    async def scenario() -> None:
        controller, nft = _controller(tmp_path)
        await controller.start()
        await controller.add_agent("bot", "nb-a", ["api.example.com", "cdn.example.com", "*.x.org:8443"])
        web = IPv4Address("192.0.2.10")
        nft.transactions.clear()

        # Timeouts are clamped into [10, 100]; a shared element keeps the longest justification.
        await controller.admit("bot", [Adm(web, 443, 500, "api.example.com"), Adm(web, 443, 1, "cdn.example.com")])
        (batch,) = nft.transactions
        assert next(c for c in batch if "add" in c)["add"]["element"]["elem"][0]["elem"]["timeout"] == 100
        assert _elements(batch, "delete") == [("192.0.2.10", 443, None)]
        # The element has more than half its timeout left: no transaction; cdn.example.com's answer may say 10 s.
        count = len(nft.transactions)
        assert await controller.admit("bot", [Adm(web, 443, 1, "cdn.example.com")]) in (9, 10)
        assert len(nft.transactions) == count

        # Not justified by the allow list, or in a blocked range: refused, nothing applied.
        count = len(nft.transactions)
        for adm, code in (
            (Adm(web, 8443, 60, "api.example.com"), ErrorCode.FORBIDDEN),
            (Adm(web, 443, 60, "evil.example.com"), ErrorCode.FORBIDDEN),
            (Adm(IPv4Address("169.254.169.254"), 443, 60, "api.example.com"), ErrorCode.FORBIDDEN),
            (Adm(IPv4Address("10.0.0.1"), 443, 60, "api.example.com"), ErrorCode.FORBIDDEN),
        ):
            with pytest.raises(WireError) as info:
                await controller.admit("bot", [adm])
            assert info.value.code == code
        with pytest.raises(WireError) as info:
            await controller.admit("ghost", [Adm(web, 443, 60, "api.example.com")])
        assert info.value.code == ErrorCode.NOT_FOUND
        assert len(nft.transactions) == count

        # A refused transaction leaves the bookkeeping as it was.
        nft.refuse = True
        with pytest.raises(WireError, match="nftables refused"):
            await controller.admit("bot", [Adm(IPv4Address("192.0.2.99"), 8443, 60, "a.x.org")])
        nft.refuse = False
        assert (IPv4Address("192.0.2.99"), 8443) not in controller.agents["bot"].grants

        await controller.admit("bot", [Adm(IPv4Address("192.0.2.20"), 8443, 50, "a.x.org")])
        # Dropping api.example.com: 192.0.2.10:443 is still justified by cdn.example.com, with its shorter expiry.
        nft.transactions.clear()
        result = await controller.update_agent("bot", ["cdn.example.com", "*.x.org:8443"])
        assert result["revoked"] == []
        (batch,) = nft.transactions
        address, port, timeout = _elements(batch, "add")[0]
        assert (address, port) == ("192.0.2.10", 443) and timeout is not None and timeout <= 10
        # Dropping the rest revokes both elements in one transaction.
        nft.transactions.clear()
        result = await controller.update_agent("bot", [])
        assert sorted((r["address"], r["port"]) for r in result["revoked"]) == [
            ("192.0.2.10", 443),
            ("192.0.2.20", 8443),
        ]
        (batch,) = nft.transactions
        assert sorted(_elements(batch, "delete")) == [("192.0.2.10", 443, None), ("192.0.2.20", 8443, None)]
        assert controller.agents["bot"].grants == {}
        proxy = controller.agents["bot"].proxy
        assert isinstance(proxy, StandInProxy) and proxy.allow == AllowList()

    asyncio.run(scenario())


def test_one_agent_cannot_take_more_than_its_share_of_the_allow_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "AGENT_ALLOW_LIMIT", 2)

    async def scenario() -> None:
        controller, nft = _controller(tmp_path)
        await controller.start()
        await controller.add_agent("bot", "nb-a", ["*.example.com"])
        adm = [Adm(IPv4Address(f"192.0.2.{i}"), 443, 60, f"h{i}.example.com") for i in range(1, 4)]
        await controller.admit("bot", adm[:2])
        count = len(nft.transactions)
        with pytest.raises(WireError, match=r"already holds 2 addresses \(limit 2\)") as info:
            await controller.admit("bot", adm[2:])
        assert info.value.code == ErrorCode.FORBIDDEN and len(nft.transactions) == count
        # What it holds already may still be refreshed.
        assert await controller.admit("bot", adm[:1]) > 0

    asyncio.run(scenario())


class LeftoverNft(RecordingNft):
    """The kernel's sets still hold elements keyed by an interface a removed agent used."""

    def listing(self, kind: str, **names: str) -> list[JSONObject] | None:
        value = {"concat": ["nb-a", "192.0.2.7", 22]}
        return [{"set": {"name": names.get("name"), "elem": [{"elem": {"val": value, "expires": 500}}]}}]


def test_adding_an_agent_clears_what_an_earlier_one_left_on_its_interface(tmp_path: Path) -> None:
    async def scenario() -> None:
        nft = LeftoverNft()

        async def lookup(interface: str) -> IPv4Address:
            return IPv4Address("10.200.1.1")

        controller = Controller(ControllerConfig(state_dir=tmp_path), nft, lambda *args: StandInProxy(), lookup)
        await controller.start()
        nft.transactions.clear()
        await controller.add_agent("bot", "nb-a", [])
        (batch,) = nft.transactions
        purged = [c["delete"]["element"] for c in batch if "delete" in c]
        assert sorted(b["name"] for b in purged) == sorted([ruleset.ALLOW_SET, ruleset.DENIED_SET])
        assert all(b["elem"] == [{"concat": ["nb-a", "192.0.2.7", 22]}] for b in purged)
        # Each delete follows an add of the same element: valid even if it expired in between.
        first_delete = next(i for i, c in enumerate(batch) if "delete" in c)
        assert (
            "add" in batch[first_delete - 1] and batch[first_delete - 1]["add"]["element"]["name"] == purged[0]["name"]
        )

    asyncio.run(scenario())


class SteppedClock:
    """The controller's view of time (its module's ``time``), moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def test_a_live_element_is_reused_until_half_its_timeout_is_spent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SteppedClock()
    monkeypatch.setattr("egress.controller.time", clock)

    async def scenario() -> None:
        controller, nft = _controller(tmp_path)
        await controller.start()
        await controller.add_agent("bot", "nb-a", ["api.example.com"])
        web = IPv4Address("192.0.2.10")
        nft.transactions.clear()
        assert await controller.admit("bot", [Adm(web, 443, 100, "api.example.com")]) == 100
        assert len(nft.transactions) == 1
        clock.now += 40  # 60 s left of 100: reused, and the answer may only promise those 60 s
        assert await controller.admit("bot", [Adm(web, 443, 100, "api.example.com")]) == 60
        assert len(nft.transactions) == 1
        clock.now += 15  # 45 s left, under half: refreshed in a transaction
        assert await controller.admit("bot", [Adm(web, 443, 100, "api.example.com")]) == 100
        assert len(nft.transactions) == 2 and _elements(nft.transactions[1], "add")[0][2] == 100

    asyncio.run(scenario())


def test_state_file_is_written_atomically_and_private(tmp_path: Path) -> None:
    async def scenario() -> None:
        controller, _ = _controller(tmp_path)
        await controller.start()
        await controller.add_agent("bot", "nb-a", ["api.example.com:8443"])
        state = tmp_path / defaults.STATE_FILE
        assert oct(state.stat().st_mode & 0o777) == "0o600"
        assert '"api.example.com:8443"' in state.read_text()
        await controller.remove_agent("bot")
        assert '"agents": []' in state.read_text()

    asyncio.run(scenario())
    assert sorted(p.name for p in tmp_path.iterdir()) == [defaults.STATE_FILE]  # no temporary file left behind
