"""The installed-agent store: ``/var/lib/nullbox/agents/<name>/`` holding ``AGENT.toml`` and the agent's rootfs.

Layout of one agent directory (the directory name *is* the agent name, taken from the manifest)::

    <root>/<name>/AGENT.toml        the exact bytes that were applied (their sha256 is what ``approve`` refers to)
    <root>/<name>/<agent.rootfs>    a directory tree, or a SquashFS image file
    <root>/<name>/.installed.json   install record: time, manifest sha256, rootfs name and kind

Every change is atomic and serialised by ``<root>/.lock`` (``flock``, so it holds across processes too):

- **apply** validates the manifest, builds the complete new agent directory in ``<root>/.stage-<name>-*`` (same
  filesystem, every file and directory fsynced), then swaps it in with ``renameat2(RENAME_EXCHANGE)`` — readers see
  the old agent or the new one, never a mix — and only then deletes the old one. Where the filesystem cannot
  exchange, the old directory is renamed aside first and renamed back if the second rename fails; a crash between
  the two is repaired by :meth:`AgentStore.recover` (which every apply and remove runs first). Any failure before
  the swap leaves the installed agent exactly as it was and removes the staging directory.
- **remove** renames the agent to ``<root>/.old-<name>-*`` (it disappears in one step), then deletes it.

The store does not know whether an agent is running: cage stops an agent's VM before it applies an update or
removes the agent (a directory rootfs is deleted from under a running VM otherwise).

Copying a rootfs directory (rather than trusting it)
    The source tree is walked with directory file descriptors and ``O_NOFOLLOW``, never by following a path, so
    swapping a component for a symlink during the copy cannot redirect it. Only regular files, directories and
    symlinks are accepted; device nodes, FIFOs and sockets are refused (a device node in a virtio-fs share is a
    host device). Symlinks are copied as links, never followed; their targets are interpreted as the guest will,
    relative to the rootfs root (``/usr/bin/python3`` is fine), and a target that climbs above the rootfs with
    ``..`` is refused. setuid/setgid bits are dropped: the copy lives on the host, where a set-id file owned by
    root would be a privilege escalation waiting for any host process. A SquashFS image is copied as one regular
    file after checking its magic; its content is only ever read by the guest kernel.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from cage.terms import MANIFEST_NAME, MAX_MANIFEST_BYTES, NAME_RE, ManifestError, digest
from nullbox import durable

if TYPE_CHECKING:
    from cage.manifest import Manifest

DEFAULT_ROOT: Final = Path("/var/lib/nullbox/agents")
INSTALL_RECORD: Final = ".installed.json"
LOCK_NAME: Final = ".lock"
STAGE_PREFIX: Final = ".stage-"
OLD_PREFIX: Final = ".old-"
SQUASHFS_MAGIC: Final = b"hsqs"
MAX_ROOTFS_ENTRIES: Final = 1_000_000
MAX_ROOTFS_DEPTH: Final = 256
RECORD_FORMAT: Final = 1
DIR_MODE: Final = 0o755

RootfsKind = Literal["dir", "squashfs"]  # the words cage.vmspec uses


class StoreError(Exception):
    """A refused store operation; ``code`` is the wire error code (ARCHITECTURE.md) the daemon answers with."""

    code: str = "invalid_request"


class InvalidAgentName(StoreError):
    pass


class AgentNotFound(StoreError):
    code = "not_found"


class InvalidSource(StoreError):
    """The source directory, manifest file or rootfs cannot be installed (the message names the path)."""


class StoreFailure(StoreError):
    """The appliance failed (disk full, I/O error); the installed agent is unchanged."""

    code = "internal"


def check_name(name: object) -> str:
    """An agent name from a request; refuses anything that could be a path (``..``, ``a/b``, ``.stage-x``)."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        shown = repr(name)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InvalidAgentName(f"agent name {shown} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return name


@dataclass(frozen=True)
class InstalledAgent:
    """One installed agent as found on disk.

    ``manifest`` is None (and ``problems`` says why) when the installed files no longer validate — for instance
    after an appliance upgrade tightened a rule, or when the directory was altered by hand; such an agent is
    listed so that it can be seen and removed, but cage must not start it.
    """

    name: str
    path: Path
    manifest: Manifest | None
    manifest_sha256: str | None
    installed_ns: int | None
    rootfs_path: Path | None
    rootfs_kind: RootfsKind | None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.problems

    @property
    def installed_at(self) -> str | None:
        """Install time as ISO 8601 UTC."""
        if self.installed_ns is None:
            return None
        return datetime.fromtimestamp(self.installed_ns / 1e9, UTC).isoformat(timespec="seconds")

    def require(self) -> Manifest:
        """The manifest of a healthy agent; raises ManifestError listing the problems otherwise."""
        if self.manifest is None or self.problems:
            raise ManifestError(f"{self.name}/{MANIFEST_NAME}", list(self.problems) or ["cannot be read"])
        return self.manifest

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.manifest.agent.version if self.manifest is not None else None,
            "manifest_sha256": self.manifest_sha256,
            "installed_at": self.installed_at,
            "installed_ns": self.installed_ns,
            "rootfs": self.rootfs_path.name if self.rootfs_path is not None else None,
            "rootfs_kind": self.rootfs_kind,
            "ok": self.ok,
            "problems": list(self.problems),
            "manifest": self.manifest.model_dump(mode="json") if self.manifest is not None else None,
        }


@dataclass(frozen=True)
class ApplyResult:
    agent: InstalledAgent
    created: bool
    previous_sha256: str | None = None

    @property
    def manifest_changed(self) -> bool:
        """Whether an existing approval (of ``previous_sha256``) no longer covers the installed manifest."""
        return self.previous_sha256 != self.agent.manifest_sha256


@dataclass
class _Budget:
    entries: int = 0
    limit: int = MAX_ROOTFS_ENTRIES

    def take(self, where: str) -> None:
        self.entries += 1
        if self.entries > self.limit:
            raise InvalidSource(f"{where}: the rootfs has more than {self.limit} entries")


class AgentStore:
    """Installed agents under ``root`` (tests pass a temporary directory).

    Directories are created 0755: the VMM, which runs under its own uid, reads the rootfs; manifests hold no
    secrets (credentials are referenced by name only).
    """

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"AgentStore({str(self.root)!r})"

    # --- queries ------------------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def show(self, name: str) -> InstalledAgent:
        """One installed agent; AgentNotFound when there is none by that name."""
        check_name(name)
        if not os.path.lexists(self.root / name):
            raise AgentNotFound(f"no agent named {name!r} is installed")
        return self._read(name)

    # --- changes ------------------------------------------------------------------------------------------------

    def apply(
        self,
        source: Path | bytes,
        rootfs: Path | None = None,
        *,
        expect_name: str | None = None,
        source_label: str | None = None,
    ) -> ApplyResult:
        """Install an agent or replace an installed one of the same name, atomically.

        ``source`` is an agent directory (``AGENT.toml`` plus the rootfs it names), an ``AGENT.toml`` file (rootfs
        next to it), or the manifest's bytes. ``rootfs`` overrides where the rootfs is taken from; with manifest
        bytes and no ``rootfs``, an update keeps the installed agent's rootfs (hard-linked, not copied).
        ``expect_name`` (a name the request gave) must equal the manifest's ``agent.name``: names come from
        manifests only. Raises ManifestError (invalid manifest) or StoreError; on any failure the installed agent
        is untouched.
        """
        from cage.manifest import parse_bytes  # noqa: PLC0415 (pydantic: only when a manifest is read)

        raw, label, base = self._read_source(source, source_label)
        manifest = parse_bytes(raw, label)
        name = manifest.agent.name
        if expect_name is not None and expect_name != name:
            raise ManifestError(label, [f"agent.name: is {name!r}, but the request is for {expect_name!r}"])
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        with self._locked():
            self._recover_locked()
            target = self.root / name
            previous = self._read(name) if os.path.lexists(target) else None
            link_from: Path | None = None
            if rootfs is None and base is None:
                if previous is None or previous.rootfs_path is None or previous.rootfs_kind is None:
                    raise InvalidSource(f"{label}: no rootfs given and no installed agent {name!r} to keep it from")
                rootfs, link_from = previous.rootfs_path, previous.rootfs_path
            elif rootfs is None:
                assert base is not None
                rootfs = base / manifest.agent.rootfs
            stage = Path(_mkdtemp(self.root, f"{STAGE_PREFIX}{name}-"))
            try:
                stage.chmod(DIR_MODE)
                kind = self._install_rootfs(rootfs, stage / manifest.agent.rootfs, hardlink=link_from is not None)
                durable.write_new(stage / MANIFEST_NAME, raw, 0o644)
                record = {
                    "format": RECORD_FORMAT,
                    "name": name,
                    "installed_ns": time.time_ns(),
                    "manifest_sha256": digest(raw),
                    "rootfs": manifest.agent.rootfs,
                    "rootfs_kind": kind,
                }
                durable.write_new(stage / INSTALL_RECORD, json.dumps(record, indent=2).encode() + b"\n", 0o644)
                durable.fsync_dir(stage)
                self._swap_in(stage, target)
            except BaseException as exc:
                _rmtree(stage)
                if isinstance(exc, OSError):
                    raise StoreFailure(f"installing {name!r} failed, nothing was changed: {exc}") from exc
                raise
            durable.fsync_dir(self.root)
        return ApplyResult(
            agent=self._read(name),
            created=previous is None,
            previous_sha256=previous.manifest_sha256 if previous is not None else None,
        )

    def remove(self, name: str) -> InstalledAgent:
        """Uninstall an agent (it disappears in one rename); returns what was removed."""
        check_name(name)
        with self._locked():
            self._recover_locked()
            target = self.root / name
            if not os.path.lexists(target):
                raise AgentNotFound(f"no agent named {name!r} is installed")
            removed = self._read(name)
            aside = Path(_mkdtemp(self.root, f"{OLD_PREFIX}{name}-"))
            target.rename(aside / name)
            durable.fsync_dir(self.root)
            _rmtree(aside)
        return removed

    def recover(self) -> list[str]:
        """Finish or undo whatever a crash interrupted; returns a line per repair (cage calls this at start)."""
        if not self.root.is_dir():
            return []
        with self._locked():
            return self._recover_locked()

    # --- internals ----------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _recover_locked(self) -> list[str]:
        repairs: list[str] = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.name.startswith(STAGE_PREFIX):
                _rmtree(Path(entry.path))
                repairs.append(f"removed the unfinished install {entry.name}")
            elif entry.name.startswith(OLD_PREFIX):
                holder = Path(entry.path)
                name = entry.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
                kept = holder / name
                if NAME_RE.fullmatch(name) and kept.is_dir() and not os.path.lexists(self.root / name):
                    kept.rename(self.root / name)
                    repairs.append(f"restored {name} (an update was interrupted before the new version was in place)")
                _rmtree(holder)
                repairs.append(f"removed {entry.name}")
        if repairs:
            durable.fsync_dir(self.root)
        return repairs

    def _read_source(self, source: Path | bytes, label: str | None) -> tuple[bytes, str, Path | None]:
        """The manifest bytes, how messages name them, and the directory a relative rootfs is found in."""
        if isinstance(source, bytes):
            return source, label or MANIFEST_NAME, None
        try:
            st = os.lstat(source)
        except OSError as exc:
            raise InvalidSource(f"{source}: {exc.strerror}") from None
        manifest_path = source / MANIFEST_NAME if stat.S_ISDIR(st.st_mode) else source
        label = label or f"{manifest_path.parent.name}/{manifest_path.name}"
        try:
            fd = os.open(manifest_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            reason = "is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise InvalidSource(f"{label}: cannot be read: {reason}") from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise InvalidSource(f"{label}: is not a regular file")
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
        return raw, label, manifest_path.parent

    def _install_rootfs(self, source: Path, dest: Path, *, hardlink: bool) -> RootfsKind:
        try:
            st = os.lstat(source)
        except OSError as exc:
            raise InvalidSource(f"rootfs {source}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _same_inode(fd, st, str(source))
                dest.mkdir(0o700)
                _copy_dir(fd, dest, (), _Budget(), source.name, hardlink=hardlink)
                dest.chmod(_host_mode(st.st_mode))
                durable.fsync_dir(dest)
            finally:
                os.close(fd)
            return "dir"
        if stat.S_ISREG(st.st_mode):
            parent = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if not hardlink:
                    with open(source, "rb") as handle:  # noqa: PTH123 - only to check the magic
                        if handle.read(4) != SQUASHFS_MAGIC:
                            raise InvalidSource(
                                f"rootfs {source}: a file rootfs must be a SquashFS image (mksquashfs), "
                                "this one lacks the 'hsqs' magic"
                            )
                _copy_file(parent, source.name, dest, st, hardlink=hardlink)
            finally:
                os.close(parent)
            return "squashfs"
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else _kind(st.st_mode)
        raise InvalidSource(f"rootfs {source}: must be a directory or a SquashFS image file, not {what}")

    def _swap_in(self, stage: Path, target: Path) -> None:
        if not os.path.lexists(target):
            stage.rename(target)
            return
        if _exchange(stage, target):
            durable.fsync_dir(self.root)
            _rmtree(stage)  # now holds the previous version
            return
        aside = Path(_mkdtemp(self.root, f"{OLD_PREFIX}{target.name}-"))
        target.rename(aside / target.name)
        try:
            stage.rename(target)
        except BaseException:
            (aside / target.name).rename(target)
            raise
        durable.fsync_dir(self.root)
        _rmtree(aside)

    def _read(self, name: str) -> InstalledAgent:
        path = self.root / name
        problems: list[str] = []
        label = f"{name}/{MANIFEST_NAME}"

        def broken(message: str) -> InstalledAgent:
            return InstalledAgent(name, path, None, None, None, None, None, (f"{label}: {message}",))

        try:
            st = os.lstat(path)
        except OSError as exc:
            return broken(f"cannot be read: {exc.strerror}")
        if not stat.S_ISDIR(st.st_mode):
            return broken(f"{path} is not a directory")
        try:
            fd = os.open(path / MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    return broken("is not a regular file")
                raw = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            return broken(f"cannot be read: {exc.strerror}")
        sha = digest(raw)
        manifest: Manifest | None
        from cage.manifest import parse_bytes  # noqa: PLC0415 (pydantic: only when a manifest is read)

        try:
            manifest = parse_bytes(raw, label)
        except ManifestError as exc:
            manifest = None
            problems.extend(exc.lines)
        if manifest is not None and manifest.agent.name != name:
            problems.append(f"{label}: agent.name: is {manifest.agent.name!r}, but the agent is installed as {name!r}")
        record = _read_record(path / INSTALL_RECORD)
        installed_ns = record.get("installed_ns") if isinstance(record.get("installed_ns"), int) else None
        if record.get("manifest_sha256") not in (None, sha):
            problems.append(f"{label}: changed after it was installed (its sha256 differs from the install record)")
        if not record:
            problems.append(f"{name}/{INSTALL_RECORD}: is missing or unreadable")
        rootfs_path: Path | None = None
        kind: RootfsKind | None = None
        if manifest is not None:
            rootfs_path = path / manifest.agent.rootfs
            try:
                rst = os.lstat(rootfs_path)
            except OSError:
                problems.append(f"{name}/{manifest.agent.rootfs}: the rootfs is missing")
            else:
                if stat.S_ISDIR(rst.st_mode):
                    kind = "dir"
                elif stat.S_ISREG(rst.st_mode):
                    kind = "squashfs"
                else:
                    problems.append(f"{name}/{manifest.agent.rootfs}: the rootfs is {_kind(rst.st_mode)}")
        return InstalledAgent(
            name=name,
            path=path,
            manifest=manifest,
            manifest_sha256=sha,
            installed_ns=installed_ns,
            rootfs_path=rootfs_path,
            rootfs_kind=kind,
            problems=tuple(problems),
        )

    # defined last: inside the class body, ``list`` names this method from here on
    def list(self) -> list[InstalledAgent]:
        """Every installed agent, sorted by name; broken ones carry ``problems`` instead of failing the listing."""
        try:
            names = sorted(entry.name for entry in os.scandir(self.root))
        except FileNotFoundError:
            return []
        return [self._read(name) for name in names if NAME_RE.fullmatch(name)]


# --- filesystem helpers -----------------------------------------------------------------------------------------


def _read_record(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = json.loads(handle.read(64 * 1024))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mkdtemp(parent: Path, prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file or directory"


def _host_mode(mode: int) -> int:
    """Permission bits kept on the host copy: set-uid and set-gid are dropped (see the module docstring)."""
    return stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)


def _same_inode(fd: int, expected: os.stat_result, where: str) -> None:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
        raise InvalidSource(f"{where}: changed while it was being copied")


def _link_escapes(rel_dir: tuple[str, ...], target: str) -> bool:
    """Whether a symlink in ``rel_dir`` pointing at ``target`` leaves the rootfs, resolved as the guest will."""
    parts: list[str] = [] if target.startswith("/") else list(rel_dir)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return True
            parts.pop()
        else:
            parts.append(part)
    return False


def _copy_dir(
    src_fd: int, dest: Path, rel: tuple[str, ...], budget: _Budget, top: str, *, hardlink: bool = False
) -> None:
    """Copy the directory open as ``src_fd`` into the existing directory ``dest`` (see the module docstring)."""
    if len(rel) > MAX_ROOTFS_DEPTH:
        raise InvalidSource(f"rootfs {top}/{'/'.join(rel)}: nested more than {MAX_ROOTFS_DEPTH} levels deep")
    with os.scandir(src_fd) as entries:
        names = sorted(entry.name for entry in entries)
    for name in names:
        where = "/".join((top, *rel, name))
        budget.take(where)
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        target = dest / name
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
            try:
                _same_inode(fd, st, where)
                target.mkdir(0o700)
                _copy_dir(fd, target, (*rel, name), budget, top, hardlink=hardlink)
                target.chmod(_host_mode(st.st_mode))
                durable.fsync_dir(target)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(src_fd, name, target, st, hardlink=hardlink)
        elif stat.S_ISLNK(st.st_mode):
            link = os.readlink(name, dir_fd=src_fd)
            if _link_escapes(rel, link):
                raise InvalidSource(f"rootfs {where}: symlink target {link!r} leaves the rootfs")
            target.symlink_to(link)
        else:
            raise InvalidSource(
                f"rootfs {where}: is {_kind(st.st_mode)}; a rootfs may hold only files, directories and symlinks"
            )


def _copy_file(src_dir_fd: int, name: str, target: Path, st: os.stat_result, *, hardlink: bool = False) -> None:
    """Copy (or, from an installed agent, hard-link) one regular file, fsynced, with set-id bits dropped."""
    if hardlink:
        os.link(name, target, src_dir_fd=src_dir_fd, follow_symlinks=False)
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_dir_fd)
    try:
        _same_inode(fd, st, name)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(os.dup(fd), "rb") as reader, os.fdopen(os.dup(out), "wb") as writer:
                shutil.copyfileobj(reader, writer, 1024 * 1024)
            os.fchmod(out, _host_mode(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    """Delete a tree we created, even where copied modes made directories read-only; never follows symlinks."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
        return
    if not path.exists():
        return
    with suppress(OSError):
        path.chmod(0o700)
    for top, dirs, _files in os.walk(path):
        for name in dirs:
            child = Path(top, name)
            if not child.is_symlink():
                with suppress(OSError):
                    child.chmod(0o700)
    shutil.rmtree(path)


_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
