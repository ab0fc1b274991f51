"""Early system setup as PID 1: hostname and the loopback interface (no `ip` binary on the appliance)."""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
from pathlib import Path
from typing import Final

log = logging.getLogger("nulld")

SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1


def set_hostname(name: str) -> None:
    try:
        socket.sethostname(name)
    except OSError as exc:
        log.error("cannot set hostname %s: %s", name, exc)


def loopback_up(interface: str = "lo") -> bool:
    """Bring ``lo`` up with SIOCSIFFLAGS; the kernel assigns 127.0.0.1 and ::1 itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = struct.pack("16sH14x", interface.encode(), 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            if not flags & IFF_UP:
                fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", interface.encode(), flags | IFF_UP))
        except OSError as exc:
            log.error("cannot bring %s up: %s", interface, exc)
            return False
    return True


def unlimit_kmsg() -> None:
    """Let userspace writes to /dev/kmsg through unthrottled: by default the kernel keeps 10 lines per 5 s per
    writer and drops the rest silently, which would lose most of the services' output and our own."""
    try:
        Path("/proc/sys/kernel/printk_devkmsg").write_text("on\n")
    except OSError as exc:
        log.warning("cannot lift the /dev/kmsg rate limit: %s", exc)
