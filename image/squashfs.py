"""Build step squashfs: build/rootfs/ packed into build/rootfs.squashfs, plus its SHA-256 in rootfs.squashfs.sha256,
and its dm-verity hash tree (image/verity.py) in rootfs.verity with the root hash in rootfs.verity.json.

Reproducible: the same tree and SOURCE_DATE_EPOCH give the same bytes.  mksquashfs (4.5.1) sorts directories
itself and is reproducible by default (said anyway with -reproducible); every timestamp is the epoch, every file is
owned by root (the tree is built as root; nothing in the image needs another owner), and extended attributes are
left out, so neither the build host's clock nor its users or security labels reach the image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

from image import verity
from image.context import Context

INPUTS: Final[list[str]] = ["image/verity.py"]  # and build/rootfs, covered through the rootfs step's digest
TREE: Final = "rootfs.verity"
RECORD: Final = "rootfs.verity.json"
COMPRESSION: Final = ("-comp", "zstd", "-Xcompression-level", "19", "-b", "128K")


def mksquashfs_argv(tree: Path, image: Path, epoch: int) -> list[str]:
    stamp = str(epoch)
    return [
        "mksquashfs",
        str(tree),
        str(image),
        "-noappend",
        *COMPRESSION,
        "-all-root",
        "-no-xattrs",
        "-mkfs-time",
        stamp,
        "-all-time",
        stamp,
        "-reproducible",
        "-no-progress",
        "-quiet",
    ]


def pack(ctx: Context, tree: Path, image: Path) -> str:
    """Pack tree into image (replaced atomically); returns the image's SHA-256 (hex)."""
    if not tree.is_dir():
        raise RuntimeError(f"squashfs: {tree} is not a directory (build the rootfs step first)")
    partial = image.with_name(image.name + ".partial")
    partial.unlink(missing_ok=True)
    # mksquashfs refuses SOURCE_DATE_EPOCH in its environment together with the explicit time options
    env = {k: v for k, v in ctx.env().items() if k != "SOURCE_DATE_EPOCH"}
    ctx.run(mksquashfs_argv(tree, partial, ctx.source_date_epoch), env=env)
    digest = hashlib.sha256()
    with partial.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    partial.replace(image)
    return digest.hexdigest()


def build(ctx: Context) -> None:
    image = ctx.out / "rootfs.squashfs"
    checksum = ctx.out / "rootfs.squashfs.sha256"
    tree, record = ctx.out / TREE, ctx.out / RECORD
    for stale in (checksum, tree, record):
        stale.unlink(missing_ok=True)
    hexdigest = pack(ctx, ctx.out / "rootfs", image)
    checksum.write_text(hexdigest + "\n")
    shown = image.relative_to(ctx.repo) if image.is_relative_to(ctx.repo) else image  # benchmarks build elsewhere
    ctx.log(f"squashfs: {shown} {image.stat().st_size / 2**20:.1f} MiB, sha256 {hexdigest}")
    partial = tree.with_name(tree.name + ".partial")
    made = verity.build_tree(image, partial)
    if made.image_sha256 != hexdigest:
        raise RuntimeError(f"squashfs: {image.name} changed while its hash tree was built")
    partial.replace(tree)
    record.write_text(made.to_json() + "\n")
    ctx.log(f"squashfs: dm-verity tree {tree.name} {made.hash_blocks} blocks, root hash {made.root_hash}")
