"""``nullctl egress status [AGENT]`` through nulld's front door to a real egress daemon in a network namespace."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from nullbox.wire import Client
from tests.egress.conftest import EgressProcess, Netns
from tests.nullctl.conftest import Appliance


@pytest.fixture
def egress(appliance: Appliance) -> Iterator[EgressProcess]:
    ns = Netns("nce")
    proc: EgressProcess | None = None
    try:
        ns.ip("tuntap", "add", "dev", "up0", "mode", "tap")
        ns.ip("tuntap", "add", "dev", "nb-t1", "mode", "tap")
        ns.ip("addr", "add", "10.200.0.1/30", "dev", "nb-t1")
        root = appliance.root / "eg"  # where the appliance fixture routes egress.* to
        root.mkdir()
        (root / "resolv.conf").write_text("nameserver 192.0.2.53\n")
        proc = EgressProcess(root, ns.name, uplink="up0")
        proc.start()
        yield proc
    finally:
        if proc is not None:
            proc.close()
        ns.delete()


def test_egress_status(appliance: Appliance, egress: EgressProcess) -> None:
    assert "no agents registered" in appliance.ok("egress", "status")
    with Client(f"unix:{egress.socket}") as client:
        client.call("add_agent", agent="bot", interface="nb-t1", allow=["api.example.com", "*.github.com:8443"])

    lines = appliance.ok("egress", "status").splitlines()
    assert lines[0].split() == ["table:", "inet", "nullbox"] and lines[1].split() == ["uplink:", "up0"]
    header = lines.index(next(line for line in lines if line.startswith("AGENT")))
    assert lines[header].split() == ["AGENT", "INTERFACE", "GATEWAY", "ACCEPTED", "DROPPED", "ALLOW"]
    row = lines[header + 1]
    assert row.split()[:3] == ["bot", "nb-t1", "10.200.0.1"] and row.endswith("api.example.com, *.github.com:8443")

    one = appliance.ok("egress", "status", "bot")
    assert "interface:  nb-t1 (gateway 10.200.0.1)" in one and "admitted addresses:\n  none" in one
    data = json.loads(appliance.ok("--json", "egress", "status", "bot"))["agent"]
    assert data["agent"] == "bot" and data["counters"]["dropped"]["packets"] == 0

    missing = appliance.run("egress", "status", "nobody")
    assert missing.returncode == 1 and "(not_found)" in missing.stderr
