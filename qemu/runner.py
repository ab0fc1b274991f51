"""Boot the appliance under QEMU: ``qemu/run [--iso PATH | --direct] [--uefi] [--log FILE] [--data-disk PATH]
[--no-data-disk] [--memory MB] [--timeout S] [-- extra qemu args]``.

- KVM only when nullbox.kvm's probe shows it really runs guests (this build host's PVM /dev/kvm does not);
  otherwise TCG.  ``--accel`` overrides.
- q35, virtio everywhere: virtio-net on user-mode networking, virtio-rng, the data disk (virtio-blk, serial
  nullbox-data), the control port (virtio-serial port org.nullbox.ctl whose host side is the unix socket
  <state>/ctl.sock: ``nullctl --connect serial:<state>/ctl.sock``), vhost-vsock when /dev/vhost-vsock exists.
- The data disk, <state>/data.img by default, is created on the host on first use: 1 GiB sparse,
  ``mkfs.ext4 -L NULLBOX-DATA``.  The appliance never formats anything itself.
- ``--uefi`` boots OVMF (its variable store copied to <state>/OVMF_VARS.fd); BIOS is SeaBIOS.
- ``--direct`` skips firmware and the ISO: QEMU loads build/boot/vmlinuz and build/initrd.img itself and the
  SquashFS and its dm-verity hash tree are read-only virtio disks with serials nullbox-root and nullbox-hash, named
  on the kernel command line by ``nullbox.root=serial:nullbox-root nullbox.hash=serial:nullbox-hash`` (see
  image/initramfs/init); ``--append`` adds to that command line
  (e.g. ``loglevel=7``, ``nullbox.onfail=halt``).
- The serial console is on stdio (Ctrl-A X quits, Ctrl-A C is the QEMU monitor); ``--log`` also copies it to a
  file.  ``--timeout`` stops QEMU after that many seconds (exit status 124).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cage.defaults import DEMO_ROOTFS
from nullbox.kvm import QEMU, Accel, probe_kvm

REPO: Final = Path(__file__).resolve().parent.parent
OVMF_CODE: Final = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS: Final = Path("/usr/share/OVMF/OVMF_VARS.fd")
VHOST_VSOCK: Final = Path("/dev/vhost-vsock")
DATA_LABEL: Final = "NULLBOX-DATA"
DATA_SIZE: Final = 1 << 30
CTL_PORT: Final = "org.nullbox.ctl"
ROOT_SERIAL: Final = "nullbox-root"
HASH_SERIAL: Final = "nullbox-hash"  # the root image's dm-verity hash tree
KERNEL_CMDLINE: Final = "console=ttyS0,115200 quiet panic=10"
TIMEOUT_STATUS: Final = 124

# ------------------------------------------------------------------------------------------------------- options


@dataclass
class Options:
    build: Path = REPO / "build"
    state: Path | None = None  # default: <build>/run
    iso: Path | None = None  # default: <build>/nullbox.iso
    direct: bool = False
    uefi: bool = False
    log: Path | None = None
    data_disk: Path | None = None  # default: <state>/data.img
    no_data_disk: bool = False
    memory: int = 1024
    cpus: int = 2
    timeout: float | None = None
    cid: int = 3
    append: str = ""  # more kernel command line (--direct)
    extra: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.state or self.build / "run"

    @property
    def iso_path(self) -> Path:
        return self.iso or self.build / "nullbox.iso"

    @property
    def data_path(self) -> Path | None:
        return None if self.no_data_disk else (self.data_disk or self.state_dir / "data.img")

    @property
    def ctl_socket(self) -> Path:
        return self.state_dir / "ctl.sock"

    @property
    def ovmf_vars(self) -> Path:
        return self.state_dir / "OVMF_VARS.fd"


def _v(path: Path) -> str:
    """A path as a QEMU option value: commas are doubled."""
    return str(path).replace(",", ",,")


def qemu_argv(opts: Options, accel: Accel, *, vsock: bool | None = None) -> list[str]:
    """The QEMU command line; no side effects (see prepare())."""
    argv = [QEMU, "-name", "nullbox", "-nodefaults", "-no-user-config", "-machine", "q35"]
    if accel.name == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    argv += ["-smp", str(opts.cpus), "-m", str(opts.memory), "-display", "none"]
    console = "stdio,id=con,mux=on" + (f",logfile={_v(opts.log)}" if opts.log else "")
    argv += ["-chardev", console, "-serial", "chardev:con", "-mon", "chardev=con,mode=readline"]
    if opts.uefi:
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_v(OVMF_CODE)}"]
        argv += ["-drive", f"if=pflash,format=raw,unit=1,file={_v(opts.ovmf_vars)}"]
    if opts.direct:
        cmdline = f"{KERNEL_CMDLINE} nullbox.root=serial:{ROOT_SERIAL} nullbox.hash=serial:{HASH_SERIAL} {opts.append}"
        cmdline = cmdline.strip()
        argv += ["-kernel", str(opts.build / "boot" / "vmlinuz"), "-initrd", str(opts.build / "initrd.img")]
        argv += ["-append", cmdline]
        argv += ["-drive", f"file={_v(opts.build / 'rootfs.squashfs')},format=raw,if=none,id=root,readonly=on"]
        argv += ["-device", f"virtio-blk-pci,drive=root,serial={ROOT_SERIAL}"]
        argv += ["-drive", f"file={_v(opts.build / 'rootfs.verity')},format=raw,if=none,id=hash,readonly=on"]
        argv += ["-device", f"virtio-blk-pci,drive=hash,serial={HASH_SERIAL}"]
    else:
        argv += ["-drive", f"file={_v(opts.iso_path)},format=raw,if=none,id=cd,media=cdrom,readonly=on"]
        argv += ["-device", "ide-cd,drive=cd,bootindex=0"]
    if opts.data_path is not None:
        argv += ["-drive", f"file={_v(opts.data_path)},format=raw,if=none,id=data,discard=unmap"]
        argv += ["-device", "virtio-blk-pci,drive=data,serial=nullbox-data"]
    argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="]
    argv += ["-device", "virtio-rng-pci"]
    argv += ["-device", "virtio-serial-pci,id=vser"]
    argv += ["-chardev", f"socket,id=ctl,path={_v(opts.ctl_socket)},server=on,wait=off"]
    argv += ["-device", f"virtserialport,bus=vser.0,chardev=ctl,name={CTL_PORT}"]
    if VHOST_VSOCK.exists() if vsock is None else vsock:
        argv += ["-device", f"vhost-vsock-pci,guest-cid={opts.cid}"]
    return argv + opts.extra


def create_data_disk(path: Path) -> None:
    """A 1 GiB sparse ext4 image labelled NULLBOX-DATA, made on the host (the appliance never formats)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.truncate(DATA_SIZE)
    argv = ["mkfs.ext4", "-F", "-q", "-L", DATA_LABEL, "-E", "root_owner=0:0", str(partial)]
    subprocess.run(argv, check=True)
    partial.replace(path)


def socket_is_live(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path`` (a stale one is just removed)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def prepare(opts: Options) -> list[str]:
    """Check the inputs and create what the VM needs on the host; returns notes for the user."""
    notes: list[str] = []
    needed = [opts.build / "boot" / "vmlinuz", opts.build / "initrd.img", opts.build / "rootfs.squashfs"]
    needed.append(opts.build / "rootfs.verity")
    needed = needed if opts.direct else [opts.iso_path]
    if opts.uefi:
        needed += [OVMF_CODE, OVMF_VARS]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)} (build the image first: python -m image.build)")
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    data = opts.data_path
    if data is not None and not data.exists():
        create_data_disk(data)
        notes.append(f"created the data disk {data} (1 GiB sparse, ext4 {DATA_LABEL})")
    if opts.uefi and not opts.ovmf_vars.exists():
        shutil.copyfile(OVMF_VARS, opts.ovmf_vars)
    if socket_is_live(opts.ctl_socket):
        raise FileExistsError(f"{opts.ctl_socket} is in use: another VM runs with this state (use --state DIR)")
    opts.ctl_socket.unlink(missing_ok=True)
    if opts.log:
        opts.log.parent.mkdir(parents=True, exist_ok=True)
    return notes


def run(opts: Options, accel: Accel) -> int:
    argv = qemu_argv(opts, accel)
    say(accel.explain())
    for note in prepare(opts):
        say(note)
    say("console: Ctrl-A X quits, Ctrl-A C switches to the QEMU monitor")
    say("$ " + " ".join(argv))
    for line in how_to(opts):
        say(line)
    with subprocess.Popen(argv) as proc:
        try:
            return proc.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            say(f"timeout: stopping QEMU after {opts.timeout:g}s")
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            return TIMEOUT_STATUS
        except KeyboardInterrupt:
            proc.terminate()
            return 130


def how_to(opts: Options) -> list[str]:
    """What to type next, in another terminal on this host: the control port's address and a first agent."""
    nullctl = REPO / ".venv" / "bin" / "nullctl"
    shown = nullctl.relative_to(Path.cwd()) if nullctl.is_relative_to(Path.cwd()) else nullctl
    return [
        f"control port: nullctl --connect serial:{opts.ctl_socket.resolve()}",
        "try, from another terminal (docs/guide.md explains each step):",
        f"  export NULLCTL_CONNECT=serial:{opts.ctl_socket.resolve()}",
        f"  {shown} status",
        f"  {shown} agent apply examples/agents/demo --rootfs {DEMO_ROOTFS}",
        f"  echo demo-token | {shown} secret set DEMO_TOKEN && {shown} secret grant DEMO_TOKEN demo",
        f"  {shown} agent start demo && {shown} ctx watch demo/",
    ]


def say(message: str) -> None:
    print(f"qemu/run: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> tuple[Options, str, bool]:
    parser = argparse.ArgumentParser(prog="qemu/run", description=__doc__.split("\n\n")[0].split(": ")[0])
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--iso", type=Path, help="the ISO to boot (default: build/nullbox.iso)")
    media.add_argument("--direct", action="store_true", help="boot build/boot/vmlinuz + build/initrd.img directly")
    parser.add_argument("--uefi", action="store_true", help="boot with OVMF instead of SeaBIOS")
    parser.add_argument("--log", type=Path, help="also write the serial console to this file")
    disk = parser.add_mutually_exclusive_group()
    disk.add_argument("--data-disk", type=Path, help="the NULLBOX-DATA disk image (default: <state>/data.img)")
    disk.add_argument("--no-data-disk", action="store_true", help="no data disk: /var is a tmpfs")
    parser.add_argument("--memory", type=int, default=1024, metavar="MB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, metavar="S", help="stop QEMU after S seconds (exit status 124)")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    parser.add_argument("--build", type=Path, default=REPO / "build", help="the build directory (default: build)")
    parser.add_argument("--state", type=Path, help="data disk, control socket, UEFI vars (default: <build>/run)")
    parser.add_argument("--cid", type=int, default=3, help="vsock guest CID when vhost-vsock is used")
    parser.add_argument("--append", default="", metavar="ARGS", help="more kernel command line (--direct only)")
    parser.add_argument("--print-argv", action="store_true", help="print the QEMU command line and exit")
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    if args.append and not args.direct:
        parser.error("--append needs --direct (the ISO's command line is in its grub.cfg)")
    opts = Options(
        build=args.build.resolve(),
        state=args.state.resolve() if args.state else None,
        iso=args.iso.resolve() if args.iso else None,
        direct=args.direct,
        uefi=args.uefi,
        log=args.log.resolve() if args.log else None,
        data_disk=args.data_disk.resolve() if args.data_disk else None,
        no_data_disk=args.no_data_disk,
        memory=args.memory,
        cpus=args.cpus,
        timeout=args.timeout,
        cid=args.cid,
        append=args.append,
        extra=extra,
    )
    return opts, args.accel, args.print_argv


def main(argv: list[str] | None = None) -> int:
    opts, accel_choice, print_only = parse_args(sys.argv[1:] if argv is None else argv)
    accel = probe_kvm() if accel_choice == "auto" else Accel(accel_choice, ("chosen with --accel",))
    if print_only:
        say(accel.explain())
        print(" ".join(qemu_argv(opts, accel)))
        return 0
    try:
        return run(opts, accel)
    except (FileNotFoundError, FileExistsError, subprocess.CalledProcessError) as exc:
        say(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
