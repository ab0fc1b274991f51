"""Build step: the busybox initramfs that verifies and mounts the SquashFS root -> build/initrd.img.

Contents: the host's static busybox (package busybox-static) with every applet as a symlink, /init
(image/initramfs/init), /bin/nb-verity (image/initramfs/nb-verity.c, compiled here: static, no libraries), the
dm-verity numbers and root hash of build/rootfs.squashfs in /etc/nullbox/rootfs.verity, and, only when the
kernel the bootkernel step chose has loadable modules (Debian's), the few modules the boot and the appliance's
devices need (listed below, plus their dependencies from each module's .modinfo, in load order in
/lib/modules/<ver>/nullbox.load{,-late}).  The NullBox kernel has everything built in: no lib/modules at all.

The archive is newc cpio written here (no host cpio, no root needed for /dev/console): entries sorted, every
mtime = SOURCE_DATE_EPOCH, owner 0:0, inode numbers in order, so the same inputs give the same bytes.  It is
compressed with zstd when the chosen kernel's .config has CONFIG_RD_ZSTD (Debian's and the NullBox one have), else
gzip with a zero mtime.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from image import squashfs
from image.bootkernel import OUT as BOOT_DIR
from image.bootkernel import staged
from image.context import Context
from image.kernel import sha256_file
from image.verity import BLOCK, Verity
from nullbox.cpio import Entry, chardev, directory, newc_archive, regular, symlink

INPUTS: Final[list[str]] = [
    "image/initrd.py",
    "nullbox/cpio.py",
    "image/initramfs",
    "image/kernel.py",
    "image/bootkernel.py",
    "image/squashfs.py",
    "image/verity.py",
]
BUSYBOX: Final = Path("/bin/busybox")  # Debian's busybox-static
INIT_SCRIPT: Final = "image/initramfs/init"
VERITY_HELPER: Final = "image/initramfs/nb-verity.c"
CC: Final = ("gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")

# (module, required): a required module that fails to load is reported on the console; the others are
# hardware-specific and fail quietly.  Dependencies (modinfo "depends", and "softdep pre:" when it names a
# module) are added by the build, before the module that needs them.
#
# BOOT_MODULES find and mount the medium; /init loads them first.  LATE_MODULES are for the appliance's devices
# and services: /init loads them in the background while it searches for and verifies the root, and waits for
# them before switch_root.  Nothing loads modules after switch_root (the root has no modprobe, no udev).
BOOT_MODULES: Final[tuple[tuple[str, bool], ...]] = (
    # checksums ext4/jbd2 ask the crypto API for (their softdep names an alias, so list them by name)
    ("crc32c_intel", False),
    ("crc32c_generic", True),
    # virtio transport and disks
    ("virtio_pci", True),
    ("virtio_blk", True),
    ("virtio_scsi", True),
    # QEMU's default CD-ROM: AHCI on q35, PIIX IDE on pc; SATA/SCSI disks and CDs
    ("ahci", True),
    ("ata_piix", True),
    ("sr_mod", True),
    ("sd_mod", True),
    # real hardware: NVMe, and the ISO written to a USB stick
    ("nvme", False),
    ("xhci_pci", False),
    ("ehci_pci", False),
    ("usb_storage", False),
    ("uas", False),
    # filesystems: the CD, the root image (a loop device on the CD's file, checked by dm-verity), the NULLBOX-DATA disk
    ("isofs", True),
    ("loop", True),
    ("dm_verity", True),
    ("squashfs", True),
    ("ext4", True),
)
LATE_MODULES: Final[tuple[tuple[str, bool], ...]] = (
    # network, the virtio-serial control port, entropy, vsock where the host has it
    ("virtio_net", True),
    ("virtio_console", True),
    ("virtio_rng", False),
    ("vmw_vsock_virtio_transport", False),
    # egress (nftables table inet nullbox: conntrack state, masquerade, named counters, rate-limited drop logging;
    # nothing can load a module on demand after switch_root) and cage (TAPs, KVM for the agents' VMs)
    ("nf_tables", True),
    ("nft_ct", True),
    ("nft_chain_nat", True),
    ("nft_masq", True),
    ("nft_objref", True),
    ("nft_limit", True),
    ("nft_log", True),
    ("nf_log_syslog", True),
    ("tun", True),
    ("kvm_intel", False),
    ("kvm_amd", False),
)
# Loaded only when /proc/cpuinfo shows this flag (the kernel complains on the console otherwise).
CPU_FLAG: Final[dict[str, str]] = {"kvm_intel": "vmx", "kvm_amd": "svm"}


def compress(archive: bytes, method: str, ctx: Context, scratch: Path) -> bytes:
    """zstd (the zstd CLI, single-threaded, deterministic) or gzip with a zero mtime."""
    if method == "gzip":
        return gzip.compress(archive, compresslevel=9, mtime=0)
    if method != "zstd":
        raise ValueError(f"unknown compression {method!r}")
    raw, packed = scratch / "initrd.cpio", scratch / "initrd.cpio.zst"
    raw.write_bytes(archive)
    ctx.run(["zstd", "-q", "-f", "-19", "-T1", "--no-progress", "-o", str(packed), str(raw)])
    data = packed.read_bytes()
    raw.unlink()
    packed.unlink()
    return data


def kernel_compression(config: str) -> str:
    """zstd when the kernel can unpack a zstd initramfs, else gzip (every Debian kernel can)."""
    return "zstd" if "\nCONFIG_RD_ZSTD=y" in "\n" + config else "gzip"


# ------------------------------------------------------------------------------------------------ kernel modules


def elf_section(image: bytes, wanted: str) -> bytes | None:
    """The contents of one section of a little-endian ELF64 file (a .ko), or None."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", image, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", image, shoff + i * shentsize)
        return name, offset, size

    _, names_off, _ = header(shstrndx)
    for i in range(shnum):
        name, offset, size = header(i)
        end = image.index(b"\0", names_off + name)
        if image[names_off + name : end].decode() == wanted:
            return image[offset : offset + size]
    return None


def modinfo(image: bytes) -> dict[str, list[str]]:
    """A module's .modinfo key=value strings (keys repeat, e.g. alias)."""
    info: dict[str, list[str]] = {}
    for item in (elf_section(image, ".modinfo") or b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def module_name(path: str) -> str:
    name = PurePosixPath(path).name
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def module_dependencies(info: dict[str, list[str]]) -> list[str]:
    """Hard dependencies, then the "softdep pre:" names (which may be aliases rather than module names)."""
    hard = [d for v in info.get("depends", []) for d in v.split(",") if d]
    soft: list[str] = []
    for value in info.get("softdep", []):
        words, pre = value.split(), False
        for word in words:
            if word.endswith(":"):
                pre = word == "pre:"
            elif pre:
                soft.append(word)
    return [n.replace("-", "_") for n in hard + soft]


@dataclass(frozen=True)
class ModuleTree:
    """lib/modules/<ver>: module name -> path relative to it, and the names built into the kernel."""

    root: Path
    paths: dict[str, str]
    builtin: frozenset[str]

    @classmethod
    def scan(cls, root: Path) -> ModuleTree:
        paths = {module_name(p.name): str(p.relative_to(root)) for p in sorted(root.rglob("*.ko*")) if p.is_file()}
        builtin_file = root / "modules.builtin"
        builtin = builtin_file.read_text().split() if builtin_file.exists() else []
        return cls(root, paths, frozenset(module_name(b) for b in builtin))

    def info(self, name: str) -> dict[str, list[str]]:
        path = self.root / self.paths[name]
        if path.suffix != ".ko":
            raise ValueError(f"{path.name}: compressed modules are not supported (busybox insmod needs plain .ko)")
        return modinfo(path.read_bytes())


def load_order(tree: ModuleTree, wanted: Iterable[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """(path, required) in an order where every module comes after its dependencies; a dependency of a required
    module is required.  A wanted module that is neither a file nor built in is an error if required."""
    order: list[str] = []
    required: dict[str, bool] = {}
    deps: dict[str, list[str]] = {}

    def visit(name: str, need: bool, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name in required:
            if need and not required[name]:
                required[name] = True
                for dep in deps[name]:
                    visit(dep, True, (*chain, name))
            return
        if name not in deps:
            deps[name] = [d for d in module_dependencies(tree.info(name)) if d in tree.paths]
        for dep in deps[name]:
            visit(dep, need, (*chain, name))
        if name not in required:
            required[name] = need
            order.append(name)

    for wanted_name, need in wanted:
        name = wanted_name.replace("-", "_")
        if name in tree.paths:
            visit(name, need, ())
        elif name not in tree.builtin and need:
            raise ValueError(f"module {name} is neither in {tree.root} nor built into the kernel")
    return [(tree.paths[name], required[name]) for name in order]


# ------------------------------------------------------------------------------------------------------ assembly


def is_static_elf(image: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header (no dynamic loader needed)."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        return False
    phoff = struct.unpack_from("<Q", image, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    return all(struct.unpack_from("<I", image, phoff + i * phentsize)[0] != 3 for i in range(phnum))


@dataclass(frozen=True)
class Inputs:
    """Everything the archive is made of, so tests can build it from synthetic parts."""

    init: bytes
    busybox: bytes
    applets: list[str]  # `busybox --list-full`: "bin/sh", "sbin/insmod", ...
    kernel_version: str
    # (path under lib/modules/<ver>, required, contents) in load order; none: no lib/modules in the archive at all
    modules: list[tuple[str, bool, bytes]]
    verity: Verity
    nb_verity: bytes  # the compiled helper
    late: frozenset[str] = frozenset()  # paths of the modules /init loads in the background


def load_kind(path: str, required: bool) -> str:
    """A nullbox.load line's first word: need, want, or want:<cpu flag>."""
    flag = CPU_FLAG.get(module_name(path))
    return "need" if required else f"want:{flag}" if flag else "want"


def entries(inputs: Inputs) -> list[Entry]:
    root = inputs.verity.root_hash
    if len(root) != 64 or root.strip("0123456789abcdef"):
        raise ValueError(f"bad dm-verity root hash {root!r}")
    out = [
        regular("init", inputs.init, 0o755),
        regular("bin/busybox", inputs.busybox, 0o755),
        regular("bin/nb-verity", inputs.nb_verity, 0o755),
        chardev("dev/console", 5, 1),
        chardev("dev/null", 1, 3, 0o666),
        *(directory(d) for d in ("proc", "sys", "run", "medium", "newroot", "tmp", "sbin", "usr/bin", "usr/sbin")),
        regular("etc/nullbox/rootfs.verity", inputs.verity.initramfs_line()),
    ]
    if inputs.modules:
        moddir = f"lib/modules/{inputs.kernel_version}"
        load = dict.fromkeys(("nullbox.load", "nullbox.load-late"), "")
        for path, need, _ in inputs.modules:
            load["nullbox.load-late" if path in inputs.late else "nullbox.load"] += f"{load_kind(path, need)} {path}\n"
        out += [regular(f"{moddir}/{name}", text.encode()) for name, text in load.items()]
        out += [regular(f"{moddir}/{path}", data) for path, _, data in inputs.modules]
    for applet in sorted({a.strip("/") for a in inputs.applets} - {"", "bin/busybox"}):
        out.append(symlink(applet, "/bin/busybox"))
    return out


def initramfs(inputs: Inputs, mtime: int) -> bytes:
    """The uncompressed newc archive."""
    return newc_archive(entries(inputs), mtime)


def kernel_modules(module_tree: Path | None) -> tuple[list[tuple[str, bool, bytes]], frozenset[str]]:
    """(modules in load order, the late ones) from a kernel's unpacked lib/modules/<ver>; none without a tree."""
    if module_tree is None:
        return [], frozenset()
    tree = ModuleTree.scan(module_tree)
    boot = {path for path, _ in load_order(tree, BOOT_MODULES)}
    order = load_order(tree, BOOT_MODULES + LATE_MODULES)  # the same walk: boot modules first
    modules = [(path, need, (tree.root / path).read_bytes()) for path, need in order]
    return modules, frozenset(path for path, _ in order if path not in boot)


def root_verity(build: Path) -> Verity:
    """The squashfs step's dm-verity record, checked against the image and tree it describes (a stale record would
    make the appliance refuse its own root)."""
    image, tree = build / "rootfs.squashfs", build / squashfs.TREE
    verity = Verity.from_json((build / squashfs.RECORD).read_text())
    actual = sha256_file(image)
    if actual != verity.image_sha256:
        raise RuntimeError(
            f"{squashfs.RECORD} is for an image hashing to {verity.image_sha256}, {image.name} to {actual}"
        )
    for path, blocks in ((image, verity.data_blocks), (tree, verity.hash_blocks)):
        if path.stat().st_size != blocks * BLOCK:
            raise RuntimeError(f"{path.name} is {path.stat().st_size} bytes, {squashfs.RECORD} says {blocks} blocks")
    return verity


def _check_call(argv: list[str]) -> None:
    subprocess.run(argv, check=True)


def compile_static(source: Path, run: Callable[[list[str]], None] = _check_call) -> bytes:
    """The one C file ``source`` as a static, stripped executable (initramfs and agent roots have no libraries),
    compiled in a scratch directory with ``run`` (the image build passes its logging Context.run)."""
    with tempfile.TemporaryDirectory(prefix=f".{source.stem}-") as scratch:
        binary = Path(scratch) / source.stem
        run([*CC, "-o", str(binary), str(source)])
        data = binary.read_bytes()
    if not is_static_elf(data):
        raise RuntimeError(f"{source} did not compile to a static executable")
    return data


def build(ctx: Context) -> None:
    boot = ctx.out / BOOT_DIR
    version = (boot / "version").read_text().strip()
    config = (boot / "config").read_text()
    record, module_tree = staged(ctx.out)
    verity = root_verity(ctx.out)
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    busybox = BUSYBOX.read_bytes()
    if not is_static_elf(busybox):
        raise RuntimeError(f"{BUSYBOX} is not statically linked: apt-get install busybox-static")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True, env=ctx.env()
    ).stdout.split()

    modules, late = kernel_modules(module_tree)
    ctx.log(
        f"initrd: {record['kernel']} kernel {version}, {len(modules)} modules "
        f"({sum(len(m[2]) for m in modules) // 1024} KiB), busybox "
        f"{len(busybox) // 1024} KiB, {len(applets)} applets, root hash {verity.root_hash[:16]}..."
    )
    helper = compile_static(ctx.repo / VERITY_HELPER, ctx.run)
    inputs = Inputs(
        init=(ctx.repo / INIT_SCRIPT).read_bytes(),
        busybox=busybox,
        applets=applets,
        kernel_version=version,
        modules=modules,
        late=late,
        verity=verity,
        nb_verity=helper,
    )
    archive = initramfs(inputs, ctx.source_date_epoch)
    method = kernel_compression(config)
    data = compress(archive, method, ctx, ctx.out)
    target = ctx.out / "initrd.img"
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    ctx.log(
        f"initrd: {len(archive) // 1024} KiB cpio -> {len(data) // 1024} KiB {method}, "
        f"sha256 {hashlib.sha256(data).hexdigest()[:16]}..."
    )
