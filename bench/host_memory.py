"""The host's free page reporting, which a boot benchmark pauses while it measures, and says so.

This machine is itself a VM whose virtio-balloon has free page reporting (VIRTIO_BALLOON_F_REPORTING): about 2 s
after memory was freed, the kernel hands free blocks of 2^page_reporting_order pages back to the hypervisor, and
whoever allocates them next takes a fault in the hypervisor for every page it touches.  A QEMU boot allocates a few
hundred MiB, so a boot that follows a pause of 2 s or more (or needs more memory than the previous boot freed) runs
about 25 % slower, and an agent's boot, which touches more memory than a bare one, lands there more often: in
interleaved rounds the agent's boots were bimodal while the bare ones were not.  That is this host's hypervisor at
work, not the code measured, so the boot rows are taken with reporting paused (``page_reporting_order`` raised above
the largest order the page allocator has, so no free block qualifies), and again with the host as configured.
The order is restored on the way out; pages reported before the pause stay reported until first reused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.common import log

ORDER_PARAMETER: Final = Path("module/page_reporting/parameters/page_reporting_order")  # under /sys
VIRTIO_DEVICES: Final = Path("bus/virtio/devices")  # under /sys
VIRTIO_ID_BALLOON: Final = 5
VIRTIO_BALLOON_F_REPORTING: Final = 5  # the feature bit (index into the device's features string)


@dataclass(frozen=True)
class FreePageReporting:
    """Free page reporting on this host: the balloon device that reports, and the order parameter that gates it."""

    device: str  # e.g. virtio0
    parameter: Path
    order: int  # the parameter's value before any pause
    max_order: int  # the page allocator's largest order (/proc/buddyinfo's last column)

    @property
    def paused_order(self) -> int:
        """An order no free block reaches: nothing is reported while the parameter holds it."""
        return self.max_order + 1

    @property
    def active(self) -> bool:
        """False when the order is already above every free block's: reporting is off (an earlier pause that was
        never restored, say a benchmark killed with SIGKILL, or the administrator's choice)."""
        return self.order <= self.max_order

    def describe(self) -> str:
        balloon = f"{self.device}, a virtio-balloon with VIRTIO_BALLOON_F_REPORTING"
        if not self.active:
            return (
                f"free page reporting: off ({balloon}, but page_reporting_order {self.order} is above the largest "
                f"free order {self.max_order}; the kernel's default is the pageblock order, 9 on x86-64)"
            )
        return f"free page reporting: on ({balloon}; page_reporting_order {self.order}, largest order {self.max_order})"


def reporting_balloon(sys_root: Path = Path("/sys")) -> str | None:
    """The virtio-balloon device that negotiated free page reporting, if any."""
    devices = sys_root / VIRTIO_DEVICES
    if not devices.is_dir():
        return None
    for device in sorted(devices.iterdir()):
        try:
            ident = int((device / "device").read_text().strip(), 16)
            features = (device / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        if ident == VIRTIO_ID_BALLOON and features[VIRTIO_BALLOON_F_REPORTING : VIRTIO_BALLOON_F_REPORTING + 1] == "1":
            return device.name
    return None


def largest_order(buddyinfo: str) -> int:
    """The buddy allocator's largest order: /proc/buddyinfo has one count per order, 0 to MAX_PAGE_ORDER."""
    counts = [len(line.split()) - 4 for line in buddyinfo.splitlines() if line.startswith("Node ")]
    if not counts or min(counts) < 1:
        raise ValueError("/proc/buddyinfo: no zone lines")
    return max(counts) - 1


def free_page_reporting(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> FreePageReporting | None:
    """This host's free page reporting, or None when nothing reports free pages (no such balloon or no module)."""
    device = reporting_balloon(sys_root)
    parameter = sys_root / ORDER_PARAMETER
    if device is None or not parameter.exists():
        return None
    order = int(parameter.read_text().strip())
    return FreePageReporting(device, parameter, order, largest_order((proc_root / "buddyinfo").read_text()))


@contextlib.contextmanager
def reporting_paused(reporting: FreePageReporting | None) -> Iterator[bool]:
    """Free page reporting paused for the block; yields whether it is (False: none on this host, already off, or
    the kernel refused the order, which is logged).  The order is restored even when the block raises."""
    if reporting is None or not reporting.active:
        yield False
        return
    try:
        reporting.parameter.write_text(f"{reporting.paused_order}\n")
    except OSError as error:
        log(f"{reporting.parameter}: {reporting.paused_order} refused ({error.strerror}): reporting stays on")
        yield False
        return
    try:
        yield int(reporting.parameter.read_text().strip()) == reporting.paused_order
    finally:
        reporting.parameter.write_text(f"{reporting.order}\n")
