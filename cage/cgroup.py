"""One cgroup v2 group per agent: CPU, memory and process limits, freeze/thaw, kill, usage.

Pause and resume use the cgroup v2 freezer (``cgroup.freeze``), so they work the same for any backend: the VMM's
vCPU threads stop being scheduled and the guest makes no progress.  ``cgroup.kill`` stops every process of an agent
at once, so nothing it started can outlive it.  Controllers are enabled top-down (``cgroup.subtree_control``) on
the path from the hierarchy root to the agents' parent; a controller the kernel does not offer here is reported by
name instead of being silently skipped.

KVM puts a kernel thread of its own into the group of the process that creates a VM (``kvm-nx-lpage-recovery``,
linux 6.1 ``kvm_vm_create_worker_thread``).  The freezer skips kernel threads but counts them, so a group holding
one never reports ``frozen``: before freezing, such threads are moved to a leaf of their own next to the agents'
parent (``<parent>/../kernel-threads``), where they still run (their work is the host kernel's, not the agent's).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DEFAULT_ROOT: Final = Path("/sys/fs/cgroup")
DEFAULT_PARENT: Final = Path("nullbox/agents")  # relative to the hierarchy root
CONTROLLERS: Final = ("cpu", "memory", "pids")
CPU_PERIOD_US: Final = 100_000
FREEZE_TIMEOUT_S: Final = 5.0
KERNEL_THREADS: Final = "kernel-threads"  # a leaf next to the agents' parent
PF_KTHREAD: Final = 0x00200000  # include/linux/sched.h: /proc/PID/stat's flags field
MIB: Final = 1024 * 1024


class CgroupError(Exception):
    """A cgroup operation that failed; the message names the group and the file."""


@dataclass(frozen=True)
class Limits:
    """What AGENT.toml asks for, in cgroup terms."""

    cpu_percent: int  # of one CPU: 50 = half a CPU (cpu.max quota/period)
    memory_mib: int  # memory.max, including the VMM's own overhead
    pids: int = 256  # the VMM's threads; a VMM never needs many

    def __post_init__(self) -> None:
        if not 1 <= self.cpu_percent <= 100:
            raise ValueError(f"cpu_percent must be 1-100, got {self.cpu_percent}")
        if self.memory_mib < 1 or self.pids < 1:
            raise ValueError("memory_mib and pids must be positive")


@dataclass(frozen=True)
class Usage:
    cpu_usec: int
    memory_bytes: int | None
    pids: int | None
    frozen: bool


class Hierarchy:
    """The cgroup v2 hierarchy (``root``) and the directory agents' groups live in (``root/parent``)."""

    def __init__(self, root: Path = DEFAULT_ROOT, parent: Path = DEFAULT_PARENT) -> None:
        self.root = root
        self.parent = root / parent
        self._relative = parent

    def is_v2(self) -> bool:
        return (self.root / "cgroup.controllers").is_file()

    def available(self) -> set[str]:
        return set(_read(self.root / "cgroup.controllers").split())

    def prepare(self) -> list[str]:
        """Create the agents' parent and enable what it can of CONTROLLERS down to it; returns what is missing."""
        if not self.is_v2():
            raise CgroupError(f"{self.root} is not a cgroup v2 hierarchy (no cgroup.controllers)")
        wanted = [c for c in CONTROLLERS if c in self.available()]
        missing = [c for c in CONTROLLERS if c not in wanted]
        directory = self.root
        for part in self._relative.parts:
            _enable(directory, wanted)
            directory = directory / part
            directory.mkdir(exist_ok=True)
        _enable(directory, wanted)
        return missing

    def group(self, agent: str) -> Group:
        if "/" in agent or agent in ("", ".", ".."):
            raise CgroupError(f"invalid agent name for a cgroup: {agent!r}")
        return Group(self.parent / agent, kernel_threads=self.parent.parent / KERNEL_THREADS)

    def groups(self) -> list[str]:
        """Agent groups that exist (e.g. left behind by a cage that was killed)."""
        if not self.parent.is_dir():
            return []
        return sorted(p.name for p in self.parent.iterdir() if p.is_dir())


class Group:
    """One agent's cgroup."""

    def __init__(self, path: Path, kernel_threads: Path | None = None) -> None:
        self.path = path
        self.kernel_threads = kernel_threads  # where kernel threads go before a freeze (None: nowhere, leave them)

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self, limits: Limits) -> list[str]:
        """Create the group with ``limits``; returns the limits that could not be set (controller unavailable)."""
        self.path.mkdir(exist_ok=True)
        skipped = []
        quota = CPU_PERIOD_US * limits.cpu_percent // 100
        for file, value in (
            ("cpu.max", f"{quota} {CPU_PERIOD_US}"),
            ("memory.max", str(limits.memory_mib * MIB)),
            ("memory.swap.max", "0"),
            ("pids.max", str(limits.pids)),
        ):
            target = self.path / file
            if not target.exists():
                skipped.append(file)
                continue
            self._write(file, value)
        return skipped

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        text = _read(self.path / "cgroup.procs") if self.exists() else ""
        return [int(p) for p in text.split()]

    def freeze(self, timeout: float = FREEZE_TIMEOUT_S) -> None:
        """Stop every task of the group; on failure the group is thawed again (never left half-frozen)."""
        self.evict_kernel_threads()
        self._write("cgroup.freeze", "1")
        try:
            self._wait_frozen(True, timeout)
        except CgroupError:
            with contextlib.suppress(CgroupError):
                self._write("cgroup.freeze", "0")
            raise

    def evict_kernel_threads(self) -> list[int]:
        """Move the kernel threads in the group (see the module docstring) to ``kernel_threads``; their pids."""
        found = [pid for pid in self.pids() if is_kernel_thread(pid)]
        if not found or self.kernel_threads is None:
            return []
        self.kernel_threads.mkdir(exist_ok=True)
        moved = []
        for pid in found:
            try:
                (self.kernel_threads / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                continue  # gone meanwhile
            except OSError as exc:
                raise CgroupError(f"cannot move kernel thread {pid} out of {self.path}: {exc.strerror}") from None
            moved.append(pid)
        return moved

    def thaw(self, timeout: float = FREEZE_TIMEOUT_S) -> None:
        self._write("cgroup.freeze", "0")
        self._wait_frozen(False, timeout)

    def frozen(self) -> bool:
        return self._events().get("frozen") == "1"

    def kill(self) -> None:
        """SIGKILL every process in the group (cgroup.kill); frozen processes die too."""
        if self.exists():
            self._write("cgroup.kill", "1")

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left and remove the group (rmdir succeeds once the kernel has reaped everything)."""
        if not self.exists():
            return
        self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {self.path}: {exc.strerror}") from None
                time.sleep(0.02)

    def usage(self) -> Usage:
        cpu = _keyed(self.path / "cpu.stat").get("usage_usec", "0")
        memory = self.path / "memory.current"
        pids = self.path / "pids.current"
        return Usage(
            cpu_usec=int(cpu),
            memory_bytes=int(_read(memory)) if memory.exists() else None,
            pids=int(_read(pids)) if pids.exists() else len(self.pids()),
            frozen=self.frozen(),
        )

    def limits(self) -> dict[str, str]:
        """The limit files as the kernel reports them (for status)."""
        found = {}
        for file in ("cpu.max", "memory.max", "pids.max"):
            path = self.path / file
            if path.exists():
                found[file] = _read(path)
        return found

    def _events(self) -> dict[str, str]:
        return _keyed(self.path / "cgroup.events")

    def _wait_frozen(self, state: bool, timeout: float) -> None:
        """The freezer is asynchronous: cgroup.events says when every task has actually stopped (or resumed)."""
        deadline = time.monotonic() + timeout
        while self.frozen() != state:
            if not self.pids():
                return  # an empty group is trivially (un)frozen
            if time.monotonic() > deadline:
                raise CgroupError(f"{self.path}: still {'not ' if state else ''}frozen after {timeout:g}s")
            time.sleep(0.01)

    def _write(self, file: str, value: str) -> None:
        try:
            (self.path / file).write_text(value)
        except OSError as exc:
            raise CgroupError(f"cannot write {value!r} to {self.path / file}: {exc.strerror}") from None


def _enable(directory: Path, controllers: Sequence[str]) -> None:
    if not controllers:
        return
    control = directory / "cgroup.subtree_control"
    enabled = set(_read(control).split())
    todo = [c for c in controllers if c not in enabled]
    if not todo:
        return
    try:
        control.write_text(" ".join(f"+{c}" for c in todo))
    except OSError as exc:
        raise CgroupError(f"cannot enable {' '.join(todo)} in {control}: {exc.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}") from None


def _keyed(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split(None, 1) for line in _read(path).splitlines())
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def is_kernel_thread(pid: int) -> bool:
    """PF_KTHREAD in /proc/PID/stat's flags (the 9th field; the 2nd, comm, may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = text[text.rindex(")") + 2 :].split()
    return bool(int(fields[6]) & PF_KTHREAD)


def cgroup_of(pid: int) -> str:
    """The v2 cgroup path of a process ("0::/path" in /proc/PID/cgroup), or '' on a v1-only host."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""
