"""Durable file writes, shared by every component that keeps state on disk (vault, approvals, the agent store).

A reader sees the old file or the new one, never a part, and what was acknowledged survives power loss: the data
is written to a temporary file in the same directory, fsynced, renamed over the target, and the directory is
fsynced so the rename itself is on disk.  A crash can leave a temporary file behind; ``remove_temp_files`` clears
them, called under the caller's lock when no writer can own one.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import suppress
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never replacing anything, never through a symlink) with ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600, temp_prefix: str = ".tmp-") -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, directory fsync."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix, dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        Path(tmp).replace(path)
    except BaseException:
        with suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    fsync_dir(path.parent)


def remove_temp_files(directory: Path, prefix: str) -> None:
    """Regular files named ``prefix*`` in ``directory``: what a crash between write and rename left behind."""
    with suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(prefix) and stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                with suppress(FileNotFoundError):
                    Path(entry.path).unlink()
