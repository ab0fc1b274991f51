"""The newc cpio format ("070701"), the one the kernel unpacks into its initramfs: deterministic archives (owners
0:0, one mtime, sorted paths) for the image build's initramfs and cage's guest initramfs, and the small archive of
a single file cage appends to the guest's at each start (the kernel unpacks concatenated archives in turn)."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class Entry:
    """One archive member; ``path`` is relative ("bin/busybox"), ``mode`` a full st_mode."""

    path: str
    mode: int
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_header(ino: int, entry: Entry, name: bytes, mtime: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,
        mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,  # check
    )
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def newc_archive(entries: Iterable[Entry], mtime: int) -> bytes:
    """A newc cpio archive of ``entries`` plus their missing parent directories, sorted by path."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        path = str(PurePosixPath(entry.path))
        if path.startswith("/") or ".." in PurePosixPath(path).parts or path == ".":
            raise ValueError(f"bad archive path {entry.path!r}")
        if path in by_path:
            raise ValueError(f"{path} is in the archive twice")
        by_path[path] = Entry(path, entry.mode, entry.data, entry.rdev)
    for path in list(by_path):
        for parent in PurePosixPath(path).parents:
            if str(parent) != ".":
                by_path.setdefault(str(parent), directory(str(parent)))
    out = bytearray()
    for ino, path in enumerate(sorted(by_path), start=1):
        entry, name = by_path[path], path.encode()
        header = _newc_header(ino, entry, name, mtime) + name + b"\0"
        out += header + _pad4(len(header)) + entry.data + _pad4(len(entry.data))
    trailer = _newc_header(0, Entry("TRAILER!!!", 0), b"TRAILER!!!", 0) + b"TRAILER!!!\0"
    out += trailer + _pad4(len(trailer))
    return bytes(out)
