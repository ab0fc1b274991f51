"""Start a ``python3 -m MODULE`` service as a fork of nulld itself (``preload = true`` in nulld.toml).

A fresh interpreter pays for its own start-up and for importing asyncio, logging, json, socket, pathlib and the
rest of the standard library that nulld has already imported: under TCG that is about a second per service, and
services that depend on each other pay it one after another on the boot path.  A forked child inherits all of it
(copy-on-write, as Android's zygote does) and only imports the service's own modules.

The child is made to look like a fresh process before the service runs: its own session, stdin on /dev/null,
stdout/stderr on nulld's pipes, every other descriptor closed, default signal dispositions and an empty signal
mask, no running event loop, no logging handlers, the service's environment and working directory, its user, and
``ssl`` importable again (nulld blocks it for itself).  nulld's objects are frozen out of the garbage collector
(``gc.freeze``) so nothing of nulld's is ever finalised in the child: a finaliser there could close a descriptor
number the service has since reused.  nulld is single-threaded, which is what makes forking it safe.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import io
import logging
import os
import runpy
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

#: Exit status of a child that failed before the service's code ran (as a shell reports "cannot execute").
SETUP_FAILED: Final = 126
_KEEP: list[Any] = []  # nulld objects the child must never finalise


@dataclass
class ForkedProcess:
    """What the supervisor needs of a child: the subset of subprocess.Popen it uses."""

    pid: int
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None
    returncode: int | None = field(default=None)


@dataclass(frozen=True)
class _Child:
    module: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    user: tuple[int, int] | None


def module_argv(binary: str, args: Sequence[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) when ``binary args`` is ``<this interpreter> -m MODULE ...``, else None."""
    if len(args) < 2 or args[0] != "-m" or not args[1]:
        return None
    if os.path.realpath(binary) != os.path.realpath(sys.executable):
        return None
    return args[1], list(args[2:])


def spawn(
    module: str,
    args: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    user: tuple[int, int] | None = None,
) -> ForkedProcess:
    """Fork, and run ``module`` as ``__main__`` in the child; returns at once in nulld."""
    if not Path(cwd).is_dir():
        raise NotADirectoryError(cwd)  # found before the fork, reported like exec's failure would be
    child = _Child(module, list(args), dict(env), cwd, user)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # or the child would write nulld's buffered output a second time
    try:
        pid = os.fork()
    except OSError:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - the child's coverage is measured by what it does (tests/nulld/test_preload.py)
        status = SETUP_FAILED
        try:
            status = _run_child(child, out_w, err_w)
        finally:
            os._exit(status)
    os.close(out_w)
    os.close(err_w)
    return ForkedProcess(pid, os.fdopen(out_r, "rb", buffering=0), os.fdopen(err_r, "rb", buffering=0))


def _run_child(child: _Child, out_w: int, err_w: int) -> int:
    # Descriptors first, before anything in the child can open one.
    signal.set_wakeup_fd(-1)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    gc.freeze()
    try:
        _become_fresh(child.env, child.cwd, child.user)
    except BaseException as exc:
        os.write(2, f"nulld: cannot prepare {child.module}: {exc}\n".encode(errors="replace"))
        return SETUP_FAILED
    sys.argv = [child.module, *child.args]
    status = 0
    try:
        runpy.run_module(child.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return status


def _become_fresh(env: dict[str, str], cwd: str, user: tuple[int, int] | None) -> None:
    """Undo what nulld set up for itself, so the service starts as it would in a new interpreter."""
    for number in range(1, signal.NSIG):
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets them at start-up
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    asyncio.events._set_running_loop(None)
    root = logging.getLogger()
    _KEEP.extend(root.handlers)
    _KEEP.extend(root.filters)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for log_filter in list(root.filters):
        root.removeFilter(log_filter)
    root.setLevel(logging.WARNING)
    blocked: object = sys.modules.get("ssl", sys)
    if blocked is None:
        del sys.modules["ssl"]  # nulld's own block; a service may need TLS (or a library that imports ssl)
    _KEEP.extend((sys.stdin, sys.stdout, sys.stderr))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = _text_stream(1)
    sys.stderr = _text_stream(2)
    atexit._clear()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if user is not None:
        uid, gid = user
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def _text_stream(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
