"""cage.network: names, MACs and /30s derived per agent, persistent slots, and real TAPs in a fresh netns."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from cage import network
from cage.network import NetworkError, Pool, SlotMap
from tests.nulld.conftest import run_in_namespaces


def test_names_and_macs_are_stable_and_short() -> None:
    digest = hashlib.sha256(b"researcher").hexdigest()
    assert network.tap_name("researcher") == "nb-" + digest[:8]
    assert len(network.tap_name("x" * 64)) <= 15  # IFNAMSIZ - 1
    mac = network.mac_address("researcher")
    assert mac == "52:54:00:" + ":".join(digest[i : i + 2] for i in (8, 10, 12))
    assert network.mac_address("researcher") == mac
    assert network.tap_name("a") != network.tap_name("b") and network.mac_address("a") != network.mac_address("b")


def test_pool_cuts_into_slash_30s() -> None:
    pool = Pool(IPv4Network("10.201.0.0/16"))
    assert pool.capacity == 16384
    assert pool.subnet(0) == IPv4Network("10.201.0.0/30")
    assert pool.subnet(1) == IPv4Network("10.201.0.4/30")
    assert pool.subnet(16383) == IPv4Network("10.201.255.252/30")
    with pytest.raises(ValueError, match="outside the pool"):
        pool.subnet(16384)
    with pytest.raises(ValueError, match="holds no /30"):
        Pool(IPv4Network("10.0.0.0/31"))
    link = network.link_for("bot", pool, 2)
    assert link.tap == network.tap_name("bot")
    assert link.gateway == IPv4Address("10.201.0.9") and link.guest == IPv4Interface("10.201.0.10/30")
    net = link.guest_net()
    assert (net.tap, net.address, net.gateway, net.dns, net.mac) == (
        link.tap,
        IPv4Interface("10.201.0.10/30"),
        IPv4Address("10.201.0.9"),
        IPv4Address("10.201.0.9"),
        link.mac,
    )
    assert link.to_json()["address"] == "10.201.0.10"


def test_slots_are_persistent_and_the_lowest_free_one_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "slots.json"
    slots = SlotMap(path, capacity=3)
    assert [slots.assign(a) for a in ("a", "b", "c")] == [0, 1, 2]
    assert slots.assign("b") == 1  # the same agent keeps its slot
    with pytest.raises(NetworkError, match="pool is full"):
        slots.assign("d")
    slots.release("b")
    assert SlotMap(path, 3).items() == {"a": 0, "c": 2}  # persisted
    assert slots.assign("d") == 1
    assert json.loads(path.read_text())["slots"] == {"a": 0, "c": 2, "d": 1}
    path.write_text('{"slots": {"a": 0, "b": 0, "c": 99, "../x": "1"}}')  # duplicates, out of range, junk
    assert SlotMap(path, 3).items() == {"a": 0}
    path.write_text("not json")
    assert SlotMap(path, 3).items() == {}


SCENARIO = textwrap.dedent(
    """
    import asyncio, json, os, subprocess
    from ipaddress import IPv4Network
    from cage import network
    from cage.network import Pool

    def ip(*args):
        return json.loads(subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout)

    async def main():
        out = {}
        pool = Pool(IPv4Network("10.201.0.0/16"))
        link = network.link_for("researcher", pool, 5)
        await network.create_link(link, uid=70005, gid=70005)
        info = ip("addr", "show", "dev", link.tap)[0]
        out["flags"] = info["flags"]
        out["addresses"] = [f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"] if a["family"] == "inet"]
        out["tun"] = ip("-d", "link", "show", "dev", link.tap)[0]["linkinfo"]
        out["link_addresses"] = await network.link_addresses(link.tap)
        # created again (a stale one of the same name): replaced, not an error
        await network.create_link(link, uid=70005, gid=70005)
        out["again"] = await network.link_addresses(link.tap)
        # stale TAPs of a killed cage, and interfaces that are not cage's
        subprocess.run(["ip", "tuntap", "add", "dev", "nb-deadbeef", "mode", "tap"], check=True)
        subprocess.run(["ip", "tuntap", "add", "dev", "keep0", "mode", "tap"], check=True)
        out["listed"] = await network.list_taps()
        out["removed"] = await network.remove_stale(keep={link.tap})
        out["left"] = sorted(i["ifname"] for i in ip("link", "show"))
        out["deleted"] = await network.delete_link(link.tap)
        out["deleted_again"] = await network.delete_link(link.tap)
        out["after"] = await network.list_taps()
        out["gone_addresses"] = await network.link_addresses(link.tap)
        try:
            await network.create_link(network.Link("x", "nb-" + "x" * 20, pool.subnet(1), "52:54:00:00:00:01"))
        except network.NetworkError as exc:
            out["bad"] = str(exc)
        out["bad_left"] = await network.list_taps()
        print(json.dumps(out))

    asyncio.run(main())
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and TAPs need root")
def test_taps_in_a_fresh_network_namespace() -> None:
    out = run_in_namespaces(["--net"], SCENARIO)
    tap = network.tap_name("researcher")
    assert out["addresses"] == ["10.201.0.21/30"]  # slot 5: 10.201.0.20/30, gateway .21
    assert out["link_addresses"] == ["10.201.0.21/30"] and out["again"] == ["10.201.0.21/30"]
    assert "UP" in out["flags"]
    assert out["tun"]["info_kind"] == "tun"
    tun = out["tun"]["info_data"]
    assert (tun["type"], tun["persist"], tun["user"], tun["group"]) == ("tap", True, 70005, 70005)
    assert out["listed"] == sorted(["nb-deadbeef", tap])
    assert out["removed"] == ["nb-deadbeef"]
    assert "keep0" in out["left"] and tap in out["left"] and "nb-deadbeef" not in out["left"]
    assert out["deleted"] is True and out["deleted_again"] is False
    assert out["after"] == [] and out["gone_addresses"] == []
    assert "cannot create the TAP" in out["bad"]
    assert out["bad_left"] == []
