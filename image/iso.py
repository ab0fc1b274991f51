"""Build step: the bootable ISO -> build/nullbox.iso (BIOS via El Torito + hybrid MBR, UEFI via an EFI system
partition image), made by grub-mkrescue from:

  /boot/grub/grub.cfg          image/grub.cfg (serial console, timeout 1)
  /boot/vmlinuz                build/boot/vmlinuz (the bootkernel step's choice: NullBox's or Debian's)
  /boot/initrd.img             build/initrd.img
  /nullbox/rootfs.squashfs     build/rootfs.squashfs
  /nullbox/rootfs.verity       build/rootfs.verity (its dm-verity hash tree; the root hash is in the initramfs)

Reproducible: staged files get mtime SOURCE_DATE_EPOCH, and xorriso and mtools honour SOURCE_DATE_EPOCH for the
volume, file and FAT dates.  The one thing left is the volume UUID grub-mkrescue derives from the wall clock (to
the second) and builds into its core images (`search --fs-uuid`); grub-mkrescue therefore runs under libfaketime
with the clock stopped at SOURCE_DATE_EPOCH.  libfaketime is fetched with `apt-get download` into build/cache/
and preloaded (LD_PRELOAD) only into grub-mkrescue and its children, never installed on the host.  Without it the
ISO still builds, and differs only in that UUID (logged).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Final

from image.bootkernel import OUT as BOOT_DIR
from image.context import Context
from image.kernel import fetch_deb

INPUTS: Final[list[str]] = [
    "image/iso.py",
    "image/grub.cfg",
    "image/kernel.py",
    "image/bootkernel.py",
    "image/grub_mformat.py",
]
MFORMAT_WRAPPER: Final = Path(__file__).resolve().parent / "grub_mformat.py"
FAKETIME_PACKAGE: Final = "libfaketime"
FAKETIME_LIBRARY: Final = "usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def layout(ctx: Context) -> dict[str, Path]:
    """ISO path -> the file that goes there."""
    return {
        "boot/grub/grub.cfg": ctx.repo / "image" / "grub.cfg",
        "boot/vmlinuz": ctx.out / BOOT_DIR / "vmlinuz",
        "boot/initrd.img": ctx.out / "initrd.img",
        "nullbox/rootfs.squashfs": ctx.out / "rootfs.squashfs",
        "nullbox/rootfs.verity": ctx.out / "rootfs.verity",
    }


def stage(ctx: Context, staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    for target, source in layout(ctx).items():
        path = staging / target
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        path.chmod(0o644)
    for path in [*sorted(staging.rglob("*"), reverse=True), staging]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (ctx.source_date_epoch, ctx.source_date_epoch), follow_symlinks=False)


def faketime_env(ctx: Context) -> dict[str, str] | None:
    """An environment whose wall clock is stopped at SOURCE_DATE_EPOCH, or None when libfaketime is unavailable."""
    try:
        deb = fetch_deb(ctx, FAKETIME_PACKAGE)
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        ctx.log(f"iso: no {FAKETIME_PACKAGE} ({exc}); the ISO's volume UUID will follow the wall clock")
        return None
    unpacked = ctx.out / "cache" / "faketime"
    library = unpacked / FAKETIME_LIBRARY
    stamp = unpacked / ".from"
    if not library.is_file() or not stamp.is_file() or stamp.read_text() != deb.name:
        if unpacked.exists():
            shutil.rmtree(unpacked)
        unpacked.mkdir(parents=True)
        ctx.run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        stamp.write_text(deb.name)
    frozen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ctx.source_date_epoch))
    return {
        **ctx.env(),
        "LD_PRELOAD": str(library),
        "FAKETIME": frozen,  # an absolute date without "@": the clock stands still
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


# What grub.cfg uses (serial console, a menu, linux + initrd from the ISO's own filesystem), and their dependencies:
# grub-mkrescue otherwise copies every module of both platforms and a 2.4 MB Unicode font the serial menu never draws.
MODULES: Final = "normal configfile echo test linux serial terminal iso9660 search search_fs_uuid part_msdos part_gpt"


def build(ctx: Context) -> None:
    staging = ctx.out / "iso-staging"
    stage(ctx, staging)
    frozen = faketime_env(ctx)
    target = ctx.out / "nullbox.iso"
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    argv = ["grub-mkrescue", "-o", str(partial), "--locales=", "--themes=", "--fonts=", "--install-modules", MODULES]
    argv.append(str(staging))
    tools = ctx.out / "iso-tools"  # grub_mformat.py as the mformat grub-mkrescue runs: a 1 MiB EFI image
    shutil.rmtree(tools, ignore_errors=True)
    tools.mkdir()
    (tools / "mformat").symlink_to(MFORMAT_WRAPPER)
    env = {**(frozen or ctx.env())}
    env["PATH"] = f"{tools}{os.pathsep}{env.get('PATH', os.defpath)}"
    ctx.run(argv, env=env)
    partial.replace(target)
    shutil.rmtree(staging)
    shutil.rmtree(tools)
    ctx.log(f"iso: {target.stat().st_size // 1024} KiB, {'reproducible' if frozen else 'volume UUID from the clock'}")
