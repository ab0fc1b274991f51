"""The QEMU microvm backend: one ``qemu-system-x86_64 -M microvm`` process per agent.

What the VM gets (``qemu_argv``; a plain argv list, never a shell string):
- microvm with ACPI (neither guest kernel has CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so the virtio-mmio devices are
  found through ACPI, not through ``virtio_mmio.device=`` on the command line), no option ROMs, the ISA serial port
  as console (written to a log file), the RTC, ``-no-reboot`` (a guest reboot or panic ends QEMU), ``-display
  none`` (QEMU never touches the daemon's stdio; ``-nographic`` would claim it for anything left unassigned) and
  QEMU's seccomp sandbox.
- ``-accel kvm -cpu host`` only when qemu.runner's probe says KVM really runs a guest here, else
  ``-accel tcg -cpu max`` (a PVM /dev/kvm hangs an ordinary kernel) and the host's TSC frequency on the kernel
  command line (see host_tsc_khz: without it a TCG guest on a busy host sometimes hangs calibrating its TSC).
- The guest kernel and initramfs (cage/guestimage.py: the NullBox guest kernel when it is built, else Debian's;
  cage/guest/init.c), with a kernel command line that carries only what is not secret: console, the agent's name, its
  network configuration and how it reaches ctxgraph.
- The root disk, virtio-blk on virtio-mmio, read-only, serial ``nullbox-root``: the agent's root image.
- The config (``write_config``): the agent's command, working directory, environment (secrets included) and shares,
  as a header line and NUL-terminated records (``config_bytes``; nothing quoted, nothing the guest evaluates) in a
  one-file cpio archive that ``Vm.start`` appends to the guest initramfs (the kernel unpacks both; the guest init
  reads /nullbox-config and removes it).  Not a disk: one device fewer to probe and no request to read it, about
  15 ms of every start under TCG.  Secrets never appear in QEMU's argv or the guest's kernel command line: both are
  world-readable (/proc/<pid>/cmdline on the host, /proc/cmdline in the guest).  On the host the config is a 0600
  file only until ``Vm.start`` has read it (it unlinks it at once, also when the start fails); QEMU gets the whole
  initramfs as a sealed memfd, never a file (``-initrd /proc/self/fd/N``).
- No virtio-rng: the guest's CRNG is ready about 45 ms into its boot, seeded from RDRAND (``random.trust_cpu=on``;
  TCG's ``-cpu max`` and KVM's ``-cpu host`` both have it), long before a virtio-rng could feed it, and the device
  cost about 5 ms of every start under TCG (its probe and the hwrng thread).
- Network: the TAP the cage daemon made (``-netdev tap,ifname=...,script=no,downscript=no``) as virtio-net.
- ctxgraph: vhost-vsock (guest CID from the spec; the guest dials host CID 2 port 7000, which ctxgraph maps to the
  agent registered with that CID) when /dev/vhost-vsock exists, and always (so that an agent with no vsock client,
  busybox's shell, still has one) the virtio-serial port ``org.nullbox.ctxgraph`` whose host side is QEMU
  connecting, as a client, to the agent's own ctxgraph socket
  (agents/<agent>.sock).  ctxgraph binds identity to the socket, so every line the guest writes is that agent's
  and a put naming another agent is ``forbidden``.  Both sides speak newline-delimited JSON (nullbox.wire), which
  QEMU passes through byte for byte.  The stream is shared by everything in the guest that opens the port and
  outlives each open: one request per line, written whole.
- QMP on a unix socket (stop, pause, quit).
- Shares (``capabilities.filesystem``): one virtio-9p-device per share (``-fsdev local,security_model=none``,
  ``readonly=on`` for read shares, so QEMU itself refuses writes), tags ``data0``, ``data1``...; the config
  lists them (``share`` records) and the guest init mounts each at its path before the agent starts (cage.shares).

Running as the agent (``QemuVM.uid`` set; cage always sets it, tests and benchmarks may leave it None and run QEMU as
themselves): QEMU is exec'ed with the agent's uid and gid (real, effective and saved) and no supplementary groups,
a 077 umask and QEMU's seccomp sandbox.  It then opens nothing cage had to make reachable by path: ``Vm.start``
opens every host resource as root and hands QEMU the descriptor (``qemu_argv``'s ``fds``):
- the TAP: /dev/net/tun is 0600 root on the appliance (devtmpfs without udev; on the build hosts too), so
  ``ifname=`` fails for another uid at open(/dev/net/tun) even on a persistent TAP it owns; cage attaches the TAP
  (TUNSETIFF as root) and passes ``tap,fd=N``;
- root image, console (log file or cage's FIFO): ``-add-fd`` sets and ``/dev/fdset/N`` paths;
- the initramfs with the config: the memfd (as for a QEMU that runs as the caller; the config file stays 0600 root
  and is gone before QEMU starts, so the agent's uid never gets to open it at all);
- QMP: a listening socket cage bound (0600 root) passed as ``fd=N``;
- shares: each directory opened by cage (O_NOFOLLOW) and given as ``path=/proc/self/fd/N``: the 9p server opens its
  root once through that link (which checks the directory itself, not the path to it) and then works relative to it;
- ctxgraph: by path, with reconnect, when the agent's uid can reach its socket (ctxgraph makes it the agent's and
  its directory 0711); otherwise a connection cage opened, passed as ``fd=N`` (no reconnect);
- vhost-vsock: ``vhostfd=N``;
- KVM: ``kvm_groups`` (the kernel and initramfs are read by path: they must be world-readable, as installed).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import IO, Any, Final, Literal

from nullbox.cpio import newc_archive, regular
from nullbox.durable import write_all
from nullbox.kvm import QEMU, Accel, probe_kvm

VHOST_VSOCK: Final = Path("/dev/vhost-vsock")
CTX_PORT: Final = "org.nullbox.ctxgraph"
CTX_VSOCK_PORT: Final = 7000
CTX_RECONNECT_S: Final = 1
ROOT_SERIAL: Final = "nullbox-root"
CONFIG_MEMBER: Final = "nullbox-config"  # the config's path in the guest's initramfs (cage/guest/init.c)
CONFIG_HEADER: Final = b"nullbox-config 2\n"
MAX_CONFIG_BYTES: Final = 1 << 20  # the guest init reads at most this much
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BASE_CMDLINE: Final = (
    "console=ttyS0",
    "quiet",
    "panic=-1",  # with -no-reboot: a panicking guest ends QEMU at once
    "reboot=t",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nokbd",
    "i8042.nopnp",
    "tsc=reliable",
    "random.trust_cpu=on",
    # egress forwards no IPv6 at all (egress.ruleset drops it): the guest has no use for the stack, and bringing
    # links up without it is faster (about 10 ms of every start under TCG)
    "ipv6.disable=1",
)
SANDBOX: Final = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
AGENT_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
TAP_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MAC: Final = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
SHARE_TAG: Final = re.compile(r"[A-Za-z0-9_-]{1,31}")  # the 9p mount_tag limit is 31 bytes
GUEST_PATH: Final = re.compile(r"/(?:[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*)?")
MAX_SHARES: Final = 128
KVM_DEVICE: Final = Path("/dev/kvm")
KVM_GID: Final = 69999  # the group /dev/kvm gets when it has none but root (cage.defaults.UID_BASE - 1)
TUN_DEVICE: Final = Path("/dev/net/tun")
TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
EXIT_LINE: Final = re.compile(rb"^NULLBOX-AGENT-EXIT (\d+)\r?$", re.MULTILINE)
FAIL_LINE: Final = re.compile(rb"^NULLBOX-GUEST-FAIL (.*?)\r?$", re.MULTILINE)

Channel = Literal["vsock", "serial", "none"]


# ----------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class GuestNet:
    """The agent's link: the host TAP and the guest side of its small private network."""

    tap: str
    address: IPv4Interface  # the guest's, e.g. 10.77.0.2/30
    gateway: IPv4Address  # the appliance's end of the link (also the agent's DNS proxy)
    mac: str
    dns: IPv4Address | None = None

    def __post_init__(self) -> None:
        if not TAP_NAME.fullmatch(self.tap):
            raise ValueError(f"bad TAP name {self.tap!r}")
        if not MAC.fullmatch(self.mac):
            raise ValueError(f"bad MAC address {self.mac!r} (lowercase xx:xx:xx:xx:xx:xx)")
        if self.gateway not in self.address.network or self.gateway == self.address.ip:
            raise ValueError(f"gateway {self.gateway} is not another address on {self.address.network}")


@dataclass(frozen=True)
class GuestShare:
    """A host directory mounted in the guest at ``guest_path`` over virtio-9p (tag ``tag``)."""

    tag: str
    host_path: Path
    guest_path: str  # absolute, normalised; the manifest allows only these characters (no spaces, quotes, ':')
    read_only: bool

    def __post_init__(self) -> None:
        if not SHARE_TAG.fullmatch(self.tag):
            raise ValueError(f"bad share tag {self.tag!r} (1-31 of A-Z a-z 0-9 _ -)")
        if not GUEST_PATH.fullmatch(self.guest_path) or len(self.guest_path) > 1024:
            raise ValueError(f"bad share guest path {self.guest_path!r}")
        if not self.host_path.is_absolute() or ".." in self.host_path.parts:
            raise ValueError(f"the share host path {self.host_path} must be absolute, without '..'")

    def config_word(self) -> str:
        """``tag:ro|rw:path``, the config's ``share`` record (see cage/guest/init.c)."""
        return f"{self.tag}:{'ro' if self.read_only else 'rw'}:{self.guest_path}"


@dataclass(frozen=True)
class QemuVM:
    """Everything one agent VM is started from.  Holds paths, never secrets (they are in ``config``)."""

    agent: str
    kernel: Path
    initramfs: Path
    rootfs: Path  # SquashFS or ext4 image, attached read-only
    config: Path  # write_config's file: Vm.start reads and removes it
    console_log: Path
    memory_mb: int = 256
    cpus: int = 1
    net: GuestNet | None = None
    ctxgraph_socket: Path | None = None  # the agent's ctxgraph socket: the virtio-serial port's host side
    vsock_cid: int | None = None  # the guest CID when vhost-vsock is available
    qmp_socket: Path | None = None
    append: tuple[str, ...] = ()  # more kernel command line (debugging: loglevel=7, nullbox.onfail=halt)
    qemu: str = QEMU
    shares: tuple[GuestShare, ...] = ()  # also listed in the config (write_config's ``shares``)
    uid: int | None = None  # run QEMU as this uid (cage: the agent's); None: as the caller
    gid: int | None = None  # with ``uid``; default: the same number
    exec_helper: Path | None = None  # with ``uid``: cage/nb-exec.c, which drops to it (else Python's subprocess)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shares", tuple(self.shares))
        if self.uid is not None and self.gid is None:
            object.__setattr__(self, "gid", self.uid)
        for ident, name in ((self.uid, "uid"), (self.gid, "gid")):
            if ident is not None and (isinstance(ident, bool) or not 1 <= ident < 2**32 - 1):
                raise ValueError(f"bad {name} {ident!r}: QEMU never runs as root this way")
        if self.gid is not None and self.uid is None:
            raise ValueError("gid without uid")
        if len(self.shares) > MAX_SHARES:
            raise ValueError(f"at most {MAX_SHARES} shares")
        for what in ("tag", "guest_path"):
            values = [getattr(s, what) for s in self.shares]
            if len(set(values)) != len(values):
                raise ValueError(f"a share {what} is used twice")
        if not AGENT_NAME.fullmatch(self.agent):
            raise ValueError(f"bad agent name {self.agent!r}")
        if not 16 <= self.memory_mb <= 1 << 20 or not 1 <= self.cpus <= 64:
            raise ValueError(f"bad VM size: {self.memory_mb} MiB, {self.cpus} CPUs")
        if self.vsock_cid is not None and not 3 <= self.vsock_cid < 2**32 - 1:
            raise ValueError(f"bad vsock CID {self.vsock_cid}")
        if any(not a or any(c.isspace() for c in a) for a in self.append):
            raise ValueError("each extra kernel argument must be one non-empty word")


# ----------------------------------------------------------------------------------------------------- config


def config_bytes(
    command: Sequence[str], env: Mapping[str, str], workdir: str = "/", shares: Sequence[GuestShare] = ()
) -> bytes:
    """The config's contents: the header line, then one NUL-terminated record per value (``env NAME=VALUE``,
    ``workdir PATH``, ``share TAG:ro|rw:PATH`` in mount order, parents first, ``arg WORD`` in order) and an empty
    record that ends them (cage/guest/init.c reads it; nothing is quoted, so any byte but NUL goes through as it
    is)."""
    if not command or not all(isinstance(a, str) and a for a in command):
        raise ValueError("the agent command must be a non-empty list of non-empty strings")
    if not GUEST_PATH.fullmatch(workdir):
        raise ValueError(f"the working directory must be an absolute, normalised path, not {workdir!r}")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"bad environment variable name {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"environment variable {name} must be a string without NUL bytes")
    if any("\0" in a for a in command):
        raise ValueError("the agent command must not contain NUL bytes")
    records = [f"env {name}={value}" for name, value in sorted(env.items())]
    records.append(f"workdir {workdir}")
    ordered = sorted(shares, key=lambda s: s.guest_path.split("/"))  # a parent before anything mounted inside it
    records += [f"share {s.config_word()}" for s in ordered]
    records += [f"arg {a}" for a in command]
    return CONFIG_HEADER + b"".join(r.encode() + b"\0" for r in records) + b"\0"


def write_config(
    path: Path,
    command: Sequence[str],
    env: Mapping[str, str],
    workdir: str = "/",
    shares: Sequence[GuestShare] = (),
) -> Path:
    """The config archive at ``path`` (a one-file cpio, /nullbox-config 0400): created 0600 (an existing file is
    replaced, a symlink never followed)."""
    data = config_bytes(command, env, workdir, shares)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"the agent's config would be {len(data)} bytes (at most {MAX_CONFIG_BYTES})")
    archive = newc_archive([regular(CONFIG_MEMBER, data, 0o400)], 0)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(archive)
    return path


def boot_initramfs(vm: QemuVM) -> int:
    """A sealed memfd holding the guest initramfs and then ``vm.config`` (which is removed here, whatever happens):
    what QEMU gets as ``-initrd``.  The kernel unpacks both archives into the guest's initramfs."""
    try:
        fd = os.open(vm.config, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            config = f.read(MAX_CONFIG_BYTES + 4096)
    finally:
        vm.config.unlink(missing_ok=True)
    base = vm.initramfs.read_bytes()
    memfd = os.memfd_create("nullbox-initrd", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        for chunk in (base, b"\0" * (-len(base) % 4), config):  # each archive starts 4-byte aligned
            write_all(memfd, chunk)
        fcntl.fcntl(
            memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        )
        os.lseek(memfd, 0, os.SEEK_SET)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


# ------------------------------------------------------------------------------------------------------- argv


@functools.cache
def detect_accel() -> Accel:
    """nullbox.kvm's probe, once per process: KVM only when it really runs a stock guest kernel here."""
    return probe_kvm()


@functools.cache
def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC frequency in kHz, or None.

    Under TCG the guest's TSC is the host's (QEMU's RDTSC reads the host counter), and microvm has neither HPET nor
    ACPI PM timer: the guest kernel can only calibrate the TSC against the PIT, which under TCG on a busy host fails
    now and then ("tsc: Unable to calibrate against PIT ... Marking TSC unstable") and the boot then hangs for
    good.  Telling it the frequency (tsc_early_khz=) skips that calibration.  The source is the first "cpu MHz" in
    /proc/cpuinfo, which on x86 is the TSC's frequency unless a cpufreq driver reports the current clock instead
    (then the guest's clock drifts by the difference: harmless for a boot, and NTP-free agents tolerate it)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    found = re.search(r"^cpu MHz\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*$", text, re.MULTILINE)
    khz = round(float(found.group(1)) * 1000) if found else 0
    return khz if 100_000 <= khz <= 100_000_000 else None


def ctx_channel(vm: QemuVM, vsock_available: bool | None = None) -> Channel:
    """vsock when the host has vhost-vsock and the spec has a CID, else virtio-serial when there is a socket."""
    available = VHOST_VSOCK.exists() if vsock_available is None else vsock_available
    if available and vm.vsock_cid is not None:
        return "vsock"
    return "serial" if vm.ctxgraph_socket is not None else "none"


def kernel_cmdline(vm: QemuVM, channel: Channel, tsc_khz: int | None = None) -> str:
    """The guest's kernel command line: nothing secret (the guest's /proc/cmdline is world-readable)."""
    words = [*BASE_CMDLINE, *([f"tsc_early_khz={tsc_khz}"] if tsc_khz else [])]
    words += [f"nullbox.agent={vm.agent}", f"nullbox.ctx={channel}"]
    if vm.net is not None:
        words.append(f"nullbox.net={vm.net.address},{vm.net.gateway}")
        if vm.net.dns is not None:
            words.append(f"nullbox.dns={vm.net.dns}")
    return " ".join([*words, *vm.append])


def _v(value: Path | str) -> str:
    """A QEMU option value: commas are doubled."""
    return str(value).replace(",", ",,")


FDSET_ROOT: Final = 1
FDSET_CONSOLE: Final = 3


@dataclass(frozen=True)
class PassedFds:
    """Descriptors ``Vm.start`` opened as root for a QEMU that runs as the agent (QEMU inherits the same numbers)."""

    root: int
    initrd: int  # boot_initramfs's memfd
    console: int
    qmp: int | None = None  # a listening socket bound at the spec's qmp_socket
    tap: int | None = None  # /dev/net/tun attached to the spec's TAP
    ctx: int | None = None  # a connection to ctxgraph, when the agent's uid cannot reach its socket by path
    vhost_vsock: int | None = None
    shares: tuple[int, ...] = ()  # one directory per spec share, same order

    @property
    def all(self) -> tuple[int, ...]:
        extra = (self.qmp, self.tap, self.ctx, self.vhost_vsock)
        return (self.root, self.initrd, self.console, *(fd for fd in extra if fd is not None), *self.shares)


def _disk(ident: str, source: str, serial: str) -> list[str]:
    return [
        "-drive",
        f"file={source},format=raw,if=none,id={ident},readonly=on",
        "-device",
        f"virtio-blk-device,drive={ident},serial={serial}",
    ]


def _fdset(fdset: int, fd: int) -> list[str]:
    return ["-add-fd", f"fd={fd},set={fdset}"]


def qemu_argv(
    vm: QemuVM,
    accel: Accel,
    *,
    vsock_available: bool | None = None,
    fds: PassedFds | None = None,
    initrd: int | None = None,
) -> list[str]:
    """The QEMU command line for ``vm``; no side effects.  With ``fds`` QEMU opens none of the host resources by
    path (module docstring: running as the agent).  The initramfs QEMU loads: ``fds.initrd`` or ``initrd`` (a
    boot_initramfs memfd, config included), else ``vm.initramfs`` as it is (no config: for looking at argv)."""
    channel = ctx_channel(vm, vsock_available)
    argv = [vm.qemu, "-name", f"nullbox-agent-{vm.agent}", "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-M", "microvm,acpi=on,auto-kernel-cmdline=off,x-option-roms=off,isa-serial=on,rtc=on,pcie=off"]
    if accel.name == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
        tsc_khz = None  # kvm-clock
    else:
        argv += ["-accel", "tcg,thread=multi" if vm.cpus > 1 else "tcg", "-cpu", "max"]
        tsc_khz = host_tsc_khz()
    argv += ["-m", str(vm.memory_mb), "-smp", str(vm.cpus), "-no-reboot", "-sandbox", SANDBOX]
    cmdline = kernel_cmdline(vm, channel, tsc_khz)
    initrd = fds.initrd if fds is not None else initrd
    initrd_path = str(vm.initramfs) if initrd is None else f"/proc/self/fd/{initrd}"
    argv += ["-kernel", str(vm.kernel), "-initrd", initrd_path, "-append", cmdline]
    if fds is None:
        argv += ["-chardev", f"file,id=console,path={_v(vm.console_log)}", "-serial", "chardev:console"]
    else:  # append=on: without it QEMU truncates the dup'ed fd, which fails on a FIFO
        argv += _fdset(FDSET_CONSOLE, fds.console)
        argv += ["-chardev", f"file,id=console,path=/dev/fdset/{FDSET_CONSOLE},append=on", "-serial", "chardev:console"]
    if vm.qmp_socket is not None:
        if fds is not None and fds.qmp is not None:
            argv += ["-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off"]
        else:
            argv += ["-chardev", f"socket,id=qmp,path={_v(vm.qmp_socket)},server=on,wait=off"]
        argv += ["-mon", "chardev=qmp,mode=control"]
    if fds is None:
        argv += _disk("root", _v(vm.rootfs), ROOT_SERIAL)
    else:
        argv += _fdset(FDSET_ROOT, fds.root) + _disk("root", f"/dev/fdset/{FDSET_ROOT}", ROOT_SERIAL)
    if vm.net is not None:
        if fds is not None and fds.tap is not None:
            argv += ["-netdev", f"tap,id=net0,fd={fds.tap}"]
        else:
            argv += ["-netdev", f"tap,id=net0,ifname={vm.net.tap},script=no,downscript=no"]
        argv += ["-device", f"virtio-net-device,netdev=net0,mac={vm.net.mac}"]
    argv += _ctx_args(vm, channel, fds)
    argv += _share_args(vm, fds)
    return argv


def _ctx_args(vm: QemuVM, channel: Channel, fds: PassedFds | None) -> list[str]:
    """The ctxgraph channel's devices: vhost-vsock when the channel is vsock, and the virtio-serial port whenever
    there is a socket (``nullbox.ctx=vsock`` tells the guest it has both)."""
    argv: list[str] = []
    if channel == "vsock":
        vhost = "" if fds is None or fds.vhost_vsock is None else f",vhostfd={fds.vhost_vsock}"
        argv += ["-device", f"vhost-vsock-device,guest-cid={vm.vsock_cid}{vhost}"]
    if vm.ctxgraph_socket is None:
        return argv
    if fds is not None and fds.ctx is not None:
        argv += ["-chardev", f"socket,id=ctx,fd={fds.ctx}"]
    else:
        # A client of the agent's socket; reconnect: QEMU starts even if ctxgraph is restarting, and reconnects.
        argv += ["-chardev", f"socket,id=ctx,path={_v(vm.ctxgraph_socket)},reconnect={CTX_RECONNECT_S}"]
    return [
        *argv,
        "-device",
        "virtio-serial-device,max_ports=2",
        "-device",
        f"virtserialport,chardev=ctx,name={CTX_PORT}",
    ]


def _share_args(vm: QemuVM, fds: PassedFds | None) -> list[str]:
    """One virtio-9p device per share; security_model=none: files are created as QEMU's uid (the agent's)."""
    argv: list[str] = []
    for index, share in enumerate(vm.shares):
        source = _v(share.host_path) if fds is None else f"/proc/self/fd/{fds.shares[index]}"
        readonly = ",readonly=on" if share.read_only else ""
        argv += ["-fsdev", f"local,id=fs{index},path={source},security_model=none{readonly}"]
        argv += ["-device", f"virtio-9p-device,fsdev=fs{index},mount_tag={share.tag}"]
    return argv


# --------------------------------------------------------------------------------- host resources, as the agent


def _permits(st: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    """Whether the mode bits of ``st`` grant ``bit`` (4 r, 2 w, 1 x) to uid/gid without supplementary groups."""
    if st.st_uid == uid:
        return bool(st.st_mode >> 6 & bit)
    if st.st_gid == gid:
        return bool(st.st_mode >> 3 & bit)
    return bool(st.st_mode & bit)


def reachable_socket(path: Path, uid: int, gid: int) -> bool:
    """Whether uid/gid can connect to the unix socket ``path``: search permission on every directory above it and,
    once it exists, write permission on it (mode bits; ACLs are not used on the appliance).  A socket not there yet
    counts as reachable: QEMU reconnects until ctxgraph has made it."""
    try:
        if not all(_permits(d.stat(), uid, gid, 1) for d in reversed(path.parents)):
            return False
        st = path.stat()
    except FileNotFoundError:
        return path.parent.is_dir()
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and _permits(st, uid, gid, 2)


def kvm_groups(device: Path = KVM_DEVICE) -> list[int]:
    """The supplementary groups a QEMU running as an agent's uid needs for KVM (its only one besides none).

    /dev/kvm open to everyone (0666): none.  Group-owned by a group other than root with read-write for it (udev's
    ``kvm`` group): that group.  Root's alone (0600 root:root, devtmpfs without udev: the appliance): cage gives it
    the group KVM_GID and mode 0660 once, so VMMs reach KVM through that group and never need root; QEMU accepts no
    KVM descriptor, so passing one is not an option."""
    st = device.stat()
    if st.st_mode & 0o006 == 0o006:
        return []
    if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:
        return [st.st_gid]
    os.chown(device, -1, KVM_GID)
    device.chmod(0o660)
    return [KVM_GID]


def open_tap(name: str) -> int:
    """/dev/net/tun attached to the TAP ``name`` (TUNSETIFF as root; the TAP's owner is irrelevant then)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_console(path: Path) -> int:
    """The console for writing: cage's FIFO (which cage holds open for reading) or a log file, truncated."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_fds(vm: QemuVM, held: contextlib.ExitStack, vsock_available: bool | None = None) -> PassedFds:
    """Open (as root) what QEMU needs; every descriptor is closed by ``held``.  The config file is read into the
    initramfs memfd and unlinked first: from then on only this process and QEMU have it."""
    assert vm.uid is not None and vm.gid is not None

    def keep(fd: int) -> int:
        held.callback(os.close, fd)
        return fd

    initrd = keep(boot_initramfs(vm))
    root = keep(os.open(vm.rootfs, os.O_RDONLY | os.O_CLOEXEC))
    console = keep(open_console(vm.console_log))
    qmp = None
    if vm.qmp_socket is not None:
        listener = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        vm.qmp_socket.unlink(missing_ok=True)
        listener.bind(str(vm.qmp_socket))
        vm.qmp_socket.chmod(0o600)
        listener.listen(4)
        qmp = listener.fileno()
    tap = None if vm.net is None else keep(open_tap(vm.net.tap))
    channel = ctx_channel(vm, vsock_available)
    vhost = keep(os.open(VHOST_VSOCK, os.O_RDWR | os.O_CLOEXEC)) if channel == "vsock" else None
    ctx = None
    if vm.ctxgraph_socket is not None and not reachable_socket(vm.ctxgraph_socket, vm.uid, vm.gid):
        client = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        client.connect(str(vm.ctxgraph_socket))
        ctx = client.fileno()
    shares = tuple(
        keep(os.open(s.host_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)) for s in vm.shares
    )
    return PassedFds(root, initrd, console, qmp, tap, ctx, vhost, shares)


# ------------------------------------------------------------------------------------------------------- QMP


def qmp(path: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 10.0) -> Any:
    """Run one QMP command on the socket ``path``; returns its "return" value (events are skipped)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        lines = sock.makefile("rb")

        def reply() -> Any:
            while True:
                line = lines.readline()
                if not line:
                    raise ConnectionError(f"QMP {path}: closed before answering")
                message = json.loads(line)
                if "return" in message:
                    return message["return"]
                if "error" in message:
                    raise RuntimeError(f"QMP {command}: {message['error'].get('desc', message['error'])}")

        greeting = json.loads(lines.readline() or b"{}")
        if "QMP" not in greeting:
            raise ConnectionError(f"QMP {path}: no greeting")
        sock.sendall(b'{"execute":"qmp_capabilities"}\n')
        reply()
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        sock.sendall(json.dumps(request).encode() + b"\n")
        return reply()


# ------------------------------------------------------------------------------------------------ running a VM


@dataclass
class Outcome:
    """How a VM ended: QEMU's exit status, and what the guest said on its console."""

    qemu_status: int
    agent_status: int | None  # from NULLBOX-AGENT-EXIT; None if the agent never finished
    guest_failure: str | None  # from NULLBOX-GUEST-FAIL
    console: str


def parse_console(data: bytes) -> tuple[int | None, str | None]:
    """(agent exit status, guest failure message) from a console log."""
    exits = EXIT_LINE.findall(data)
    fails = FAIL_LINE.findall(data)
    return (int(exits[-1]) if exits else None), (fails[-1].decode(errors="replace") if fails else None)


@dataclass
class Vm:
    """A running agent VM (QEMU child process)."""

    spec: QemuVM
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = field(default=(), init=False, repr=False)
    groups: tuple[int, ...] = field(default=(), init=False, repr=False)

    def start(self, accel: Accel | None = None, *, open_timeout: float = 30.0) -> Vm:
        """Start QEMU, as ``spec.uid`` when set (every host resource passed as a descriptor, see open_fds), and
        wait until QMP answers when there is a QMP socket (every drive is open by then).  The config file is read
        into the initramfs memfd and removed from the host before QEMU starts, also when the start fails."""
        spec = self.spec
        try:
            accel = accel or detect_accel()
            spec.console_log.parent.mkdir(parents=True, exist_ok=True)
            if spec.qmp_socket is not None:
                spec.qmp_socket.unlink(missing_ok=True)
            with contextlib.ExitStack() as held:  # cage's copies of the descriptors: QEMU has its own once spawned
                if spec.uid is None:
                    initrd = boot_initramfs(spec)
                    held.callback(os.close, initrd)
                    self.argv = qemu_argv(spec, accel, initrd=initrd)
                    self.pass_fds = (initrd,)
                else:
                    vsock = VHOST_VSOCK.exists()
                    fds = open_fds(spec, held, vsock)
                    self.argv = qemu_argv(spec, accel, vsock_available=vsock, fds=fds)
                    self.pass_fds = fds.all
                    self.groups = tuple(kvm_groups()) if accel.name == "kvm" else ()
                self._spawn()
            if spec.qmp_socket is not None:
                self._wait_for_qmp(open_timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            spec.config.unlink(missing_ok=True)
        return self

    def _popen(self, out: IO[bytes], **extra: Any) -> subprocess.Popen[bytes]:
        """QEMU with stdout/stderr to ``out``; as the agent: its uid and gid (real, effective, saved), no
        supplementary groups but KVM's (``kvm_groups``), umask 077, and the descriptors of open_fds.  The privileges
        are dropped by the spec's exec_helper when there is one (subprocess then vforks; a daemon's fork costs
        milliseconds per start), else by subprocess itself."""
        spec, argv, ids = self.spec, self.argv, dict[str, Any]()
        if spec.uid is not None and spec.exec_helper is not None:
            groups = ",".join(str(g) for g in self.groups) or "-"
            argv = [str(spec.exec_helper), str(spec.uid), str(spec.gid), groups, "077", "--", *self.argv]
        elif spec.uid is not None:
            ids = {"user": spec.uid, "group": spec.gid, "extra_groups": list(self.groups), "umask": 0o077}
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            close_fds=True,
            pass_fds=self.pass_fds,
            **ids,
            **extra,
        )

    def _spawn(self) -> None:
        with self.qemu_log.open("wb") as log:  # QEMU's own messages: a file, so a pipe can never fill up
            self.proc = self._popen(log)

    def _wait_for_qmp(self, timeout: float) -> None:
        assert self.proc is not None and self.spec.qmp_socket is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with status {self.proc.returncode} at start: {self._stderr()}")
            try:
                qmp(self.spec.qmp_socket, "query-status", timeout=max(0.1, deadline - time.monotonic()))
                return
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QEMU's QMP socket did not answer within {timeout:g}s") from None
                time.sleep(0.02)

    @property
    def qemu_log(self) -> Path:
        """QEMU's stdout and stderr: <console log>.qemu."""
        return self.spec.console_log.with_name(self.spec.console_log.name + ".qemu")

    def _stderr(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace").strip()
        except OSError:
            return ""

    def wait(self, timeout: float | None = None) -> Outcome:
        """Wait for QEMU to exit (the guest powers off after its agent); stop it after ``timeout`` seconds."""
        assert self.proc is not None
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            status = self.proc.wait()
        console = self.spec.console_log.read_bytes() if self.spec.console_log.exists() else b""
        agent_status, failure = parse_console(console)
        return Outcome(status, agent_status, failure, console.decode(errors="replace"))

    def stop(self, grace: float = 5.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.spec.qmp_socket is not None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                qmp(self.spec.qmp_socket, "quit", timeout=grace)
        for signal_it in (proc.terminate, proc.kill):
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                signal_it()
        proc.wait()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.spec.qmp_socket is not None:
            self.spec.qmp_socket.unlink(missing_ok=True)
