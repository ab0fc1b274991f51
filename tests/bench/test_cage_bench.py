"""bench.cage_bench's pure helpers: the bare baseline's initramfs and command line, smaps parsing, percentiles and
the agent's manifest.  The benchmark's figures themselves are never asserted."""

from __future__ import annotations

import stat
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from bench import cage_bench
from bench.common import Report
from cage import qemu
from cage.manifest import parse_bytes
from nullbox.kvm import Accel


def newc_members(archive: bytes) -> dict[str, tuple[int, tuple[int, int], bytes]]:
    """name -> (mode, (rdevmajor, rdevminor), data) of a newc cpio archive, up to its trailer."""
    members: dict[str, tuple[int, tuple[int, int], bytes]] = {}
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701", header[:6]
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, rdev, archive[data_start : data_start + filesize])
        offset = data_start + filesize + (-filesize % 4)


def test_bare_initramfs_has_init_busybox_and_console() -> None:
    members = newc_members(cage_bench.bare_initramfs(cage_bench.POWEROFF_INIT, b"\x7fELF not really"))
    mode, _, data = members["init"]
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755 and data == cage_bench.POWEROFF_INIT
    assert data.startswith(b"#!/bin/busybox sh\n") and b"poweroff -f" in data
    mode, _, data = members["bin/busybox"]
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755 and data == b"\x7fELF not really"
    mode, rdev, _ = members["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert {"bin", "dev"} <= set(members)  # the parents come with their members
    idle = newc_members(cage_bench.bare_initramfs(cage_bench.IDLE_INIT, b"x"))["init"][2]
    assert cage_bench.IDLE_MARK.encode() in idle and b"sleep" in idle


def test_bare_argv_keeps_cages_machine_and_drops_its_devices(tmp_path: Path) -> None:
    spec = qemu.QemuVM(
        agent="a",
        kernel=tmp_path / "vmlinux",
        initramfs=tmp_path / "guest.img",
        rootfs=tmp_path / "root.sqfs",
        config=tmp_path / "config.cpio",
        console_log=tmp_path / "console",
        memory_mb=256,
        net=qemu.GuestNet("nb-0", IPv4Interface("10.77.0.2/30"), IPv4Address("10.77.0.1"), "52:54:00:00:00:01"),
        ctxgraph_socket=tmp_path / "ctx.sock",
        qmp_socket=tmp_path / "qmp.sock",
    )
    cage_argv = qemu.qemu_argv(spec, Accel("tcg", ("test",)), vsock_available=False)
    bare = cage_bench.bare_qemu_argv(
        cage_argv, kernel=tmp_path / "k", initramfs=tmp_path / "bare.cpio", console=tmp_path / "a,b"
    )
    assert bare[0] == cage_argv[0]

    def value(argv: list[str], option: str) -> str:
        return argv[argv.index(option) + 1]

    for option in ("-M", "-accel", "-cpu", "-m", "-smp", "-sandbox", "-append", "-display"):
        assert value(bare, option) == value(cage_argv, option), option
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in bare
    for option in ("-drive", "-device", "-netdev", "-mon"):
        assert option not in bare, option
    assert value(bare, "-name") == cage_bench.BARE_NAME
    assert value(bare, "-kernel") == str(tmp_path / "k")
    assert value(bare, "-initrd") == str(tmp_path / "bare.cpio")
    assert bare.count("-kernel") == bare.count("-initrd") == bare.count("-chardev") == 1
    assert value(bare, "-chardev") == f"file,id=console,path={tmp_path}/a,,b"
    assert value(bare, "-serial") == "chardev:console"


SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:00 123    /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               32768 kB
Pss:               32768 kB
VmFlags: rd wr mr mw me ac
7f0020000000-7f0060000000 rwxp 00000000 00:00 0
Size:            1048576 kB
Rss:               20000 kB
Pss:               20000 kB
"""


def test_parse_smaps_sums_and_finds_the_guest_ram() -> None:
    memory = cage_bench.parse_smaps(SMAPS, 256 * 1024)
    assert (memory.rss, memory.pss) == (800 + 32768 + 20000, 400 + 32768 + 20000)
    assert (memory.guest_rss, memory.guest_pss) == (32768, 32768)
    assert (memory.vmm_rss, memory.vmm_pss) == (20800, 20400)
    missing = cage_bench.parse_smaps(SMAPS, 512 * 1024)
    assert missing.guest_rss is None and missing.vmm_rss == missing.rss


def test_percentile() -> None:
    values = [float(v) for v in range(1, 11)]
    assert cage_bench.percentile(values, 50) == 5.5
    assert cage_bench.percentile(values, 90) == pytest.approx(9.1)
    assert cage_bench.percentile([3.0], 90) == 3.0
    assert cage_bench.percentile([], 50) != cage_bench.percentile([], 50)  # NaN


@pytest.mark.parametrize("idle", [False, True])
def test_agent_manifest_is_valid(idle: bool) -> None:
    manifest = parse_bytes(cage_bench.agent_manifest("bench-agent", idle=idle).encode())
    assert manifest.agent.name == "bench-agent"
    assert list(manifest.agent.argv) == ["/agent/run"]
    assert manifest.agent.env["BENCH_KEY"] == cage_bench.CTX_KEY
    assert ("BENCH_IDLE" in manifest.agent.env) is idle
    assert manifest.capabilities.max_memory_mb == cage_bench.MEMORY_MB


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cage_bench.main(["--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_paired_ratios_cancel_a_slow_spell() -> None:
    """A round where the host was slow for both boots gives the same ratio as a quick one."""
    bare = [0.50, 1.00, 0.52]
    agent = [0.60, 1.20, 0.65]
    assert cage_bench.paired_ratios(bare, agent) == pytest.approx([1.2, 1.2, 1.25])
    with pytest.raises(ValueError):
        cage_bench.paired_ratios(bare, agent[:2])  # every round has both boots


def test_cold_boot_rounds_are_settings_and_rows() -> None:
    """--cold-boots: 5 by default, 1 with --quick; negative counts are refused; a condition's rows and note."""
    assert cage_bench.parse_args([]).cold_boots == 5
    assert cage_bench.parse_args(["--quick"]).cold_boots == 1
    assert cage_bench.parse_args(["--cold-boots", "0"]).cold_boots == 0
    with pytest.raises(SystemExit):
        cage_bench.parse_args(["--cold-boots", "-1"])
    report = Report()
    idle = cage_bench.Condition("(2g)", 5.0, paused=True)
    cage_bench.condition_rows(report, idle, cage_bench.Boot())
    assert report.rows == [] and report.notes == []
    cage_bench.condition_rows(report, idle, cage_bench.Boot(bare_s=[0.6, 0.7], agent_s=[0.72, 0.77]))
    assert report.rows[0].measurement == (
        "(2g) the same, 2 rounds: each boot after 5 s idle; free page reporting paused"
    )
    rows = {row.measurement: row for row in report.rows}
    assert rows["(2g) agent / bare, paired"].value == "1.15"  # median of 1.20 and 1.10
    assert rows["(2g) bare QEMU: start -> exit"].versus == "min-max 0.60-0.70"
    assert rows["(2g) agent: start request -> first write"].versus == "1.15 x bare; min-max 0.72-0.77"
    assert report.notes == ["(2g) runs, s: bare 0.60 0.70; agent 0.72 0.77"]
    host = cage_bench.Condition("(2h)", 0.0, paused=False)
    assert host.describe() == "interleaved, back to back; host as configured"
    cage_bench.condition_rows(report, host, cage_bench.Boot(bare_s=[0.6], agent_s=[0.72]))
    assert report.rows[-4].measurement == "(2h) the same, 1 round: interleaved, back to back; host as configured"
