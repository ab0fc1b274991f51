"""The boot pieces that need no full image: the KVM probe, QEMU's command line, the initramfs archive writer and
module ordering, and the init script's root-image check (run under the host's busybox sh)."""

from __future__ import annotations

import gzip
import os
import random
import shlex
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from cage.defaults import DEMO_ROOTFS
from image import initrd
from image.initrd import Inputs, ModuleTree
from image.verity import Verity
from nullbox import cpio, kvm
from nullbox.kvm import Accel
from nullctl.cli import build_parser, chosen_command
from qemu import runner
from qemu.runner import Options

REPO = Path(__file__).resolve().parent.parent.parent
INIT = REPO / "image" / "initramfs" / "init"
BUSYBOX = shutil.which("busybox")
QEMU = shutil.which(kvm.QEMU)
EPOCH = 1767225600
TCG = Accel("tcg", ("test",))


# ---------------------------------------------------------------------------------------------------- KVM probe


def _probe(tmp_path: Path, flags: str, modules: list[str], *, device: bool = True) -> Accel:
    dev = tmp_path / "kvm"
    if device:
        dev.write_bytes(b"")
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    for name in modules:
        (tmp_path / "module" / name).mkdir(parents=True)
    (tmp_path / "module").mkdir(exist_ok=True)
    return kvm.probe_kvm(device=dev, cpuinfo=tmp_path / "cpuinfo", modules=tmp_path / "module", run_guest=False)


def test_probe_wants_a_kvm_device(tmp_path: Path) -> None:
    accel = _probe(tmp_path, "vmx", ["kvm_intel"], device=False)
    assert accel.name == "tcg"
    assert "cannot be opened" in accel.explain()


def test_probe_distrusts_kvm_without_vmx_or_svm(tmp_path: Path) -> None:
    accel = _probe(tmp_path, "hypervisor", ["kvm"])
    assert accel.name == "tcg"
    assert "neither vmx nor svm" in accel.explain()


def test_probe_distrusts_a_pvm_only_kvm(tmp_path: Path) -> None:
    accel = _probe(tmp_path, "svm", ["kvm", "kvm_pvm"])
    assert accel.name == "tcg"
    assert "kvm_pvm" in accel.explain()


def test_probe_accepts_hardware_virtualisation(tmp_path: Path) -> None:
    accel = _probe(tmp_path, "vmx", ["kvm", "kvm_intel"])
    assert accel.name == "kvm"
    assert "vmx" in accel.explain()


def test_probe_says_tcg_on_this_host() -> None:
    """This host's /dev/kvm is a paravirtual KVM without vmx/svm: a Debian kernel hangs under it."""
    flags = {
        w for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags") for w in line.split()
    }
    if flags & {"vmx", "svm"} and not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("this host has hardware virtualisation")
    accel = kvm.probe_kvm(run_guest=False)
    assert accel.name == "tcg"
    assert accel.explain().startswith("accelerator TCG: ")
    assert len(accel.reasons) >= 1


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_tiny_probe_guest_runs_under_tcg() -> None:
    """The guest the probe runs under -accel kvm really reaches its exit port (shown here under TCG)."""
    ok, why = kvm.tiny_guest_runs("tcg", timeout=30)
    assert ok, why


# -------------------------------------------------------------------------------------------------- QEMU argv


def _opts(tmp_path: Path, **kwargs: object) -> Options:
    return Options(build=tmp_path / "build", **kwargs)  # type: ignore[arg-type]


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def test_bios_argv(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    argv = runner.qemu_argv(opts, TCG, vsock=False)
    build = tmp_path / "build"
    assert argv[0] == "qemu-system-x86_64"
    assert _values(argv, "-machine") == ["q35"]
    assert _values(argv, "-accel") == ["tcg,thread=multi"]
    assert _values(argv, "-m") == ["1024"]
    drives = _values(argv, "-drive")
    devices = _values(argv, "-device")
    assert f"file={build}/nullbox.iso,format=raw,if=none,id=cd,media=cdrom,readonly=on" in drives
    assert "ide-cd,drive=cd,bootindex=0" in devices
    assert f"file={build}/run/data.img,format=raw,if=none,id=data,discard=unmap" in drives
    assert "virtio-blk-pci,drive=data,serial=nullbox-data" in devices
    assert "virtio-net-pci,netdev=n0,romfile=" in devices
    assert _values(argv, "-netdev") == ["user,id=n0"]
    assert "virtio-serial-pci,id=vser" in devices
    assert "virtserialport,bus=vser.0,chardev=ctl,name=org.nullbox.ctl" in devices
    assert f"socket,id=ctl,path={build}/run/ctl.sock,server=on,wait=off" in _values(argv, "-chardev")
    assert not any("pflash" in d for d in drives)
    assert "-kernel" not in argv
    assert not any(d.startswith("vhost-vsock") for d in devices)


def test_uefi_argv(tmp_path: Path) -> None:
    argv = runner.qemu_argv(_opts(tmp_path, uefi=True, log=tmp_path / "console.log"), TCG, vsock=True)
    drives = _values(argv, "-drive")
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={runner.OVMF_CODE}" in drives
    assert f"if=pflash,format=raw,unit=1,file={tmp_path}/build/run/OVMF_VARS.fd" in drives
    assert "ide-cd,drive=cd,bootindex=0" in _values(argv, "-device")
    assert "vhost-vsock-pci,guest-cid=3" in _values(argv, "-device")
    assert f"stdio,id=con,mux=on,logfile={tmp_path}/console.log" in _values(argv, "-chardev")


def test_direct_argv(tmp_path: Path) -> None:
    opts = _opts(tmp_path, direct=True, no_data_disk=True, memory=512, append="loglevel=7", extra=["-no-reboot"])
    argv = runner.qemu_argv(opts, Accel("kvm", ("test",)), vsock=False)
    build = tmp_path / "build"
    assert _values(argv, "-kernel") == [f"{build}/boot/vmlinuz"]
    assert _values(argv, "-initrd") == [f"{build}/initrd.img"]
    (cmdline,) = _values(argv, "-append")
    assert "console=ttyS0,115200" in cmdline.split()
    assert "nullbox.root=serial:nullbox-root" in cmdline.split()
    assert cmdline.endswith(" loglevel=7")
    drives = _values(argv, "-drive")
    assert f"file={build}/rootfs.squashfs,format=raw,if=none,id=root,readonly=on" in drives
    assert "virtio-blk-pci,drive=root,serial=nullbox-root" in _values(argv, "-device")
    assert not any("id=cd" in d or "id=data" in d for d in drives)
    assert _values(argv, "-accel") == ["kvm"]
    assert _values(argv, "-cpu") == ["host"]
    assert _values(argv, "-m") == ["512"]
    assert argv[-1] == "-no-reboot"


def test_argv_escapes_commas_in_paths(tmp_path: Path) -> None:
    argv = runner.qemu_argv(_opts(tmp_path, iso=tmp_path / "a,b.iso"), TCG, vsock=False)
    assert f"file={tmp_path}/a,,b.iso,format=raw,if=none,id=cd,media=cdrom,readonly=on" in _values(argv, "-drive")


def test_command_line_parsing(tmp_path: Path) -> None:
    ours = ["--direct", "--uefi", "--no-data-disk", "--memory", "2048", "--timeout", "60", "--build", str(tmp_path)]
    opts, accel, print_only = runner.parse_args([*ours, "--", "-no-reboot", "-s"])
    assert (opts.direct, opts.uefi, opts.data_path, opts.memory, opts.timeout) == (True, True, None, 2048, 60.0)
    assert opts.extra == ["-no-reboot", "-s"]
    assert opts.ctl_socket == tmp_path / "run" / "ctl.sock"
    assert (accel, print_only) == ("auto", False)
    with pytest.raises(SystemExit):
        runner.parse_args(["--direct", "--iso", "x.iso"])
    with pytest.raises(SystemExit):
        runner.parse_args(["--append", "loglevel=7"])


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 is not installed")
def test_prepare_makes_a_labelled_data_disk_once(tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "nullbox.iso").write_bytes(b"")
    opts = Options(build=build)
    notes = runner.prepare(opts)
    assert opts.data_path is not None
    assert any("created the data disk" in n for n in notes)
    assert opts.data_path.stat().st_size == 1 << 30
    assert opts.data_path.stat().st_blocks * 512 < 64 << 20  # sparse
    label = subprocess.run(["e2label", str(opts.data_path)], capture_output=True, text=True, check=True).stdout
    assert label.strip() == "NULLBOX-DATA"
    assert runner.prepare(opts) == []  # never re-created, never re-formatted


def test_prepare_refuses_a_state_dir_in_use(tmp_path: Path) -> None:
    import socket

    opts = Options(build=tmp_path, state=tmp_path / "state", no_data_disk=True)
    (tmp_path / "nullbox.iso").write_bytes(b"")
    opts.state_dir.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(opts.ctl_socket))
        server.listen()
        with pytest.raises(FileExistsError, match="in use"):
            runner.prepare(opts)
    assert runner.prepare(opts) == []  # closed: stale, removed
    assert not opts.ctl_socket.exists()


def test_prepare_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"rootfs\.squashfs"):
        runner.prepare(Options(build=tmp_path, direct=True, no_data_disk=True))


# ------------------------------------------------------------------------------------------------ the initramfs


def _fake_elf(modinfo: dict[str, str]) -> bytes:
    """A minimal little-endian ELF64 relocatable file with a .modinfo section, like a kernel module."""
    info = b"".join(f"{k}={v}\0".encode() for k, v in modinfo.items())
    names = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    names_off = data_off + len(info)
    sh_off = (names_off + len(names) + 7) & ~7
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)
    sections = bytes(64)  # the null section
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(info), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, names_off, len(names), 0, 0, 1, 0)
    body = header + info + names
    return body + bytes(sh_off - len(body)) + sections


def _fake_tree(root: Path, modules: dict[str, dict[str, str]], builtin: list[str] = []) -> ModuleTree:  # noqa: B006
    for path, info in modules.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(_fake_elf(info))
    (root / "modules.builtin").write_text("".join(f"{b}\n" for b in builtin))
    return ModuleTree.scan(root)


def test_modinfo_reads_the_modinfo_section() -> None:
    info = initrd.modinfo(_fake_elf({"depends": "a,b-c", "softdep": "pre: crc32c post: x", "license": "GPL"}))
    assert info["depends"] == ["a,b-c"]
    assert initrd.module_dependencies(info) == ["a", "b_c", "crc32c"]


def test_modules_load_after_their_dependencies(tmp_path: Path) -> None:
    tree = _fake_tree(
        tmp_path,
        {
            "kernel/fs/ext4.ko": {"depends": "jbd2,mbcache,crc16", "softdep": "pre: crc32c"},
            "kernel/fs/jbd2.ko": {"depends": ""},
            "kernel/fs/mbcache.ko": {"depends": ""},
            "kernel/lib/crc16.ko": {"depends": ""},
            "kernel/drivers/usb-storage.ko": {"depends": "usbcore"},
            "kernel/drivers/usbcore.ko": {"depends": ""},
            "kernel/drivers/uas.ko": {"depends": "usb-storage,usbcore"},
        },
        builtin=["kernel/crypto/crc32c_generic.ko"],
    )
    order = initrd.load_order(tree, [("usb_storage", False), ("ext4", True), ("uas", False), ("crc32c_generic", True)])
    paths = [p for p, _ in order]
    assert paths == [
        "kernel/drivers/usbcore.ko",
        "kernel/drivers/usb-storage.ko",
        "kernel/fs/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/lib/crc16.ko",
        "kernel/fs/ext4.ko",
        "kernel/drivers/uas.ko",
    ]
    assert dict(order)["kernel/fs/jbd2.ko"] is True
    assert dict(order)["kernel/drivers/usbcore.ko"] is False
    with pytest.raises(ValueError, match="neither"):
        initrd.load_order(tree, [("nosuch", True)])
    assert initrd.load_order(tree, [("nosuch", False)]) == []


def test_a_dependency_cycle_is_an_error(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path, {"a.ko": {"depends": "b"}, "b.ko": {"depends": "a"}})
    with pytest.raises(ValueError, match="cycle"):
        initrd.load_order(tree, [("a", True)])


def _inputs(applets: list[str], modules: list[tuple[str, bool, bytes]] | None = None) -> Inputs:
    return Inputs(
        init=b"#!/bin/sh\necho hi\n",
        busybox=b"\x7fELF fake busybox",
        applets=applets,
        kernel_version="6.1.0-99-amd64",
        modules=modules
        if modules is not None
        else [("kernel/a.ko", True, b"A" * 5), ("kernel/x/kvm-intel.ko", False, b"B" * 3)],
        verity=Verity(data_blocks=3, hash_blocks=1, root_hash="ab" * 32, salt="cd" * 32, image_sha256="ef" * 32),
        nb_verity=b"\x7fELF fake nb-verity",
        late=frozenset({"kernel/x/kvm-intel.ko"}),
    )


def _read_newc(archive: bytes) -> list[tuple[str, int, int, int, int, bytes]]:
    """(name, mode, uid, mtime, nlink, data) of every member, checking the format as it goes."""
    members: list[tuple[str, int, int, int, int, bytes]] = []
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        f = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        assert archive[pos + 110 + namesize - 1] == 0
        pos += 110 + namesize
        pos += -pos % 4
        data = archive[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return members
        members.append((name, f[1], f[2], f[5], f[4], data))


def test_initramfs_archive_is_reproducible_and_well_formed() -> None:
    applets = ["bin/sh", "sbin/insmod", "usr/bin/sha256sum", "bin/mount", "sbin/switch_root"]
    first = initrd.initramfs(_inputs(applets), EPOCH)
    shuffled = applets[:]
    random.Random(1).shuffle(shuffled)
    assert initrd.initramfs(_inputs(shuffled), EPOCH) == first
    assert initrd.initramfs(_inputs(applets), EPOCH + 1) != first
    members = _read_newc(first)
    names = [m[0] for m in members]
    assert names == sorted(names)
    assert {m[2] for m in members} == {0}  # uid
    assert {m[3] for m in members} == {EPOCH}
    by_name = {m[0]: m for m in members}
    assert stat.S_ISCHR(by_name["dev/console"][1])
    assert by_name["init"][1] == stat.S_IFREG | 0o755
    assert by_name["bin/sh"][5] == b"/bin/busybox"
    assert stat.S_ISLNK(by_name["bin/sh"][1])
    assert stat.S_ISDIR(by_name["usr/bin"][1])  # parents are added
    assert by_name["etc/nullbox/rootfs.verity"][5] == b"3 1 " + b"ab" * 32 + b" " + b"cd" * 32 + b"\n"
    assert by_name["bin/nb-verity"][1] == stat.S_IFREG | 0o755
    moddir = "lib/modules/6.1.0-99-amd64"
    assert by_name[f"{moddir}/nullbox.load"][5] == b"need kernel/a.ko\n"
    assert by_name[f"{moddir}/nullbox.load-late"][5] == b"want:vmx kernel/x/kvm-intel.ko\n"
    assert by_name[f"{moddir}/kernel/a.ko"][5] == b"AAAAA"
    assert gzip.compress(first, mtime=0) == gzip.compress(first, mtime=0)


def test_initramfs_for_a_kernel_without_modules_has_no_lib_modules() -> None:
    """The NullBox kernel has everything built in: no module lists, no .ko files, no lib/modules directory."""
    members = {m[0]: m for m in _read_newc(initrd.initramfs(_inputs(["bin/sh", "sbin/insmod"], modules=[]), EPOCH))}
    assert not [name for name in members if name == "lib" or name.startswith("lib/")]
    assert {"init", "bin/busybox", "bin/nb-verity", "etc/nullbox/rootfs.verity", "dev/console"} <= set(members)
    assert initrd.kernel_modules(None) == ([], frozenset())


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_host_cpio_reads_the_archive(tmp_path: Path) -> None:
    archive = initrd.initramfs(_inputs(["bin/sh"]), EPOCH)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True).stdout
    assert b"etc/nullbox/rootfs.verity" in listing.split(b"\n")
    assert b"dev/console" in listing.split(b"\n")


def test_archive_rejects_bad_paths_and_hashes() -> None:
    with pytest.raises(ValueError, match="bad archive path"):
        cpio.newc_archive([cpio.regular("../etc/passwd", b"")], EPOCH)
    with pytest.raises(ValueError, match="twice"):
        cpio.newc_archive([cpio.regular("a", b""), cpio.regular("a", b"")], EPOCH)
    bad = Inputs(b"", b"", [], "v", [], Verity(1, 0, "not-a-hash", "", "ef" * 32), b"")
    with pytest.raises(ValueError, match="root hash 'not-a-hash'"):
        initrd.entries(bad)


def test_compression_follows_the_kernel_config() -> None:
    assert initrd.kernel_compression("CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n") == "zstd"
    assert initrd.kernel_compression("CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n") == "gzip"


def test_static_busybox_detection() -> None:
    assert not initrd.is_static_elf(Path("/usr/bin/env").read_bytes())
    if Path("/bin/busybox").exists():
        assert initrd.is_static_elf(Path("/bin/busybox").read_bytes())


def test_real_kernel_modules_order() -> None:
    """With the kernel step built: every wanted module resolves, and ext4 comes after jbd2."""
    modules = REPO / "build" / "kernel" / "modules"
    if not modules.is_dir():
        pytest.skip("build/kernel is not built (python -m image.build kernel)")
    order = [p for p, _ in initrd.load_order(ModuleTree.scan(modules), initrd.BOOT_MODULES + initrd.LATE_MODULES)]
    names = [initrd.module_name(p) for p in order]
    assert names.index("jbd2") < names.index("ext4")
    assert names.index("virtio_pci") < names.index("virtio_blk")
    assert names.index("cdrom") < names.index("sr_mod")
    assert {"isofs", "squashfs", "loop", "virtio_console", "virtio_net"} <= set(names)


# ------------------------------------------------------------------------------------------------- /init script


@pytest.fixture
def busybox_path(tmp_path: Path) -> str:
    """A PATH of busybox applets only, as in the initramfs."""
    if BUSYBOX is None:
        pytest.skip("busybox is not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        os.symlink(BUSYBOX, bindir / applet)
    return str(bindir)


def _init_shell(path: str, script: str) -> subprocess.CompletedProcess[str]:
    """Source /init (not as PID 1, so it only defines its functions) and run ``script`` under busybox sh."""
    assert BUSYBOX is not None
    return subprocess.run(
        [BUSYBOX, "sh", "-c", f'. "$1"; {script}', "sh", str(INIT)],
        capture_output=True,
        text=True,
        env={"PATH": path},
        timeout=30,
        check=False,
    )


def test_init_script_parses() -> None:
    if BUSYBOX is None:
        pytest.skip("busybox is not installed")
    subprocess.run([BUSYBOX, "sh", "-n", str(INIT)], check=True)
    assert INIT.stat().st_mode & 0o111


def test_init_hands_the_verity_table_to_nb_verity(tmp_path: Path, busybox_path: str) -> None:
    """nb_verity_open: read-only loop devices for the image and tree files, and the table from /etc/nullbox (the
    kernel side, with block devices, is tests/image/test_verity.py's VM test); nb-verity is a recorder here."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "rootfs.verity").write_text(f"3 1 {'ab' * 32} {'cd' * 32}\n")
    recorder = Path(busybox_path) / "nb-verity"
    recorder.write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\necho /dev/dm-7\n')
    recorder.chmod(0o755)
    # a shell function wins over busybox's own applet; each -f answers the next free device (a counter file: the
    # calls run in command substitutions)
    counter = tmp_path / "loops"
    counter.write_text("5")
    losetup = (
        f'losetup() {{ n=$(cat "{counter}"); if [ "$1" = -f ]; then echo /dev/loop$n; '
        f'else echo "LOSETUP $*" >&2; echo $((n + 1)) >"{counter}"; fi; }}'
    )
    done = _init_shell(busybox_path, f'{losetup}; NB_ETC="{etc}"; nb_verity_open /nb/image /nb/tree && echo OPENED')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "ARG nullbox-root",
        "ARG 24",
        f"ARG 1 /dev/loop5 /dev/loop6 4096 4096 3 0 sha256 {'ab' * 32} {'cd' * 32}",
        "/dev/dm-7",
        "OPENED",
    ]
    assert done.stderr.splitlines() == ["LOSETUP -r /dev/loop5 /nb/image", "LOSETUP -r /dev/loop6 /nb/tree"]
    (etc / "rootfs.verity").unlink()
    assert _init_shell(busybox_path, f'NB_ETC="{etc}"; nb_verity_open a b || echo REFUSED').stdout.endswith("REFUSED\n")


def test_init_fail_never_powers_off_unless_pid_1(busybox_path: str) -> None:
    done = _init_shell(busybox_path, 'nb_fail "something broke"; echo "returned $?"')
    assert done.stdout.splitlines() == ["NullBox: something broke", "returned 1"]


def test_grub_config_uses_the_serial_console() -> None:
    text = (REPO / "image" / "grub.cfg").read_text()
    assert "serial --unit=0 --speed=115200" in text
    assert "terminal_input serial console" in text
    assert "terminal_output serial console" in text
    assert "linux /boot/vmlinuz" in text
    assert "initrd /boot/initrd.img" in text
    assert "console=ttyS0,115200" in text


def test_the_printed_how_to_names_the_control_port_and_real_nullctl_commands(tmp_path: Path) -> None:
    """``make run`` ends with what to type next: every nullctl line must be a command nullctl accepts."""
    lines = runner.how_to(Options(state=tmp_path / "vm"))
    address = f"serial:{(tmp_path / 'vm' / 'ctl.sock').resolve()}"
    assert lines[0] == f"control port: nullctl --connect {address}"
    assert f"  export NULLCTL_CONNECT={address}" in lines
    commands = [
        shlex.split(part)
        for line in lines
        for part in line.replace("echo demo-token |", "").split("&&")
        if "nullctl " in part and "--connect" not in part
    ]
    assert len(commands) == 6
    for argv in commands:
        assert argv[0].endswith("nullctl"), argv
        build_parser(chosen_command(argv[1:])).parse_args(argv[1:])  # raises on anything nullctl would refuse
    assert ["agent", "apply", "examples/agents/demo", "--rootfs", str(DEMO_ROOTFS)] in [a[1:] for a in commands]
    assert (runner.REPO / "examples/agents/demo/AGENT.toml").is_file()
