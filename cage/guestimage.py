"""Build-time pieces of an agent VM, besides the appliance's kernel: the guest initramfs and the agent's read-only
root image.  (The per-boot config disk is written at run time by cage.qemu, which must not import image.*: the
appliance ships cage but not the image build.)

- ``build_initramfs()``: cage/guest/init + the host's static busybox (every applet a symlink) + the few modules the
  guest needs, as a newc cpio made by image.initrd's writer (same ordering, owners and mtimes, so the same inputs
  give the same bytes), compressed like the appliance's initrd.  Cached under build/cage/ by the digest of the
  uncompressed archive: a rebuild with unchanged inputs only re-reads a few MB and returns the cached file.
- ``boot_kernel()``: what to give QEMU's -kernel.  The appliance's bzImage decompresses its own XZ payload before
  the kernel starts, which under TCG costs about 2.5 s of every boot; when the kernel has CONFIG_PVH=y, QEMU can
  load the uncompressed ELF vmlinux through its PVH entry point instead (microvm supports it), so the payload is
  extracted once into build/cage/vmlinux-<digest>.  Falls back to the bzImage when that is not possible.
- ``pack_rootfs()``: an agent's rootfs directory -> a SquashFS image (the guest mounts it read-only under a tmpfs
  overlay; an ext4 image works too).

Guest modules (see cage/guest/init for when each list is loaded):
  nullbox.load        virtio-mmio (microvm's transport), virtio-blk, virtio-console (virtio-serial), virtio-net,
                      squashfs, overlayfs; the ACPI button and evdev (the power button: a polite stop)
  nullbox.load-ext4   ext4 and its checksums, only when the root image is not a SquashFS
  nullbox.load-vsock  virtio vsock, only when the ctxgraph channel is vsock (the host has /dev/vhost-vsock)
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from image.context import Context
from image.initrd import (
    BUSYBOX,
    Entry,
    ModuleTree,
    chardev,
    compress,
    directory,
    elf_section,
    is_static_elf,
    kernel_compression,
    load_order,
    newc_archive,
    regular,
    symlink,
)

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
        # the ACPI power button (QMP system_powerdown: cage's polite stop) as an input event for busybox acpid
        ("button", False),
        ("evdev", False),
    ),
    "nullbox.load-ext4": (("crc32c_generic", True), ("ext4", True)),
    "nullbox.load-vsock": (("vmw_vsock_virtio_transport", True),),
}


# ------------------------------------------------------------------------------------------------------- kernel


@dataclass(frozen=True)
class GuestKernel:
    """The appliance's kernel as image.kernel unpacked it under build/kernel/."""

    vmlinuz: Path
    version: str
    modules: Path
    config: str

    @classmethod
    def from_build(cls, build: Path = BUILD) -> GuestKernel:
        kernel = build / "kernel"
        try:
            version = (kernel / "version").read_text().strip()
            config = (kernel / "deb" / "boot" / f"config-{version}").read_text()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc.filename} is missing: build the kernel first (python -m image.build)"
            ) from exc
        return cls(kernel / "vmlinuz", version, kernel / "modules", config)


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


def boot_kernel(build: Path = BUILD) -> Path:
    """build/cage/vmlinux-<digest> (the uncompressed PVH kernel, extracted when missing), else build/kernel/vmlinuz."""
    kernel = GuestKernel.from_build(build)
    if "\nCONFIG_PVH=y" not in "\n" + kernel.config:
        return kernel.vmlinuz
    bzimage = kernel.vmlinuz.read_bytes()
    out = build / CACHE_DIR
    target = out / f"vmlinux-{hashlib.sha256(bzimage).hexdigest()[:16]}"
    if target.is_file():
        return target
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        return kernel.vmlinuz  # not an XZ payload (Debian's is); the bzImage boots anyway, only slower
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    except lzma.LZMAError:
        return kernel.vmlinuz
    if not has_pvh_entry(elf):
        return kernel.vmlinuz
    out.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(elf)
    partial.replace(target)
    for stale in out.glob("vmlinux-*"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------- initramfs


def _busybox() -> tuple[bytes, list[str]]:
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    data = BUSYBOX.read_bytes()
    if not is_static_elf(data):
        raise RuntimeError(f"{BUSYBOX} is not statically linked: apt-get install busybox-static")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout
    return data, applets.split()


def initramfs_entries(
    init: bytes, busybox: bytes, applets: Sequence[str], version: str, tree: ModuleTree
) -> list[Entry]:
    """The guest initramfs: /init, busybox and its applets, device nodes the kernel needs before devtmpfs, and the
    modules of MODULE_LISTS with one load list each (``need PATH`` / ``want PATH``, dependencies first)."""
    moddir = f"lib/modules/{version}"
    out = [
        regular("init", init, 0o755),
        regular("bin/busybox", busybox, 0o755),
        chardev("dev/console", 5, 1),
        chardev("dev/null", 1, 3, 0o666),
        *(directory(d) for d in ("proc", "sys", "run", "tmp", "lower", "overlay", "newroot", "sbin", "usr/bin")),
    ]
    seen: set[str] = set()
    for list_name, wanted in MODULE_LISTS.items():
        lines = ""
        for path, need in load_order(tree, wanted):
            if path in seen:
                continue  # loaded by an earlier list
            seen.add(path)
            lines += f"{'need' if need else 'want'} {path}\n"
            out.append(regular(f"{moddir}/{path}", (tree.root / path).read_bytes()))
        out.append(regular(f"{moddir}/{list_name}", lines.encode()))
    out += [symlink(a, "/bin/busybox") for a in sorted({a.strip("/") for a in applets} - {"", "bin/busybox"})]
    return out


def build_initramfs(build: Path = BUILD, *, epoch: int | None = None) -> Path:
    """build/cage/guest-initrd-<digest>.img, built when missing; returns its path."""
    kernel = GuestKernel.from_build(build)
    ctx = Context(repo=REPO, out=build) if epoch is None else Context(repo=REPO, out=build, source_date_epoch=epoch)
    busybox, applets = _busybox()
    entries = initramfs_entries(
        (GUEST_DIR / "init").read_bytes(), busybox, applets, kernel.version, ModuleTree.scan(kernel.modules)
    )
    archive = newc_archive(entries, ctx.source_date_epoch)
    method = kernel_compression(kernel.config)
    digest = hashlib.sha256(archive + method.encode()).hexdigest()[:16]
    out = build / CACHE_DIR
    target = out / f"guest-initrd-{digest}.img"
    if target.is_file():
        return target
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".initrd-") as scratch:
        partial = Path(scratch) / target.name
        partial.write_bytes(compress(archive, method, ctx, Path(scratch)))
        partial.replace(target)
    for stale in out.glob("guest-initrd-*.img"):
        if stale != target:
            stale.unlink(missing_ok=True)
    ctx.log(
        f"cage: guest initramfs {target.name}: {len(archive) // 1024} KiB cpio -> {target.stat().st_size // 1024} KiB"
    )
    return target


# ------------------------------------------------------------------------------------------------------ rootfs


def pack_rootfs(source: Path, target: Path, *, epoch: int | None = None) -> Path:
    """The directory ``source`` as a read-only SquashFS image at ``target`` (owners 0:0, fixed timestamps)."""
    if not source.is_dir():
        raise NotADirectoryError(f"{source} is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    argv = ["mksquashfs", str(source), str(partial), "-noappend", "-all-root", "-comp", "zstd", "-quiet"]
    argv += ["-no-progress", "-no-xattrs"]
    if epoch is not None:
        argv += ["-mkfs-time", str(epoch), "-all-time", str(epoch)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    partial.replace(target)
    return target
