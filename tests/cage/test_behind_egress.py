"""An agent microVM behind egress: it reaches the host its manifest allows and not another one.

Everything is real and nothing leaves the test's network namespaces (tests.egress.topology)::

    QEMU guest (eth0 10.201.0.2) == TAP nb-<hash> == appliance netns (egress, cage) == up0 == internet netns

The internet namespace serves DNS (198.51.100.53) for a zone with two names, each pointing at a TCP server that
answers with its own address (``served``).  egress runs in the appliance namespace with the topology's uplink and
that DNS server upstream; cage runs there too (as in test_daemon.py: a private mount namespace with cgroup2
mounted, here under a cgroup parent of its own so that it never touches another cage's agents) and ctxgraph in the
host's.  cage creates the agent's TAP in the appliance namespace, registers it with egress using the manifest's
``network.allow`` and boots the guest under TCG.

The agent, a busybox script, asks its resolver (/etc/resolv.conf, written by the guest init: the gateway, where
egress's DNS proxy for this agent listens) for both names with nslookup, dials the address it got for the allowed
name and the other host's address (which it knows without DNS) with nc, and reports each result as a console line
``probe: KEY VALUE``.  The test reads those lines through cage's ``logs`` and egress's ``status`` for the agent
while the VM still runs (the agent then idles; a stop undoes the registration), and checks what the upstream DNS
server was asked.  The topology routes everything (tests/egress/test_traffic.py's control test shows every
destination is reachable without egress), so only egress can stop the second connection; its ``denied`` record
shows that it did.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from cage import guestimage, network
from ctxgraph.process import ServerProcess
from nullbox.daemon import DaemonProcess
from tests.cage.agent_rootfs import build_agent_rootfs, manifest
from tests.cage.test_daemon import CageProcess, running
from tests.egress.conftest import EgressProcess
from tests.egress.topology import DNS_SERVER, UPLINK, WEB, Topology, served

REPO: Final = Path(__file__).resolve().parent.parent.parent
PYTHON: Final = sys.executable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, TAPs and cgroups need root")

AGENT: Final = "prober"
PORT: Final = 443
ALLOWED_NAME: Final = "api.example.com"
ALLOWED_ADDRESS: Final = str(WEB[0])
OTHER_NAME: Final = "other.example.com"
OTHER_ADDRESS: Final = str(WEB[3])
ZONE: Final = {
    ALLOWED_NAME: [("A", ALLOWED_ADDRESS, 300)],
    OTHER_NAME: [("A", OTHER_ADDRESS, 300)],
}
#: nc's connect timeout in the guest: a dropped SYN shows as "nc: timed out" after this many seconds.
DIAL_WAIT: Final = 5
#: Every wait of the test (cage start, the guest's probes under a busy TCG host, stop).
WAIT: Final = 180.0

#: Applets the probe script uses, beyond agent_rootfs.APPLETS.
PROBE_APPLETS: Final = ("nslookup", "nc", "sed", "head", "timeout")

PROBE_SCRIPT: Final = """#!/bin/sh
# Probe the network from inside the VM; every result is one console line "probe: KEY VALUE".
probe() { echo "probe: $*"; }
probe nameserver "$(sed -n 's/^nameserver //p' /etc/resolv.conf)"

# lookup NAME KEY: ask /etc/resolv.conf's server for NAME's A records; sets $address to the first one ("none").
lookup() {
	out=$(nslookup -type=a "$1" 2>&1)
	status=$?
	echo "$out" | sed "s|^|nslookup $1: |"
	address=$(echo "$out" | sed -n '/^Name:/,$ s/^Address: *//p' | head -n 1)
	address=${address:-none}
	probe "lookup-$2" "status=$status address=$address"
}

# dial ADDRESS KEY: connect to ADDRESS:$PORT and report what the server said (its own address) or nc's error.
dial() {
	answer=$(timeout 60 nc -w "$DIAL_WAIT" "$1" "$PORT" </dev/null 2>&1)
	status=$?
	probe "dial-$2" "status=$status answer=$(echo $answer)"
}

lookup "$ALLOWED_NAME" allowed
dial "$address" allowed
lookup "$OTHER_NAME" other
dial "$OTHER_ADDRESS" other
probe done
exec sleep 100000
"""

PROBE: Final = re.compile(r"probe: (\S+) ?(.*)$")


class Cage(CageProcess):
    """test_daemon's cage, with its agents' cgroups under a parent of its own (``<tag>/agents``).

    Every cgroup2 mount shows the same hierarchy, and a starting cage removes every agent group under its parent
    (killing the VMMs in them): with the default parent it would end another cage's agents, e.g. test_daemon's
    running at the same time.
    """

    def __init__(self, root: Path, netns: str, egress_socket: Path, ctxgraph_socket: Path, tag: str) -> None:
        super().__init__(root, netns, egress_socket, ctxgraph_socket)
        self.tag = tag

    def argv(self) -> list[str]:
        return [*super().argv(), "--cgroup-parent", f"{self.tag}/agents"]


def remove_cgroup_tree(tag: str, mountpoint: Path) -> None:
    """Remove the (by now empty) ``<tag>`` directory tree from the cgroup2 hierarchy, through a mount of our own."""
    mountpoint.mkdir(exist_ok=True)
    script = 'mount -t cgroup2 none "$0" && if [ -d "$0/$1" ]; then find "$0/$1" -depth -type d -exec rmdir {} +; fi'
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(mountpoint), tag],
        capture_output=True,
        check=False,
        timeout=30,
    )


class Run:
    """The daemons of one test and what they said, for assertion messages."""

    def __init__(self, root: Path, topo: Topology, egress: EgressProcess, cage: Cage) -> None:
        self.root = root
        self.topo = topo
        self.egress = egress
        self.cage = cage

    def console(self) -> list[str]:
        lines: list[str] = self.cage.call("logs", agent=AGENT, lines=10000)["lines"]
        return lines

    def probes(self, lines: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for line in lines:
            match = PROBE.search(line)
            if match:
                found[match.group(1)] = match.group(2)
        return found

    def explain(self) -> str:
        """The agent's console, and the tails of the daemons' logs."""
        try:
            console = "\n".join(self.console())
        except Exception as exc:  # the explanation must not hide the failure it explains
            console = f"(cage logs failed: {exc})"
        tails = [f"--- agent console:\n{console}"]
        for proc in (self.cage, self.egress):
            text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
            tails.append(f"--- {proc.name} log (tail):\n{text[-3000:]}")
        return "\n".join(tails)

    def wait_for_probes(self) -> dict[str, str]:
        """The agent's probe results once it reports ``done``; fails (explained) if its VM stops running first."""
        deadline = time.monotonic() + WAIT
        while True:
            probes = self.probes(self.console())
            if "done" in probes:
                return probes
            state = self.cage.call("status", agent=AGENT)["agent"]["state"]
            assert state == "running", f"the agent's VM is {state} before its probes were done\n{self.explain()}"
            assert time.monotonic() < deadline, f"no 'probe: done' within {WAIT}s\n{self.explain()}"
            time.sleep(0.5)


@pytest.fixture
def run(guest_files: tuple[Path, Path]) -> Iterator[Run]:
    """The topology, with egress and cage in its appliance namespace and ctxgraph beside; all removed afterwards."""
    tag = f"nbt-{secrets.token_hex(3)}"
    root = Path(tempfile.mkdtemp(prefix="cb-"))  # short: unix socket paths are limited to 108 bytes
    started: list[DaemonProcess] = []
    cage: Cage | None = None
    try:
        with Topology(zone=ZONE, agents=()) as topo:
            try:
                resolv = root / "resolv.conf"
                resolv.write_text(f"nameserver {DNS_SERVER}\n")
                egress = EgressProcess(root / "eg", topo.appliance, uplink=UPLINK, resolv_conf=resolv)
                started.append(egress)
                egress.start(timeout=WAIT)
                ctxgraph = ServerProcess(root / "cx")
                started.append(ctxgraph)
                ctxgraph.start(timeout=WAIT)
                kernel, initramfs = guest_files
                (root / "cage").mkdir()
                (root / "cage" / "cage.toml").write_text(
                    f'[backend]\nkind = "qemu"\nkernel = "{kernel}"\ninitramfs = "{initramfs}"\nstop_timeout_s = 5\n'
                    f'exec_helper = "{guestimage.exec_helper_path()}"\n'
                )
                cage = Cage(root / "cage", topo.appliance, egress.socket, ctxgraph.socket, tag)
                started.append(cage)
                try:
                    cage.start(timeout=WAIT)
                except RuntimeError:
                    raise RuntimeError(f"cage did not become ready:\n{cage.log_text()}") from None
                yield Run(root, topo, egress, cage)
            finally:
                vmm = vmm_pid(cage)
                for proc in reversed(started):  # cage first: its SIGTERM stops every VMM and undoes their starts
                    proc.close()
                if vmm is not None and running(vmm):  # cage did not stop it (killed after its stop timed out)
                    os.kill(vmm, signal.SIGKILL)
                for proc in started:
                    if proc.log.exists():
                        print(f"--- {proc.name} log:\n{proc.log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
    finally:
        remove_cgroup_tree(tag, root / "cg-cleanup")
        shutil.rmtree(root, ignore_errors=True)


def vmm_pid(cage: Cage | None) -> int | None:
    """The agent's VMM pid while cage reports one (for a last-resort kill), else None."""
    if cage is None or not cage.alive():
        return None
    try:
        pid = cage.call("status", agent=AGENT)["agent"].get("pid")
    except Exception:
        return None
    return pid if isinstance(pid, int) else None


# ------------------------------------------------------------------------------------------------------- test


def test_an_agent_vm_reaches_its_allowed_host_and_not_another(run: Run) -> None:
    source = run.root / "src"
    build_agent_rootfs(source / "rootfs")
    for applet in PROBE_APPLETS:
        (source / "rootfs" / "bin" / applet).symlink_to("busybox")
    script = source / "rootfs" / "agent" / "run"
    script.write_text(PROBE_SCRIPT)
    script.chmod(0o755)
    (source / "AGENT.toml").write_text(
        manifest(
            AGENT,
            allow=[ALLOWED_NAME],
            ALLOWED_NAME=ALLOWED_NAME,
            OTHER_NAME=OTHER_NAME,
            OTHER_ADDRESS=OTHER_ADDRESS,
            PORT=str(PORT),
            DIAL_WAIT=str(DIAL_WAIT),
        )
    )
    run.cage.call("apply", path=str(source))

    started = run.cage.call("start", agent=AGENT)["agent"]
    assert started["state"] == "running", started
    link = started["network"]
    assert link["tap"] == network.tap_name(AGENT)
    registered = run.egress.call("status", agent=AGENT)["agent"]
    assert registered["interface"] == link["tap"] and registered["allow"] == [ALLOWED_NAME], registered

    probes = run.wait_for_probes()
    why = run.explain()

    # The guest's resolver is its gateway: egress's DNS proxy for this agent.
    assert probes["nameserver"] == link["gateway"], why
    # The allowed name resolves through it, and its server answers.
    assert probes["lookup-allowed"] == f"status=0 address={ALLOWED_ADDRESS}", why
    assert probes["dial-allowed"] == f"status=0 answer={served(ALLOWED_ADDRESS, PORT)}", why
    # The other name is refused by the proxy, and the other host's address, dialled directly, is dropped.
    assert probes["lookup-other"] == "status=1 address=none", why
    assert any(f"{OTHER_NAME}: REFUSED" in line for line in run.console()), why
    assert probes["dial-other"] == "status=1 answer=nc: timed out", why

    # egress's view of the same agent: one admitted destination (by the allowed name), the other host denied.
    status = run.egress.call("status", agent=AGENT)["agent"]
    why = f"egress status: {status}\n{why}"
    admitted = [(a["address"], a["port"], a["names"]) for a in status["addresses"]]
    assert admitted == [(ALLOWED_ADDRESS, PORT, [ALLOWED_NAME])], why
    assert (OTHER_ADDRESS, PORT) in {(d["address"], d["port"]) for d in status["denied"]}, why
    assert ALLOWED_ADDRESS not in {d["address"] for d in status["denied"]}, why
    assert OTHER_NAME in {d["name"] for d in status["denied_names"]}, why
    assert status["counters"]["dropped"]["packets"] >= 1, why
    assert status["counters"]["accepted"]["packets"] >= 1, why

    # Upstream DNS was asked for the allowed name (by the proxy) and never for the other one.
    asked = {q["name"] for q in run.topo.dns_log()}
    assert ALLOWED_NAME in asked and OTHER_NAME not in asked, f"upstream DNS was asked {asked}\n{why}"

    # Stopping the agent undoes its registration.
    stopped = run.cage.call("stop", agent=AGENT)["agent"]
    assert stopped["state"] == "stopped", stopped
    assert run.egress.call("list")["agents"] == []
