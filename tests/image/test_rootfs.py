"""The root tree and its SquashFS: reproducible packing and the shipped files (always), and what the built image
contains and must not contain (when build/rootfs.squashfs exists: `python -m image.build squashfs` makes it)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from image import rootfs, squashfs
from image.context import Context
from nulld import config

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "image" / "rootfs-files"
BUILT = REPO / "build" / "rootfs.squashfs"
EPOCH = 1767225600

needs_image = pytest.mark.usefixtures("image")  # builds the image once per run, or reuses it


@dataclass(frozen=True)
class Entry:
    mode: str  # as ls shows it: drwxr-xr-x
    owner: str
    size: str
    time: str
    target: str | None  # of a symlink


LINE = re.compile(r"(\S{10}) (\S+)\s+(\S+) (\S+ \S+) squashfs-root(/.*?)?(?: -> (.*))?")


def listing(image: Path) -> dict[str, Entry]:
    """unsquashfs -lls, keyed by absolute path in the image ("/" for the root)."""
    text = subprocess.run(["unsquashfs", "-UTC", "-lls", str(image)], capture_output=True, text=True, check=True).stdout
    entries = {}
    for line in text.splitlines():
        match = LINE.fullmatch(line)
        if match:
            mode, owner, size, time, path, target = match.groups()
            entries[path or "/"] = Entry(mode, owner, size, time, target)
    assert "/" in entries, f"cannot parse the listing of {image}:\n{text[:2000]}"
    return entries


def cat(image: Path, path: str) -> bytes:
    return subprocess.run(["unsquashfs", "-cat", str(image), path], capture_output=True, check=True).stdout


def make_tree(root: Path, order: list[int], mtime: int) -> None:
    """A small tree with files, directories, an executable and symlinks, created in the given order."""
    items = [
        ("etc/hostname", b"nullbox\n", 0o644),
        ("etc/nullbox/nulld.toml", b"[system]\n", 0o644),
        ("usr/bin/python3.11", b"\x7fELF" + bytes(range(256)) * 64, 0o755),
        ("usr/lib/python3/dist-packages/mod.py", b"x = 1\n" * 1000, 0o644),
        ("usr/sbin/init", b"#!/usr/bin/python3 -I\n", 0o755),
    ]
    for index in order:
        relative, content, mode = items[index]
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "sbin").symlink_to("usr/sbin")
    (root / "var").mkdir()
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def test_squashfs_packing_is_reproducible(tmp_path: Path) -> None:
    """Same content and epoch -> same bytes, whatever the creation order and the files' own timestamps."""
    first, second = tmp_path / "a", tmp_path / "b"
    make_tree(first, [0, 1, 2, 3, 4], mtime=1_000_000_000)
    make_tree(second, [4, 3, 2, 1, 0], mtime=1_700_000_000)
    ctx = Context(repo=tmp_path, out=tmp_path, source_date_epoch=EPOCH)
    digest_a = squashfs.pack(ctx, first, tmp_path / "a.squashfs")
    digest_b = squashfs.pack(ctx, second, tmp_path / "b.squashfs")
    assert (tmp_path / "a.squashfs").read_bytes() == (tmp_path / "b.squashfs").read_bytes()
    assert digest_a == digest_b == hashlib.sha256((tmp_path / "a.squashfs").read_bytes()).hexdigest()

    entries = listing(tmp_path / "a.squashfs")
    assert {e.owner for e in entries.values()} == {"root/root"}
    assert {e.time for e in entries.values()} == {"2026-01-01 00:00"}
    assert entries["/usr/sbin/init"].mode == "-rwxr-xr-x"
    assert entries["/sbin"].target == "usr/sbin"

    later = Context(repo=tmp_path, out=tmp_path, source_date_epoch=EPOCH + 86400)
    assert squashfs.pack(later, first, tmp_path / "c.squashfs") != digest_a


def test_squashfs_step_writes_the_image_and_its_checksum(tmp_path: Path) -> None:
    make_tree(tmp_path / "rootfs", [0, 1, 2, 3, 4], mtime=0)
    squashfs.build(Context(repo=tmp_path, out=tmp_path, source_date_epoch=EPOCH))
    image = (tmp_path / "rootfs.squashfs").read_bytes()
    assert (tmp_path / "rootfs.squashfs.sha256").read_text() == hashlib.sha256(image).hexdigest() + "\n"
    assert not list(tmp_path.glob("*.partial"))
    assert cat(tmp_path / "rootfs.squashfs", "/etc/hostname") == b"nullbox\n"


def test_shipped_nulld_toml_is_valid() -> None:
    loaded = config.load(FILES / "etc/nullbox/nulld.toml")
    assert loaded.hostname == "nullbox"
    assert loaded.order == ("egress", "uplink", "ctxgraph", "cage")
    cage = loaded.services["cage"]
    assert cage.argv == ["/usr/bin/python3", "-m", "cage", "serve"]
    assert set(cage.depends_on) == {"egress", "ctxgraph"}  # an agent's allow list and socket exist before its VM
    service = loaded.services["ctxgraph"]
    assert service.argv == ["/usr/bin/python3", "-m", "ctxgraph", "serve", "--vsock-port", "7000"]  # agents via vsock
    assert service.depends_on == ("egress",)  # the network policy is in force before anything agent-facing
    assert loaded.services["egress"].argv == ["/usr/bin/python3", "-m", "egress", "serve"]
    assert service.restart is config.Restart.ALWAYS
    assert service.ready is config.ReadyKind.NOTIFY


def test_shipped_init_is_a_python_program_that_runs_nulld() -> None:
    init = FILES / "usr/sbin/init"
    assert init.stat().st_mode & 0o111 == 0o111, "image/rootfs-files/usr/sbin/init must be executable"
    source = init.read_text()
    assert source.startswith("#!/usr/bin/python3 -IS\n")  # isolated, no site: dist-packages is added by hand
    assert 'sys.path.append("/usr/lib/python3/dist-packages")' in source
    compile(source, str(init), "exec")
    assert "from nulld.__main__ import main" in source


@pytest.mark.parametrize(
    "path",
    [
        "/usr/bin/sh",
        "/usr/bin/bash",
        "/usr/bin/dash",
        "/usr/bin/rbash",
        "/bin/busybox",
        "/usr/bin/apt-get",
        "/usr/bin/dpkg",
        "/usr/bin/dpkg-query",
        "/var/lib/dpkg/status",
        "/etc/apt/sources.list",
        "/usr/sbin/sshd",
        "/usr/bin/login",
        "/usr/sbin/agetty",
        "/usr/bin/su",
        "/usr/bin/perl",
        "/usr/share/doc/libc6/copyright",
        "/usr/share/man/man1/ls.1.gz",
        "/usr/share/locale/de/LC_MESSAGES/x.mo",
        "/usr/lib/locale/de_DE.utf8/LC_CTYPE",
        "/boot/vmlinuz-6.1.0-1-amd64",
        "/var/log/dpkg.log",
    ],
)
def test_forbidden_paths_are_recognised(path: str) -> None:
    assert rootfs.forbidden([path]) == [path]


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/etc/shadow",
        "/usr/bin/python3",
        "/usr/sbin/init",
        "/var",
        "/usr/lib/locale/C.utf8/LC_CTYPE",
        "/usr/lib/python3.11/shlex.py",
        "/usr/lib/python3/dist-packages/nulld/__main__.py",
    ],
)
def test_allowed_paths_are_not_flagged(path: str) -> None:
    assert rootfs.forbidden([path]) == []


def test_dependency_closure_skips_install_time_tools_and_follows_providers() -> None:
    status = """Package: python3
Status: install ok installed
Pre-Depends: python3-minimal (= 3.11.2-1+b1)
Depends: python3.11 (>= 3.11.2-1~), libpython3-stdlib (= 3.11.2-1+b1)

Package: python3-minimal
Status: install ok installed
Depends: dpkg (>= 1.13.20)

Package: python3.11
Status: install ok installed
Depends: media-types | mime-support, tzdata

Package: libpython3-stdlib
Status: install ok installed

Package: media-types
Status: install ok installed

Package: tzdata
Status: install ok installed
Depends: debconf (>= 0.5) | debconf-2.0

Package: time-data
Status: install ok installed
Provides: tzdata-virtual

Package: dpkg
Status: install ok installed

Package: bash
Status: install ok installed
"""
    kept, installed = rootfs.runtime_closure(status, ["python3"])
    assert kept == {"python3", "python3-minimal", "python3.11", "libpython3-stdlib", "media-types", "tzdata"}
    assert installed - kept == {"time-data", "dpkg", "bash"}
    with pytest.raises(RuntimeError, match="not installed"):
        rootfs.runtime_closure(status.replace("Package: media-types", "Package: other"), ["python3"])


def test_runtime_requirements_leave_out_extras() -> None:
    assert rootfs.runtime_requirements(["rfc8785>=0.1.4,<0.2", 'pytest>=8; extra == "dev"']) == ["rfc8785"]
    on_windows = 'win_inet_pton; platform_system == "Windows"'
    on_linux = 'x; sys_platform == "linux"'
    assert rootfs.runtime_requirements([on_windows, on_linux]) == ["x"]


# --- the built image ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(image: Path) -> dict[str, Entry]:
    return listing(image / "rootfs.squashfs")


def _resolve(entries: dict[str, Entry], path: str) -> str:
    """Follow the merged-/usr symlinks (/sbin -> usr/sbin) of the path's first component."""
    top, _, rest = path.lstrip("/").partition("/")
    entry = entries.get("/" + top)
    if entry is not None and entry.target is not None and rest:
        return "/" + entry.target.lstrip("/") + "/" + rest
    return path


@needs_image
@pytest.mark.parametrize(
    "path", ["/sbin/init", "/usr/bin/python3", "/usr/bin/python3.11", "/etc/nullbox/nulld.toml", "/etc/hostname"]
)
def test_image_contains(built: dict[str, Entry], path: str) -> None:
    assert _resolve(built, path) in built, f"{path} is missing from {BUILT}"


@needs_image
def test_image_init_is_executable_python(built: dict[str, Entry]) -> None:
    init = built[_resolve(built, "/sbin/init")]
    assert init.mode == "-rwxr-xr-x"
    assert cat(BUILT, "/usr/sbin/init") == (FILES / "usr/sbin/init").read_bytes()


@needs_image
def test_image_contains_nothing_forbidden(built: dict[str, Entry]) -> None:
    assert rootfs.forbidden(built) == []
    for path in ["/bin/sh", "/bin/bash", "/bin/dash", "/bin/rbash", "/bin/busybox", "/sbin/sshd", "/bin/login"]:
        assert _resolve(built, path) not in built, f"{path} is in the image"
    programs = {p for p in built if p.startswith(("/usr/bin/", "/usr/sbin/"))}
    assert programs == {"/usr/bin/python3", "/usr/bin/python3.11", "/usr/bin/qemu-system-x86_64", "/usr/sbin/init"}
    # QEMU without its helpers (qemu-bridge-helper is set-uid root) and without display/audio modules' libraries
    assert not [p for p in built if p.startswith(("/usr/lib/qemu/", "/usr/lib/x86_64-linux-gnu/qemu/"))]
    libraries = {PurePosixPath(p).name.split(".so")[0] for p in built if ".so" in p}
    assert not libraries & {"libspice-server", "libasound", "libgstreamer-1.0", "libepoxy", "libnss3"}
    assert sorted(p.removeprefix("/usr/share/qemu/") for p in built if p.startswith("/usr/share/qemu/")) == [
        "bios-microvm.bin",
        "qboot.rom",
    ]
    # The agents' guest kernel and initramfs, the only kernel in the image (the appliance's is on the ISO)
    kernels = sorted(p for p in built if PurePosixPath(p).name.startswith(("vmlinu", "initrd.img")))
    assert kernels == ["/usr/lib/nullbox/guest/initrd.img", "/usr/lib/nullbox/guest/vmlinux"]
    assert built["/usr/lib/nullbox/guest/nb-exec"].mode == "-rwxr-xr-x"  # cage starts QEMU through it
    for tree in ["/usr/share/doc", "/usr/share/man", "/usr/share/locale", "/var/lib/dpkg", "/var/lib/apt"]:
        assert tree not in built, f"{tree} is in the image"
    assert not [p for p, e in built.items() if e.mode[3] in "sS" or e.mode[6] in "sS"], "set-uid/set-gid files"


@needs_image
def test_image_mount_points_are_empty(built: dict[str, Entry]) -> None:
    for name in ["/proc", "/sys", "/dev", "/run", "/tmp", "/var"]:
        assert built[name].mode.startswith("d"), f"{name} is not a directory"
        assert not [p for p in built if p.startswith(name + "/")], f"{name} is not empty"
    assert built["/tmp"].mode == "drwxrwxrwt"


@needs_image
def test_image_etc(built: dict[str, Entry]) -> None:
    assert built["/etc/resolv.conf"].target == "../run/resolv.conf"
    assert built["/etc/machine-id"].size == "0"
    assert cat(BUILT, "/etc/hostname") == b"nullbox\n"
    shipped = cat(BUILT, "/etc/nullbox/nulld.toml").decode()
    assert shipped == (FILES / "etc/nullbox/nulld.toml").read_text()
    assert config.parse(shipped, "image:/etc/nullbox/nulld.toml").order == ("egress", "uplink", "ctxgraph", "cage")


@needs_image
def test_image_has_bytecode_for_every_module(built: dict[str, Entry]) -> None:
    """NullBox's packages: source and __pycache__ bytecode; everything else: sourceless X.pyc only."""
    python = ("/usr/lib/python3.11/", "/usr/lib/python3/")
    ours = tuple(f"/usr/lib/python3/dist-packages/{name}/" for name in rootfs.project_packages())
    sources = [p for p in built if p.endswith(".py") and p.startswith(python)]
    assert sources and all(p.startswith(ours) for p in sources), [p for p in sources if not p.startswith(ours)][:5]
    missing = [
        m
        for m in sources
        if f"{m.rsplit('/', 1)[0]}/__pycache__/{m.rsplit('/', 1)[1][:-3]}.cpython-311.pyc" not in built
    ]
    assert missing == []
    sourceless = [p for p in built if p.endswith(".pyc") and "/__pycache__/" not in p and p.startswith(python)]
    assert len(sourceless) > 500
    for module in ("/usr/lib/python3.11/asyncio/__init__.pyc", "/usr/lib/python3/dist-packages/pydantic/main.pyc"):
        assert module in built, module
    assert not [p for p in built if "/__pycache__/" in p and not p.startswith(ours)][:5]


@needs_image
def test_image_is_owned_by_root_at_one_time(built: dict[str, Entry]) -> None:
    assert {e.owner for e in built.values()} == {"root/root"}
    assert len({e.time for e in built.values()}) == 1


@needs_image
def test_image_checksum() -> None:
    checksum = BUILT.with_name(BUILT.name + ".sha256").read_text()
    assert checksum == hashlib.sha256(BUILT.read_bytes()).hexdigest() + "\n"


@needs_image
@pytest.mark.slow
def test_image_repacks_to_the_same_bytes(tmp_path: Path) -> None:
    """build/rootfs packed again, with the epoch recorded in the image, gives build/rootfs.squashfs exactly."""
    with BUILT.open("rb") as f:
        superblock = f.read(12)
    epoch = int.from_bytes(superblock[8:12], "little")  # mkfs_time, after magic and inode count
    ctx = Context(repo=REPO, out=tmp_path, source_date_epoch=epoch)
    again = tmp_path / "again.squashfs"
    squashfs.pack(ctx, REPO / "build" / "rootfs", again)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(BUILT.read_bytes()).hexdigest()
