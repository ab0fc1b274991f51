"""Whether KVM really runs guests here, and why not: shared by qemu/run (the appliance on a host) and cage (agent VMs).

KVM is used only when it is real hardware virtualisation that a stock kernel can run on: /dev/kvm opens, the CPU
reports vmx or svm, /dev/kvm is not provided by kvm_pvm alone (a PVM host runs only PVM-enabled guest kernels: a
Debian kernel hangs), and a tiny guest (four instructions at the reset vector that write to isa-debug-exit) really
runs under -accel kvm.  Otherwise TCG.  The presence of /dev/kvm alone proves nothing.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

QEMU: Final = "qemu-system-x86_64"

# The tiny KVM test guest: 64 KiB of firmware whose reset vector (16 bytes below its end) does
# "mov al, 0x31; out 0xf4, al; hlt; jmp $-1"; isa-debug-exit makes QEMU exit with status (0x31 << 1) | 1.
_PROBE_CODE: Final = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
PROBE_EXIT_STATUS: Final = 0x63


@dataclass(frozen=True)
class Accel:
    """The accelerator to use and why."""

    name: str  # "kvm" | "tcg"
    reasons: tuple[str, ...]

    def explain(self) -> str:
        return f"accelerator {self.name.upper()}: " + "; ".join(self.reasons)


def probe_firmware() -> bytes:
    image = bytearray(b"\xf4" * 0x10000)
    image[-16 : -16 + len(_PROBE_CODE)] = _PROBE_CODE
    return bytes(image)


def tiny_guest_runs(accel: str, qemu: str = QEMU, timeout: float = 10.0) -> tuple[bool, str]:
    """Run the probe firmware under ``accel``; True when it reached its exit port within ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="nullbox-kvm-probe-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        firmware.write_bytes(probe_firmware())
        argv = [qemu, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults", "-no-user-config"]
        argv += ["-display", "none", "-bios", str(firmware), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False, f"a tiny test guest under -accel {accel} did not finish within {timeout:g}s"
        except OSError as exc:
            return False, f"cannot run {qemu}: {exc}"
    if done.returncode == PROBE_EXIT_STATUS:
        return True, f"a tiny test guest ran under -accel {accel}"
    detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    return False, f"a tiny test guest failed under -accel {accel}: {detail[0]}"


def probe_kvm(
    *,
    device: Path = Path("/dev/kvm"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
    modules: Path = Path("/sys/module"),
    qemu: str = QEMU,
    run_guest: bool = True,
) -> Accel:
    """KVM only when every check passes (cheapest first); TCG with the reason otherwise."""
    reasons: list[str] = []
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Accel("tcg", (f"{device} cannot be opened ({exc.strerror})",))
    os.close(fd)
    reasons.append(f"{device} opens")
    try:
        flags = {word for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for word in line.split()}
    except OSError:
        flags = set()
    if not flags & {"vmx", "svm"}:
        reasons.append(f"but the CPU reports neither vmx nor svm in {cpuinfo}: no hardware virtualisation")
    else:
        reasons.append("the CPU has " + "/".join(sorted(flags & {"vmx", "svm"})))
    loaded = {name for name in ("kvm_intel", "kvm_amd", "kvm_pvm") if (modules / name).exists()}
    if "kvm_pvm" in loaded and not loaded & {"kvm_intel", "kvm_amd"}:
        reasons.append("/dev/kvm comes from kvm_pvm (pagetable-based VMs: only PVM-enabled guest kernels run)")
    if any(r.startswith(("but ", "/dev/kvm comes from kvm_pvm")) for r in reasons):
        return Accel("tcg", tuple(reasons))
    if run_guest:
        ok, why = tiny_guest_runs("kvm", qemu)
        reasons.append(why)
        if not ok:
            return Accel("tcg", tuple(reasons))
    return Accel("kvm", tuple(reasons))
