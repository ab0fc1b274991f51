"""cage.qemu: the microvm command line, the config, the guest kernel and initramfs (cage.guestimage), and real
boots under TCG with each guest kernel: the NullBox one (kernel.build guest) and Debian's (image.build kernel)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Final

import pytest

from cage import guestimage, qemu
from cage.guestimage import KernelKind
from cage.qemu import GuestNet, QemuVM, Vm
from ctxgraph.process import ServerProcess
from image.initrd import ModuleTree, is_static_elf
from kernel import build as kernel_build
from nullbox import kvm
from nullbox.kvm import Accel
from tests.cage.agent_rootfs import AGENT_PATH, agent_env, build_agent_rootfs

REPO = Path(__file__).resolve().parent.parent.parent
TCG = Accel("tcg", ("test",))
KVM = Accel("kvm", ("test",))
AGENT_PATH_VAR = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the guest init's default
SECRET = 'tok-3f9a\'$(reboot) "x"\nline2'


def spec(tmp: Path, **changes: object) -> QemuVM:
    base = QemuVM(
        agent="alpha",
        kernel=tmp / "vmlinuz",
        initramfs=tmp / "initrd.img",
        rootfs=tmp / "root.sqfs",
        config=tmp / "config.cpio",
        console_log=tmp / "console.log",
        qmp_socket=tmp / "qmp.sock",
        ctxgraph_socket=tmp / "agents" / "alpha.sock",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# ------------------------------------------------------------------------------------------------------- argv


def test_argv_is_a_microvm_with_a_read_only_root_disk(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(spec(tmp_path), TCG, vsock_available=False)
    assert argv[0] == "qemu-system-x86_64"
    assert all(isinstance(a, str) for a in argv)
    assert option(argv, "-M")[0].startswith("microvm,")
    assert "x-option-roms=off" in option(argv, "-M")[0]
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    drives = option(argv, "-drive")
    assert len(drives) == 1  # the config travels in the initramfs (boot_initramfs), not as a disk
    assert "readonly=on" in drives[0] and "format=raw" in drives[0]
    assert f"file={tmp_path / 'root.sqfs'}," in drives[0]
    devices = option(argv, "-device")
    assert [d for d in devices if d.startswith("virtio-blk")] == ["virtio-blk-device,drive=root,serial=nullbox-root"]
    assert not any("-pci" in d for d in devices)  # microvm: virtio-mmio only
    assert not any(d.startswith("virtio-rng") for d in devices)  # the guest's CRNG seeds from RDRAND
    assert option(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert option(argv, "-initrd") == [str(tmp_path / "initrd.img")]
    assert f"file,id=console,path={tmp_path / 'console.log'}" in option(argv, "-chardev")


def test_accelerator_in_argv(tmp_path: Path) -> None:
    tcg = qemu.qemu_argv(spec(tmp_path, cpus=2), TCG)
    assert option(tcg, "-accel") == ["tcg,thread=multi"]
    assert option(tcg, "-cpu") == ["max"]
    assert option(tcg, "-smp") == ["2"]
    kvm = qemu.qemu_argv(spec(tmp_path), KVM)
    assert option(kvm, "-accel") == ["kvm"]
    assert "tsc_early_khz=" not in option(kvm, "-append")[0]
    khz = qemu.host_tsc_khz()
    if khz is not None:  # TCG: the guest is told the (host's) TSC frequency instead of calibrating it
        assert f"tsc_early_khz={khz}" in option(tcg, "-append")[0].split()


def test_host_tsc_khz(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.118\n\nprocessor\t: 1\ncpu MHz\t\t: 1.0\n"
    )
    assert qemu.host_tsc_khz.__wrapped__(cpuinfo) == 2596118
    cpuinfo.write_text("processor\t: 0\n")
    assert qemu.host_tsc_khz.__wrapped__(cpuinfo) is None
    assert qemu.host_tsc_khz.__wrapped__(tmp_path / "missing") is None


def test_this_host_gets_tcg() -> None:
    """A PVM /dev/kvm (kvm_pvm without kvm_intel/kvm_amd) hangs a stock kernel: the probe must say TCG."""
    modules = {m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if Path("/sys/module", m).exists()}
    if modules != {"kvm_pvm"} and Path("/dev/kvm").exists():
        pytest.skip(f"this host's KVM ({', '.join(sorted(modules)) or 'no module'}) may really work")
    accel = qemu.detect_accel()
    assert accel.name == "tcg", accel.explain()
    assert option(qemu.qemu_argv(spec(Path("/x")), accel), "-accel") == ["tcg"]


def test_no_secrets_in_argv_or_kernel_command_line(tmp_path: Path) -> None:
    vm = spec(tmp_path)
    qemu.write_config(vm.config, ["/bin/agent", "--serve"], {"OPENAI_API_KEY": SECRET, "TOKEN": "hunter2"})
    argv = qemu.qemu_argv(vm, TCG)
    for secret in (SECRET, "hunter2", "OPENAI_API_KEY", "tok-3f9a"):
        assert not any(secret in a for a in argv)
    cmdline = option(argv, "-append")[0]
    assert "nullbox.agent=alpha" in cmdline.split()
    assert "console=ttyS0" in cmdline.split()
    assert cmdline == qemu.kernel_cmdline(vm, "serial", qemu.host_tsc_khz())


def test_virtio_serial_without_vhost_vsock(tmp_path: Path) -> None:
    vm = spec(tmp_path, vsock_cid=7)
    argv = qemu.qemu_argv(vm, TCG, vsock_available=False)
    sock = tmp_path / "agents" / "alpha.sock"
    ctx = [c for c in option(argv, "-chardev") if c.startswith("socket,id=ctx,")]
    assert ctx == [f"socket,id=ctx,path={sock},reconnect=1"]  # a client: no server=on
    assert "virtserialport,chardev=ctx,name=org.nullbox.ctxgraph" in option(argv, "-device")
    assert not any("vsock" in d for d in option(argv, "-device"))
    assert "nullbox.ctx=serial" in option(argv, "-append")[0].split()


def test_vhost_vsock_when_the_host_has_it_and_the_serial_port_still(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(spec(tmp_path, vsock_cid=7), TCG, vsock_available=True)
    assert "vhost-vsock-device,guest-cid=7" in option(argv, "-device")
    # the virtio-serial port stays: a shell agent (busybox has no vsock client) still reaches ctxgraph
    assert "virtserialport,chardev=ctx,name=org.nullbox.ctxgraph" in option(argv, "-device")
    assert [c for c in option(argv, "-chardev") if c.startswith("socket,id=ctx")]
    assert "nullbox.ctx=vsock" in option(argv, "-append")[0].split()
    # without a socket, vsock alone
    alone = qemu.qemu_argv(spec(tmp_path, vsock_cid=7, ctxgraph_socket=None), TCG, vsock_available=True)
    assert "vhost-vsock-device,guest-cid=7" in option(alone, "-device")
    assert not any("virtserialport" in d for d in option(alone, "-device"))
    # without a CID the spec cannot use vsock, without a socket there is no channel at all
    assert qemu.ctx_channel(spec(tmp_path), vsock_available=True) == "serial"
    assert qemu.ctx_channel(spec(tmp_path, ctxgraph_socket=None), vsock_available=False) == "none"


def test_tap_network(tmp_path: Path) -> None:
    net = GuestNet("nb-1a2b3c", IPv4Interface("10.77.0.2/30"), IPv4Address("10.77.0.1"), "52:54:00:12:34:56")
    argv = qemu.qemu_argv(spec(tmp_path, net=replace(net, dns=IPv4Address("10.77.0.1"))), TCG)
    assert option(argv, "-netdev") == ["tap,id=net0,ifname=nb-1a2b3c,script=no,downscript=no"]
    assert "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56" in option(argv, "-device")
    words = option(argv, "-append")[0].split()
    assert "nullbox.net=10.77.0.2/30,10.77.0.1" in words
    assert "nullbox.dns=10.77.0.1" in words
    with pytest.raises(ValueError, match="gateway"):
        GuestNet("nb-x", IPv4Interface("10.77.0.2/30"), IPv4Address("10.78.0.1"), "52:54:00:12:34:56")
    with pytest.raises(ValueError, match="TAP"):
        GuestNet("tap,script=/bin/evil", IPv4Interface("10.77.0.2/30"), IPv4Address("10.77.0.1"), "52:54:00:00:00:01")


def test_spec_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="agent name"):
        spec(tmp_path, agent="a b")
    with pytest.raises(ValueError, match="kernel argument"):
        spec(tmp_path, append=("loglevel=7 init=/bin/sh",))
    commas = qemu.qemu_argv(spec(tmp_path, rootfs=tmp_path / "a,b.img"), TCG)
    assert f"file={tmp_path}/a,,b.img,format=raw,if=none,id=root,readonly=on" in option(commas, "-drive")


def test_argv_with_passed_descriptors(tmp_path: Path) -> None:
    """Running as the agent: QEMU gets every host resource as a descriptor, never a path it would open itself."""
    net = GuestNet("nb-1a2b3c", IPv4Interface("10.77.0.2/30"), IPv4Address("10.77.0.1"), "52:54:00:12:34:56")
    share = qemu.GuestShare("data0", tmp_path / "data" / "in", "/data/in", read_only=True)
    vm = spec(tmp_path, net=net, uid=70123, shares=(share,))
    fds = qemu.PassedFds(root=10, initrd=11, console=12, qmp=13, tap=14, ctx=15, shares=(16,))
    argv = qemu.qemu_argv(vm, TCG, vsock_available=False, fds=fds)
    assert option(argv, "-add-fd") == ["fd=12,set=3", "fd=10,set=1"]
    assert option(argv, "-drive") == ["file=/dev/fdset/1,format=raw,if=none,id=root,readonly=on"]
    assert option(argv, "-initrd") == ["/proc/self/fd/11"]  # boot_initramfs's memfd: the config is in it
    chardevs = option(argv, "-chardev")
    assert "file,id=console,path=/dev/fdset/3,append=on" in chardevs
    assert "socket,id=qmp,fd=13,server=on,wait=off" in chardevs
    assert "socket,id=ctx,fd=15" in chardevs
    assert option(argv, "-netdev") == ["tap,id=net0,fd=14"]
    assert option(argv, "-fsdev") == ["local,id=fs0,path=/proc/self/fd/16,security_model=none,readonly=on"]
    # nothing under the caller's directories is opened by path but the kernel (installed world-readable)
    assert [a for a in argv if str(tmp_path) in a] == [str(vm.kernel)]
    assert fds.all == (10, 11, 12, 13, 14, 15, 16)
    # the ctxgraph socket by path (reconnecting) when the agent's uid reaches it
    by_path = qemu.qemu_argv(vm, TCG, vsock_available=False, fds=replace(fds, ctx=None))
    assert f"socket,id=ctx,path={tmp_path / 'agents' / 'alpha.sock'},reconnect=1" in option(by_path, "-chardev")
    assert option(argv, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_shares_in_argv(tmp_path: Path) -> None:
    shares = (
        qemu.GuestShare("data0", tmp_path / "a,b", "/data/in", read_only=True),
        qemu.GuestShare("data1", tmp_path / "out", "/data/in/out", read_only=False),
    )
    argv = qemu.qemu_argv(spec(tmp_path, shares=shares), TCG)
    assert option(argv, "-fsdev") == [
        f"local,id=fs0,path={tmp_path}/a,,b,security_model=none,readonly=on",
        f"local,id=fs1,path={tmp_path}/out,security_model=none",
    ]
    assert [d for d in option(argv, "-device") if "9p" in d] == [
        "virtio-9p-device,fsdev=fs0,mount_tag=data0",
        "virtio-9p-device,fsdev=fs1,mount_tag=data1",
    ]


def test_uid_and_share_validation(tmp_path: Path) -> None:
    assert spec(tmp_path, uid=70001).gid == 70001  # gid defaults to the uid
    assert spec(tmp_path, uid=70001, gid=70002).gid == 70002
    for bad in ({"uid": 0}, {"uid": 2**32 - 1}, {"gid": 5}, {"uid": True}):
        with pytest.raises(ValueError):
            spec(tmp_path, **bad)
    with pytest.raises(ValueError, match="tag"):
        qemu.GuestShare("x" * 32, tmp_path, "/data", read_only=True)  # the 9p mount_tag limit
    for path in ("/data/a b", "/data/../etc", "data", "/data/x:rw", "/data//x", "/data/x/"):
        with pytest.raises(ValueError, match="guest path"):
            qemu.GuestShare("data0", tmp_path, path, read_only=True)
    twice = qemu.GuestShare("data0", tmp_path, "/data", read_only=True)
    with pytest.raises(ValueError, match="twice"):
        spec(tmp_path, shares=(twice, replace(twice, guest_path="/data/x")))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_reachable_socket_and_kvm_groups(tmp_path: Path) -> None:
    """What decides how QEMU, as the agent, reaches ctxgraph (path or passed connection) and KVM (which group)."""
    uid = 70123
    top = Path(tempfile.mkdtemp(prefix="nbq-"))
    try:
        top.chmod(0o711)
        (top / "agents").mkdir(mode=0o711)
        sock = top / "agents" / "a.sock"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(sock))
            sock.chmod(0o600)
            assert not qemu.reachable_socket(sock, uid, uid)  # root's socket
            os.chown(sock, uid, uid)
            assert qemu.reachable_socket(sock, uid, uid)
            assert qemu.reachable_socket(top / "agents" / "later.sock", uid, uid)  # QEMU reconnects until it exists
            top.chmod(0o700)
            assert not qemu.reachable_socket(sock, uid, uid)
    finally:
        shutil.rmtree(top)
    device = tmp_path / "kvm"
    device.touch(0o666)
    device.chmod(0o666)
    assert qemu.kvm_groups(device) == []
    device.chmod(0o660)
    os.chown(device, 0, 36)  # udev's kvm group
    assert qemu.kvm_groups(device) == [36]
    os.chown(device, 0, 0)
    device.chmod(0o600)  # devtmpfs without udev: cage gives it a group of its own
    assert qemu.kvm_groups(device) == [qemu.KVM_GID]
    st = device.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, qemu.KVM_GID, 0o660)


# ----------------------------------------------------------------------------------------------------- config


@pytest.fixture(scope="module")
def guest_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cage/guest/init.c compiled as the initramfs carries it; run on the host (not PID 1) it only parses configs."""
    path = tmp_path_factory.mktemp("init") / "init"
    path.write_bytes(guestimage.guest_init())
    path.chmod(0o755)
    return path


def config_member(archive: Path) -> tuple[int, bytes]:
    """(permission bits, data) of the one member of a write_config archive, as the host's cpio extracts it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["cpio", "-id", "--quiet"], input=archive.read_bytes(), cwd=tmp, check=True)
        members = list(Path(tmp).iterdir())
        assert [m.name for m in members] == [qemu.CONFIG_MEMBER]
        return stat.S_IMODE(members[0].stat().st_mode), members[0].read_bytes()


def print_config(init: Path, config: bytes, tmp: Path, *extra: str) -> list[tuple[str, ...]]:
    """``init --print-config FILE``: what the guest would give the agent, as (kind, fields...) tuples."""
    path = tmp / "nullbox-config"
    path.write_bytes(config)
    out = subprocess.run([str(init), "--print-config", str(path), *extra], check=True, capture_output=True).stdout
    fields = out.decode().split("\0")
    assert fields.pop() == ""
    arity = {"env": 1, "workdir": 1, "arg": 1, "share": 3}
    parsed: list[tuple[str, ...]] = []
    while fields:
        kind = fields.pop(0)
        parsed.append((kind, *(fields.pop(0) for _ in range(arity[kind]))))
    return parsed


def test_config_round_trips_through_the_guest_init(tmp_path: Path, guest_init: Path) -> None:
    """What the guest's init reads is exactly what cage wrote: any byte but NUL, nothing evaluated; the agent's
    environment is a clean one plus the config's, which may replace a default."""
    env = {"SECRET": SECRET, "EMPTY": "", "UNI": "żółw \\ $HOME `id`", "HOME": "/home/agent"}
    command = ["/bin/agent", "two words", "it's", "-x=$(id)"]
    archive = qemu.write_config(tmp_path / "config.cpio", command, env, "/work")
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    mode, data = config_member(archive)
    assert mode == 0o400 and data == qemu.config_bytes(command, env, "/work")
    assert data.startswith(qemu.CONFIG_HEADER)
    parsed = print_config(guest_init, data, tmp_path, "alpha", "vsock")
    assert [p[1] for p in parsed if p[0] == "env"] == [
        "TERM=dumb",
        "NULLBOX_AGENT=alpha",
        "NULLBOX_CTX=vsock",
        f"PATH={AGENT_PATH_VAR}",
        "EMPTY=",
        "HOME=/home/agent",
        f"SECRET={SECRET}",
        f"UNI={env['UNI']}",
    ]
    assert ("workdir", "/work") in parsed
    assert [p[1] for p in parsed if p[0] == "arg"] == command


def test_config_lists_shares_parents_first(tmp_path: Path, guest_init: Path) -> None:
    shares = [
        qemu.GuestShare("data1", tmp_path / "o", "/data/in/out", read_only=False),
        qemu.GuestShare("data2", tmp_path / "w", "/data/in-x", read_only=False),
        qemu.GuestShare("data0", tmp_path / "i", "/data/in", read_only=True),
    ]
    config = qemu.config_bytes(["/a"], {"X": "1"}, "/", shares)
    assert [p[1:] for p in print_config(guest_init, config, tmp_path) if p[0] == "share"] == [
        ("data0", "ro", "/data/in"),
        ("data1", "rw", "/data/in/out"),
        ("data2", "rw", "/data/in-x"),
    ]
    assert b"share " not in qemu.config_bytes(["/a"], {})  # none: the guest mounts nothing


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (b"# nullbox-config 1\nexport A=b\n", " is not a nullbox config (version 2)"),
        (b"nullbox-config 2\nenv A=b\0\0", ": the config names no command"),
        (b"nullbox-config 2\narg /a\0run x\0\0", ": unknown config record run x"),
        (b"nullbox-config 2\nenv 1A=b\0arg /a\0\0", ": bad environment record (variable 1A=b)"),
        (b"nullbox-config 2\nenv A\0arg /a\0\0", ": bad environment record (variable A)"),
        (b"nullbox-config 2\narg /a\0workdir /x/../etc\0\0", ": bad working directory /x/../etc"),
        (b"nullbox-config 2\narg /a\0share d0:rx:/d\0\0", ": share d0 has mode rx (ro or rw)"),
        (b"nullbox-config 2\narg /a\0share d0:ro:d\0\0", ": share d0 has a bad path d"),
        (b"nullbox-config 2\narg /a\0share d0:ro:/d/\0\0", ": share d0 has a bad path /d/"),
        (b"nullbox-config 2\narg /a\0share d0\0\0", ": bad share record d0"),
        (b"nullbox-config 2\narg /a\0", ": the config has no end record"),
        (b"nullbox-config 2\narg /a", ": the config's last record is not terminated"),
    ],
)
def test_the_guest_init_refuses_a_bad_config(tmp_path: Path, guest_init: Path, records: bytes, message: str) -> None:
    """Each defect gets one message naming the file and what is wrong (in the guest: NULLBOX-GUEST-FAIL)."""
    path = tmp_path / "nullbox-config"
    path.write_bytes(records)
    done = subprocess.run([str(guest_init), "--print-config", str(path)], check=False, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"init: {path}{message}\n"


def test_the_guest_init_runs_only_as_pid_1(guest_init: Path) -> None:
    done = subprocess.run([str(guest_init)], check=False, capture_output=True, text=True)
    assert done.returncode == 2 and "not PID 1" in done.stderr


def test_config_refuses_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "config.cpio"
    for command, env, workdir in (
        ([], {}, "/"),
        (["/a", ""], {}, "/"),
        (["/a"], {"BAD NAME": "x"}, "/"),
        (["/a"], {"X": "nul\0"}, "/"),
        (["nul\0"], {}, "/"),
        (["/a"], {}, "relative"),
        (["/a"], {}, "/x/../etc"),
        (["/a"], {"BIG": "x" * qemu.MAX_CONFIG_BYTES}, "/"),
    ):
        with pytest.raises(ValueError):
            qemu.write_config(path, command, env, workdir)
    assert not path.exists()
    path.symlink_to(tmp_path / "elsewhere")
    qemu.write_config(path, ["/a"], {})
    assert not path.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_the_boot_initramfs_is_the_guest_initramfs_then_the_config(tmp_path: Path) -> None:
    """QEMU's -initrd: a sealed memfd, the guest initramfs padded to 4 bytes and the config archive after it (the
    kernel unpacks one archive after the other); the config file is gone from the host once read."""
    vm = spec(tmp_path)
    vm.initramfs.write_bytes(b"070701 base archive!!")  # 21 bytes: 3 bytes of padding follow
    archive = qemu.write_config(vm.config, ["/a"], {"TOKEN": "hunter2"}).read_bytes()
    fd = qemu.boot_initramfs(vm)
    try:
        assert not vm.config.exists()
        with open(f"/proc/self/fd/{fd}", "rb") as reopened:  # as QEMU opens it
            assert reopened.read() == b"070701 base archive!!\0\0\0" + archive
        with pytest.raises(PermissionError):
            os.write(fd, b"x")  # sealed
        assert qemu.qemu_argv(vm, TCG, initrd=fd)[qemu.qemu_argv(vm, TCG).index("-initrd") + 1] == f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def test_failed_start_still_removes_the_config(tmp_path: Path) -> None:
    vm = spec(tmp_path, qemu="false")  # exits at once with status 1, QMP never answers
    vm.initramfs.write_bytes(b"")
    qemu.write_config(vm.config, ["/a"], {"TOKEN": "hunter2"})
    with Vm(vm) as running, pytest.raises(RuntimeError, match="exited with status 1"):
        running.start(TCG)
    assert not vm.config.exists()
    (tmp_path / "initrd.img").unlink()  # a start that fails before QEMU does too
    qemu.write_config(vm.config, ["/a"], {"TOKEN": "hunter2"})
    with Vm(vm) as running, pytest.raises(FileNotFoundError):
        running.start(TCG)
    assert not vm.config.exists()


def test_parse_console() -> None:
    log = b"[ 1.0] x\r\nNULLBOX-AGENT-START 1.8s\r\nNULLBOX-AGENT-EXIT 42\r\n[ 2.0] reboot: Power down\r\n"
    assert qemu.parse_console(log) == (42, None)
    assert qemu.parse_console(b"NULLBOX-GUEST-FAIL no root disk (virtio serial nullbox-root)\n") == (
        None,
        "no root disk (virtio serial nullbox-root)",
    )
    assert qemu.parse_console(b"agent: NULLBOX-AGENT-EXIT 0\n") == (None, None)  # only whole lines count


# -------------------------------------------------------------------------------------------- guest initramfs


def test_the_guest_init_is_a_static_executable() -> None:
    """It is the initramfs's only program: no loader, no libraries."""
    assert is_static_elf(guestimage.guest_init())


# ----------------------------------------------------------------------- which kernel (fake builds, no compile)


def fake_nullbox_build(build: Path, config: str = "CONFIG_PVH=y\nCONFIG_RD_ZSTD=y\n") -> Path:
    """build/kernel-nullbox/guest as a complete kernel.build run leaves it (build.json with today's key)."""
    out = kernel_build.variant_dir("guest", build)
    out.mkdir(parents=True)
    (out / "bzImage").write_bytes(b"MZ fake bzImage")
    (out / "vmlinux").write_bytes(b"not an ELF")
    (out / ".config").write_text(config)
    (out / "version").write_text("6.1.0-test-nullbox-guest\n")
    (out / "build.json").write_text(json.dumps(kernel_build.cache_key("guest", "6.1.0-test")))
    return out


def fake_debian_build(build: Path) -> Path:
    """build/kernel as image.build's kernel step leaves it (no modules: enough to pick and describe it)."""
    kernel = build / "kernel"
    (kernel / "deb" / "boot").mkdir(parents=True)
    (kernel / "modules").mkdir()
    (kernel / "vmlinuz").write_bytes(b"MZ fake vmlinuz")
    (kernel / "version").write_text("6.1.0-99-amd64\n")
    (kernel / "deb" / "boot" / "config-6.1.0-99-amd64").write_text("CONFIG_RD_ZSTD=y\n")
    return kernel


def test_the_nullbox_guest_kernel_is_chosen_when_built(tmp_path: Path) -> None:
    debian = fake_debian_build(tmp_path)
    assert guestimage.choose_kernel(tmp_path) is KernelKind.DEBIAN  # no NullBox build
    out = fake_nullbox_build(tmp_path)
    assert guestimage.choose_kernel(tmp_path) is KernelKind.NULLBOX
    chosen = guestimage.GuestKernel.from_build(tmp_path)
    assert chosen.kind is KernelKind.NULLBOX and chosen.version == "6.1.0-test-nullbox-guest"
    assert chosen.modules is None and chosen.vmlinux == out / "vmlinux" and chosen.vmlinuz == out / "bzImage"

    # either kernel on request, whatever the default
    other = guestimage.GuestKernel.from_build(tmp_path, KernelKind.DEBIAN)
    assert other.kind is KernelKind.DEBIAN and other.version == "6.1.0-99-amd64"
    assert other.modules == debian / "modules" and other.vmlinux is None
    assert guestimage.GuestKernel.from_build(tmp_path, KernelKind("nullbox")) == chosen

    # a build that kernel.build would redo is not "built": an interrupted one, one of another fragment, a lost output
    key = json.loads((out / "build.json").read_text())
    vmlinux = (out / "vmlinux").read_bytes()
    for change in ("fragment", "builder", "interrupted", "vmlinux"):
        if change in ("fragment", "builder"):
            (out / "build.json").write_text(json.dumps({**key, change: "0" * 64}))
        else:
            (out / ("build.json" if change == "interrupted" else "vmlinux")).unlink()
        assert guestimage.choose_kernel(tmp_path) is KernelKind.DEBIAN, change
        with pytest.raises(FileNotFoundError, match=r"python -m kernel\.build guest"):
            guestimage.GuestKernel.from_build(tmp_path, KernelKind.NULLBOX)
        (out / "build.json").write_text(json.dumps(key))
        (out / "vmlinux").write_bytes(vmlinux)
        assert guestimage.choose_kernel(tmp_path) is KernelKind.NULLBOX


def test_boot_kernel_of_a_nullbox_build_without_a_pvh_vmlinux_is_its_bzimage(tmp_path: Path) -> None:
    out = fake_nullbox_build(tmp_path)  # its vmlinux is no ELF at all
    assert guestimage.boot_kernel(tmp_path) == out / "bzImage"
    (out / ".config").write_text("CONFIG_RD_ZSTD=y\n")  # no CONFIG_PVH
    assert guestimage.boot_kernel(tmp_path, KernelKind.NULLBOX) == out / "bzImage"


NEWC_MAGIC = b"070701"


def initramfs_members(path: Path) -> dict[str, bytes]:
    """Name -> data of every member of an uncompressed newc initramfs (read by the host's cpio)."""
    archive = path.read_bytes()
    assert archive.startswith(NEWC_MAGIC)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=archive, cwd=tmp, check=True)
        root = Path(tmp)
        return {  # device nodes and directories as b"" (reading dev/console would read the console)
            str(f.relative_to(root)): f.read_bytes() if f.is_file() and not f.is_symlink() else b""
            for f in root.rglob("*")
        }


def test_the_nullbox_initramfs_is_the_init_alone(tmp_path: Path) -> None:
    """The compiled init, its mount points and two device nodes: no modules, no shell, no compression; cached per
    kernel kind."""
    cache = tmp_path / guestimage.CACHE_DIR
    cache.mkdir()
    debians = cache / "guest-initrd-debian-0123456789abcdef.img"  # another kernel's initramfs
    debians.write_bytes(b"x")
    out = fake_nullbox_build(tmp_path)
    image = guestimage.build_initramfs(tmp_path, KernelKind.NULLBOX)
    assert image.parent == cache and image.name.startswith("guest-initrd-nullbox-")
    members = initramfs_members(image)
    assert members.pop("init") == guestimage.guest_init()
    assert members == dict.fromkeys(
        ("dev", "dev/console", "dev/null", "proc", "sys", "lower", "overlay", "newroot"), b""
    )
    assert guestimage.build_initramfs(tmp_path) == image  # chosen by default, and cached

    (out / "version").write_text("6.1.1-test-nullbox-guest\n")  # another release of the kernel: a new image
    (out / "build.json").write_text(json.dumps(kernel_build.cache_key("guest", "6.1.0-test")))
    before = image.read_bytes()
    again = guestimage.build_initramfs(tmp_path, KernelKind.NULLBOX)
    assert again != image and again.read_bytes() == before
    assert not image.exists()  # the same kernel's older initramfs is replaced ...
    assert debians.exists()  # ... another kernel's stays (a benchmark boots both in one run)


# --------------------------------------------------------------------------------------------------- real boots


def require_qemu() -> None:
    if shutil.which(kvm.QEMU) is None:
        pytest.skip(f"{kvm.QEMU} is not installed")


@pytest.fixture(scope="module")
def debian_kernel() -> guestimage.GuestKernel:
    """Debian's appliance kernel (image.build's kernel step: cached after the first run)."""
    require_qemu()
    subprocess.run([sys.executable, "-m", "image.build", "kernel"], cwd=REPO, check=True, timeout=1800)
    return guestimage.GuestKernel.from_build(kernel=KernelKind.DEBIAN)


@pytest.fixture(scope="module")
def nullbox_kernel() -> guestimage.GuestKernel:
    """The NullBox guest kernel (kernel.build: a cache hit when built; about 4 min of compiling otherwise)."""
    require_qemu()
    subprocess.run([sys.executable, "-m", "kernel.build", "guest"], cwd=REPO, check=True, timeout=3600)
    return guestimage.GuestKernel.from_build(kernel=KernelKind.NULLBOX)


def test_initramfs_loads_modules_after_their_dependencies(debian_kernel: guestimage.GuestKernel) -> None:
    kernel = debian_kernel
    assert kernel.modules is not None
    tree = ModuleTree.scan(kernel.modules)
    entries = guestimage.initramfs_entries(b"\x7fELF init", kernel.version, tree)
    by_path = {e.path: e for e in entries}
    assert stat.S_IMODE(by_path["init"].mode) == 0o755 and by_path["init"].data == b"\x7fELF init"
    moddir = f"lib/modules/{kernel.version}"
    listed: list[str] = []
    for name in guestimage.MODULE_LISTS:
        lines = [line.split() for line in by_path[f"{moddir}/{name}"].data.decode().splitlines()]
        assert lines and all(kind in ("need", "want") and f"{moddir}/{path}" in by_path for kind, path in lines)
        listed += [Path(path).name for _, path in lines]
    assert len(listed) == len(set(listed))  # each module in one list only
    assert listed.index("virtio.ko") < listed.index("virtio_mmio.ko") < listed.index("virtio_blk.ko")
    assert listed.index("jbd2.ko") < listed.index("ext4.ko")
    initramfs = guestimage.build_initramfs(kernel=KernelKind.DEBIAN)
    assert initramfs.name.startswith("guest-initrd-debian-")
    assert f"{moddir}/nullbox.load" in initramfs_members(initramfs)
    assert guestimage.build_initramfs(kernel=KernelKind.DEBIAN) == initramfs  # cached by content


def test_boot_kernel_is_the_uncompressed_pvh_vmlinux(
    debian_kernel: guestimage.GuestKernel, nullbox_kernel: guestimage.GuestKernel
) -> None:
    assert nullbox_kernel.has_pvh  # kernel/guest.config asks for it
    assert guestimage.boot_kernel(kernel=KernelKind.NULLBOX) == nullbox_kernel.vmlinux  # as kernel.build left it
    assert nullbox_kernel.vmlinux is not None and guestimage.has_pvh_entry(nullbox_kernel.vmlinux.read_bytes())
    if not debian_kernel.has_pvh:
        pytest.skip("Debian's kernel has no PVH entry point")
    vmlinux = guestimage.boot_kernel(kernel=KernelKind.DEBIAN)
    assert vmlinux.parent.name == guestimage.CACHE_DIR  # extracted from the bzImage's XZ payload
    assert guestimage.has_pvh_entry(vmlinux.read_bytes())
    assert not guestimage.has_pvh_entry(debian_kernel.vmlinuz.read_bytes()[:4096])  # the bzImage is not an ELF
    assert guestimage.boot_kernel(kernel=KernelKind.DEBIAN) == vmlinux


@pytest.fixture(scope="module")
def agent_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("agent")
    return guestimage.pack_rootfs(build_agent_rootfs(tmp / "root"), tmp / "root.sqfs")


@dataclass(frozen=True)
class BootFiles:
    kernel: guestimage.GuestKernel
    vmlinux: Path  # what QEMU boots (-kernel)
    initramfs: Path
    rootfs: Path  # the agent's root image


@pytest.fixture(scope="module", params=list(KernelKind), ids=str)
def boot_files(request: pytest.FixtureRequest, agent_image: Path) -> BootFiles:
    """Everything to boot the test agent, once with each guest kernel."""
    kind = KernelKind(request.param)
    kernel: guestimage.GuestKernel = request.getfixturevalue(f"{kind}_kernel")
    vmlinux, initramfs = guestimage.guest_files(kernel=kind)
    return BootFiles(kernel, vmlinux, initramfs, agent_image)


def reported_kernel(console: str) -> str:
    """The kernel release the guest init printed (``init started, kernel <uname -r>``)."""
    found = re.search(r"^nullbox-guest: agent \S+: init started, kernel (\S+) ", console, re.MULTILINE)
    assert found, "the guest init never said which kernel it runs"
    return found.group(1)


def check_guest_kernel(files: BootFiles, console: str) -> None:
    release = reported_kernel(console)
    assert release == files.kernel.version
    assert release.endswith("-nullbox-guest") == (files.kernel.kind is KernelKind.NULLBOX)


@pytest.fixture
def tap() -> Iterator[GuestNet]:
    """A host TAP for the guest on a random /30 in 10.213.0.0/16 (the host netns is shared with whatever else runs
    here, so neither the name nor the subnet may be fixed); the host has the first address.  Removed afterwards."""
    name = f"nbq{uuid.uuid4().hex[:8]}"
    used = subprocess.run(["ip", "-4", "route", "show"], check=True, capture_output=True, text=True).stdout
    link = next(
        n
        for n in (IPv4Network(f"10.213.{random.randrange(256)}.{4 * random.randrange(64)}/30") for _ in range(100))
        if f"{n} " not in used
    )
    host, guest = list(link.hosts())
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{host}/30", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield GuestNet(name, IPv4Interface(f"{guest}/30"), host, "52:54:00:d5:4d:02")
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def boot(vm: QemuVM, timeout: float = 45.0) -> tuple[qemu.Outcome, int]:
    """Boot ``vm`` to completion; returns how it ended and the host wall clock (ns) when QEMU was started."""
    started_ns = time.time_ns()
    with Vm(vm) as running:
        running.start()
        assert not vm.config.exists(), "the config must be gone from the host once QEMU has it"
        outcome = running.wait(timeout)
    print(f"--- console of {vm.agent}:\n{outcome.console}", file=sys.stderr)
    return outcome, started_ns


@pytest.mark.skipif(os.geteuid() != 0, reason="the TAP needs root")
def test_agent_vm_boots_and_writes_to_ctxgraph(
    tmp_path: Path,
    server: ServerProcess,
    boot_files: BootFiles,
    tap: GuestNet,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = server.client()
    alpha_sock = Path(admin.register_agent("alpha")["socket"])
    beta_sock = Path(admin.register_agent("beta")["socket"])
    secret = "granted-" + uuid.uuid4().hex
    net = tap
    files = boot_files

    vm = QemuVM(
        agent="alpha",
        kernel=files.vmlinux,
        initramfs=files.initramfs,
        rootfs=files.rootfs,
        config=qemu.write_config(
            tmp_path / "alpha.cfg",
            [AGENT_PATH],
            agent_env("e2e/agent", "AGENT_SECRET", secret, ping=str(net.gateway)),
            "/work",
        ),
        console_log=tmp_path / "alpha.console",
        qmp_socket=tmp_path / "alpha.qmp",
        ctxgraph_socket=alpha_sock,
        net=net,
    )
    argv = qemu.qemu_argv(vm, qemu.detect_accel())
    assert not any(secret in a for a in argv)
    outcome, started_ns = boot(vm)

    assert outcome.qemu_status == 0, f"QEMU: {(tmp_path / 'alpha.console.qemu').read_text()}"
    check_guest_kernel(files, outcome.console)
    assert "reboot: Power down" in outcome.console  # the guest powered off (no reboot, no panic)
    assert outcome.guest_failure is None
    assert outcome.agent_status == 0
    assert "NULLBOX-AGENT-EXIT 0" in outcome.console
    assert f"the gateway {net.gateway} answers" in outcome.console
    assert "agent: in /work as alpha" in outcome.console
    assert "agent: the random pool has 256 bits" in outcome.console  # seeded from RDRAND: no virtio-rng needed
    assert secret not in outcome.console  # the agent never printed it; nothing else did either

    entries = admin.by_agent("alpha")["entries"]
    assert [(e["agent"], e["key"], e["value"]) for e in entries] == [("alpha", "e2e/agent", secret)]
    boot_to_write = (entries[0]["created_ns"] - started_ns) / 1e9
    with capsys.disabled():  # shown in the normal test output, not only with -s
        print(f"\n{files.kernel.version}: QEMU start -> first ctxgraph write {boot_to_write:.2f}s (bench/) ", end="")

    # A second agent, booted the same way on its own socket, cannot write as the first.
    beta = replace(
        vm,
        agent="beta",
        config=qemu.write_config(
            tmp_path / "beta.cfg", [AGENT_PATH], agent_env("e2e/beta", "AGENT_SECRET", "x", write_as="alpha")
        ),
        console_log=tmp_path / "beta.console",
        qmp_socket=tmp_path / "beta.qmp",
        ctxgraph_socket=beta_sock,
        net=None,
    )
    outcome, _ = boot(beta)
    assert outcome.qemu_status == 0
    assert outcome.agent_status == 5  # the agent's "ctxgraph refused" status
    assert '"code":"forbidden"' in outcome.console
    assert "cannot write as 'alpha'" in outcome.console
    assert admin.by_agent("beta")["entries"] == []
    assert [e["key"] for e in admin.by_agent("alpha")["entries"]] == ["e2e/agent"]


def test_the_power_button_ends_a_running_agent(tmp_path: Path, boot_files: BootFiles) -> None:
    """cage's polite stop: QMP system_powerdown -> ACPI power button -> the guest init TERMs the agent and reports."""
    vm = QemuVM(
        agent="sleeper",
        kernel=boot_files.vmlinux,
        initramfs=boot_files.initramfs,
        rootfs=boot_files.rootfs,
        config=qemu.write_config(tmp_path / "sleeper.cfg", ["/bin/sleep", "600"], {}),
        console_log=tmp_path / "sleeper.console",
        qmp_socket=tmp_path / "sleeper.qmp",
        ctxgraph_socket=tmp_path / "unused.sock",
        net=None,
    )
    with Vm(vm) as running:
        running.start()
        deadline = time.monotonic() + 60
        while b"NULLBOX-AGENT-START" not in vm.console_log.read_bytes():
            assert time.monotonic() < deadline, vm.console_log.read_text(errors="replace")
            time.sleep(0.1)
        assert vm.qmp_socket is not None
        qemu.qmp(vm.qmp_socket, "system_powerdown")
        outcome = running.wait(30)  # past that, wait() quits QEMU itself: no power-button line, no status 143
    print(f"--- console of sleeper:\n{outcome.console}", file=sys.stderr)
    check_guest_kernel(boot_files, outcome.console)
    assert "NULLBOX-POWER-BUTTON" in outcome.console
    assert outcome.agent_status == 128 + 15  # SIGTERM, sent by the guest init
    assert outcome.qemu_status == 0 and "reboot: Power down" in outcome.console


def test_an_ext4_root_image_boots(tmp_path: Path, boot_files: BootFiles) -> None:
    """Agent roots may be ext4 images (what does not mount as SquashFS the guest mounts as ext4; Debian loads ext4)."""
    image = tmp_path / "root.ext4"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    root = build_agent_rootfs(tmp_path / "root")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(image)], check=True)
    vm = QemuVM(
        agent="ext4",
        kernel=boot_files.vmlinux,
        initramfs=boot_files.initramfs,
        rootfs=image,
        config=qemu.write_config(tmp_path / "ext4.cfg", ["/bin/echo", "agent: on an ext4 root"], {}),
        console_log=tmp_path / "ext4.console",
        qmp_socket=tmp_path / "ext4.qmp",
        ctxgraph_socket=None,
    )
    outcome, _ = boot(vm)
    check_guest_kernel(boot_files, outcome.console)
    assert outcome.guest_failure is None and outcome.agent_status == 0
    assert "agent: on an ext4 root" in outcome.console
    assert "SQUASHFS" not in outcome.console  # the SquashFS attempt is silent


# What the agent sees of its /etc and its API mounts, one "fact: ..." line each.
ROOT_FACTS: Final = """\
echo "fact: etc $(busybox stat -c '%a %F' /etc)"
echo "fact: resolver $(busybox stat -c %F /etc/resolv.conf): $(cat /etc/resolv.conf)"
echo "fact: hosts $(cat /etc/hosts 2>&1)"
for m in /proc /sys /dev /tmp /run; do
    echo "fact: mount:$m $(busybox awk -v m=$m '$2 == m {print $3, $4}' /proc/mounts)"
done
echo "fact: init $(cat /proc/1/comm)"
"""


def etc_rootfs(root: Path, shape: str) -> Path:
    """The test agent's root with its /etc as a directory (mode 0751, the resolver a dangling symlink, as on a
    systemd image), as a symlink to /usr/etc, or missing."""
    build_agent_rootfs(root)
    etc = root / "etc"
    etc.rmdir()
    if shape == "directory":
        etc.mkdir()
        etc.chmod(0o751)
        (etc / "resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
        (etc / "hosts").write_text("127.0.0.1 image-hosts\n")
    elif shape == "symlink":
        (root / "usr" / "etc").mkdir(parents=True)
        (root / "usr" / "etc" / "hosts").write_text("127.0.0.1 usr-etc-hosts\n")
        etc.symlink_to("usr/etc")
    return root


def facts(console: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in re.findall(r"^fact: (.*?)\r?$", console, re.MULTILINE))


@pytest.mark.skipif(os.geteuid() != 0, reason="the TAP needs root")
@pytest.mark.parametrize("shape", ["directory", "symlink", "missing"])
def test_the_resolver_and_api_mounts_in_the_agent_root(
    tmp_path: Path, nullbox_kernel: guestimage.GuestKernel, tap: GuestNet, shape: str
) -> None:
    """The guest init writes the resolver into the overlay's upper /etc before mounting it when the image's /etc is
    a directory (the merged /etc keeps the image's mode and files), through the mounted root when it is a symlink
    (followed inside the root), and into a fresh /etc when there is none; /proc and /sys are init's, bound."""
    vmlinux, initramfs = guestimage.guest_files(kernel=KernelKind.NULLBOX)
    image = guestimage.pack_rootfs(etc_rootfs(tmp_path / "root", shape), tmp_path / "root.sqfs")
    vm = QemuVM(
        agent="etc",
        kernel=vmlinux,
        initramfs=initramfs,
        rootfs=image,
        config=qemu.write_config(tmp_path / "etc.cfg", ["/bin/sh", "-c", ROOT_FACTS], {}),
        console_log=tmp_path / "etc.console",
        net=replace(tap, dns=tap.gateway),
    )
    outcome, _ = boot(vm)
    assert outcome.guest_failure is None and outcome.agent_status == 0
    seen = facts(outcome.console)
    assert seen["resolver"] == f"regular file: nameserver {tap.gateway}"
    etc = {"directory": "751 directory", "symlink": "777 symbolic link", "missing": "755 directory"}
    assert seen["etc"] == etc[shape]  # stat does not follow the symlink: it is still one
    hosts = {
        "directory": "127.0.0.1 image-hosts",
        "symlink": "127.0.0.1 usr-etc-hosts",  # read through the symlink, inside the root
        "missing": "cat: can't open '/etc/hosts': No such file or directory",
    }
    assert seen["hosts"] == hosts[shape]
    assert seen["mount:/proc"] == "proc rw,nosuid,nodev,noexec,relatime"
    assert seen["mount:/sys"] == "sysfs rw,nosuid,nodev,noexec,relatime"
    assert seen["mount:/tmp"].startswith("tmpfs rw,nosuid,nodev,")
    assert seen["mount:/run"].startswith("tmpfs rw,nosuid,nodev,")
    assert seen["mount:/dev"].startswith("devtmpfs rw,nosuid,")
    assert seen["init"] == "init"  # the guest init's own /proc: the same process namespace


AGENT_UID = 70123  # no such user here; what cage.defaults.UID_BASE + slot would give an agent


def status_ids(status: str) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, filesystem), Groups and Umask (octal) from a /proc/PID/status text."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    ids = {name: [int(v) for v in fields[name].split()] for name in ("Uid", "Gid", "Groups")}
    return {**ids, "Umask": [int(fields["Umask"], 8)]}


def process_ids(pid: int) -> dict[str, list[int]]:
    return status_ids(Path(f"/proc/{pid}/status").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_nb_exec_runs_a_program_as_the_ids_it_is_given(tmp_path: Path) -> None:
    """cage/nb-exec.c: uid, gid, exactly the groups given, the umask; descriptors stay open; never root."""
    helper = guestimage.install_exec_helper(tmp_path / "nb-exec")
    as_agent = [str(helper), "70123", "70124", "36,69999", "027", "--"]
    done = subprocess.run([*as_agent, "cat", "/proc/self/status"], capture_output=True, text=True, check=True)
    ids = status_ids(done.stdout)
    assert ids == {"Uid": [70123] * 4, "Gid": [70124] * 4, "Groups": [36, 69999], "Umask": [0o027]}, done.stderr
    with tempfile.TemporaryFile() as kept:  # a descriptor passed down stays open across the exec
        fd = kept.fileno()
        argv = [*as_agent, "readlink", f"/proc/self/fd/{fd}"]
        link = subprocess.run(argv, check=False, pass_fds=(fd,), capture_output=True)
        assert link.returncode == 0 and link.stdout.startswith(b"/"), link.stderr
    for args, message in (
        (["0", "5", "-", "077"], "refusing uid 0 (root)"),
        (["5", "0", "-", "077"], "refusing gid 0 (root)"),
        (["5", "5", "36,0", "077"], "refusing group 0 (root)"),
        (["-5", "5", "-", "077"], "bad uid -5"),
        (["5", "5x", "-", "077"], "bad gid 5x"),
        (["5", "5", "36,", "077"], None),  # an empty list item is skipped by strtok: groups [36]
        (["5", "5", "-", "0778"], "bad umask 0778"),
        (["5", "5", "-", "1777"], "bad umask 1777"),
    ):
        done = subprocess.run([str(helper), *args, "--", "true"], capture_output=True, text=True, check=False)
        if message is None:
            assert done.returncode == 0, done.stderr
        else:
            assert (done.returncode, done.stderr) == (126, f"nb-exec: {message}\n"), args
    missing = subprocess.run([*as_agent, "/no/such"], check=False, capture_output=True, text=True)
    assert missing.returncode == 127 and "cannot execute /no/such" in missing.stderr
    usage = subprocess.run([*as_agent[:-1], "true"], check=False, capture_output=True, text=True)
    assert usage.returncode == 126 and usage.stderr.startswith("usage: nb-exec")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid and the TAP need root")
def test_qemu_runs_as_the_agent_uid(tmp_path: Path, server: ServerProcess, tap: GuestNet) -> None:
    """With ``uid`` QEMU is the agent's uid and gid and nothing else (whether nb-exec or subprocess drops the
    privileges), yet boots, pings and reaches ctxgraph: by path
    (reconnecting) when the uid can reach its socket, else through a connection cage opened (here: the pytest
    directory is 0700 root)."""
    kernel, initramfs = guestimage.guest_files(kernel=KernelKind.NULLBOX)
    image = guestimage.pack_rootfs(build_agent_rootfs(tmp_path / "root"), tmp_path / "root.sqfs")
    reachable = ServerProcess(Path(tempfile.mkdtemp(prefix="nbq-")) / "ctx")
    reachable.root.parent.chmod(0o711)  # as /run/nullbox: the agent's uid may pass
    try:
        reachable.start()
        outcomes = {}
        helper = guestimage.exec_helper_path()
        for agent, ctxgraph, net, exec_helper in (("alpha", reachable, tap, helper), ("beta", server, None, None)):
            admin = ctxgraph.client()
            sock = Path(admin.register_agent(agent, uid=AGENT_UID, gid=AGENT_UID)["socket"])
            env = agent_env(f"uid/{agent}", "TOKEN", f"tok-{agent}", ping=None if net is None else str(net.gateway))
            vm = QemuVM(
                agent=agent,
                kernel=kernel,
                initramfs=initramfs,
                rootfs=image,
                config=qemu.write_config(tmp_path / f"{agent}.cfg", [AGENT_PATH], env, "/work"),
                console_log=tmp_path / f"{agent}.console",
                qmp_socket=tmp_path / f"{agent}.qmp",
                ctxgraph_socket=sock,
                net=net,
                uid=AGENT_UID,
                exec_helper=exec_helper,  # alpha: through nb-exec; beta: subprocess drops the privileges itself
            )
            with Vm(vm) as running:
                running.start()
                assert not vm.config.exists()
                assert running.proc is not None
                ids = process_ids(running.proc.pid)
                assert ids == {"Uid": [AGENT_UID] * 4, "Gid": [AGENT_UID] * 4, "Groups": [], "Umask": [0o077]}, ids
                assert Path(f"/proc/{running.proc.pid}/exe").resolve().name.startswith("qemu-system")
                chardevs = option(running.argv, "-chardev")
                by_path = f"socket,id=ctx,path={sock},reconnect=1" in chardevs
                assert by_path is (ctxgraph is reachable), chardevs
                if net is not None:
                    assert option(running.argv, "-netdev")[0].startswith("tap,id=net0,fd=")
                outcome = running.wait(45)
            print(f"--- console of {agent}:\n{outcome.console}", file=sys.stderr)
            assert outcome.guest_failure is None and outcome.agent_status == 0, outcome.console
            entries = admin.by_agent(agent)["entries"]
            assert [(e["key"], e["value"]) for e in entries] == [(f"uid/{agent}", f"tok-{agent}")]
            outcomes[agent] = outcome
            admin.close()
        assert f"the gateway {tap.gateway} answers" in outcomes["alpha"].console
    finally:
        reachable.close()
        shutil.rmtree(reachable.root.parent, ignore_errors=True)
