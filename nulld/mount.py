"""The mount table nulld sets up as PID 1, with hardened flags; what the initramfs mounted is left alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nulld import syscalls
from nulld.syscalls import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RELATIME

log = logging.getLogger("nulld")


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    flags: int
    data: str | None = None


TABLE: Final = (
    Mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME, "hidepid=invisible"),
    Mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME),
    Mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC | MS_RELATIME, "mode=0755"),
    Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC | MS_RELATIME, "gid=5,mode=0620,ptmxmode=0666"),
    Mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777"),  # noqa: S108
    Mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=20%"),
    Mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=40%"),  # noqa: S108
    Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME, "nsdelegate"),
)
API_FILESYSTEMS: Final = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup2",
        "cgroup",
        "tmpfs",
        "securityfs",
        "debugfs",
        "tracefs",
        "bpf",
        "mqueue",
        "pstore",
        "configfs",
        "fusectl",
        "efivarfs",
    }
)
CGROUP_CONTROLLERS: Final = ("cpu", "memory", "pids", "io", "cpuset")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountPoint:
    target: str
    fstype: str
    source: str
    options: str


def mounted(mountinfo: str | None = None) -> list[MountPoint]:
    """The current mount table, in mount order (parents before children)."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    points = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 6 and len(tail) >= 2:
            points.append(MountPoint(_unescape(fields[4]), tail[0], _unescape(tail[1]), fields[5]))
    return points


def plan(table: tuple[Mount, ...], already: list[MountPoint], root: str = "") -> list[Mount]:
    """The mounts still to do: those whose target (under ``root``) is not a mount point yet."""
    targets = {m.target for m in already}
    return [m for m in table if root + m.target not in targets]


def mount_all(root: str = "") -> list[str]:
    """Mount the table under ``root`` ("" on the appliance); returns what was mounted.  Failures are logged,
    never fatal: a box with a missing /dev/shm is better than a panicked one."""
    done = []
    proc_ready = Path("/proc/self/mountinfo").exists()
    for entry in plan(TABLE, mounted() if proc_ready else [], root):
        target = root + entry.target
        try:
            Path(target).mkdir(parents=True, exist_ok=True)
            syscalls.mount(entry.source, target, entry.fstype, entry.flags, entry.data)
        except OSError as exc:
            if entry.fstype == "proc" and entry.data:
                try:  # kernels before 5.8 have no hidepid=invisible
                    syscalls.mount(entry.source, target, entry.fstype, entry.flags, None)
                except OSError:
                    log.error("cannot mount %s on %s: %s", entry.fstype, target, exc)
                    continue
            else:
                log.error("cannot mount %s on %s: %s", entry.fstype, target, exc)
                continue
        done.append(target)
    return done


def enable_cgroup_controllers(root: str = "") -> list[str]:
    """Delegate every available controller to child cgroups (cage puts each agent in one)."""
    base = Path(root + "/sys/fs/cgroup")
    try:
        available = (base / "cgroup.controllers").read_text().split()
    except OSError:
        return []
    wanted = [c for c in CGROUP_CONTROLLERS if c in available]
    enabled: list[str] = []
    for controller in wanted:
        try:
            (base / "cgroup.subtree_control").write_text(f"+{controller}")
            enabled.append(controller)
        except OSError as exc:
            log.warning("cannot enable cgroup controller %s: %s", controller, exc)
    return enabled


def unmount_all(under: str = "", api: frozenset[str] = API_FILESYSTEMS) -> None:
    """At shutdown: unmount what can be, deepest first; what is busy is remounted read-only.

    Root stays (it is read-only SquashFS on the appliance), and so do the kernel's API filesystems.  ``under``
    limits the sweep to mounts below a directory (tests).
    """
    for point in reversed(mounted()):
        if point.target == "/" or point.fstype in api or not point.target.startswith(under + "/"):
            continue
        try:
            syscalls.umount(point.target)
        except OSError:
            try:
                syscalls.mount(point.source, point.target, point.fstype, syscalls.MS_REMOUNT | syscalls.MS_RDONLY)
            except OSError as exc:
                log.error("cannot unmount or remount read-only %s: %s", point.target, exc)
