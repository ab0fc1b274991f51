"""The few syscalls nulld needs that the os module lacks, through ctypes: mount, umount2, reboot, prctl."""

from __future__ import annotations

import ctypes
import os
from typing import Final

# dlopen(NULL): the interpreter's own symbols, libc's among them.  find_library() would run ldconfig (absent on
# the appliance) in a subprocess at import time.
_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MS_NOATIME: Final = 1024
MS_RELATIME: Final = 1 << 21
MS_STRICTATIME: Final = 1 << 24
MNT_DETACH: Final = 2

RB_AUTOBOOT: Final = 0x01234567
RB_HALT_SYSTEM: Final = 0xCDEF0123
RB_POWER_OFF: Final = 0x4321FEDC
RB_DISABLE_CAD: Final = 0

PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
        f"mount {fstype} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def reboot(command: int) -> None:
    """reboot(2).  Returns only on failure (or for RB_DISABLE_CAD)."""
    _check(_libc.reboot(ctypes.c_int(ctypes.c_int32(command).value)), "reboot")


def set_child_subreaper() -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def is_child_subreaper() -> bool:
    value = ctypes.c_int(0)
    _check(_libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0), "prctl(PR_GET_CHILD_SUBREAPER)")
    return value.value != 0
