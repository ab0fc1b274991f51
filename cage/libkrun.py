"""ctypes binding to libkrun's C API (``libkrun.so.1``) and the check that decides whether cage may use it.

Every function used has its argtypes and restype declared from libkrun.h: ctypes would otherwise pass Python ints
as C ``int`` and silently truncate or sign-extend.  ctypes does not range-check either (``c_uint8(300)`` is 44), so
each integer is checked here before the call.  libkrun returns ``-errno`` on failure; that becomes a
:class:`KrunError` naming the call.  ``envp`` is always an explicit array: NULL would copy the host's whole
environment (the launcher's, which is not the agent's) into the guest.

libkrun is not packaged for this project's build hosts; the ABI is exercised by tests/cage/test_libkrun.py against a
recording test double (tests/cage/krun_recorder.c), loaded through the ``library`` path override.
"""

from __future__ import annotations

import ctypes
import errno as errno_names
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from nullbox.kvm import QEMU, probe_kvm

SONAME: Final = "libkrun.so.1"
FEATURE_NET: Final = 0
FEATURE_BLK: Final = 1
FEATURE_GPU: Final = 2
MAC_LEN: Final = 6

_U8_MAX: Final = (1 << 8) - 1
_U32_MAX: Final = (1 << 32) - 1
_U64_MAX: Final = (1 << 64) - 1

_StrV = ctypes.POINTER(ctypes.c_char_p)  # const char *const x[], NULL-terminated
_u8p = ctypes.POINTER(ctypes.c_uint8)
_i32, _u32, _u64 = ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint64
_str = ctypes.c_char_p

# name -> (restype, argtypes), transcribed from libkrun.h (1.18); tests compare this with the recorder's C source.
PROTOTYPES: Final[dict[str, tuple[Any, tuple[Any, ...]]]] = {
    "krun_set_log_level": (_i32, (_u32,)),
    "krun_create_ctx": (_i32, ()),
    "krun_free_ctx": (_i32, (_u32,)),
    "krun_set_vm_config": (_i32, (_u32, ctypes.c_uint8, _u32)),
    "krun_set_root": (_i32, (_u32, _str)),
    "krun_add_virtiofs": (_i32, (_u32, _str, _str)),
    "krun_add_virtiofs3": (_i32, (_u32, _str, _str, _u64, ctypes.c_bool)),
    "krun_set_exec": (_i32, (_u32, _str, _StrV, _StrV)),
    "krun_set_env": (_i32, (_u32, _StrV)),
    "krun_set_workdir": (_i32, (_u32, _str)),
    "krun_set_rlimits": (_i32, (_u32, _StrV)),
    "krun_add_net_tap": (_i32, (_u32, _str, _u8p, _u32, _u32)),
    "krun_add_vsock_port": (_i32, (_u32, _u32, _str)),
    "krun_set_console_output": (_i32, (_u32, _str)),
    "krun_has_feature": (_i32, (_u64,)),
    "krun_start_enter": (_i32, (_u32,)),
}


class LibkrunUnavailable(RuntimeError):
    """libkrun cannot be loaded, or lacks a function or feature this launch needs."""


class KrunError(OSError):
    """A krun_* call returned a negative errno (or krun_start_enter returned at all)."""

    def __init__(self, call: str, result: int) -> None:
        code = -result if result < 0 else 0
        if code:
            name = errno_names.errorcode.get(code, "?")
            message = f"{call} failed: {os.strerror(code)} ({name}, errno {code})"
        else:
            message = f"{call} returned {result} without starting the VM"
        super().__init__(code, message)
        self.call = call
        self.result = result

    def __str__(self) -> str:
        return str(self.strerror)


def _u(value: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValueError(f"{what} must be an integer from 0 to {high}, not {value!r}")
    return value


def _c(value: str | os.PathLike[str], what: str) -> bytes:
    """A C string: UTF-8 (libkrun refuses anything else with EINVAL), no NUL (C would cut the string there)."""
    data = os.fsencode(value) if isinstance(value, os.PathLike) else value.encode("utf-8")
    if b"\x00" in data:
        raise ValueError(f"{what} contains a NUL byte")
    data.decode("utf-8")  # surrogate-escaped bytes from a Path: refuse early rather than get -EINVAL
    return data


def _strv(items: Sequence[str], what: str) -> Any:
    """A NULL-terminated ``char *[]``; the caller keeps the returned array alive for the call."""
    encoded = [_c(item, what) for item in items]
    return (ctypes.c_char_p * (len(encoded) + 1))(*encoded, None)


class Libkrun:
    """The library, with prototypes resolved on first use (a missing symbol means a missing build feature)."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self._lib = lib
        self.path = path
        self._fns: dict[str, Any] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Libkrun:
        """dlopen ``path`` (default: the soname through the normal library search)."""
        name = SONAME if path is None else os.fspath(path)
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise LibkrunUnavailable(f"{name} cannot be loaded: {exc}") from None
        return cls(lib, name)

    def has(self, name: str) -> bool:
        try:
            self._fn(name)
        except LibkrunUnavailable:
            return False
        return True

    def require(self, names: Sequence[str]) -> None:
        """Resolve every function a launch will call before the first call, so a gap fails before any state."""
        for name in names:
            self._fn(name)

    def _fn(self, name: str) -> Any:
        fn = self._fns.get(name)
        if fn is None:
            restype, argtypes = PROTOTYPES[name]
            try:
                fn = getattr(self._lib, name)
            except AttributeError:
                raise LibkrunUnavailable(f"{self.path} has no {name} (older libkrun, or built without it)") from None
            fn.restype = restype
            fn.argtypes = argtypes
            self._fns[name] = fn
        return fn

    def _call(self, name: str, *args: Any) -> int:
        result = int(self._fn(name)(*args))
        if result < 0:
            raise KrunError(name, result)
        return result

    # ----------------------------------------------------------------------------------------------- the calls

    def set_log_level(self, level: int) -> None:
        self._call("krun_set_log_level", _u(level, 5, "log level"))

    def create_ctx(self) -> int:
        return self._call("krun_create_ctx")

    def free_ctx(self, ctx: int) -> None:
        self._call("krun_free_ctx", _u(ctx, _U32_MAX, "ctx"))

    def set_vm_config(self, ctx: int, vcpus: int, ram_mib: int) -> None:
        if vcpus == 0:
            raise ValueError("vcpus must be at least 1")
        args = (_u(ctx, _U32_MAX, "ctx"), _u(vcpus, _U8_MAX, "vcpus"), _u(ram_mib, _U32_MAX, "ram_mib"))
        self._call("krun_set_vm_config", *args)

    def set_root(self, ctx: int, path: str | os.PathLike[str]) -> None:
        self._call("krun_set_root", _u(ctx, _U32_MAX, "ctx"), _c(path, "root path"))

    def add_virtiofs(self, ctx: int, tag: str, path: str | os.PathLike[str]) -> None:
        self._call("krun_add_virtiofs", _u(ctx, _U32_MAX, "ctx"), _c(tag, "tag"), _c(path, "share path"))

    def add_virtiofs3(
        self, ctx: int, tag: str, path: str | os.PathLike[str], *, shm_size: int = 0, read_only: bool
    ) -> None:
        """shm_size 0 means no DAX window (libkrun's krun_add_virtiofs does the same)."""
        args = (_u(ctx, _U32_MAX, "ctx"), _c(tag, "tag"), _c(path, "share path"), _u(shm_size, _U64_MAX, "shm"))
        self._call("krun_add_virtiofs3", *args, bool(read_only))

    def set_exec(self, ctx: int, path: str, argv: Sequence[str], envp: Sequence[str]) -> None:
        """``argv`` excludes argv[0]; ``envp`` is required (NULL would leak the host environment)."""
        if isinstance(envp, str) or isinstance(argv, str):
            raise TypeError("argv and envp are sequences of strings")
        c_argv, c_envp = _strv(argv, "argument"), _strv(envp, "environment entry")
        self._call("krun_set_exec", _u(ctx, _U32_MAX, "ctx"), _c(path, "exec path"), c_argv, c_envp)

    def set_env(self, ctx: int, envp: Sequence[str]) -> None:
        if isinstance(envp, str):
            raise TypeError("envp is a sequence of strings")
        self._call("krun_set_env", _u(ctx, _U32_MAX, "ctx"), _strv(envp, "environment entry"))

    def set_workdir(self, ctx: int, path: str) -> None:
        self._call("krun_set_workdir", _u(ctx, _U32_MAX, "ctx"), _c(path, "workdir"))

    def set_rlimits(self, ctx: int, rlimits: Sequence[str]) -> None:
        self._call("krun_set_rlimits", _u(ctx, _U32_MAX, "ctx"), _strv(rlimits, "rlimit"))

    def add_net_tap(self, ctx: int, tap: str, mac: bytes, *, features: int = 0, flags: int = 0) -> None:
        """A virtio-net NIC on an existing TAP; adding a NIC turns TSI off."""
        if len(mac) != MAC_LEN:
            raise ValueError(f"a MAC is {MAC_LEN} bytes")
        c_mac = (ctypes.c_uint8 * MAC_LEN)(*mac)
        args = (_u(ctx, _U32_MAX, "ctx"), _c(tap, "tap name"), c_mac)
        self._call("krun_add_net_tap", *args, _u(features, _U32_MAX, "features"), _u(flags, _U32_MAX, "flags"))

    def add_vsock_port(self, ctx: int, port: int, socket_path: str | os.PathLike[str]) -> None:
        """Guest connect(AF_VSOCK, cid 2, port) reaches the host unix socket ``socket_path``."""
        args = (_u(ctx, _U32_MAX, "ctx"), _u(port, _U32_MAX, "port"), _c(socket_path, "socket path"))
        self._call("krun_add_vsock_port", *args)

    def set_console_output(self, ctx: int, path: str | os.PathLike[str]) -> None:
        self._call("krun_set_console_output", _u(ctx, _U32_MAX, "ctx"), _c(path, "console path"))

    def has_feature(self, feature: int) -> bool:
        return self._call("krun_has_feature", _u(feature, _U64_MAX, "feature")) == 1

    def start_enter(self, ctx: int) -> NoReturn:
        """Become the VMM.  Never returns on success (the process exits with the workload's status)."""
        result = int(self._fn("krun_start_enter")(_u(ctx, _U32_MAX, "ctx")))
        raise KrunError("krun_start_enter", result)


# --------------------------------------------------------------------------------------------- backend selection


def kvm_runs_guests() -> tuple[bool, str]:
    """KVM that runs ordinary guests, decided by nullbox.kvm's probe (the host's /dev/kvm alone proves nothing)."""
    accel = probe_kvm(run_guest=shutil.which(QEMU) is not None)
    detail = "; ".join(accel.reasons)
    if accel.name != "kvm":
        return False, f"KVM cannot run ordinary guests here: {detail}"
    return True, f"KVM runs guests: {detail}"


def libkrun_usable(
    library: str | os.PathLike[str] | None = None,
    *,
    kvm_probe: Callable[[], tuple[bool, str]] = kvm_runs_guests,
) -> tuple[bool, str]:
    """(True, why) only when libkrun loads with the functions and NET feature the launcher needs and KVM is real.

    Both halves are always checked so the reason tells an operator everything that is missing.
    """
    problems: list[str] = []
    notes: list[str] = []
    try:
        krun = Libkrun.load(library)
    except LibkrunUnavailable as exc:
        problems.append(str(exc))
    else:
        missing = [name for name in LAUNCH_FUNCTIONS if not krun.has(name)]
        if missing:
            problems.append(f"{krun.path} lacks {', '.join(missing)}")
        else:
            try:
                net = krun.has_feature(FEATURE_NET)
            except KrunError as exc:
                net = False
                problems.append(str(exc))
            if net:
                notes.append(f"{Path(krun.path).name} loads with virtio-net (TAP) support")
            elif not problems:
                problems.append(f"{krun.path} was built without virtio-net: agents would get TSI, not a TAP")
    kvm_ok, kvm_reason = kvm_probe()
    (notes if kvm_ok else problems).append(kvm_reason)
    if problems:
        return False, "libkrun is not usable: " + "; ".join(problems)
    return True, "libkrun is usable: " + "; ".join(notes)


# What every launch calls (krun_add_virtiofs3 is needed only for read-only shares and checked per launch).
LAUNCH_FUNCTIONS: Final = (
    "krun_set_log_level",
    "krun_has_feature",
    "krun_create_ctx",
    "krun_free_ctx",
    "krun_set_vm_config",
    "krun_set_root",
    "krun_set_exec",
    "krun_add_net_tap",
    "krun_add_vsock_port",
    "krun_set_rlimits",
    "krun_start_enter",
)
