"""Build step rootfs: the appliance's root tree, build/rootfs/.

1. mkosi 14 (image/mkosi.conf) bootstraps Debian bookworm with python3, python3-nftables, python3-cryptography and
   qemu-system-x86 (cage's VMM) into a directory;
   image/mkosi.prepare upgrades it from bookworm-updates and bookworm-security.  mkosi runs in a private mount
   namespace with a tmpfs on /run and --nspawn-keep-unit, so that its systemd-nspawn asks no system bus for a
   unit (there is none on a build host or container without systemd), and any mount it leaves dies with the
   namespace.  mkosi's package cache and its incremental copy of the installed tree live in build/cache/mkosi/;
   the copy is dropped when the mkosi files or mkosi's version change.  It is not refreshed otherwise: delete
   build/cache/mkosi/ to pick up new Debian updates.
2. Trim: keep the files of the packages that KEEP_PACKAGES need at run time, and drop every other package's files
   (shells, apt, dpkg, perl, login, util-linux, coreutils, ...), using dpkg's own file lists.  Then /etc, /usr/bin
   and /usr/sbin are cut down to allowlists, and docs, locales, Python test suites, package state and all of /var go.
3. Install the project's packages and their runtime dependencies (the versions installed in .venv; a dependency the
   dev environment takes from a Debian package, like cryptography, comes from the same Debian package in the image,
   its version checked to match) into /usr/lib/python3/dist-packages, copy image/rootfs-files/ over the tree
   (/sbin/init, /etc/nullbox/nulld.toml, ...), and compile every module with the tree's own python3, hash-based
   and unchecked (the root is read-only).
4. Check: nothing forbidden is left (see `forbidden`), and the tree's python3 imports what the services need.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Final

from packaging.markers import Marker

from image.context import Context

REPO: Final = Path(__file__).resolve().parent.parent
MKOSI_FILES: Final = ("image/mkosi.conf", "image/mkosi.prepare", "image/mkosi.skeleton")
ROOTFS_FILES: Final = "image/rootfs-files"


def project_packages(repo: Path = REPO) -> list[str]:
    """The top-level import packages the project ships, as pyproject.toml's setuptools `find` selects them."""
    config = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    patterns: list[str] = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        entry.name
        for entry in repo.iterdir()
        if (entry / "__init__.py").is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)
    )


INPUTS: Final[list[str]] = [*MKOSI_FILES, ROOTFS_FILES, "pyproject.toml", *project_packages()]

# What the appliance runs: these packages and everything they need at run time stay, all other packages go.
KEEP_PACKAGES: Final = (
    "python3",
    "python3-nftables",
    "python3-cryptography",
    "ca-certificates",
    "tzdata",
    "base-files",
)
# Programs kept without their package's Depends: the package (its files) and the packages of the shared libraries
# the tree's loader resolves for the program, with their own dependencies.  qemu-system-x86 Depends on
# qemu-system-common, which Depends on spice, ALSA, epoxy and, through them, gstreamer, NSS, Kerberos ... for display
# and audio modules cage never loads (~25 MB).  Its firmware comes from qemu-system-data (see QEMU_DATA_KEEP).
KEEP_PROGRAMS: Final = {"qemu-system-x86": "/usr/bin/qemu-system-x86_64", "qemu-system-data": None}
# Dependencies that only maintainer scripts use (installing, configuring): not followed.
INSTALL_TIME_ONLY: Final = frozenset(
    {"dpkg", "debconf", "debconf-2.0", "perl-base", "init-system-helpers", "adduser", "awk", "mawk", "ucf"}
)
# Files of dropped packages that are still wanted (libc-bin: the loader's configuration, the C.UTF-8 locale).
#: Runtime dependencies taken from Debian packages, in the dev environment (system site-packages) and in the image:
#: distribution name -> Debian package (kept in the tree by KEEP_PACKAGES).
DEBIAN_PROVIDED: Final = {"cryptography": "python3-cryptography"}
KEEP_FROM_DROPPED: Final = ("/etc/ld.so.conf", "/etc/ld.so.conf.d/libc.conf", "/usr/lib/locale/C.utf8")
MERGED_USR: Final = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}

# The only files in /usr/bin and /usr/sbin (init comes from image/rootfs-files).
EXECUTABLES: Final = frozenset({"usr/bin/python3", "usr/bin/python3.11", "usr/bin/qemu-system-x86_64", "usr/sbin/init"})
# The only QEMU data cage's microvm needs (its qboot firmware); the rest is firmware for other machines and
# architectures, keymaps for displays it never opens, option ROMs for devices it never adds.
QEMU_DATA: Final = "usr/share/qemu"
QEMU_DATA_KEEP: Final = frozenset({"bios-microvm.bin", "qboot.rom"})  # the first is a link to the second
# Everything else in /etc goes.  (nullbox/, hostname, hosts come from image/rootfs-files; resolv.conf and
# machine-id are written below.)
ETC_KEEP: Final = frozenset(
    {
        "debian_version",
        "gai.conf",
        "group",
        "gshadow",
        "host.conf",
        "hostname",
        "hosts",
        "ld.so.cache",
        "ld.so.conf",
        "ld.so.conf.d",
        "locale.conf",
        "localtime",
        "machine-id",
        "mime.types",
        "netconfig",
        "nsswitch.conf",
        "nullbox",
        "os-release",
        "passwd",
        "python3",
        "python3.11",
        "resolv.conf",
        "shadow",
        "ssl",
        "timezone",
    }
)
REMOVE: Final = (
    "boot",
    "home",
    "media",
    "mnt",
    "opt",
    "srv",
    "usr/games",
    "usr/local",
    "usr/libexec",
    "usr/include",
    "usr/src",
    "usr/lib/valgrind",
    "usr/lib/binfmt.d",
    "usr/share/doc-base",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/applications",
    "usr/share/binfmts",
    "usr/share/pixmaps",
    "usr/share/python3",  # Debian's py3compile helpers
    "usr/share/zoneinfo/right",  # leap-second variants
    "usr/lib/ssl/misc",  # openssl's perl and shell helper scripts
    "usr/lib/x86_64-linux-gnu/gconv",  # iconv modules: Python has its own codecs
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/distutils",
    "usr/lib/python3.11/venv",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/turtle.py",
    "usr/lib/python3.11/LICENSE.txt",
    "usr/lib/python3/dist-packages/jsonschema/tests",
    "usr/lib/python3/dist-packages/jsonschema/benchmarks",
    "usr/lib/qemu",  # qemu-bridge-helper (set-uid root), vhost-user helpers: cage uses none of them
    "usr/lib/ipxe",  # option ROMs for PCI NICs (microvm's virtio-net is on virtio-mmio)
    "usr/share/seabios",  # the PC BIOS (microvm boots qboot)
    "usr/share/qemu-efi",
)
# Empty directories the appliance mounts over, or writes to at run time (mode).
MOUNT_POINTS: Final = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "tmp": 0o1777, "var": 0o755}

# What must never be in the image, whatever the packages pull in: checked here and by tests/image.
# Shells and remote-login daemons by name anywhere; the other programs by name in a bin/, sbin/ or libexec/.
SHELLS: Final = frozenset({"sh", "bash", "dash", "rbash", "busybox", "zsh", "ksh", "mksh", "csh", "tcsh", "fish"})
FORBIDDEN_ANYWHERE: Final = SHELLS | frozenset({"sshd", "dropbear", "telnetd"})
FORBIDDEN_PROGRAMS: Final = frozenset(
    {
        "apt",
        "aptitude",
        "dpkg",
        "debconf",
        "perl",
        "ssh",
        "login",
        "nologin",
        "getty",
        "agetty",
        "mingetty",
        "sulogin",
        "su",
        "sudo",
        "runuser",
        "passwd",
        "chpasswd",
        "useradd",
        "pip",
        "pip3",
    }
)
FORBIDDEN_PROGRAM_PREFIXES: Final = ("apt-", "dpkg-", "debconf-", "perl5", "python2")
PROGRAM_DIRS: Final = frozenset({"bin", "sbin", "libexec"})
# The one place a kernel may be: the agent VMs' (image/guest.py); the appliance never boots it.
GUEST_KERNEL_DIR: Final = PurePosixPath("/usr/lib/nullbox/guest")
FORBIDDEN_TREES: Final = (
    "/boot",
    "/etc/apt",
    "/etc/dpkg",
    "/etc/pam.d",
    "/etc/ssh",
    "/usr/lib/apt",
    "/usr/lib/dpkg",
    "/usr/lib/modules",
    "/usr/lib/x86_64-linux-gnu/perl",
    "/usr/lib/x86_64-linux-gnu/perl-base",
    "/usr/lib/x86_64-linux-gnu/perl5",
    "/usr/share/doc",
    "/usr/share/info",
    "/usr/share/locale",
    "/usr/share/man",
    "/usr/share/perl",
    "/usr/share/perl5",
    "/var",
)
PYTHON_DIRS: Final = ("usr/lib/python3.11", "usr/lib/python3/dist-packages")
# The build fails unless the tree's own python3 can do this (run in a chroot, writing no bytecode).
SMOKE_TEST: Final = """
import asyncio, ctypes, json, sqlite3, ssl, zoneinfo
import nftables, rfc8785
import nulld.__main__, nulld.config, ctxgraph.server, egress.controller, egress.dnsproxy, nulld.uplink
import cage.manifest, cage.agents, cage.runtime, cage.server, cage.vault
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
nftables.Nftables()
AESGCM(AESGCM.generate_key(bit_length=256)).encrypt(b"0" * 12, b"sealed", b"name")
assert ssl.create_default_context().cert_store_stats()["x509_ca"] > 0, "no CA certificates"
zoneinfo.ZoneInfo("Europe/Berlin")
nulld.config.load(nulld.config.DEFAULT_PATH)
print("rootfs: python", ".".join(map(str, __import__("sys").version_info[:3])), "imports what nullbox needs")
import subprocess
qemu = subprocess.run(["/usr/bin/qemu-system-x86_64", "-version"], capture_output=True, text=True, check=True)
machines = subprocess.run(["/usr/bin/qemu-system-x86_64", "-machine", "help"], capture_output=True, text=True)
assert "microvm" in machines.stdout, machines.stdout + machines.stderr
assert __import__("os").path.isfile("/usr/share/qemu/bios-microvm.bin"), "no firmware for -M microvm"
print("rootfs:", qemu.stdout.splitlines()[0], "runs, with its libraries, and has microvm")
"""


def forbidden(paths: Iterable[str]) -> list[str]:
    """The paths (absolute, as in the image) that an immutable appliance must not contain."""
    found = []
    for path in paths:
        pure = PurePosixPath(path)
        program = bool(PROGRAM_DIRS.intersection(pure.parent.parts))
        if (
            pure.name in FORBIDDEN_ANYWHERE
            or (program and (pure.name in FORBIDDEN_PROGRAMS or pure.name.startswith(FORBIDDEN_PROGRAM_PREFIXES)))
            or (pure.name.startswith(("vmlinuz", "vmlinux", "initrd.img")) and pure.parent != GUEST_KERNEL_DIR)
            or any(path.startswith(tree + "/") for tree in FORBIDDEN_TREES)
            or (path.startswith("/usr/lib/locale/") and not path.startswith("/usr/lib/locale/C.utf8"))
        ):
            found.append(path)
    return found


def image_paths(tree: Path) -> Iterator[str]:
    """Every path in the tree, absolute as the image sees it (symlinks not followed)."""
    for parent, dirs, files in os.walk(tree):
        for name in sorted(dirs + files):
            yield "/" + str((Path(parent) / name).relative_to(tree))


# --- mkosi ---------------------------------------------------------------------------------------------------------


def _digest(ctx: Context, relatives: Iterable[str]) -> str:
    """What decides mkosi's tree: its version and configuration files."""
    repo = ctx.repo
    digest = hashlib.sha256(ctx.output(["mkosi", "--version"]).encode())
    for relative in relatives:
        root = repo / relative
        for file in sorted([root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]):
            digest.update(str(file.relative_to(repo)).encode() + b"\0" + file.read_bytes() + b"\0")
            digest.update(b"x" if file.stat().st_mode & 0o111 else b"-")
    return digest.hexdigest()


def run_mkosi(ctx: Context) -> Path:
    """Run mkosi; returns the directory tree it made (to be moved away by the caller)."""
    cache = ctx.out / "cache" / "mkosi"
    output, packages, workspace = cache / "output", cache / "packages", cache / "workspace"
    key_file, key = cache / "config.sha256", _digest(ctx, MKOSI_FILES)
    if output.exists() and (not key_file.exists() or key_file.read_text().strip() != key):
        ctx.log("rootfs: mkosi configuration changed; dropping mkosi's incremental cache")
        shutil.rmtree(output)
    key_file.unlink(missing_ok=True)
    if workspace.exists():  # left over by an interrupted build (its mounts died with its namespace)
        shutil.rmtree(workspace)
    for directory in (output, packages, workspace):
        directory.mkdir(parents=True, exist_ok=True)
    # mkosi 14 rebuilds its incremental cache unless both cache-pre-dev and cache-pre-inst exist, but makes
    # cache-pre-dev only for a build script (need_cache_images()); we have none, so an empty one stands in
    (output / "root.cache-pre-dev").touch()
    mkosi = [
        "mkosi",
        f"--directory={ctx.repo / 'image'}",
        "--force",
        "--incremental",
        "--nspawn-keep-unit",
        f"--output={output / 'root'}",
        f"--cache={packages}",
        f"--workspace-dir={workspace}",
        "build",
    ]
    # a private mount namespace, in which `python -m image.rootfs --in-namespace ARGV` mounts a tmpfs on /run
    # and runs ARGV (see _in_namespace): argv lists all the way, no shell
    namespace = ["unshare", "--mount", "--propagation", "private"]
    ctx.run([*namespace, sys.executable, "-m", "image.rootfs", "--in-namespace", *mkosi], cwd=ctx.repo)
    key_file.write_text(key + "\n")
    return output / "root"


def _in_namespace(argv: list[str]) -> int:
    """Inside `unshare --mount`: hide the host's /run from systemd-nspawn, then run argv."""
    mount = shutil.which("mount")
    if mount is None:
        raise RuntimeError("mount(8) not found")
    subprocess.run([mount, "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/run"], check=True)
    return subprocess.run(argv, check=False).returncode


# --- trimming ------------------------------------------------------------------------------------------------------


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            yield fields


def _names(relation: str) -> list[list[str]]:
    """'a (>= 1) | b:any, c' -> [['a', 'b'], ['c']]"""
    groups = []
    for group in relation.split(","):
        names = [re.split(r"[\s:(\[]", alt.strip(), maxsplit=1)[0] for alt in group.split("|")]
        if any(names):
            groups.append([n for n in names if n])
    return groups


def runtime_closure(status: str, roots: Iterable[str]) -> tuple[set[str], set[str]]:
    """(kept, installed): the installed packages the roots need through Depends and Pre-Depends, and all of them."""
    installed: dict[str, dict[str, str]] = {}
    providers: dict[str, list[str]] = {}
    for fields in _stanzas(status):
        if fields.get("Status", "").endswith(" installed"):
            installed[fields["Package"]] = fields
            for group in _names(fields.get("Provides", "")):
                providers.setdefault(group[0], []).append(fields["Package"])
    kept: set[str] = set()
    todo = list(roots)
    while todo:
        package = todo.pop()
        if package in kept:
            continue
        if package not in installed:
            raise RuntimeError(f"rootfs: package {package} is not installed in the tree")
        kept.add(package)
        relations = installed[package].get("Pre-Depends", "") + "," + installed[package].get("Depends", "")
        for group in _names(relations):
            if any(name in INSTALL_TIME_ONLY for name in group):
                continue
            candidates = [c for name in group for c in ([name] if name in installed else providers.get(name, []))]
            if not candidates:
                raise RuntimeError(f"rootfs: {package} needs {' | '.join(group)}, which is not installed")
            if not any(c in kept for c in candidates):
                todo.append(candidates[0])
    return kept, set(installed)


def _canonical(path: str) -> str:
    """An absolute path from a dpkg file list, with the merged-/usr symlinks (/bin -> usr/bin, ...) resolved."""
    relative = path.strip().lstrip("/")
    top, _, rest = relative.partition("/")
    if top in MERGED_USR:
        relative = MERGED_USR[top] + ("/" + rest if rest else "")
    return "/" + relative


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def loader_libraries(ctx: Context, tree: Path, program: str) -> list[str]:
    """The shared libraries the tree's dynamic loader resolves for ``program`` (``ld.so --list``, in a chroot)."""
    listing = ctx.output(["chroot", str(tree), "/lib64/ld-linux-x86-64.so.2", "--list", program])
    found = []
    for line in listing.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        path = rest.split(" (")[0].strip() if arrow else name.split(" (")[0].strip()
        if path.startswith("/"):
            found.append(_canonical(path))
        elif arrow and "not found" in rest:
            raise RuntimeError(f"rootfs: {program} needs {name}, which the tree does not have")
    return found


def drop_packages(ctx: Context, tree: Path) -> None:
    """Remove the files of every package outside the runtime closure of KEEP_PACKAGES and KEEP_PROGRAMS."""
    dpkg = tree / "var/lib/dpkg"
    status = (dpkg / "status").read_text(encoding="utf-8")
    kept, installed = runtime_closure(status, KEEP_PACKAGES)

    def files(package: str) -> set[str]:
        for name in (f"{package}.list", f"{package}:amd64.list"):
            if (dpkg / "info" / name).exists():
                text = (dpkg / "info" / name).read_text(encoding="utf-8")
                return {_canonical(line) for line in text.splitlines() if line.strip() not in ("", "/.")}
        return set()

    owners: dict[str, str] = {}
    for package in sorted(installed):
        for path in files(package):
            owners.setdefault(path, package)
    for package, program in KEEP_PROGRAMS.items():
        kept.add(package)
        if program is None:
            continue
        needed: set[str] = set()
        for library in loader_libraries(ctx, tree, program):
            real = _resolve(tree, PurePosixPath(library))  # dpkg may list the file, not its SONAME link
            owner = owners.get(library) or (owners.get(str(real)) if real is not None else None)
            if owner is None:
                raise RuntimeError(f"rootfs: no package owns {library} ({program} needs it)")
            needed.add(owner)
        kept |= runtime_closure(status, needed)[0]
    dropped = sorted(installed - kept)

    keep = set().union(*(files(p) for p in kept))
    directories = []
    for path in sorted(set().union(*(files(p) for p in dropped)) - keep):
        if any(path == k or path.startswith(k + "/") for k in KEEP_FROM_DROPPED):
            continue
        full = tree / path.lstrip("/")
        if full.is_dir() and not full.is_symlink():
            directories.append(full)
        elif full.is_symlink() or full.exists():
            full.unlink()
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
    ctx.log(f"rootfs: kept {len(kept)} packages: {' '.join(sorted(kept))}")
    ctx.log(f"rootfs: dropped {len(dropped)} packages: {' '.join(dropped)}")


def _resolve(tree: Path, path: PurePosixPath, depth: int = 0) -> PurePosixPath | None:
    """Resolve an absolute image path inside the tree, following symlinks as the image would; None on a loop."""
    if depth > 40:
        return None
    resolved = PurePosixPath("/")
    for part in path.parts[1:]:
        if part == "..":
            resolved = resolved.parent
            continue
        candidate = resolved / part
        full = tree / str(candidate).lstrip("/")
        if full.is_symlink():
            target = PurePosixPath(full.readlink())
            absolute = target if target.is_absolute() else candidate.parent / target
            found = _resolve(tree, absolute, depth + 1)
            if found is None:
                return None
            candidate = found
        elif part == ".":
            continue
        resolved = candidate
    return resolved


def remove_dangling_symlinks(ctx: Context, tree: Path) -> None:
    """Remove symlinks that point at nothing in the tree (alternatives, helpers of dropped packages), until none
    are left; links into the file systems mounted at run time (/proc, /run, ...) stay."""
    runtime = tuple(f"/{name}/" for name in MOUNT_POINTS)
    while True:
        removed = []
        for path in list(image_paths(tree)):
            full = tree / path.lstrip("/")
            if not full.is_symlink():
                continue
            target = _resolve(tree, PurePosixPath(path))
            if target is not None and (str(target) + "/").startswith(runtime):
                continue
            if target is None or not os.path.lexists(tree / str(target).lstrip("/")):
                full.unlink()
                removed.append(path)
        if not removed:
            return
        ctx.log(f"rootfs: removed {len(removed)} dangling symlinks: {' '.join(removed)}")


def trim(ctx: Context, tree: Path) -> None:
    drop_packages(ctx, tree)
    for relative in REMOVE:
        _remove(tree / relative)
    for directory in ("usr/bin", "usr/sbin"):
        for entry in (tree / directory).iterdir():
            if f"{directory}/{entry.name}" not in EXECUTABLES:
                _remove(entry)
    for entry in (tree / "etc").iterdir():
        if entry.name not in ETC_KEEP:
            _remove(entry)
    for locale in (tree / "usr/lib/locale").iterdir():
        if locale.name != "C.utf8":
            _remove(locale)
    for entry in (tree / QEMU_DATA).iterdir():
        if entry.name not in QEMU_DATA_KEEP:
            _remove(entry)
    for name in ("root", *MOUNT_POINTS):  # emptied, and made again below
        _remove(tree / name)
    remove_dangling_symlinks(ctx, tree)


# --- installing nullbox --------------------------------------------------------------------------------------------


def _copy_file(source: Path, target: Path, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def venv_site_packages(repo: Path) -> Path:
    found = sorted((repo / ".venv" / "lib").glob("python3*/site-packages"))
    if len(found) != 1:
        raise RuntimeError(f"rootfs: expected one .venv/lib/python3*/site-packages in {repo}, found {len(found)}")
    return found[0]


def runtime_requirements(requirements: Iterable[str]) -> list[str]:
    """Names of the requirements that apply at run time on the appliance: no extras, and environment markers
    evaluated for this interpreter (the image ships the same Python on the same platform)."""
    names = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate({"extra": ""}):
            continue
        names.append(re.split(r"[\s\[<>=!~(]", spec.strip(), maxsplit=1)[0])
    return names


def install_dependencies(ctx: Context, target: Path) -> None:
    """Copy the project's runtime dependencies, recursively, at the versions installed in .venv."""
    site = venv_site_packages(ctx.repo)
    pyproject = tomllib.loads((ctx.repo / "pyproject.toml").read_text(encoding="utf-8"))
    todo = runtime_requirements(pyproject["project"].get("dependencies", []))
    done: set[str] = set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in done:
            continue
        done.add(name)
        found = [
            d
            for d in importlib.metadata.distributions(path=[str(site)])
            if re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() == name
        ]
        if not found and name in DEBIAN_PROVIDED:
            _check_debian_provided(ctx, name, target)
            continue
        if len(found) != 1:
            raise RuntimeError(f"rootfs: runtime dependency {name} is not installed in {site} (run `make deps`)")
        distribution = found[0]
        copied = 0
        for file in distribution.files or []:
            parts = PurePosixPath(str(file)).parts
            if parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc":
                continue  # scripts outside site-packages, bytecode (compiled later)
            if parts[0].endswith(".dist-info") and parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            source = site / str(file)
            if file.hash is not None:
                digest = hashlib.sha256(source.read_bytes()).digest()
                if file.hash.mode != "sha256" or file.hash.value != _b64(digest):
                    raise RuntimeError(f"rootfs: {source} differs from its RECORD")
            _copy_file(source, target / str(file), 0o644)
            copied += 1
        ctx.log(f"rootfs: installed {distribution.metadata['Name']}=={distribution.version} ({copied} files)")
        todo.extend(runtime_requirements(distribution.requires or []))


def _check_debian_provided(ctx: Context, name: str, target: Path) -> None:
    """A dependency both the dev venv (system site-packages) and the image take from the same Debian package."""
    in_tree = [
        d for d in importlib.metadata.distributions(path=[str(target)]) if _normalise(d.metadata["Name"]) == name
    ]
    try:
        dev_version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        package = DEBIAN_PROVIDED[name]
        raise RuntimeError(f"rootfs: {name} is not installed on the build host (apt-get install {package})") from None
    if not in_tree or {d.version for d in in_tree} != {dev_version}:  # (Debian may ship .egg-info and .dist-info)
        found = ", ".join(d.version for d in in_tree) or "none"
        raise RuntimeError(
            f"rootfs: {name} {dev_version} is used by the dev environment but the image's {DEBIAN_PROVIDED[name]} "
            f"gives {found}: add it to image/mkosi.conf and KEEP_PACKAGES, or update the build host"
        )
    ctx.log(f"rootfs: {name}=={dev_version} comes from Debian's {DEBIAN_PROVIDED[name]}")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def install_project(ctx: Context, target: Path) -> None:
    """Copy the project's packages: their modules and py.typed, as the wheel would have them."""
    for package in project_packages(ctx.repo):
        count = 0
        for source in sorted((ctx.repo / package).rglob("*")):
            relative = source.relative_to(ctx.repo)
            if "__pycache__" in relative.parts or not source.is_file():
                continue
            if source.suffix == ".py" or source.name == "py.typed":
                _copy_file(source, target / relative, 0o644)
                count += 1
        ctx.log(f"rootfs: installed {package} ({count} files)")


def install_files(ctx: Context, tree: Path) -> None:
    """image/rootfs-files/ verbatim (mode 0755 where the repository's file is executable, else 0644), then the
    files every build writes the same way."""
    files = ctx.repo / ROOTFS_FILES
    for source in sorted(files.rglob("*")):
        if source.is_file():
            _copy_file(source, tree / source.relative_to(files), 0o755 if source.stat().st_mode & 0o111 else 0o644)
    for name, mode in MOUNT_POINTS.items():
        (tree / name).mkdir()
        (tree / name).chmod(mode)
    (tree / "root").mkdir(mode=0o700)
    (tree / "etc/machine-id").write_text("")
    (tree / "etc/machine-id").chmod(0o444)
    _remove(tree / "etc/resolv.conf")
    (tree / "etc/resolv.conf").symlink_to("../run/resolv.conf")
    # the last password change (days since 1970) is the build day: make it the epoch's
    shadow = tree / "etc/shadow"
    day = str(ctx.source_date_epoch // 86400)
    lines = [line.split(":") for line in shadow.read_text().splitlines()]
    shadow.write_text("".join(":".join([*f[:2], day if f[2] else "", *f[3:]]) + "\n" for f in lines))


def harden(tree: Path) -> None:
    """No set-uid/set-gid files; only directories, regular files and symlinks."""
    for path in image_paths(tree):
        full = tree / path.lstrip("/")
        mode = full.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise RuntimeError(f"rootfs: {path} is a special file")
        if mode & (stat.S_ISUID | stat.S_ISGID):
            full.chmod(stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))


def compile_bytecode(ctx: Context, tree: Path) -> None:
    """Every module's bytecode, made by the tree's python3: hash-based and never checked, so that no timestamp
    matters and nothing is ever written at run time; a fixed hash seed keeps the output the same each build."""
    for directory in PYTHON_DIRS:
        for cache in sorted((tree / directory).rglob("__pycache__")):
            shutil.rmtree(cache)
    env = {**ctx.env(), "PYTHONHASHSEED": "0"}
    argv = ["chroot", str(tree), "/usr/bin/python3", "-I", "-m", "compileall", "-q", "-f"]
    ctx.run([*argv, "--invalidation-mode", "unchecked-hash", *(f"/{d}" for d in PYTHON_DIRS)], env=env)
    missing = []
    for directory in PYTHON_DIRS:
        for module in (tree / directory).rglob("*.py"):
            if not (module.parent / "__pycache__" / f"{module.stem}.cpython-311.pyc").is_file():
                missing.append(str(module.relative_to(tree)))
        for cache in (tree / directory).rglob("__pycache__"):
            cache.chmod(0o755)
            for pyc in cache.iterdir():
                pyc.chmod(0o644)
    if missing:
        raise RuntimeError(f"rootfs: no bytecode for {len(missing)} modules, e.g. {missing[:5]}")


def drop_sources(ctx: Context, tree: Path) -> None:
    """Ship bytecode only, except for NullBox's own packages: each other module's ``__pycache__/X.cpython-311.pyc``
    becomes ``X.pyc`` beside it (where Python's sourceless loader finds it) and ``X.py`` goes.

    Why: the sources of the standard library and the dependencies are ~2.7 MB of the compressed image and nothing
    on the appliance reads them (no debugger, no inspect.getsource); their tracebacks keep file and line numbers.
    NullBox's packages keep theirs, so its own tracebacks show the code.  Sourceless modules also skip the
    source's stat at import.
    """
    ours = {f"usr/lib/python3/dist-packages/{name}" for name in project_packages()}
    dropped = size = 0
    for directory in PYTHON_DIRS:
        for module in sorted((tree / directory).rglob("*.py")):
            relative = module.relative_to(tree)
            if any(str(relative).startswith(f"{package}/") for package in ours):
                continue
            cache = module.parent / "__pycache__" / f"{module.stem}.cpython-311.pyc"
            size += module.stat().st_size
            cache.replace(module.with_suffix(".pyc"))
            module.unlink()
            dropped += 1
        for cache in sorted((tree / directory).rglob("__pycache__"), reverse=True):
            if not any(cache.iterdir()):
                cache.rmdir()
    ctx.log(f"rootfs: {dropped} modules as bytecode only ({size / 2**20:.1f} MiB of sources left out)")


def check(ctx: Context, tree: Path) -> None:
    bad = forbidden(image_paths(tree))
    if bad:
        raise RuntimeError(f"rootfs: forbidden paths in the tree: {' '.join(bad[:20])}")
    if any((tree / "var").iterdir()):
        raise RuntimeError("rootfs: /var is not empty")
    env = {**ctx.env(), "PYTHONDONTWRITEBYTECODE": "1"}
    ctx.run(["chroot", str(tree), "/usr/bin/python3", "-I", "-B", "-c", SMOKE_TEST], env=env)


def build(ctx: Context) -> None:
    tree = ctx.out / "rootfs"
    made = run_mkosi(ctx)
    if tree.exists():
        shutil.rmtree(tree)
    made.rename(tree)
    trim(ctx, tree)
    install_files(ctx, tree)
    site = tree / "usr/lib/python3/dist-packages"
    install_project(ctx, site)
    install_dependencies(ctx, site)
    ctx.run(["ldconfig", "-X", "-r", str(tree)])  # the loader's cache, for the libraries that are left
    _remove(tree / "var")
    (tree / "var").mkdir(mode=MOUNT_POINTS["var"])
    harden(tree)
    compile_bytecode(ctx, tree)
    drop_sources(ctx, tree)
    check(ctx, tree)
    size = sum(f.lstat().st_size for f in tree.rglob("*") if not f.is_symlink() and f.is_file())
    ctx.log(f"rootfs: {tree.relative_to(ctx.repo)} holds {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--in-namespace"]:
        sys.exit("image/rootfs.py is a build step: python -m image.build rootfs")
    sys.exit(_in_namespace(sys.argv[2:]))
