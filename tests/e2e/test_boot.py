"""Boot the real appliance under QEMU (TCG) and talk to nulld from the host through the control port."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from nullbox.wire import WireError
from tests.e2e.conftest import Appliance

# The initramfs's first line names the running kernel (uname -r); the next says so when it cannot load modules.
KERNEL_LINE = re.compile(r"NullBox: initramfs started, kernel (\S+) ")
NO_MODULES = "NullBox: kernel without loadable modules: everything is built in, nothing to load"


def assert_nullbox_kernel(console: str) -> None:
    """The appliance booted the NullBox kernel (built in, no module support), not Debian's with its modules."""
    releases = KERNEL_LINE.findall(console)
    assert releases and all(r.endswith("-nullbox") for r in releases), (releases, console[-4000:])
    assert console.count(NO_MODULES) == len(releases), console[-4000:]  # /proc/modules absent: CONFIG_MODULES off
    assert not re.search(r"NullBox: loaded \d+ .* modules", console), console[-4000:]


def test_boot_put_reboot_and_the_data_survives(image: Path, boot_dir: Path) -> None:
    box = Appliance(boot_dir)
    try:
        status = box.wait_for_nulld()
        nulld = status["nulld"]
        assert (nulld["pid"], nulld["mode"], nulld["degraded"], nulld["config_errors"]) == (1, "pid1", None, [])
        assert nulld["root_readonly"] is True
        status = box.wait_for_nulld() if status["services"][0]["state"] != "ready" else status
        deadline = time.monotonic() + 120
        expected = {"egress": "ready", "ctxgraph": "ready", "uplink": "ready", "cage": "ready"}
        while {s["name"]: s["state"] for s in status["services"]} != expected:
            assert time.monotonic() < deadline, status
            time.sleep(1)
            status = box.call("status")
        uplink = {s["name"]: s for s in status["services"]}["uplink"]
        assert uplink["message"].startswith("eth0 10.0.2.15/24 via 10.0.2.2"), uplink  # QEMU's user-mode DHCP
        events = box.call("timings")["events"]
        order = [(e["event"], e["service"]) for e in events]
        assert (
            order.index(("mounts_done", None))
            < order.index(("spawned", "egress"))
            < order.index(("ready", "egress"))
            < order.index(("spawned", "ctxgraph"))  # ctxgraph depends on egress
            < order.index(("ready", "ctxgraph"))
            < order.index(("spawned", "cage"))  # cage depends on egress and ctxgraph
        )
        assert all(e["monotonic_s"] > 0 for e in events)  # monotonic since kernel boot

        # egress's table is in force on the appliance's kernel (everything its rules use is built into the NullBox
        # kernel; with Debian's, the initramfs loads it and says so when a required module fails), and its API
        # answers through nulld's front door.
        assert "cannot load" not in box.console(), box.console()
        egress = box.call("egress.status")
        assert (egress["table"], egress["uplink"], egress["agents"]) == ("inet nullbox", "eth0", []), egress
        with pytest.raises(WireError, match="is the uplink"):
            box.call("egress.add_agent", agent="probe", interface="eth0", allow=["example.com"])
        assert box.call("egress.list") == {"agents": []}

        put = box.call("ctx.put", key="e2e/boot", value={"survives": "reboot"})
        assert put["created"] is True

        uptime = box.call("status")["nulld"]["uptime_s"]
        assert box.call("reboot") == {"accepted": "reboot"}
        again = box.wait_for_nulld(newer_than=uptime)
        assert again["nulld"]["pid"] == 1
        deadline = time.monotonic() + 120
        while True:
            try:
                entry = box.call("ctx.get", hash=put["hash"])["entry"]
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(1)
        assert (entry["key"], entry["value"]) == ("e2e/boot", {"survives": "reboot"})
        assert box.call("poweroff") == {"accepted": "poweroff"}
        box.wait_exit()
    finally:
        box.close()
    assert "checked by dm-verity against root hash" in box.console()
    assert_nullbox_kernel(box.console())
    assert len(KERNEL_LINE.findall(box.console())) == 2  # both boots


def test_a_flipped_byte_in_the_root_refuses_to_boot(image: Path, boot_dir: Path) -> None:
    build = boot_dir / "build"
    (build / "boot").mkdir(parents=True)
    os.symlink(image / "boot" / "vmlinuz", build / "boot" / "vmlinuz")
    os.symlink(image / "initrd.img", build / "initrd.img")
    os.symlink(image / "rootfs.verity", build / "rootfs.verity")
    corrupt = build / "rootfs.squashfs"
    shutil.copyfile(image / "rootfs.squashfs", corrupt)
    with corrupt.open("r+b") as f:
        # past the superblock, in the first 4 KiB block: SquashFS itself would not notice (it is compressed data
        # it has no reason to read at mount), dm-verity does when mount reads the block
        f.seek(2048)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    box = Appliance(boot_dir, "--direct", "--build", str(build), "--no-data-disk")
    try:
        box.wait_exit(timeout=300)  # the initramfs powers off instead of booting
    finally:
        box.close()
    console = box.console()
    assert "data block 0 is corrupted" in console  # the kernel's dm-verity, on the console (loglevel 3)
    assert "cannot mount the root image: it is not the one this initramfs was built for" in console
    assert "refusing to boot" in console
    assert "switching to the verified root" not in console
    assert_nullbox_kernel(console)


def test_uefi_boot(image: Path, boot_dir: Path) -> None:
    box = Appliance(boot_dir, "--uefi", "--no-data-disk")
    try:
        status = box.wait_for_nulld()
        assert status["nulld"]["pid"] == 1
        assert any("tmpfs" in note for note in status["nulld"]["boot"])  # no data disk: /var on tmpfs, said so
        assert box.call("poweroff") == {"accepted": "poweroff"}
        box.wait_exit()
    finally:
        box.close()
    assert_nullbox_kernel(box.console())  # GRUB's UEFI path boots the bzImage through its EFI stub
