"""``capabilities.filesystem`` shares: where an agent's data lives on the appliance and how its shares are prepared.

The agent's data directory is ``<cage state dir>/data/<agent>/`` (``/var/lib/nullbox/cage/data/<agent>/``), not the
installed agent's directory: ``apply`` replaces that one whole on every update, and data must outlive updates.  It
is kept when the agent is removed (an operator deletes it).  ``/data/x`` in the VM is ``<data dir>/x``
(cage.manifest.data_path; the manifest refuses anything that could leave it).

Before each start cage creates what is missing, walking down from the data directory one component at a time with
O_NOFOLLOW, so a symlink planted by an earlier run of the agent (a write share may contain a read share's
directory) is refused instead of followed:
- ``<state>/data`` and the agent's data directory: root, 0711 (the agent's uid may pass, not list);
- a write share: owned by the agent's uid and gid, 0700; an existing one owned by someone else (the agent's uid
  changes when it is removed and installed again) is handed over, its whole tree, without following symlinks;
- a read share: root, 0755 when created, an existing one as it is (QEMU enforces read-only: ``readonly=on``);
- directories between them: root, 0755.
Shares are mounted parents first, each tagged ``data<N>`` (9p tags are at most 31 bytes; paths are not).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Final

from cage.manifest import FilesystemCaps, data_path
from cage.qemu import GuestShare

DATA_SUBDIR: Final = "data"
TAG_PREFIX: Final = "data"
ROOT_DIR_MODE: Final = 0o711
READ_MODE: Final = 0o755
WRITE_MODE: Final = 0o700


class ShareError(RuntimeError):
    """A share directory cannot be prepared (the message names it)."""


def data_dir(state: Path, agent: str) -> Path:
    """The agent's data directory: ``/data`` in its VM."""
    return state / DATA_SUBDIR / agent


def plan(data: Path, caps: FilesystemCaps) -> list[GuestShare]:
    """The shares of ``caps``, parents first, tagged data0, data1, ...; host paths under ``data``."""
    wanted = [(p, True) for p in caps.read] + [(p, False) for p in caps.write]
    wanted.sort(key=lambda item: PurePosixPath(item[0]).parts)
    return [
        GuestShare(f"{TAG_PREFIX}{index}", data_path(data, path), path, read_only)
        for index, (path, read_only) in enumerate(wanted)
    ]


def prepare(data: Path, shares: list[GuestShare], uid: int, gid: int) -> None:
    """Create and own the data directory and every share's directory (module docstring)."""
    for directory in (data.parent, data):
        directory.mkdir(mode=ROOT_DIR_MODE, parents=True, exist_ok=True)
        st = directory.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise ShareError(f"{directory} is not a directory")
        if st.st_uid == 0:  # not when /data itself is a write share, owned by the agent
            directory.chmod(ROOT_DIR_MODE)  # mkdir's mode is cut by the umask
    for share in shares:
        relative = share.host_path.relative_to(data).parts
        fd: int | None = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for depth, name in enumerate(relative):
                parent, fd = fd, None
                assert parent is not None
                fd = _step(parent, name, share, last=depth == len(relative) - 1, uid=uid, gid=gid)
            if not relative:  # /data itself
                assert fd is not None
                _own(fd, share, created=False, uid=uid, gid=gid, where=data)
        finally:
            if fd is not None:
                os.close(fd)


def _step(parent: int, name: str, share: GuestShare, *, last: bool, uid: int, gid: int) -> int:
    """Open (creating when missing) ``name`` under ``parent`` without following a symlink; closes ``parent``."""
    try:
        created = False
        try:
            os.mkdir(name, READ_MODE if share.read_only or not last else WRITE_MODE, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            raise ShareError(
                f"share {share.guest_path}: {name!r} under the data directory is not a directory ({exc.strerror})"
            ) from None
    finally:
        os.close(parent)
    try:
        if created:
            os.fchmod(fd, READ_MODE if share.read_only or not last else WRITE_MODE)
        if last:
            _own(fd, share, created=created, uid=uid, gid=gid, where=share.host_path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _own(fd: int, share: GuestShare, *, created: bool, uid: int, gid: int, where: Path) -> None:
    """A write share belongs to the agent, all of it; a read share created here gets root 0755."""
    if share.read_only:
        if created:
            os.fchmod(fd, READ_MODE)
        return
    st = os.fstat(fd)
    if created:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, WRITE_MODE)
        return
    if (st.st_uid, st.st_gid) == (uid, gid):
        return
    try:
        for _, dirs, files, dir_fd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            for name in (*dirs, *files):
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, WRITE_MODE)
    except OSError as exc:
        raise ShareError(f"cannot hand the write share {where} to uid {uid}: {exc.strerror}") from None
