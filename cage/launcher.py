"""The per-agent libkrun launcher: ``python -I -m cage.launcher [--config-fd N] [--library PATH]``.

One VM is one freshly exec'ed process (libkrun's krun_start_enter takes the process over and never returns on
success), so cage runs this module with an argv list — never a fork of the supervisor, whose threads, fds and
memory the VMM would inherit.  The VM spec (JSON, see cage.vmspec) arrives on an inherited pipe fd or stdin: it
holds the agent's credentials, which must never reach argv (/proc/<pid>/cmdline is world-readable) or a log.

Sequence: validate → krun_set_log_level → krun_has_feature(NET) → krun_create_ctx → krun_set_vm_config →
krun_set_root → krun_set_exec (explicit envp) → [krun_set_workdir] → krun_add_net_tap (TAP + MAC; TSI off) →
krun_add_vsock_port(7000 → the agent's ctxgraph socket) → krun_add_virtiofs / krun_add_virtiofs3 (read-only,
enforced host side) per share → krun_set_rlimits → [krun_set_console_output] → setgroups([]), setresgid,
setresuid to the agent's ids → krun_start_enter.  Everything the VMM opens later (/dev/kvm, the TAP, the ctxgraph
socket, share directories, the console log) is opened as the agent's uid, which is what confines it.

Exit status when the launch fails, before the guest exists (see :class:`Exit`); once krun_start_enter has
succeeded the status is the workload's (libkrun: 125 setup error, 126 cannot exec, 127 not found).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, NoReturn

from cage.libkrun import FEATURE_NET, SONAME, KrunError, Libkrun, LibkrunUnavailable, libkrun_usable
from cage.vmspec import SpecError, VmSpec
from nullbox import log

VSOCK_CTXGRAPH_PORT: Final = 7000
# Warnings and errors only: at debug/trace libkrun may print the guest kernel command line, which carries the env.
KRUN_LOG_LEVEL: Final = 2
MAX_CONFIG_BYTES: Final = 4 << 20
DEFAULT_PATH: Final = "/usr/sbin:/usr/bin:/sbin:/bin"

logger = logging.getLogger("cage.launcher")


class Exit(enum.IntEnum):
    """Launcher failures, from sysexits.h so they are easy to tell from libkrun's 125-127."""

    USAGE = 64  # bad launcher arguments
    CONFIG = 65  # the VM spec is unreadable or invalid
    UNAVAILABLE = 69  # libkrun cannot be loaded, or lacks a function/feature this VM needs
    KRUN = 70  # a krun_* call returned an error (including krun_start_enter returning)
    HOST = 71  # a host-side operation failed (console log, chdir)
    NOPERM = 77  # dropping privileges to the agent's uid/gid failed


class LaunchFailed(Exception):
    """A launch that stops before the VM starts, with the exit status to report."""

    def __init__(self, status: Exit, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ parent side


def launcher_argv(*, python: str = sys.executable, config_fd: int, library: str | None = None) -> list[str]:
    """``-I``: the launcher runs as root, so PYTHON* variables, the user site and the cwd are ignored."""
    argv = [python, "-I", "-m", "cage.launcher", "--config-fd", str(config_fd)]
    return argv + (["--library", library] if library is not None else [])


def spawn(
    spec: VmSpec,
    *,
    library: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
    environ: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Exec a launcher for ``spec`` and hand it the spec over a pipe; returns the VMM process.

    ``environ`` is the launcher's own environment (default: just PATH and the log level); it never reaches the guest.
    The VMM gets its own session: a terminal's ^C to cage's process group does not reach it; cage stops VMs itself.
    """
    payload = json.dumps(spec.to_json()).encode()
    if environ is None:
        environ = {"PATH": DEFAULT_PATH} | {k: v for k, v in os.environ.items() if k == log.ENV_LEVEL}
    read_fd, write_fd = os.pipe()
    try:
        argv = launcher_argv(python=python, config_fd=read_fd, library=None if library is None else os.fspath(library))
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(read_fd,),
            env=dict(environ),
            cwd="/",
            start_new_session=True,
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    with os.fdopen(write_fd, "wb") as pipe, contextlib.suppress(BrokenPipeError):
        pipe.write(payload)  # a launcher that died early reports through its exit status and stderr
    return proc


@dataclass(frozen=True)
class LibkrunBackend:
    """The libkrun backend for cage: one launcher process per agent VM."""

    library: str | None = None
    name: str = "libkrun"

    def usable(self) -> tuple[bool, str]:
        return libkrun_usable(self.library)

    def start(self, spec: VmSpec) -> subprocess.Popen[bytes]:
        return spawn(spec, library=self.library)


# ------------------------------------------------------------------------------------------------- child side


def read_config(fd: int) -> VmSpec:
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise LaunchFailed(Exit.CONFIG, f"the VM spec is larger than {MAX_CONFIG_BYTES} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise LaunchFailed(Exit.CONFIG, f"cannot read the VM spec from fd {fd}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        data = json.loads(b"".join(chunks))
    except UnicodeDecodeError:
        raise LaunchFailed(Exit.CONFIG, "the VM spec is not UTF-8") from None
    except json.JSONDecodeError as exc:
        # The message and position only, never the document (it holds credentials).
        raise LaunchFailed(Exit.CONFIG, f"the VM spec is not JSON: {exc.msg} at offset {exc.pos}") from None
    try:
        spec = VmSpec.from_json(data)
    except SpecError as exc:
        raise LaunchFailed(Exit.CONFIG, f"invalid VM spec: {exc}") from None
    if spec.rootfs_kind != "dir":
        raise LaunchFailed(Exit.CONFIG, "libkrun boots from a directory rootfs (mount the SquashFS read-only first)")
    return spec


def required_functions(spec: VmSpec) -> list[str]:
    names = ["krun_set_log_level", "krun_has_feature", "krun_create_ctx", "krun_free_ctx", "krun_set_vm_config"]
    names += ["krun_set_root", "krun_set_exec", "krun_add_net_tap", "krun_add_vsock_port", "krun_set_rlimits"]
    names += ["krun_start_enter"]
    if spec.workdir is not None:
        names.append("krun_set_workdir")
    if any(s.read_only for s in spec.shares):
        names.append("krun_add_virtiofs3")  # only 1.18+ enforces read-only host side; never degrade to writable
    if any(not s.read_only for s in spec.shares):
        names.append("krun_add_virtiofs")
    if spec.console_log is not None:
        names.append("krun_set_console_output")
    return names


def configure(krun: Libkrun, spec: VmSpec) -> int:
    """Every krun_* call up to (not including) krun_start_enter; returns the context id."""
    krun.require(required_functions(spec))
    krun.set_log_level(KRUN_LOG_LEVEL)
    if not krun.has_feature(FEATURE_NET):
        raise LibkrunUnavailable(f"{krun.path} was built without virtio-net: the agent's TAP cannot be attached")
    ctx = krun.create_ctx()
    try:
        krun.set_vm_config(ctx, spec.vcpus, spec.memory_mib)
        krun.set_root(ctx, spec.rootfs)
        krun.set_exec(ctx, spec.command[0], spec.command[1:], spec.envp)
        if spec.workdir is not None:
            krun.set_workdir(ctx, spec.workdir)
        krun.add_net_tap(ctx, spec.tap, spec.mac_bytes)
        krun.add_vsock_port(ctx, VSOCK_CTXGRAPH_PORT, spec.ctxgraph_socket)
        for share in spec.shares:
            if share.read_only:
                krun.add_virtiofs3(ctx, share.tag, share.host_path, read_only=True)
            else:
                krun.add_virtiofs(ctx, share.tag, share.host_path)
        krun.set_rlimits(ctx, [limit.krun() for limit in spec.rlimits])
        if spec.console_log is not None:
            krun.set_console_output(ctx, spec.console_log)
    except BaseException:
        with contextlib.suppress(KrunError):
            krun.free_ctx(ctx)
        raise
    return ctx


def prepare_console_log(path: Path, uid: int, gid: int) -> None:
    """Create the console log owned by the agent: libkrun opens it inside krun_start_enter, after the drop.

    O_NOFOLLOW and fchown on the opened fd: a symlink planted at ``path`` cannot make root chown another file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o600)
        try:
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
    except OSError as exc:
        raise LaunchFailed(Exit.HOST, f"cannot prepare the console log {path}: {exc.strerror}") from None


def drop_privileges(uid: int, gid: int) -> None:
    """No supplementary groups, then gid, then uid (all of real/effective/saved), and prove root cannot return."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise LaunchFailed(Exit.NOPERM, f"cannot switch to uid {uid} gid {gid}: {exc.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise LaunchFailed(Exit.NOPERM, f"the switch to uid {uid} gid {gid} did not take")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise LaunchFailed(Exit.NOPERM, "root could be regained after dropping privileges")


def launch(spec: VmSpec, library: str | None) -> NoReturn:
    """Configure, drop privileges, become the VMM.  Raises LaunchFailed; never returns."""
    try:
        os.chdir("/")  # the caller's cwd may be unreadable for the agent's uid
    except OSError as exc:
        raise LaunchFailed(Exit.HOST, f"cannot chdir to /: {exc.strerror}") from None
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the VMM holds guest memory, credentials included
    try:
        krun = Libkrun.load(library)
        logger.info(
            "agent %s: %d vCPU, %d MiB, root %s, tap %s (%s), ctxgraph %s on vsock port %d, %d share(s), %d env var(s)",
            spec.agent, spec.vcpus, spec.memory_mib, spec.rootfs, spec.tap, spec.mac, spec.ctxgraph_socket,
            VSOCK_CTXGRAPH_PORT, len(spec.shares), len(spec.env),
        )  # fmt: skip
        ctx = configure(krun, spec)
    except LibkrunUnavailable as exc:
        raise LaunchFailed(Exit.UNAVAILABLE, str(exc)) from None
    except KrunError as exc:
        raise LaunchFailed(Exit.KRUN, str(exc)) from None
    except ValueError as exc:  # a value the binding refuses to pass to C (out of range, NUL)
        raise LaunchFailed(Exit.CONFIG, str(exc)) from None
    try:
        if spec.console_log is not None:
            prepare_console_log(spec.console_log, spec.uid, spec.gid)
        drop_privileges(spec.uid, spec.gid)
    except LaunchFailed:
        with contextlib.suppress(KrunError):
            krun.free_ctx(ctx)
        raise
    logger.info("agent %s: entering the VM as uid %d gid %d", spec.agent, spec.uid, spec.gid)
    try:
        krun.start_enter(ctx)
    except KrunError as exc:
        raise LaunchFailed(Exit.KRUN, str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise LaunchFailed(Exit.USAGE, message)


def main(argv: Sequence[str] | None = None) -> int:
    log.setup("cage-launcher")
    parser = _Parser(prog="python -m cage.launcher", description="Start one agent VM with libkrun.")
    parser.add_argument("--config-fd", type=int, default=0, help="read the VM spec (JSON) from this fd (stdin)")
    parser.add_argument("--library", help=f"the libkrun library to load (default: {SONAME})")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        spec = read_config(args.config_fd)
        launch(spec, args.library)
    except LaunchFailed as exc:
        logger.error("launch failed: %s", exc)
        return int(exc.status)


if __name__ == "__main__":
    sys.exit(main())
