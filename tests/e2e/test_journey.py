"""The operator's journey on the booted appliance, from the host, with nullctl through the control port only.

status -> agent init / edit / apply (the demo agent's root image ships in the appliance) -> secret set + grant ->
ctx watch while the agent starts -> egress status -> pause (frozen: no heartbeats) / resume / stop -> reboot ->
the agent, its secret and its entries are still there.  Every step's output is checked, human and --json.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cage.defaults import DEMO_ROOTFS
from tests.e2e.conftest import Appliance

SECRET = "journey-token-1234"
CTX_DEADLINE = 120.0  # agent start -> its first entry, nested under TCG on a busy 2-core machine


class Nullctl:
    """nullctl as the operator runs it on the host: a new process per command, --connect serial:<control port>."""

    def __init__(self, box: Appliance, cwd: Path) -> None:
        self.box = box
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if k not in ("NULLCTL_CONNECT", "NO_COLOR")}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "nullctl", "--connect", f"serial:{self.box.socket}", *args]

    def run(self, *args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
            cwd=self.cwd,
        )

    def ok(self, *args: str, stdin: str = "") -> str:
        done = self.run(*args, stdin=stdin)
        assert done.returncode == 0, (
            f"nullctl {' '.join(args)} -> {done.returncode}\n{done.stderr}{self.box.console()[-3000:]}"
        )
        assert done.stderr == "", done.stderr
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("--json", *args))


def heartbeats(ctl: Nullctl) -> int:
    """The demo agent's latest heartbeat number ("beat N" under demo/heartbeat), 0 before the first."""
    entries = ctl.json("ctx", "history", "demo/heartbeat", "--limit", "1")["entries"]
    return int(entries[0]["value"].removeprefix("beat ")) if entries else 0


def wait_until(what: str, check: Any, deadline: float = CTX_DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {deadline:g}s")


def edit(path: Path, replacements: dict[str, str]) -> None:
    """What the operator does in an editor: change lines of the starter AGENT.toml."""
    text = path.read_text()
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} is not one line of {path}"
        text = text.replace(old, new)
    path.write_text(text)


def all_ready(ctl: Nullctl) -> dict[str, Any] | None:
    status: dict[str, Any] = ctl.json("status")
    return status if status["services"] and all(s["ready"] for s in status["services"]) else None


def step_status(ctl: Nullctl) -> None:
    """Every service ready, cage among them, no agent yet."""
    status = wait_until("every service ready", lambda: all_ready(ctl))
    assert {s["name"] for s in status["services"]} == {"egress", "uplink", "ctxgraph", "cage"}
    human = ctl.ok("status")
    assert "cage " in human and "agents: none installed" in human, human


def step_install(ctl: Nullctl) -> None:
    """A starter manifest, edited, applied with the demo root image the appliance ships; its credential."""
    assert ctl.ok("agent", "init", "demo").startswith("wrote demo/AGENT.toml")
    edit(
        ctl.cwd / "demo" / "AGENT.toml",
        {
            "credential_refs = []": 'credential_refs = ["DEMO_TOKEN"]',
            "allow = []": 'allow = ["example.com"]',
            '# env = { LOG_LEVEL = "info" }': 'env = { DEMO_INTERVAL = "1" }',
            "max_memory_mb = 256": "max_memory_mb = 96",
        },
    )
    applied = ctl.ok("agent", "apply", "demo/", "--rootfs", str(DEMO_ROOTFS))
    assert applied.startswith("demo 0.1.0 installed (manifest sha256 "), applied
    listed = ctl.json("agent", "list")["agents"]
    assert [(a["name"], a["state"], a["ok"]) for a in listed] == [("demo", "stopped", True)], listed
    assert [line.split()[:3] for line in ctl.ok("agent", "list").splitlines()[1:]] == [["demo", "0.1.0", "stopped"]]
    # the value goes over stdin, never argv; listing shows names only
    assert "DEMO_TOKEN stored" in ctl.ok("secret", "set", "DEMO_TOKEN", stdin=SECRET)
    assert ctl.ok("secret", "grant", "DEMO_TOKEN", "demo").strip() == "DEMO_TOKEN granted to demo"
    secrets = json.dumps(ctl.json("secret", "list"))
    assert SECRET not in secrets and "DEMO_TOKEN" in secrets, secrets


def step_start_and_watch(ctl: Nullctl) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start it, then watch ctxgraph: the agent's entries arrive on the stream.  (agent status, its demo/seen entry)

    The control port serves one connection at a time, so the watch (which holds it) runs between other commands."""
    started: dict[str, Any] = ctl.json("agent", "start", "demo")["agent"]
    assert (started["agent"], started["state"], started["backend"]) == ("demo", "running", "qemu"), started
    watch = subprocess.Popen(
        ctl.argv("--json", "ctx", "watch", "demo/"), stdout=subprocess.PIPE, text=True, env=ctl.env, cwd=ctl.cwd
    )
    try:
        assert watch.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(watch.stdout, selectors.EVENT_READ)
        end = time.monotonic() + CTX_DEADLINE
        streamed: dict[str, Any] | None = None
        while streamed is None and time.monotonic() < end:
            if selector.select(timeout=max(0.0, end - time.monotonic())):
                line = watch.stdout.readline()
                assert line, "ctx watch ended"
                event = json.loads(line)
                streamed = event.get("entry")  # the stream opens with an acknowledgement, then one event per entry
        assert streamed is not None, "ctx watch saw nothing within the deadline"
        assert streamed["key"] in ("demo/seen", "demo/heartbeat") and streamed["agent"] == "demo", streamed
    finally:
        watch.kill()
        watch.wait()
    history = ctl.json("ctx", "history", "demo/seen")["entries"]
    assert len(history) == 1, history

    # the human listing, once the first heartbeat followed demo/seen (the watch may have seen only the latter)
    def listing() -> str | None:
        text = ctl.ok("ctx", "query", "demo/")
        return text if "demo/heartbeat" in text else None

    human = wait_until("demo/heartbeat in ctx query", listing)
    assert "demo/seen" in human and "demo/heartbeat" in human and "demo   " in human, human
    return started, history[0]


def step_pause_resume_stop(ctl: Nullctl) -> None:
    """Pause: the cgroup is frozen, the limits are in force, the heartbeat stops; resume: it beats again; stop."""
    wait_until("a heartbeat", lambda: heartbeats(ctl) >= 2)
    paused = ctl.json("agent", "pause", "demo")["agent"]
    assert paused["state"] == "paused" and paused["cgroup"]["frozen"] is True, paused
    # the starter's 25% of a CPU; 96 MiB for the VM plus cage's VMM overhead (128 MiB); cage's pids.max
    assert paused["cgroup"]["limits"] == {
        "cpu.max": "25000 100000",
        "memory.max": str((96 + 128) * 2**20),
        "pids.max": "256",
    }, paused
    before = heartbeats(ctl)
    time.sleep(5)
    assert heartbeats(ctl) == before, "the agent made progress while paused"
    assert [line.split()[:3] for line in ctl.ok("agent", "list").splitlines()[1:]] == [["demo", "0.1.0", "paused"]]
    resumed = ctl.json("agent", "resume", "demo")["agent"]
    assert resumed["state"] == "running" and resumed["cgroup"]["frozen"] is False, resumed
    wait_until("a heartbeat after resume", lambda: heartbeats(ctl) > before, 60)
    assert ctl.ok("agent", "stop", "demo").strip() == "demo: stopped"
    assert ctl.json("agent", "list")["agents"][0]["state"] == "stopped"


def test_the_operators_journey(image: Path, boot_dir: Path, tmp_path: Path) -> None:
    box = Appliance(boot_dir)
    ctl = Nullctl(box, tmp_path)
    try:
        box.wait_for_nulld()
        step_status(ctl)
        step_install(ctl)
        started, seen = step_start_and_watch(ctl)
        assert seen["agent"] == "demo"  # ctxgraph bound the write to the agent's own channel
        assert seen["value"].startswith("agent demo; kernel ") and "-nullbox-guest" in seen["value"], seen
        assert f"DEMO_TOKEN present, {len(SECRET)} characters" in seen["value"], seen  # granted, never echoed
        # The appliance's kernel has vhost-vsock, so cage gave the VM a CID and ctxgraph took the demo's writes over
        # vsock (nb-vsock in the demo's root; ctxgraph mapped the peer CID to the agent), not the serial port.
        assert started["vsock_cid"] is not None, started
        assert "ctxgraph over vsock" in seen["value"], seen
        logs = ctl.ok("agent", "logs", "demo")
        assert "demo: wrote demo/seen" in logs and SECRET not in logs

        # egress: its allow list, on its own interface
        egress = ctl.json("egress", "status", "demo")["agent"]
        assert (egress["agent"], egress["allow"]) == ("demo", ["example.com"]), egress
        assert egress["interface"] == started["network"]["tap"]
        human = ctl.ok("egress", "status", "demo")
        assert "allow:      example.com" in human and f"interface:  {egress['interface']}" in human, human

        step_pause_resume_stop(ctl)

        # reboot: the agent, its secret and its memory are still there
        uptime = ctl.json("status")["nulld"]["uptime_s"]
        assert "reboot" in ctl.ok("reboot")
        box.wait_for_nulld(newer_than=uptime)
        wait_until("every service ready after the reboot", lambda: all_ready(ctl))
        assert [a["name"] for a in ctl.json("agent", "list")["agents"]] == ["demo"]
        assert "DEMO_TOKEN" in ctl.ok("secret", "list")
        entry = ctl.json("ctx", "get", seen["hash"])  # --json: the entry itself
        assert (entry["key"], entry["agent"], entry["value"]) == ("demo/seen", "demo", seen["value"])
        assert json.loads(ctl.ok("ctx", "get", seen["hash"]))["hash"] == seen["hash"]  # human: the entry, indented
        assert ctl.ok("poweroff").startswith("poweroff accepted")
        box.wait_exit()
    finally:
        box.close()
