"""Build-time pieces of an agent VM: the guest kernel to boot, the guest initramfs and the agent's read-only root
image.  (The per-boot config is written at run time by cage.qemu, which must not import image.*: the
appliance ships cage but not the image build.)

Two guest kernels, chosen by :class:`KernelKind` (every function below takes ``kernel``; None means
``choose_kernel()``: the NullBox guest kernel when kernel.build has built it and it is up to date, else Debian's):
  NULLBOX  build/kernel-nullbox/guest/ (``python -m kernel.build guest``): made for cage's microvm, everything the
           guest needs built in, CONFIG_MODULES off.  QEMU boots its ``vmlinux`` through the PVH note as it is.
  DEBIAN   build/kernel/ (``python -m image.build kernel``): Debian's appliance kernel; the guest initramfs carries
           the modules of MODULE_LISTS and QEMU boots its payload, extracted from the bzImage.

- ``boot_kernel()``: what to give QEMU's -kernel.  A bzImage decompresses its own payload before the kernel starts,
  which under TCG costs about 2.5 s of every boot for Debian's XZ one; when the kernel has CONFIG_PVH=y QEMU can
  load the uncompressed ELF vmlinux through its PVH entry point instead (microvm supports it).  NULLBOX: kernel.build
  leaves that vmlinux next to the bzImage.  DEBIAN: the XZ payload is extracted once into
  build/cage/vmlinux-<digest>.  Either falls back to the bzImage when there is no PVH vmlinux.
- ``build_initramfs()``: cage/guest/init.c compiled static (``guest_init``) + for DEBIAN the few modules the guest
  needs (none for NULLBOX), as an uncompressed newc cpio made by nullbox.cpio's writer (same ordering, owners and
  mtimes, so the same inputs give the same bytes).  Uncompressed because it is small (the init is the only program)
  and the kernel unpacks it before /init runs: under TCG a zstd initramfs cost about 0.1 s of every agent's start;
  on the appliance it lies in the compressed root image anyway.  Cached under build/cage/ as
  guest-initrd-<kind>-<digest>.img, the digest covering the archive and the kernel release.
- ``guest_files()``: both of the above, what a QemuVM (and the appliance's /usr/lib/nullbox/guest/) needs.
- ``static_busybox()``: the host's static busybox and its applet paths (agent roots' shell: tests, the demo).
- ``pack_rootfs()``: an agent's rootfs directory -> a SquashFS image (the guest mounts it read-only under a tmpfs
  overlay; an ext4 image works too).

Guest modules, DEBIAN only (see cage/guest/init.c for when each list is loaded; a kernel without module support, such
as NULLBOX, has them built in: kernel/guest.config, checked against these lists by tests/kernel):
  nullbox.load        virtio-mmio (microvm's transport), virtio-blk, virtio-console (virtio-serial), virtio-net,
                      squashfs, overlayfs; the ACPI button and evdev (the power button: a polite stop)
  nullbox.load-ext4   ext4 and its checksums, only when the root image is not a SquashFS
  nullbox.load-vsock  virtio vsock, only when the ctxgraph channel is vsock (the host has /dev/vhost-vsock)
  nullbox.load-9p     9P over virtio (and netfs), only when the agent has filesystem shares (SHARE_MODULES)
"""

from __future__ import annotations

import enum
import functools
import hashlib
import lzma
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from image.context import Context
from image.initrd import BUSYBOX, ModuleTree, compile_static, elf_section, is_static_elf, load_order
from kernel import build as kernel_build
from nullbox.cpio import Entry, chardev, directory, newc_archive, regular
from nullbox.durable import write_atomically

REPO: Final = Path(__file__).resolve().parent.parent
BUILD: Final = REPO / "build"
GUEST_DIR: Final = Path(__file__).resolve().parent / "guest"
CACHE_DIR: Final = "cage"  # under build/


# (module, required), in the order the guest loads them; dependencies are added before each module by load_order.
MODULE_LISTS: Final[dict[str, tuple[tuple[str, bool], ...]]] = {
    "nullbox.load": (
        ("virtio_mmio", True),
        ("virtio_blk", True),
        ("virtio_console", True),
        ("virtio_net", True),
        ("squashfs", True),
        ("overlay", True),
        # the ACPI power button (QMP system_powerdown: cage's polite stop) as an input event for the guest init
        ("button", False),
        ("evdev", False),
    ),
    "nullbox.load-ext4": (("crc32c_generic", True), ("ext4", True)),
    "nullbox.load-vsock": (("vmw_vsock_virtio_transport", True),),
}
# Loaded only for an agent with capabilities.filesystem shares.  Kept out of MODULE_LISTS, whose every module
# tests/kernel maps to a NullBox config option; tests/cage/test_shares.py checks these (CONFIG_9P_FS,
# CONFIG_NET_9P_VIRTIO are in kernel/guest.config).
SHARE_MODULES: Final[dict[str, tuple[tuple[str, bool], ...]]] = {
    "nullbox.load-9p": (("9pnet_virtio", True), ("9p", True)),
}


# ------------------------------------------------------------------------------------------------------- kernel


class KernelKind(enum.StrEnum):
    """Which guest kernel an agent VM boots."""

    NULLBOX = "nullbox"  # build/kernel-nullbox/guest: kernel.build's guest variant, no modules
    DEBIAN = "debian"  # build/kernel: Debian's appliance kernel from image.build, modules in the initramfs


NULLBOX_VARIANT: Final = "guest"  # kernel.build's variant for agent VMs


def nullbox_dir(build: Path = BUILD) -> Path:
    return kernel_build.variant_dir(NULLBOX_VARIANT, build)


def choose_kernel(build: Path = BUILD) -> KernelKind:
    """NULLBOX when kernel.build has a complete, up-to-date build of the guest kernel in ``build``, else DEBIAN."""
    return KernelKind.NULLBOX if kernel_build.is_built(NULLBOX_VARIANT, nullbox_dir(build)) else KernelKind.DEBIAN


@dataclass(frozen=True)
class GuestKernel:
    """A guest kernel as its build left it: kernel.build's guest variant, or Debian's as image.kernel unpacked it."""

    kind: KernelKind
    vmlinuz: Path  # the bzImage
    version: str  # its release (uname -r)
    config: str  # its .config
    modules: Path | None  # DEBIAN: the unpacked /lib/modules/<version>; NULLBOX has none
    vmlinux: Path | None = None  # NULLBOX: the uncompressed ELF kernel kernel.build left next to the bzImage

    @classmethod
    def from_build(cls, build: Path = BUILD, kernel: KernelKind | None = None) -> GuestKernel:
        kind = choose_kernel(build) if kernel is None else KernelKind(kernel)
        return cls._nullbox(build) if kind is KernelKind.NULLBOX else cls._debian(build)

    @classmethod
    def _nullbox(cls, build: Path) -> GuestKernel:
        out = nullbox_dir(build)
        if not kernel_build.is_built(NULLBOX_VARIANT, out):
            raise FileNotFoundError(
                f"{out} holds no complete, up-to-date build of the NullBox guest kernel: python -m kernel.build guest"
            )
        version = (out / "version").read_text().strip()
        return cls(KernelKind.NULLBOX, out / "bzImage", version, (out / ".config").read_text(), None, out / "vmlinux")

    @classmethod
    def _debian(cls, build: Path) -> GuestKernel:
        kernel = build / "kernel"
        try:
            version = (kernel / "version").read_text().strip()
            config = (kernel / "deb" / "boot" / f"config-{version}").read_text()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc.filename} is missing: build the kernel first (python -m image.build kernel)"
            ) from exc
        return cls(KernelKind.DEBIAN, kernel / "vmlinuz", version, config, kernel / "modules")

    @property
    def has_pvh(self) -> bool:
        """Built with CONFIG_PVH=y: QEMU can boot its uncompressed vmlinux directly."""
        return "\nCONFIG_PVH=y" in "\n" + self.config


XZ_MAGIC: Final = b"\xfd7zXZ\x00"
XEN_ELFNOTE_PHYS32_ENTRY: Final = 18  # the PVH entry point QEMU looks for in an ELF kernel


def has_pvh_entry(elf: bytes) -> bool:
    """True when the ELF kernel's .notes has Xen's PHYS32_ENTRY note (QEMU boots such a vmlinux directly)."""
    try:
        notes = elf_section(elf, ".notes") or b""
    except (ValueError, struct.error):
        return False
    offset = 0
    while offset + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, offset)
        if notes[offset + 12 : offset + 12 + namesz] == b"Xen\0" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        offset += 12 + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
    return False


def boot_kernel(build: Path = BUILD, kernel: KernelKind | None = None) -> Path:
    """The uncompressed PVH kernel when there is one (NULLBOX: its vmlinux; DEBIAN: build/cage/vmlinux-<digest>,
    extracted when missing), else the bzImage."""
    guest = GuestKernel.from_build(build, kernel)
    if not guest.has_pvh:
        return guest.vmlinuz
    if guest.vmlinux is not None:
        return guest.vmlinux if has_pvh_entry(guest.vmlinux.read_bytes()) else guest.vmlinuz
    bzimage = guest.vmlinuz.read_bytes()
    out = build / CACHE_DIR
    target = out / f"vmlinux-{hashlib.sha256(bzimage).hexdigest()[:16]}"
    if target.is_file():
        return target
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        return guest.vmlinuz  # not an XZ payload (Debian's is); the bzImage boots anyway, only slower
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    except lzma.LZMAError:
        return guest.vmlinuz
    if not has_pvh_entry(elf):
        return guest.vmlinuz
    out.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(elf)
    partial.replace(target)
    for stale in out.glob("vmlinux-*"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------- initramfs


def static_busybox() -> tuple[bytes, list[str]]:
    """The host's static busybox (Debian's busybox-static) and the paths of its applets (``--list-full``)."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    data = BUSYBOX.read_bytes()
    if not is_static_elf(data):
        raise RuntimeError(f"{BUSYBOX} is not statically linked: apt-get install busybox-static")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout
    return data, applets.split()


VSOCK_RELAY: Final = Path(__file__).resolve().parent / "guest" / "nb-vsock.c"
EXEC_HELPER: Final = Path(__file__).resolve().parent / "nb-exec.c"


@functools.cache
def exec_helper() -> bytes:
    """nb-exec (cage/nb-exec.c) compiled static: cage starts QEMU through it (cage.toml backend.exec_helper)."""
    return compile_static(EXEC_HELPER)


def install_exec_helper(target: Path) -> Path:
    """exec_helper() at ``target`` (0755), written only when it differs; returns ``target``."""
    data = exec_helper()
    if not target.is_file() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data, mode=0o755)
    return target


def exec_helper_path(build: Path = BUILD) -> Path:
    """build/cage/nb-exec, (re)built when it is missing or stale: what tests and benchmarks give cage.toml."""
    return install_exec_helper(build / CACHE_DIR / "nb-exec")


def vsock_relay() -> bytes:
    """nb-vsock (cage/guest/nb-vsock.c) compiled static: what a shell agent's root needs to reach ctxgraph over
    vsock (busybox's nc has no AF_VSOCK).  The demo agent in the image carries it."""
    return compile_static(VSOCK_RELAY)


GUEST_INIT: Final = GUEST_DIR / "init.c"


@functools.cache
def guest_init() -> bytes:
    """cage/guest/init.c compiled static: the guest initramfs's /init (once per process)."""
    return compile_static(GUEST_INIT)


def initramfs_entries(init: bytes, version: str, tree: ModuleTree | None) -> list[Entry]:
    """The guest initramfs: /init, the directories and device nodes it needs before devtmpfs, and, given a module
    tree, the modules of MODULE_LISTS and SHARE_MODULES with one load list each (``need PATH`` / ``want PATH``,
    dependencies first).  Without one (a kernel with everything built in) there is no /lib/modules at all."""
    out = [
        regular("init", init, 0o755),
        chardev("dev/console", 5, 1),
        chardev("dev/null", 1, 3, 0o666),
        *(directory(d) for d in ("proc", "sys", "lower", "overlay", "newroot")),
    ]
    if tree is not None:
        out += _module_entries(f"lib/modules/{version}", tree)
    return out


def _module_entries(moddir: str, tree: ModuleTree) -> list[Entry]:
    out: list[Entry] = []
    seen: set[str] = set()
    for list_name, wanted in {**MODULE_LISTS, **SHARE_MODULES}.items():
        lines = ""
        for path, need in load_order(tree, wanted):
            if path in seen:
                continue  # loaded by an earlier list
            seen.add(path)
            lines += f"{'need' if need else 'want'} {path}\n"
            out.append(regular(f"{moddir}/{path}", (tree.root / path).read_bytes()))
        out.append(regular(f"{moddir}/{list_name}", lines.encode()))
    return out


def build_initramfs(build: Path = BUILD, kernel: KernelKind | None = None, *, epoch: int | None = None) -> Path:
    """build/cage/guest-initrd-<kind>-<digest>.img for that kernel, built when missing; returns its path."""
    guest = GuestKernel.from_build(build, kernel)
    ctx = Context(repo=REPO, out=build) if epoch is None else Context(repo=REPO, out=build, source_date_epoch=epoch)
    tree = None if guest.modules is None else ModuleTree.scan(guest.modules)
    archive = newc_archive(initramfs_entries(guest_init(), guest.version, tree), ctx.source_date_epoch)
    digest = hashlib.sha256(f"{guest.kind} {guest.version}\n".encode() + archive).hexdigest()[:16]
    out = build / CACHE_DIR
    prefix = f"guest-initrd-{guest.kind}-"
    target = out / f"{prefix}{digest}.img"
    if target.is_file():
        return target
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(target, archive, mode=0o644)
    others = tuple(f"guest-initrd-{kind}-" for kind in KernelKind if kind is not guest.kind)
    for stale in out.glob("guest-initrd-*.img"):
        if stale != target and not stale.name.startswith(others):  # another kernel's initramfs stays
            stale.unlink(missing_ok=True)
    ctx.log(
        f"cage: guest initramfs {target.name} ({guest.kind} {guest.version}): {len(archive) // 1024} KiB, uncompressed"
    )
    return target


def guest_files(
    build: Path = BUILD, kernel: KernelKind | None = None, *, epoch: int | None = None
) -> tuple[Path, Path]:
    """(kernel to boot, initramfs) for a QemuVM: ``boot_kernel`` and ``build_initramfs`` of the same kernel."""
    kind = choose_kernel(build) if kernel is None else KernelKind(kernel)
    return boot_kernel(build, kind), build_initramfs(build, kind, epoch=epoch)


# ------------------------------------------------------------------------------------------------------ rootfs


def pack_rootfs(source: Path, target: Path, *, epoch: int | None = None) -> Path:
    """The directory ``source`` as a read-only SquashFS image at ``target`` (owners 0:0, fixed timestamps)."""
    if not source.is_dir():
        raise NotADirectoryError(f"{source} is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    # LZ4 (high-compression mode: same decompression speed) in 1 MiB blocks, not zstd in 128 KiB ones: under TCG
    # zstd's decompression and every extra request show in each agent's start, and the root is read on every boot.
    # No fragments: a small file is its own block, so reading one decompresses it alone, not the up to 1 MiB of
    # small files packed with it (the kernel caches only 3 fragment blocks, 3 MiB it also allocates at each mount).
    # No export table: it serves NFS exports, which an agent's root never has.
    argv = ["mksquashfs", str(source), str(partial), "-noappend", "-all-root", "-comp", "lz4", "-Xhc", "-b", "1M"]
    argv += ["-no-fragments", "-no-exports", "-quiet", "-no-progress", "-no-xattrs"]
    if epoch is not None:
        argv += ["-mkfs-time", str(epoch), "-all-time", str(epoch)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    partial.replace(target)
    return target
