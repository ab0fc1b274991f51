"""Health checks and call budgets, live: test_daemon's appliance (real cage, egress, ctxgraph, QEMU guests under TCG).

The agent serves ``/healthz`` with busybox httpd inside its VM; cage probes it over the agent's private link.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cage import defaults, qemu
from cage.config import CageConfig
from cage.manifest import parse_bytes
from cage.network import Pool, link_for
from cage.runtime import Cage, Paths, Run
from ctxgraph.process import ServerProcess
from nullbox.kvm import Accel
from tests.cage.agent_rootfs import manifest
from tests.cage.test_daemon import Appliance, appliance

__all__ = ["appliance"]  # the module-scoped fixture, shared with test_daemon's definition

HEALTH_SCRIPT = """#!/bin/sh
# Serve /www over HTTP on 8080; with SERVE_S, stop answering after that many seconds (the VM keeps running).
httpd -f -p 8080 -h /www &
server=$!
echo "agent: httpd serving (pid $server)"
if [ -n "${SERVE_S:-}" ]; then
	sleep "$SERVE_S"
	kill "$server"
	echo "agent: httpd stopped"
fi
exec sleep 100000
"""


def health_manifest(name: str, check: str, *, restart: str = "never", **env: str) -> str:
    variables: dict[str, Any] = env  # manifest() takes them as keyword arguments
    text = manifest(name, restart=restart, **variables)
    text = text.replace('command = ["/agent/run"]', 'command = ["/agent/health"]')
    return text + f"health_check = {{ {check} }}\n"


def add_health_agent(appliance: Appliance) -> None:
    """The fixture's rootfs plus httpd, kill and the script above (apply copies the rootfs)."""
    root = appliance.agent_dir / "rootfs"
    for applet in ("httpd", "kill"):
        if not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    (root / "www").mkdir(exist_ok=True)
    (root / "www" / "healthz").write_text("ok\n")
    script = root / "agent" / "health"
    script.write_text(HEALTH_SCRIPT)
    script.chmod(0o755)


@contextlib.contextmanager
def installed(appliance: Appliance, name: str, text: str) -> Iterator[None]:
    """The agent applied for one test, and stopped and removed after it even when the test fails (so a failure
    leaves no VM, TAP or cgroup behind for the next test to trip over)."""
    appliance.apply(name, text)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            appliance.cage.call("remove", agent=name)


def test_a_healthy_agent_is_healthy_and_pausing_does_not_make_it_unhealthy(appliance: Appliance) -> None:
    cage, name = appliance.cage, "healthy"
    add_health_agent(appliance)
    check = 'port = 8080, http_path = "/healthz", interval_s = 1, timeout_s = 1, retries = 2, start_period_s = 60'
    with installed(appliance, name, health_manifest(name, check, restart="on-failure")):
        assert cage.call("start", agent=name)["agent"]["state"] == "running"
        status = appliance.wait(name, lambda s: "health" in s, "the health watch")
        assert status["health"]["state"] in ("starting", "healthy")
        status = appliance.wait(name, lambda s: s.get("health", {}).get("state") == "healthy", "healthy", timeout=90)
        assert status["health"]["last"] == "HTTP 200" and status["health"]["checked_at"] is not None

        # paused for longer than interval_s x retries: a frozen VM is not probed, so it is not found unhealthy
        assert cage.call("pause", agent=name)["agent"]["health"]["state"] == "paused"
        time.sleep(4)
        status = cage.call("status", agent=name)["agent"]
        assert (status["state"], status["health"]["state"], status["restarts"]) == ("paused", "paused", 0)
        resumed = cage.call("resume", agent=name)["agent"]
        assert resumed["health"]["state"] == "starting" and resumed["health"]["failures"] == 0
        appliance.wait(name, lambda s: s["health"]["state"] == "healthy", "healthy after resume", timeout=30)
        status = cage.call("stop", agent=name)["agent"]
        assert status["state"] == "stopped" and "health" not in status
        assert status["last_exit"]["unhealthy"] is None and status["restarts"] == 0


def test_an_agent_that_stops_answering_is_stopped_and_restarted(appliance: Appliance) -> None:
    cage, name = appliance.cage, "flaky"
    add_health_agent(appliance)
    check = 'port = 8080, http_path = "/healthz", interval_s = 1, timeout_s = 1, retries = 2, start_period_s = 60'
    with installed(appliance, name, health_manifest(name, check, restart="on-failure", SERVE_S="3")):
        cage.call("start", agent=name)
        appliance.wait(name, lambda s: s.get("health", {}).get("state") == "healthy", "healthy first", timeout=90)
        status = appliance.wait(name, lambda s: s["restarts"] >= 1, "a restart after the health check failed", 90)
        last = status["last_exit"]
        assert last["failed"] is True and last["stopped"] is False
        assert str(last["unhealthy"]).startswith("2 health checks failed in a row, last: "), status
        lines = appliance.log_lines(name)
        assert any(f"nullbox-cage: agent {name} is unhealthy (2 health checks failed" in line for line in lines)
        assert f"agent {name} is unhealthy" in cage.log_text()
        assert status["backoff_failures"] >= 1
        # the restarted VM is probed afresh, and found unhealthy again once it stops answering
        appliance.wait(name, lambda s: s["restarts"] >= 2, "a second restart", timeout=90)
        assert cage.call("stop", agent=name)["agent"]["state"] == "stopped"
        assert appliance.taps() == [] and cage.cgroup_dirs() == []


def test_an_agent_that_never_listens_is_unhealthy_after_its_retries(appliance: Appliance) -> None:
    cage, name = appliance.cage, "deaf"
    add_health_agent(appliance)
    check = "port = 9, interval_s = 1, timeout_s = 1, retries = 3, start_period_s = 0"  # TCP only; nothing on 9
    with installed(appliance, name, health_manifest(name, check, restart="never")):
        cage.call("start", agent=name)
        status = appliance.wait(name, lambda s: s["state"] == "failed", "the unhealthy VM stopped", timeout=90)
        assert str(status["last_exit"]["unhealthy"]).startswith("3 health checks failed in a row, last: "), status
        assert status["restarts"] == 0  # restart = "never"
        assert appliance.taps() == [] and cage.cgroup_dirs() == []


def test_the_manifest_budget_reaches_ctxgraph(appliance: Appliance) -> None:
    cage, name = appliance.cage, "budgeted"
    with installed(appliance, name, manifest(name, HOLD="100000") + "max_api_calls_per_hour = 120\n"):
        cage.call("start", agent=name)
        with appliance.ctxgraph.client() as client:
            registered = {a["agent"]: a for a in client.list_agents()}
        assert registered[name]["max_calls_per_hour"] == 120
        cage.call("stop", agent=name)


# ------------------------------------------------------------------------- the step alone, without a VM


def test_step_ctxgraph_registers_the_budget(tmp_path: Path) -> None:
    manifest_text = manifest("stepper") + "max_api_calls_per_hour = 7\n"
    parsed = parse_bytes(manifest_text.encode())
    with ServerProcess(tmp_path / "cx") as ctxgraph:
        places = {p: tmp_path / p for p in ("agents", "vault", "state", "run", "logs", "cgroup_root")}
        cage = Cage(CageConfig(), Paths(socket=tmp_path / "cage.sock", ctxgraph=ctxgraph.socket, **places))
        pool = Pool(CageConfig().pool)
        run = Run("stepper", 0, 60000, link_for("stepper", pool, 0), tmp_path / "run")

        async def step() -> dict[str, Any]:
            await cage._step_ctxgraph(run, parsed)
            with ctxgraph.client() as client:
                (record,) = await asyncio.to_thread(client.list_agents)
            await run.undo[-1][1]()  # the step's undo unregisters it again
            return record

        record = asyncio.run(step())
        assert (record["agent"], record["max_calls_per_hour"], record["uid"]) == ("stepper", 7, 60000)
        assert run.ctx_socket == ctxgraph.agents_dir / "stepper.sock"
        with ctxgraph.client() as client:
            assert client.list_agents() == []


@pytest.mark.parametrize(("vhost_vsock", "accel"), [(False, "kvm"), (True, "kvm"), (True, "tcg")])
def test_step_ctxgraph_registers_a_vsock_cid_only_where_vhost_vsock_can_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vhost_vsock: bool, accel: str
) -> None:
    """With QEMU under KVM on a host that has /dev/vhost-vsock (not this one: a file stands in for the device node,
    and the accelerator probe's answer is given) the VM's CID is registered, so ctxgraph maps the VM's vsock
    connections to the agent; without vhost-vsock, or under TCG (vhost needs KVM's ioeventfd/irqfd), no CID."""
    device = tmp_path / "vhost-vsock"
    if vhost_vsock:
        device.touch()
    monkeypatch.setattr(qemu, "VHOST_VSOCK", device)
    monkeypatch.setattr(qemu, "detect_accel", lambda: Accel(accel, ("given by the test",)))
    with ServerProcess(tmp_path / "cx") as ctxgraph:
        places = {p: tmp_path / p for p in ("agents", "vault", "state", "run", "logs", "cgroup_root")}
        config = CageConfig(backend="qemu")
        cage = Cage(config, Paths(socket=tmp_path / "cage.sock", ctxgraph=ctxgraph.socket, **places))
        run = Run("vsocker", 5, 60005, link_for("vsocker", Pool(config.pool), 5), tmp_path / "run")

        async def step() -> dict[str, Any]:
            await cage._step_ctxgraph(run, parse_bytes(manifest("vsocker").encode()))
            with ctxgraph.client() as client:
                (record,) = await asyncio.to_thread(client.list_agents)
            await run.undo[-1][1]()
            return record

        record = asyncio.run(step())
    expected = defaults.VSOCK_CID_BASE + 5 if vhost_vsock and accel == "kvm" else None
    assert run.cid == expected and record["cid"] == expected
