"""What one agent VM is, independent of the hypervisor that runs it (libkrun or QEMU).

cage builds a :class:`VmSpec` from the agent's AGENT.toml, its vault entries and the resources it allocated (TAP,
ctxgraph socket, uid); a backend turns it into a running VM.  Every VmSpec is valid once constructed: the checks
live here so both backends, and the launcher that reads a spec back from JSON, refuse the same things.

``env`` carries credentials: it is excluded from ``repr`` and error messages name a variable, never its value.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

# Same grammars as egress.names (not imported: the launcher stays free of egress's dependencies).
AGENT_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
INTERFACE_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,14}")
ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
MAC_RE: Final = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# virtio-fs tags are at most 36 bytes (virtio spec); keep them to a plain grammar.
TAG_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,35}")
# Guest rlimit names → Linux resource numbers (what libkrun's "RESOURCE=CUR:MAX" strings carry).
RLIMIT_NUMBERS: Final = {"CPU": 0, "FSIZE": 1, "DATA": 2, "STACK": 3, "CORE": 4, "NPROC": 6, "NOFILE": 7}
RLIM_INFINITY: Final = (1 << 64) - 1
MAX_U32: Final = (1 << 32) - 1
# libkrun passes exec path, argv, env, workdir and rlimits on the guest kernel command line (64 KiB on x86_64),
# each value in double quotes: keep well under the cap and refuse characters that would break the quoting.
MAX_CMDLINE_PAYLOAD: Final = 48 * 1024
_FORBIDDEN_IN_CMDLINE: Final = re.compile(r'["\x00-\x1f\x7f]')

RootfsKind = Literal["dir", "squashfs"]


class SpecError(ValueError):
    """A VM spec that is refused; the message names the field (never a secret value)."""


@dataclass(frozen=True)
class Share:
    """A host directory exposed to the guest over virtio-fs under ``tag``; ``read_only`` is enforced host side.

    cage makes one per ``capabilities.filesystem`` path (cage.shares: tags ``data<N>``, directories under the agent's
    data directory, prepared and owned before the start); libkrun opens ``host_path`` after the launcher's privilege
    drop, so it must be reachable by the agent's uid (cage.shares makes the data directories 0711)."""

    tag: str
    host_path: Path
    read_only: bool


@dataclass(frozen=True)
class Rlimit:
    """A resource limit applied inside the guest before the agent's command starts."""

    resource: str  # a key of RLIMIT_NUMBERS
    soft: int
    hard: int

    def krun(self) -> str:
        """The ``"RESOURCE=CUR:MAX"`` form krun_set_rlimits takes (numeric resource id)."""
        return f"{RLIMIT_NUMBERS[self.resource]}={self.soft}:{self.hard}"


# No core dumps inside the guest (they would hold credentials); a bounded number of open files.
DEFAULT_RLIMITS: Final = (Rlimit("CORE", 0, 0), Rlimit("NOFILE", 4096, 4096))


@dataclass(frozen=True)
class VmSpec:
    """One agent VM.  ``kernel``/``initrd`` are for QEMU; libkrun brings its own kernel (libkrunfw)."""

    agent: str
    vcpus: int
    memory_mib: int
    rootfs: Path
    rootfs_kind: RootfsKind
    command: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    tap: str
    mac: str
    ctxgraph_socket: Path
    uid: int
    gid: int
    shares: tuple[Share, ...] = ()
    console_log: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    workdir: str | None = None
    rlimits: tuple[Rlimit, ...] = DEFAULT_RLIMITS

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "shares", tuple(self.shares))
        object.__setattr__(self, "rlimits", tuple(self.rlimits))
        if not isinstance(self.mac, str):
            raise SpecError("mac must be a string like 52:54:00:12:34:56")
        object.__setattr__(self, "mac", self.mac.lower())
        _validate(self)

    @property
    def mac_bytes(self) -> bytes:
        return bytes(int(part, 16) for part in self.mac.split(":"))

    @property
    def envp(self) -> list[str]:
        """The guest environment as ``KEY=VALUE`` strings, in a stable order."""
        return [f"{key}={value}" for key, value in sorted(self.env.items())]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (it contains ``env``: send it only over a pipe, never on argv or to a log)."""
        return {
            "agent": self.agent,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "rootfs": str(self.rootfs),
            "rootfs_kind": self.rootfs_kind,
            "command": list(self.command),
            "env": dict(self.env),
            "tap": self.tap,
            "mac": self.mac,
            "ctxgraph_socket": str(self.ctxgraph_socket),
            "uid": self.uid,
            "gid": self.gid,
            "shares": [{"tag": s.tag, "host_path": str(s.host_path), "read_only": s.read_only} for s in self.shares],
            "console_log": _opt(self.console_log),
            "kernel": _opt(self.kernel),
            "initrd": _opt(self.initrd),
            "workdir": self.workdir,
            "rlimits": [{"resource": r.resource, "soft": r.soft, "hard": r.hard} for r in self.rlimits],
        }

    @classmethod
    def from_json(cls, data: object) -> VmSpec:
        """Parse and validate; unknown keys are errors (a typo must not silently drop a setting)."""
        if not isinstance(data, dict):
            raise SpecError("the VM spec must be a JSON object")
        known = {
            "agent", "vcpus", "memory_mib", "rootfs", "rootfs_kind", "command", "env", "tap", "mac",
            "ctxgraph_socket", "uid", "gid", "shares", "console_log", "kernel", "initrd", "workdir", "rlimits",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown VM spec keys: {', '.join(map(repr, unknown))}")
        try:
            shares = tuple(
                Share(tag=_str(s, "tag"), host_path=Path(_str(s, "host_path")), read_only=_bool(s, "read_only"))
                for s in _list(data, "shares", required=False)
            )
            rlimits = (
                tuple(
                    Rlimit(resource=_str(r, "resource"), soft=_int(r, "soft"), hard=_int(r, "hard"))
                    for r in _list(data, "rlimits", required=False)
                )
                if "rlimits" in data
                else DEFAULT_RLIMITS
            )
            env = _dict(data, "env")
            return cls(
                agent=_str(data, "agent"),
                vcpus=_int(data, "vcpus"),
                memory_mib=_int(data, "memory_mib"),
                rootfs=Path(_str(data, "rootfs")),
                rootfs_kind=_str(data, "rootfs_kind"),  # type: ignore[arg-type]  # checked in _validate
                command=tuple(_str_item(v, "command") for v in _list(data, "command")),
                env={_str_item(k, "env name"): _env_value(k, v) for k, v in env.items()},
                tap=_str(data, "tap"),
                mac=_str(data, "mac"),
                ctxgraph_socket=Path(_str(data, "ctxgraph_socket")),
                uid=_int(data, "uid"),
                gid=_int(data, "gid"),
                shares=shares,
                console_log=_opt_path(data, "console_log"),
                kernel=_opt_path(data, "kernel"),
                initrd=_opt_path(data, "initrd"),
                workdir=_opt_str(data, "workdir"),
                rlimits=rlimits,
            )
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. Path() of something odd
            raise SpecError(f"invalid VM spec: {exc}") from None


class Backend(Protocol):
    """A hypervisor backend: whether it can run here, and how to start one VM (one process per VM)."""

    @property
    def name(self) -> str: ...

    def usable(self) -> tuple[bool, str]: ...

    def start(self, spec: VmSpec) -> subprocess.Popen[bytes]: ...


# ------------------------------------------------------------------------------------------------- validation


def _validate(spec: VmSpec) -> None:
    if not isinstance(spec.agent, str) or AGENT_RE.fullmatch(spec.agent) is None:
        raise SpecError("agent must be 1-64 characters of A-Z a-z 0-9 _ -")
    _check_int(spec.vcpus, "vcpus", 1, 255)  # libkrun takes uint8_t
    _check_int(spec.memory_mib, "memory_mib", 32, MAX_U32)  # libkrun takes uint32_t MiB
    _check_abs(spec.rootfs, "rootfs")
    if spec.rootfs_kind not in ("dir", "squashfs"):
        raise SpecError("rootfs_kind must be 'dir' or 'squashfs'")
    if not spec.command or not all(isinstance(a, str) for a in spec.command):
        raise SpecError("command must be a non-empty list of strings")
    if not spec.command[0].startswith("/"):
        raise SpecError("command[0] must be an absolute path inside the guest")
    for index, arg in enumerate(spec.command):
        if _FORBIDDEN_IN_CMDLINE.search(arg):
            raise SpecError(f"command[{index}] contains a double quote or a control character")
    for key, value in spec.env.items():
        if not isinstance(key, str) or ENV_NAME_RE.fullmatch(key) is None:
            raise SpecError("env names must match [A-Za-z_][A-Za-z0-9_]*")
        if not isinstance(value, str) or _FORBIDDEN_IN_CMDLINE.search(value):
            raise SpecError(f"env[{key!r}] must be a string without double quotes or control characters")
    if not isinstance(spec.tap, str) or INTERFACE_RE.fullmatch(spec.tap) is None:
        raise SpecError("tap must be an interface name of 1-15 characters of A-Z a-z 0-9 _ - .")
    if MAC_RE.fullmatch(spec.mac) is None:
        raise SpecError("mac must look like 52:54:00:12:34:56")
    first = int(spec.mac[:2], 16)
    if first & 1 or spec.mac == "00:00:00:00:00:00":
        raise SpecError("mac must be a unicast address (even first octet, not all zero)")
    _check_abs(spec.ctxgraph_socket, "ctxgraph_socket")
    _check_int(spec.uid, "uid", 1, MAX_U32 - 1)  # never root; (uid_t)-1 means "unchanged" to setuid
    _check_int(spec.gid, "gid", 1, MAX_U32 - 1)
    tags: set[str] = set()
    for share in spec.shares:
        if not isinstance(share.tag, str) or TAG_RE.fullmatch(share.tag) is None:
            raise SpecError("share tags must be 1-36 characters of A-Z a-z 0-9 _ - .")
        if share.tag in tags:
            raise SpecError(f"share tag {share.tag!r} is used twice")
        tags.add(share.tag)
        _check_abs(share.host_path, f"share {share.tag!r} host_path")
        if not isinstance(share.read_only, bool):
            raise SpecError(f"share {share.tag!r} read_only must be true or false")
    for name, path in (("console_log", spec.console_log), ("kernel", spec.kernel), ("initrd", spec.initrd)):
        if path is not None:
            _check_abs(path, name)
    if spec.workdir is not None and (
        not isinstance(spec.workdir, str)
        or not spec.workdir.startswith("/")
        or _FORBIDDEN_IN_CMDLINE.search(spec.workdir)
    ):
        raise SpecError("workdir must be an absolute guest path without quotes or control characters")
    for limit in spec.rlimits:
        if limit.resource not in RLIMIT_NUMBERS:
            raise SpecError(f"rlimit resource must be one of {', '.join(RLIMIT_NUMBERS)}")
        _check_int(limit.soft, f"rlimit {limit.resource} soft", 0, RLIM_INFINITY)
        _check_int(limit.hard, f"rlimit {limit.resource} hard", limit.soft, RLIM_INFINITY)
    payload = sum(len(s.encode()) + 3 for s in (*spec.command, *spec.envp, spec.workdir or ""))
    if payload > MAX_CMDLINE_PAYLOAD:
        raise SpecError(f"command, env and workdir take {payload} bytes; the guest command line allows ~48 KiB")


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{name} must be an integer from {low} to {high}")


def _check_abs(path: object, name: str) -> None:
    if not isinstance(path, Path) or not path.is_absolute():
        raise SpecError(f"{name} must be an absolute path")
    text = str(path)
    if "\x00" in text or ".." in path.parts:
        raise SpecError(f"{name} must be an absolute path without '..' or NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(f"{name} must be valid UTF-8") from None


def _opt(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _str(obj: object, key: str) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise SpecError(f"{key} must be a string")
    return value


def _str_item(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"every {what} must be a string")
    return value


def _env_value(key: object, value: object) -> str:
    if not isinstance(value, str):
        raise SpecError(f"env[{key!r}] must be a string")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key)


def _opt_path(obj: dict[str, Any], key: str) -> Path | None:
    return None if obj.get(key) is None else Path(_str(obj, key))


def _int(obj: object, key: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{key} must be an integer")
    return value


def _bool(obj: object, key: str) -> bool:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, bool):
        raise SpecError(f"{key} must be true or false")
    return value


def _dict(obj: dict[str, Any], key: str) -> dict[Any, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise SpecError(f"{key} must be an object")
    return value


def _list(obj: dict[str, Any], key: str, *, required: bool = True) -> list[Any]:
    value = obj.get(key, None if required else [])
    if not isinstance(value, list):
        raise SpecError(f"{key} must be a list")
    return value
