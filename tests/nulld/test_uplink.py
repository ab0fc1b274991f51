"""The uplink service's own logic; its DHCP exchange runs for real in the e2e boot (QEMU's user-mode DHCP)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nulld.uplink import pick_uplink, resolv_conf, write_atomically


def _iface(sys_net: Path, name: str, kind: str, device: bool) -> None:
    (sys_net / name).mkdir(parents=True)
    (sys_net / name / "type").write_text(kind + "\n")
    if device:
        (sys_net / name / "device").mkdir()


def test_pick_uplink_takes_the_first_physical_ethernet(tmp_path: Path) -> None:
    sys_net = tmp_path / "net"
    _iface(sys_net, "lo", "772", device=False)
    _iface(sys_net, "veth0", "1", device=False)  # virtual: no device
    _iface(sys_net, "nb-1a2b", "1", device=True)  # an agent's TAP
    _iface(sys_net, "eth1", "1", device=True)
    _iface(sys_net, "eth0", "1", device=True)
    assert pick_uplink(sys_net) == "eth0"
    assert pick_uplink(tmp_path / "missing") is None


def test_resolv_conf_from_a_lease(tmp_path: Path) -> None:
    text = resolv_conf(["10.0.2.3", "1.1.1.1", "8.8.8.8", "9.9.9.9"], search="lan")
    assert text.splitlines()[1:] == ["search lan", "nameserver 10.0.2.3", "nameserver 1.1.1.1", "nameserver 8.8.8.8"]
    target = tmp_path / "run" / "resolv.conf"
    write_atomically(target, text)
    write_atomically(target, resolv_conf([]))
    assert target.read_text().splitlines()[1:] == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["resolv.conf"]


def test_the_service_starts_in_a_fresh_interpreter() -> None:
    # Imports as nulld runs it: the lean-import trims must leave every module the service needs importable.
    done = subprocess.run(
        [sys.executable, "-m", "nulld.uplink", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
