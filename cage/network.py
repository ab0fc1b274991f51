"""Agent links: one TAP per agent VM on a private /30 of its own.

- TAP name ``nb-`` + the first 8 hex digits of sha256(agent name) (15 characters at most, stable across restarts);
- MAC ``52:54:00:xx:xx:xx`` from the next three bytes of the same hash (stable: the guest sees the same NIC);
- the agent's *slot* (a small integer, persisted in ``slots.json``) picks its /30 from the pool — slot n is the
  n-th /30 — with the appliance's gateway at .1 on the TAP and the guest at .2.  The same slot gives the agent's
  uid (cage.defaults.UID_BASE + slot), so both stay the same across restarts and reinstalls of one name.

Links are made with pyroute2 (netlink and the tun ioctls; no ip(8) process): ``create_link`` adds a persistent TAP
owned by the agent's uid/gid, gives it the gateway address and brings it up; anything half-done is deleted again.
``remove_stale`` deletes ``nb-*`` TAPs a killed cage left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Final

from cage import defaults
from cage.qemu import GuestNet
from nullbox import lean_imports

log = logging.getLogger("cage.network")

LINK_PREFIX: Final = 30
SLOTS_FILE: Final = "slots.json"


class NetworkError(Exception):
    """A link that could not be made or removed; the message names the interface."""


def _digest(agent: str) -> bytes:
    return hashlib.sha256(agent.encode()).digest()


def tap_name(agent: str) -> str:
    return defaults.TAP_PREFIX + _digest(agent).hex()[:8]


def mac_address(agent: str) -> str:
    """Locally administered range QEMU uses (52:54:00), unicast; the last three bytes from the agent's hash."""
    tail = _digest(agent)[4:7]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


class Pool:
    """The agents' address pool, cut into /30s."""

    def __init__(self, network: IPv4Network) -> None:
        if network.prefixlen > LINK_PREFIX:
            raise ValueError(f"the pool {network} holds no /{LINK_PREFIX}")
        self.network = network
        self.capacity = 1 << (LINK_PREFIX - network.prefixlen)

    def subnet(self, slot: int) -> IPv4Network:
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is outside the pool {self.network} ({self.capacity} links)")
        return IPv4Network((int(self.network.network_address) + 4 * slot, LINK_PREFIX))


@dataclass(frozen=True)
class Link:
    """One agent's link: the TAP on the appliance and the addresses on both ends."""

    agent: str
    tap: str
    subnet: IPv4Network
    mac: str

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address + 1

    @property
    def guest(self) -> IPv4Interface:
        return IPv4Interface((self.subnet.network_address + 2, LINK_PREFIX))

    def guest_net(self) -> GuestNet:
        """What the QEMU backend gives the guest; the gateway is also its DNS server (the egress proxy)."""
        return GuestNet(self.tap, self.guest, self.gateway, self.mac, dns=self.gateway)

    def to_json(self) -> dict[str, Any]:
        return {
            "tap": self.tap,
            "subnet": str(self.subnet),
            "gateway": str(self.gateway),
            "address": str(self.guest.ip),
            "mac": self.mac,
        }


def link_for(agent: str, pool: Pool, slot: int) -> Link:
    return Link(agent, tap_name(agent), pool.subnet(slot), mac_address(agent))


class SlotMap:
    """Persistent agent -> slot assignments (``<state dir>/slots.json``); the lowest free slot for a new agent."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self._slots = self._read()

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("%s is unreadable (%s); slots are assigned afresh", self.path, exc)
            return {}
        slots = data.get("slots") if isinstance(data, dict) else None
        if not isinstance(slots, dict):
            return {}
        seen: set[int] = set()
        result: dict[str, int] = {}
        for agent, slot in sorted(slots.items()):
            if isinstance(agent, str) and isinstance(slot, int) and 0 <= slot < self.capacity and slot not in seen:
                result[agent] = slot
                seen.add(slot)
        return result

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".new")
        with partial.open("w") as handle:
            json.dump({"version": 1, "slots": dict(sorted(self._slots.items()))}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(self.path)

    def get(self, agent: str) -> int | None:
        return self._slots.get(agent)

    def assign(self, agent: str) -> int:
        """The agent's slot, assigning (and persisting) the lowest free one the first time."""
        if agent in self._slots:
            return self._slots[agent]
        used = set(self._slots.values())
        slot = next((s for s in range(self.capacity) if s not in used), None)
        if slot is None:
            raise NetworkError(f"the address pool is full: all {self.capacity} agent links are assigned")
        self._slots[agent] = slot
        self._write()
        return slot

    def release(self, agent: str) -> None:
        if self._slots.pop(agent, None) is not None:
            self._write()

    def items(self) -> dict[str, int]:
        return dict(self._slots)


# ------------------------------------------------------------------------------------------------- netlink


def _iproute() -> Any:
    lean_imports.pyroute2_submodules_only()
    from pyroute2.iproute.linux import AsyncIPRoute  # noqa: PLC0415 (only with the first link)

    return AsyncIPRoute()


async def create_link(link: Link, *, uid: int | None = None, gid: int | None = None) -> None:
    """The TAP with the gateway address, up; a TAP of that name already there is replaced (it is stale)."""
    try:
        async with _iproute() as ipr:
            for index in await ipr.link_lookup(ifname=link.tap):
                log.warning("replacing the stale TAP %s", link.tap)
                await ipr.link("del", index=index)
            owner: dict[str, int] = {}
            if uid is not None:
                owner["uid"] = uid
            if gid is not None:
                owner["gid"] = gid
            await ipr.link("add", ifname=link.tap, kind="tuntap", mode="tap", **owner)
            try:
                (index,) = await ipr.link_lookup(ifname=link.tap)
                await ipr.addr("add", index=index, address=str(link.gateway), prefixlen=LINK_PREFIX)
                await ipr.link("set", index=index, state="up")
            except BaseException:
                with contextlib.suppress(Exception):
                    for index in await ipr.link_lookup(ifname=link.tap):
                        await ipr.link("del", index=index)
                raise
    except NetworkError:
        raise
    except Exception as exc:
        raise NetworkError(f"cannot create the TAP {link.tap} ({link.gateway}/{LINK_PREFIX}): {exc}") from exc


async def delete_link(tap: str) -> bool:
    """Delete the TAP; False when there was none."""
    try:
        async with _iproute() as ipr:
            indices = await ipr.link_lookup(ifname=tap)
            for index in indices:
                await ipr.link("del", index=index)
            return bool(indices)
    except Exception as exc:
        raise NetworkError(f"cannot delete the TAP {tap}: {exc}") from exc


async def list_taps(prefix: str = defaults.TAP_PREFIX) -> list[str]:
    """Interfaces whose name starts with ``prefix`` (cage's TAPs), sorted."""
    try:
        async with _iproute() as ipr:
            names = [str(msg.get("ifname")) async for msg in await ipr.link("dump")]
    except Exception as exc:
        raise NetworkError(f"cannot list interfaces: {exc}") from exc
    return sorted(name for name in names if name.startswith(prefix))


async def link_addresses(tap: str) -> list[str]:
    """The IPv4 addresses (CIDR) on ``tap``; [] when it does not exist."""
    import socket  # noqa: PLC0415

    async with _iproute() as ipr:
        indices = await ipr.link_lookup(ifname=tap)
        if not indices:
            return []
        return [
            f"{msg.get('address')}/{msg['prefixlen']}"
            async for msg in await ipr.addr("dump", index=indices[0], family=socket.AF_INET)
            if msg["index"] == indices[0]
        ]


async def remove_stale(keep: Iterable[str] = (), prefix: str = defaults.TAP_PREFIX) -> list[str]:
    """Delete every ``prefix`` TAP not in ``keep`` (left by a cage that was killed); returns their names."""
    kept = set(keep)
    removed = []
    for name in await list_taps(prefix):
        if name in kept:
            continue
        try:
            if await delete_link(name):
                removed.append(name)
        except NetworkError as exc:
            log.error("%s", exc)
    return removed
