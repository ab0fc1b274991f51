"""The appliance's uplink: bring the first Ethernet interface up and keep a DHCP lease on it.

Run by nulld as a service (``python3 -m nulld.uplink``, ready = "notify"): ready once the interface has its
address and default route; the lease's name servers go to /run/resolv.conf (the read-only root's
/etc/resolv.conf points there).  pyroute2 does the netlink and DHCP work; the client renews on its own timers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Final

from nullbox import lean_imports

lean_imports.without_ssl()  # asyncio without TLS support: the uplink never speaks TLS

import asyncio  # noqa: E402

lean_imports.lazy("ssl")  # pyroute2.netlink.rtnl.probe_msg imports ssl for TLS probes the uplink never makes
lean_imports.pyroute2_submodules_only()

from pyroute2.dhcp.client import AsyncDHCPClient, ClientConfig  # noqa: E402
from pyroute2.dhcp.fsm import State  # noqa: E402
from pyroute2.dhcp.hooks import Trigger, add_default_gw, configure_ip, hook  # noqa: E402
from pyroute2.dhcp.leases import Lease  # noqa: E402
from pyroute2.iproute.linux import AsyncIPRoute  # noqa: E402

from nullbox import log as nullbox_log  # noqa: E402
from nullbox import notify  # noqa: E402

log = logging.getLogger("uplink")

SYS_NET: Final = Path("/sys/class/net")
RESOLV_CONF: Final = Path("/run/resolv.conf")
ARPHRD_ETHER: Final = "1"


def pick_uplink(sys_net: Path = SYS_NET) -> str | None:
    """The first Ethernet interface by name (virtual ones such as veth, bridges and TAPs of agents excluded)."""
    for iface in sorted(p.name for p in sys_net.iterdir()) if sys_net.is_dir() else []:
        path = sys_net / iface
        try:
            if (path / "type").read_text().strip() != ARPHRD_ETHER:
                continue
        except OSError:
            continue
        if (path / "device").exists() and not iface.startswith("nb-"):
            return iface
    return None


def resolv_conf(name_servers: list[str], search: str | None = None) -> str:
    lines = ["# written by nullbox uplink from its DHCP lease"]
    if search:
        lines.append(f"search {search}")
    lines += [f"nameserver {server}" for server in name_servers[:3]]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".new")
    partial.write_text(text)
    partial.replace(path)


async def run(interface: str | None, resolv: Path, lease_timeout: float | None) -> int:
    iface = interface or pick_uplink()
    if iface is None:
        log.error("no Ethernet interface to bring up")
        return 1
    async with AsyncIPRoute() as ipr:
        (index,) = await ipr.link_lookup(ifname=iface)
        await ipr.link("set", index=index, state="up")

    async def write_resolv(lease: Lease) -> None:
        try:
            servers = list(lease.name_servers or [])
        except Exception:  # the server may send no DNS option at all
            servers = []
        write_atomically(resolv, resolv_conf(servers))

    hooks = (configure_ip, add_default_gw, hook(Trigger.BOUND)(write_resolv))
    config = ClientConfig(interface=iface, hooks=hooks)
    async with AsyncDHCPClient(config) as client:
        await client.bootstrap()
        await client.wait_for_state(State.BOUND, timeout=lease_timeout)
        lease = client.lease
        assert lease is not None
        status = f"{iface} {lease.ip}/{lease.prefixlen} via {lease.default_gateway}"
        log.info("uplink up: %s", status)
        notify.ready(status)
        await asyncio.Event().wait()  # renewals run on the client's own timers
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m nulld.uplink", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interface", help="default: the first Ethernet interface")
    parser.add_argument("--resolv-conf", type=Path, default=RESOLV_CONF)
    parser.add_argument("--timeout", type=float, default=None, help="give up if no lease within this many seconds")
    args = parser.parse_args(argv)
    nullbox_log.setup("uplink")
    try:
        return asyncio.run(run(args.interface, args.resolv_conf, args.timeout))
    except TimeoutError:
        log.error("no DHCP lease within %ss", args.timeout)
        return 1


if __name__ == "__main__":
    sys.exit(main())
