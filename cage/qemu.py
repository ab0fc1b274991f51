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
  cage/guest/init), with a kernel command line that carries only what is not secret: console, the agent's name, its
  network configuration and how it reaches ctxgraph.
- Disks, virtio-blk on virtio-mmio, both read-only and named by serial: ``nullbox-root`` (the agent's root image)
  and ``nullbox-config``, the per-boot config disk (``write_config_disk``): the agent's command, working directory
  and environment, secrets included.  Secrets never appear in QEMU's argv or the guest's kernel command line:
  both are world-readable (/proc/<pid>/cmdline on the host, /proc/cmdline in the guest).  The disk is one POSIX sh
  fragment (every value single-quoted by shlex.quote; no NUL anywhere) padded with NULs to whole sectors (64 KiB at
  least); the guest
  strips the NULs into a 0700 tmpfs outside the agent's root and sources it.  The host file is created 0600 and
  ``Vm.start`` unlinks it as soon as QEMU has opened it (QMP answering means every drive is open), so it exists on
  the host only while a VM starts.
- Network: the TAP the cage daemon made (``-netdev tap,ifname=...,script=no,downscript=no``) as virtio-net.
- ctxgraph: vhost-vsock (guest CID from the spec; the guest dials host CID 2 port 7000, which ctxgraph maps to the
  agent registered with that CID) when /dev/vhost-vsock exists, else the virtio-serial port
  ``org.nullbox.ctxgraph`` whose host side is QEMU connecting, as a client, to the agent's own ctxgraph socket
  (agents/<agent>.sock).  ctxgraph binds identity to the socket, so every line the guest writes is that agent's
  and a put naming another agent is ``forbidden``.  Both sides speak newline-delimited JSON (nullbox.wire), which
  QEMU passes through byte for byte.  The stream is shared by everything in the guest that opens the port and
  outlives each open: one request per line, written whole.
- QMP on a unix socket (stop, pause, quit).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any, Final, Literal

from nullbox.kvm import QEMU, Accel, probe_kvm

VHOST_VSOCK: Final = Path("/dev/vhost-vsock")
CTX_PORT: Final = "org.nullbox.ctxgraph"
CTX_VSOCK_PORT: Final = 7000
CTX_RECONNECT_S: Final = 1
ROOT_SERIAL: Final = "nullbox-root"
CONFIG_SERIAL: Final = "nullbox-config"
CONFIG_HEADER: Final = "# nullbox-config 1\n"
SECTOR: Final = 512
MIN_CONFIG_BYTES: Final = 64 << 10  # the kernel's partition scan reads a few sectors; keep them all there
MAX_CONFIG_BYTES: Final = 1 << 20
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
)
SANDBOX: Final = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
AGENT_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
TAP_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MAC: Final = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
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
class QemuVM:
    """Everything one agent VM is started from.  Holds paths, never secrets (they are in ``config_disk``)."""

    agent: str
    kernel: Path
    initramfs: Path
    rootfs: Path  # SquashFS or ext4 image, attached read-only
    config_disk: Path  # guestimage.write_config_disk
    console_log: Path
    memory_mb: int = 256
    cpus: int = 1
    net: GuestNet | None = None
    ctxgraph_socket: Path | None = None  # the agent's ctxgraph socket: the virtio-serial port's host side
    vsock_cid: int | None = None  # the guest CID when vhost-vsock is available
    qmp_socket: Path | None = None
    append: tuple[str, ...] = ()  # more kernel command line (debugging: loglevel=7, nullbox.onfail=halt)
    qemu: str = QEMU

    def __post_init__(self) -> None:
        if not AGENT_NAME.fullmatch(self.agent):
            raise ValueError(f"bad agent name {self.agent!r}")
        if not 16 <= self.memory_mb <= 1 << 20 or not 1 <= self.cpus <= 64:
            raise ValueError(f"bad VM size: {self.memory_mb} MiB, {self.cpus} CPUs")
        if self.vsock_cid is not None and not 3 <= self.vsock_cid < 2**32 - 1:
            raise ValueError(f"bad vsock CID {self.vsock_cid}")
        if any(not a or any(c.isspace() for c in a) for a in self.append):
            raise ValueError("each extra kernel argument must be one non-empty word")


# ------------------------------------------------------------------------------------------------ config disk


def config_text(command: Sequence[str], env: Mapping[str, str], workdir: str = "/") -> str:
    """The config disk's sh fragment: the environment, the working directory, then ``set --`` the command."""
    if not command or not all(isinstance(a, str) and a for a in command):
        raise ValueError("the agent command must be a non-empty list of non-empty strings")
    if not workdir.startswith("/"):
        raise ValueError(f"the working directory must be absolute, not {workdir!r}")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name) or name.startswith(("NB_", "nb_")):
            raise ValueError(f"bad environment variable name {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"environment variable {name} must be a string without NUL bytes")
    if any("\0" in a for a in (*command, workdir)):
        raise ValueError("the agent command and working directory must not contain NUL bytes")
    lines = [f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items())]
    lines.append(f"NB_WORKDIR={shlex.quote(workdir)}\n")
    lines.append("set -- " + " ".join(shlex.quote(a) for a in command) + "\n")
    return CONFIG_HEADER + "".join(lines)


def write_config_disk(path: Path, command: Sequence[str], env: Mapping[str, str], workdir: str = "/") -> Path:
    """The config disk image at ``path``: created 0600 (an existing file is replaced, a symlink never followed)."""
    data = config_text(command, env, workdir).encode()
    image = data + b"\0" * max(MIN_CONFIG_BYTES - len(data), -len(data) % SECTOR)
    if len(image) > MAX_CONFIG_BYTES:
        raise ValueError(f"the config disk would be {len(image)} bytes (at most {MAX_CONFIG_BYTES})")
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(image)
    return path


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


def _disk(ident: str, path: Path, serial: str) -> list[str]:
    return [
        "-drive",
        f"file={_v(path)},format=raw,if=none,id={ident},readonly=on",
        "-device",
        f"virtio-blk-device,drive={ident},serial={serial}",
    ]


def qemu_argv(vm: QemuVM, accel: Accel, *, vsock_available: bool | None = None) -> list[str]:
    """The QEMU command line for ``vm``; no side effects."""
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
    argv += ["-kernel", str(vm.kernel), "-initrd", str(vm.initramfs), "-append", cmdline]
    argv += ["-chardev", f"file,id=console,path={_v(vm.console_log)}", "-serial", "chardev:console"]
    if vm.qmp_socket is not None:
        argv += ["-chardev", f"socket,id=qmp,path={_v(vm.qmp_socket)},server=on,wait=off"]
        argv += ["-mon", "chardev=qmp,mode=control"]
    argv += _disk("root", vm.rootfs, ROOT_SERIAL)
    argv += _disk("config", vm.config_disk, CONFIG_SERIAL)
    argv += ["-device", "virtio-rng-device"]
    if vm.net is not None:
        argv += ["-netdev", f"tap,id=net0,ifname={vm.net.tap},script=no,downscript=no"]
        argv += ["-device", f"virtio-net-device,netdev=net0,mac={vm.net.mac}"]
    if channel == "vsock":
        argv += ["-device", f"vhost-vsock-device,guest-cid={vm.vsock_cid}"]
    elif channel == "serial":
        assert vm.ctxgraph_socket is not None
        # A client of the agent's socket; reconnect: QEMU starts even if ctxgraph is restarting, and reconnects.
        argv += ["-chardev", f"socket,id=ctx,path={_v(vm.ctxgraph_socket)},reconnect={CTX_RECONNECT_S}"]
        argv += [
            "-device",
            "virtio-serial-device,max_ports=2",
            "-device",
            f"virtserialport,chardev=ctx,name={CTX_PORT}",
        ]
    return argv


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

    def start(self, accel: Accel | None = None, *, open_timeout: float = 30.0) -> Vm:
        """Start QEMU.  With a QMP socket: wait until QMP answers (every drive is open by then), then remove the
        config disk from the host, also when the start fails; without one the caller removes it after the VM."""
        spec = self.spec
        self.argv = qemu_argv(spec, accel or detect_accel())
        spec.console_log.parent.mkdir(parents=True, exist_ok=True)
        if spec.qmp_socket is None:
            self._spawn()
            return self
        spec.qmp_socket.unlink(missing_ok=True)
        try:
            self._spawn()
            self._wait_for_qmp(open_timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            spec.config_disk.unlink(missing_ok=True)
        return self

    def _spawn(self) -> None:
        with self.qemu_log.open("wb") as log:  # QEMU's own messages: a file, so a pipe can never fill up
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)

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
