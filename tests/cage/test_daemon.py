"""The cage daemon, live: real egress and ctxgraph daemons, a real cgroup2 hierarchy, real QEMU (TCG) guests.

Topology: one network namespace plays the appliance.  egress runs in it (uplink ``up0``, a TAP nobody uses), cage
runs in it too, in a private mount namespace of its own where a fresh cgroup2 hierarchy is mounted (the build host's
cgroups are v1).  ctxgraph runs in the host's network namespace (its sockets are files, reachable from anywhere).
The guests boot the NullBox guest kernel with its module-less initramfs (cage.guestimage) and a tiny busybox
agent.

Not tested here, and why: on this v1 host the cpu, memory and pids controllers stay bound to v1 hierarchies, so the
cgroup2 mount has none of them; cage reports them missing (asserted below) and the limits are not enforced.  The
freezer, cgroup.kill and process moves are core cgroup v2 and are real here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cage import guestimage, network
from cage.guestimage import KernelKind
from ctxgraph.process import ServerProcess
from nullbox.daemon import DaemonProcess
from nullbox.wire import Client, WireError
from tests.cage.agent_rootfs import build_agent_rootfs, manifest
from tests.egress.conftest import EgressProcess, Netns

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, TAPs and cgroups need root")

AGENT_SCRIPT = """#!/bin/sh
# Write {"key": $KEY, "value": $TOKEN} to ctxgraph through the virtio-serial port, tick $HOLD times, exit $STATUS.
port=/dev/virtio-ports/org.nullbox.ctxgraph
if [ -n "${KEY:-}" ]; then
	exec 3<>"$port"
	printf '{"id":1,"op":"put","key":"%s","value":"%s"}\\n' "$KEY" "${TOKEN:-}" >&3
	IFS= read -r reply <&3
	exec 3>&-
	echo "agent: ctxgraph replied $reply"
	case "$reply" in *'"ok":true'*) ;; *) exit 5 ;; esac
fi
i=0
while [ "$i" -lt "${HOLD:-0}" ]; do
	echo "agent: tick $i"
	sleep 0.2
	i=$((i + 1))
done
echo "agent: exiting with ${STATUS:-0}"
exit "${STATUS:-0}"
"""


class CageProcess(DaemonProcess):
    """``python -m cage serve`` inside the appliance netns, in a private mount namespace with cgroup2 mounted."""

    name = "cage"

    def __init__(self, root: Path, netns: str, egress_socket: Path, ctxgraph_socket: Path) -> None:
        super().__init__(root, env={"CAGE_TEST_HOOKS": "1"})
        self.netns = netns
        self.socket = root / "cage.sock"
        self.cgroup = root / "cg"
        self.egress_socket = egress_socket
        self.ctxgraph_socket = ctxgraph_socket

    def argv(self) -> list[str]:
        self.cgroup.mkdir(exist_ok=True)
        serve = [PYTHON, "-m", "cage", "serve", "--config", str(self.root / "cage.toml")]
        serve += ["--socket", str(self.socket), "--agents-dir", str(self.root / "agents")]
        serve += ["--vault-dir", str(self.root / "vault"), "--state-dir", str(self.root / "state")]
        serve += ["--run-dir", str(self.root / "run"), "--log-dir", str(self.root / "logs")]
        serve += ["--egress-socket", str(self.egress_socket), "--ctxgraph-socket", str(self.ctxgraph_socket)]
        serve += ["--cgroup-root", str(self.cgroup)]
        script = 'mount -t cgroup2 none "$0" && exec "$@"'
        return [
            *("ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private"),
            *("sh", "-c", script, str(self.cgroup), *serve),
        ]

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        with Client(f"unix:{self.socket}", timeout=120) as client:
            return client.call(op, **params)

    def error(self, op: str, **params: Any) -> WireError:
        try:
            reply = self.call(op, **params)
        except WireError as exc:
            return exc
        raise AssertionError(f"{op} {params} should have failed but answered {reply}")

    def in_mounts(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in cage's mount namespace (where its cgroup2 hierarchy is)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", *argv], capture_output=True, text=True, check=False, timeout=30
        )

    def cgroup_dirs(self) -> list[str]:
        parent = str(self.cgroup / "nullbox" / "agents")
        out = self.in_mounts("find", parent, "-mindepth", "1", "-maxdepth", "1", "-type", "d", "-printf", "%f\n")
        return sorted(out.stdout.split())

    def cgroup_file(self, agent: str, name: str) -> str:
        out = self.in_mounts("cat", str(self.cgroup / "nullbox" / "agents" / agent / name))
        assert out.returncode == 0, out.stderr
        return out.stdout

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Appliance:
    root: Path
    ns: Netns
    egress: EgressProcess
    ctxgraph: ServerProcess
    cage: CageProcess
    agent_dir: Path

    def apply(self, name: str, text: str) -> dict[str, Any]:
        (self.agent_dir / "AGENT.toml").write_text(text)
        return self.cage.call("apply", path=str(self.agent_dir))

    def wait(self, agent: str, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.cage.call("status", agent=agent)["agent"]
            if predicate(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {status}\ncage log:\n{self.cage.log_text()[-4000:]}")

    def taps(self) -> list[str]:
        out = self.ns.run(["ip", "-o", "link", "show"])
        return sorted(n for n in (line.split(": ")[1].split("@")[0] for line in out.stdout.splitlines()) if "nb-" in n)

    def ctx_agents(self) -> list[str]:
        with self.ctxgraph.client() as client:
            return sorted(a["agent"] for a in client.list_agents())

    def egress_agents(self) -> list[str]:
        return sorted(a["agent"] for a in self.egress.call("list")["agents"])

    def wait_for_entries(self, agent: str, timeout: float = 60) -> list[dict[str, Any]]:
        """The ctxgraph entries written by ``agent``, once there are some."""
        deadline = time.monotonic() + timeout
        while True:
            with self.ctxgraph.client() as client:
                entries: list[dict[str, Any]] = client.by_agent(agent)["entries"]
            if entries:
                return entries
            assert time.monotonic() < deadline, f"no entry of {agent}; cage log:\n{self.cage.log_text()[-4000:]}"
            time.sleep(0.2)

    def log_lines(self, agent: str) -> list[str]:
        lines: list[str] = self.cage.call("logs", agent=agent, lines=10000)["lines"]
        return lines


@pytest.fixture(scope="module")
def appliance(guest_files: tuple[Path, Path]) -> Iterator[Appliance]:
    root = Path(tempfile.mkdtemp(prefix="cg-"))  # short: unix socket paths are limited to 108 bytes
    ns = Netns("cgt")
    started: list[DaemonProcess] = []
    try:
        ns.ip("tuntap", "add", "dev", "up0", "mode", "tap")
        (root / "eg").mkdir()
        (root / "eg" / "resolv.conf").write_text("nameserver 192.0.2.53\n")
        egress = EgressProcess(root / "eg", ns.name, uplink="up0")
        started.append(egress.start())
        ctxgraph = ServerProcess(root / "cx")
        started.append(ctxgraph.start())
        kernel, initramfs = guest_files
        (root / "cage").mkdir()
        (root / "cage" / "cage.toml").write_text(
            textwrap.dedent(
                f"""\
                [backend]
                kind = "qemu"
                kernel = "{kernel}"
                initramfs = "{initramfs}"
                exec_helper = "{guestimage.exec_helper_path()}"
                stop_timeout_s = 1

                [restart]
                backoff_initial_s = 0.5
                backoff_max_s = 2
                """
            )
        )
        cage = CageProcess(root / "cage", ns.name, egress.socket, ctxgraph.socket)
        started.append(cage)
        try:
            cage.start(timeout=60)
        except RuntimeError:
            raise RuntimeError(f"cage did not become ready:\n{cage.log_text()}") from None
        agent_dir = root / "src"
        build_agent_rootfs(agent_dir / "rootfs")
        run = agent_dir / "rootfs" / "agent" / "run"
        run.write_text(AGENT_SCRIPT)
        run.chmod(0o755)
        appliance = Appliance(root, ns, egress, ctxgraph, cage, agent_dir)
        yield appliance
        if appliance.cage is not cage:  # a test replaced it (a restarted cage)
            started.append(appliance.cage)
    finally:
        for proc in reversed(started):
            proc.close()
        for proc in started:
            if proc.log.exists():
                print(f"--- {proc.name} log:\n{proc.log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
        ns.delete()
        shutil.rmtree(root, ignore_errors=True)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting for its reaper)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "nullbox-agent-"], capture_output=True, text=True, check=False)
    return {int(p) for p in out.stdout.split()}


# ------------------------------------------------------------------------------------------------------ tests


def test_ready_status_and_missing_controllers(appliance: Appliance) -> None:
    status = appliance.cage.call("status")
    assert status["agents"] == []
    # this host's cgroup2 mount has no cpu/memory/pids controllers (they are bound to v1): reported, not fatal
    assert set(status["cgroup"]["missing_controllers"]) <= {"cpu", "memory", "pids"}
    assert status["cgroup"]["error"] is None
    assert status["config"]["backend"] == "qemu"
    assert oct(appliance.cage.socket.stat().st_mode & 0o777) == "0o600"


def test_bad_requests_get_one_clear_error_and_the_daemon_keeps_running(appliance: Appliance) -> None:
    cage = appliance.cage
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("launch", {}, "invalid_request", "unknown op 'launch'"),
        ("start", {}, "invalid_request", "'start' needs 'agent'"),
        ("start", {"agent": "../etc"}, "invalid_request", "must be 1-64 characters"),
        ("start", {"agent": "ghost"}, "not_found", "no agent named 'ghost'"),
        ("stop", {"agent": 7}, "invalid_request", "must be 1-64 characters"),
        ("status", {"agent": "ghost"}, "not_found", "ghost"),
        ("logs", {"agent": "ghost"}, "not_found", "ghost"),
        ("pause", {"agent": "ghost"}, "not_found", "ghost"),
        ("apply", {}, "invalid_request", "exactly one of 'path'"),
        ("apply", {"path": "relative/dir"}, "invalid_request", "absolute path"),
        ("apply", {"path": "/nonexistent/agent"}, "invalid_request", "cannot be read"),
        ("apply", {"manifest": "[agent]\nname = 'x'\nbogus = 1\n"}, "invalid_request", "agent.bogus"),
        ("apply", {"manifest": "[agent]\nname = 'x'\n"}, "invalid_request", "no rootfs given"),
        ("secret_set", {"name": "bad name", "value": "v"}, "invalid_request", "secret names are"),
        ("secret_grant", {"name": "NOPE", "agent": "x"}, "not_found", "NOPE"),
        ("test_fail_next", {"step": "nowhere"}, "invalid_request", "'step' must be one of"),
    ]
    for op, params, code, message in cases:
        error = cage.error(op, **params)
        assert error.code == code, (op, params, error)
        assert message in error.message, (op, params, error)
        assert "\n" not in error.message
    with socket.socket(socket.AF_UNIX) as sock:  # a malformed line, then a good request on the same connection
        sock.connect(str(cage.socket))
        sock.sendall(b'{not json\n{"id": 2, "op": "list"}\n')
        sock.shutdown(socket.SHUT_WR)
        replies = [json.loads(line) for line in sock.makefile("rb")]
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "invalid_request"
    assert replies[1] == {"id": 2, "ok": True, "agents": []}
    assert cage.alive()


def test_agent_lifecycle(appliance: Appliance) -> None:
    cage, name = appliance.cage, "writer"
    applied = appliance.apply(name, manifest(name, credentials=True, KEY="daemon/writer", HOLD="1000"))
    assert applied["created"] is True and applied["agent"]["name"] == name
    assert cage.call("list")["agents"][0]["state"] == "stopped"

    # the credential is not in the vault, then not granted: refused, naming it (never a value), nothing left behind
    error = cage.error("start", agent=name)
    assert error.code == "not_found" and "TOKEN is not in the vault" in error.message
    token = "tok-" + os.urandom(8).hex()
    cage.call("secret_set", name="TOKEN", value=token)
    error = cage.error("start", agent=name)
    assert error.code == "forbidden" and "TOKEN is not granted to writer" in error.message
    assert token not in error.message
    assert cage.call("secret_grant", name="TOKEN", agent=name)["granted"] is True
    assert [s["name"] for s in cage.call("secret_list")["secrets"]] == ["TOKEN"]
    assert appliance.taps() == [] and appliance.ctx_agents() == []

    started = cage.call("start", agent=name)["agent"]
    assert started["state"] == "running" and started["backend"] == "qemu"
    tap = network.tap_name(name)
    assert started["network"]["tap"] == tap and appliance.taps() == [tap]
    assert appliance.egress_agents() == [name]
    assert appliance.egress.call("status", agent=name)["agent"]["interface"] == tap
    assert name in appliance.ctx_agents()
    assert cage.cgroup_dirs() == [name]
    pid = started["pid"]
    assert str(pid) in cage.cgroup_file(name, "cgroup.procs").split()  # the VMM is in the agent's cgroup
    assert cage.error("start", agent=name).code == "conflict"

    # the agent's command writes to ctxgraph through its own channel: the entry is that agent's
    entries = appliance.wait_for_entries(name)
    assert [(e["agent"], e["key"], e["value"]) for e in entries] == [(name, "daemon/writer", token)]
    release = guestimage.GuestKernel.from_build(kernel=KernelKind.NULLBOX).version
    assert release.endswith("-nullbox-guest")
    assert any(f"agent {name}: init started, kernel {release} (" in line for line in appliance.log_lines(name))
    appliance.wait(name, lambda s: any("agent: tick" in line for line in appliance.log_lines(name)), "ticks")

    status = cage.call("status", agent=name)["agent"]
    assert status["uptime_s"] > 0 and status["cgroup"]["cpu_usec"] > 0 and status["cgroup"]["frozen"] is False
    assert status["cgroup"]["pids"] >= 1

    check_pause_and_resume(appliance, name)
    check_logs(appliance, name, token)

    # stop: the VMM is gone and everything the start set up is undone
    stopped = cage.call("stop", agent=name)["agent"]
    assert stopped["state"] == "stopped" and stopped["last_exit"]["stopped"] is True
    assert stopped["last_exit"]["failed"] is False
    assert pid not in qemu_pids()
    assert appliance.taps() == [] and appliance.egress_agents() == [] and name not in appliance.ctx_agents()
    assert cage.cgroup_dirs() == []
    assert not (cage.root / "run" / name).exists()
    assert any("nullbox-cage: agent writer ended" in line for line in appliance.log_lines(name))

    shown = cage.call("show", agent=name)
    assert shown["agent"]["manifest"]["agent"]["name"] == name and shown["status"]["state"] == "stopped"
    removed = cage.call("remove", agent=name)
    assert removed["grants_dropped"] == ["TOKEN"]
    assert cage.call("list") == {"agents": []}


def check_pause_and_resume(appliance: Appliance, name: str) -> None:
    """Pause: frozen in the cgroup, and the guest makes no progress (no new ticks); resume: it ticks again."""
    cage = appliance.cage
    assert cage.call("pause", agent=name)["agent"]["state"] == "paused"
    assert "frozen 1" in cage.cgroup_file(name, "cgroup.events")
    assert cage.call("status", agent=name)["agent"]["cgroup"]["frozen"] is True
    time.sleep(0.3)
    before = len(appliance.log_lines(name))
    time.sleep(1.0)
    assert len(appliance.log_lines(name)) == before
    assert cage.error("pause", agent=name).code == "conflict"
    assert cage.call("resume", agent=name)["agent"]["state"] == "running"
    assert "frozen 0" in cage.cgroup_file(name, "cgroup.events")
    appliance.wait(name, lambda s: len(appliance.log_lines(name)) > before, "ticks after resume")


def check_logs(appliance: Appliance, name: str, token: str) -> None:
    """The console log holds the agent's output (never the secret); a follow streams new lines."""
    cage = appliance.cage
    lines = appliance.log_lines(name)
    assert any("ctxgraph replied" in line and '"ok":true' in line for line in lines)
    assert not any(token in line for line in lines)
    with Client(f"unix:{cage.socket}", timeout=30) as follower:
        stream = follower.stream("logs", agent=name, lines=0, follow=True)
        assert "agent: tick" in next(stream)["line"]


def test_crash_restarts_with_backoff(appliance: Appliance) -> None:
    cage, name = appliance.cage, "crasher"
    appliance.apply(name, manifest(name, restart="on-failure", STATUS="1"))
    cage.call("start", agent=name)
    status = appliance.wait(name, lambda s: s["restarts"] >= 2, "two restarts", timeout=90)
    assert status["last_exit"]["agent_status"] == 1 and status["last_exit"]["failed"] is True
    assert status["last_exit"]["vmm_status"] == 0  # the guest powered off after its agent failed
    assert status["backoff_failures"] >= 2
    starts = [line for line in appliance.log_lines(name) if "nullbox-cage: agent crasher started" in line]
    assert len(starts) >= 2  # the first start and at least one restart (the next may still be booting)
    restarting = appliance.wait(name, lambda s: s["state"] == "restarting", "a backoff wait")
    assert 0 < restarting["restart_in_s"] <= 2.0
    stopped = cage.call("stop", agent=name)["agent"]
    assert stopped["state"] == "stopped"
    time.sleep(2.5)  # the pending restart was cancelled: it stays stopped
    assert cage.call("status", agent=name)["agent"]["state"] == "stopped"
    assert appliance.taps() == [] and cage.cgroup_dirs() == []
    # an agent that succeeds is not restarted under on-failure
    appliance.apply(name, manifest(name, restart="on-failure", STATUS="0"))
    cage.call("start", agent=name)
    done = appliance.wait(name, lambda s: s["state"] == "exited", "a clean exit")
    assert done["last_exit"]["agent_status"] == 0 and done["restarts"] == 0
    cage.call("remove", agent=name)


def test_a_failed_start_is_rolled_back(appliance: Appliance) -> None:
    cage, name = appliance.cage, "refused"
    appliance.apply(name, manifest(name, HOLD="1000"))

    # egress refuses the agent (its next nftables transaction fails): the TAP made before it is deleted again
    appliance.egress.call("test_fail_next")
    error = cage.error("start", agent=name)
    assert error.code == "unavailable" and "egress refused agent refused" in error.message
    assert appliance.taps() == [] and appliance.egress_agents() == [] and appliance.ctx_agents() == []
    assert cage.cgroup_dirs() == []
    assert cage.call("status", agent=name)["agent"]["state"] == "failed"

    # the VMM fails to start, after every other step: all of them are undone
    cage.call("test_fail_next", step="backend")
    error = cage.error("start", agent=name)
    assert error.code == "unavailable" and "backend failed" in error.message
    assert appliance.taps() == [] and appliance.egress_agents() == [] and appliance.ctx_agents() == []
    assert cage.cgroup_dirs() == []

    # and then it starts normally
    assert cage.call("start", agent=name)["agent"]["state"] == "running"
    assert appliance.taps() == [network.tap_name(name)]
    cage.call("stop", agent=name)


def test_a_killed_cage_leaves_nothing_behind_once_it_is_back(appliance: Appliance) -> None:
    old, name = appliance.cage, "phoenix"
    appliance.apply(name, manifest(name, HOLD="100000"))
    pid = old.call("start", agent=name)["agent"]["pid"]
    old.kill()  # SIGKILL: no clean-up at all
    assert running(pid) and appliance.taps() == [network.tap_name(name)] and appliance.egress_agents() == [name]
    new = CageProcess(old.root, appliance.ns.name, old.egress_socket, old.ctxgraph_socket)
    appliance.cage = new
    new.start(timeout=60)
    # its start removed the stale cgroup (killing the orphaned VMM in it) and the stale TAP
    assert not running(pid)
    assert appliance.taps() == [] and new.cgroup_dirs() == []
    assert "removing the stale cgroup of agent phoenix" in new.log_text()
    assert "removed the stale TAP" in new.log_text()
    # egress still has the agent from before the kill: the next start replaces that registration
    again = new.call("start", agent=name)["agent"]
    assert again["state"] == "running" and running(again["pid"])
    assert appliance.egress_agents() == [name]
    assert "egress had it registered already" in new.log_text()
    new.call("stop", agent=name)
    assert appliance.taps() == [] and appliance.egress_agents() == []


def test_sigterm_stops_every_vmm(appliance: Appliance) -> None:
    cage = appliance.cage
    pids = []
    for name in ("keep-a", "keep-b"):
        appliance.apply(name, manifest(name, HOLD="100000"))
        pids.append(cage.call("start", agent=name)["agent"]["pid"])
    assert set(pids) <= qemu_pids()
    assert len(appliance.taps()) == 2
    assert cage.stop(timeout=60) == 0
    assert not any(running(pid) for pid in pids)
    assert not set(pids) & qemu_pids()
    assert appliance.taps() == [] and appliance.egress_agents() == [] and appliance.ctx_agents() == []
    assert "stopping every agent" in cage.log_text()
