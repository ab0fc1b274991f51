"""The root image's dm-verity: the hash tree image/verity.py builds, and the NullBox kernel checking it for real.

The host kernel here has no device-mapper, so the kernel side runs in a VM: the NullBox appliance kernel under TCG
with a test initramfs that uses /init's own functions (nb_named_device, nb_verity_open) and the real nb-verity
helper over virtio disks, then reads the whole mapped device.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from image import initrd, verity
from image.verity import BLOCK, PER_BLOCK, Verity
from kernel import build as kernel_build
from nullbox import cpio, kvm

REPO = Path(__file__).resolve().parent.parent.parent
INIT = REPO / "image" / "initramfs" / "init"
EPOCH = 1767225600


def _image(path: Path, blocks: int, seed: int = 7) -> Path:
    path.write_bytes(random.Random(seed).randbytes(blocks * BLOCK))
    return path


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _reference_root(data: bytes, salt: bytes) -> str:
    """The root hash computed independently: recursive, straight from the format's definition."""

    def digest(block: bytes) -> bytes:
        return hashlib.sha256(salt + block).digest()

    hashes = [digest(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK)]
    while len(hashes) > 1:
        blocks = [b"".join(hashes[i : i + PER_BLOCK]).ljust(BLOCK, b"\0") for i in range(0, len(hashes), PER_BLOCK)]
        hashes = [digest(block) for block in blocks]
    return hashes[0].hex()


@pytest.mark.parametrize(("blocks", "levels"), [(1, []), (2, [1]), (128, [1]), (129, [2, 1]), (16385, [129, 2, 1])])
def test_level_sizes_follow_the_kernel(blocks: int, levels: list[int]) -> None:
    assert verity.level_sizes(blocks) == levels


@pytest.mark.parametrize("blocks", [1, 5, 128, 300])
def test_tree_root_and_every_block_verify(tmp_path: Path, blocks: int) -> None:
    image = _image(tmp_path / "image", blocks)
    made = verity.build_tree(image, tmp_path / "tree")
    data = image.read_bytes()
    assert made.image_sha256 == hashlib.sha256(data).hexdigest()
    assert made.salt == verity.salt_for(made.image_sha256).hex()
    assert made.root_hash == _reference_root(data, bytes.fromhex(made.salt))
    assert (made.data_blocks, made.hash_blocks) == (blocks, sum(verity.level_sizes(blocks)))
    assert (tmp_path / "tree").stat().st_size == made.hash_blocks * BLOCK
    assert all(verity.check_block(image, tmp_path / "tree", made, i) for i in range(blocks))
    assert Verity.from_json(made.to_json()) == made


def test_a_flipped_byte_fails_its_block_only(tmp_path: Path) -> None:
    image = _image(tmp_path / "image", 300)
    made = verity.build_tree(image, tmp_path / "tree")
    _flip(image, 200 * BLOCK + 17)
    assert [i for i in range(300) if not verity.check_block(image, tmp_path / "tree", made, i)] == [200]
    # and the tree: a flipped byte in the top block fails every block
    image.write_bytes(_image(tmp_path / "again", 300).read_bytes())
    _flip(tmp_path / "tree", 5)
    assert not any(verity.check_block(image, tmp_path / "tree", made, i) for i in (0, 150, 299))


def test_salt_is_reproducible_and_differs_per_image(tmp_path: Path) -> None:
    one = verity.build_tree(_image(tmp_path / "a", 3, seed=1), tmp_path / "ta")
    again = verity.build_tree(_image(tmp_path / "b", 3, seed=1), tmp_path / "tb")
    other = verity.build_tree(_image(tmp_path / "c", 3, seed=2), tmp_path / "tc")
    assert one == again and (tmp_path / "ta").read_bytes() == (tmp_path / "tb").read_bytes()
    assert other.salt != one.salt and other.root_hash != one.root_hash


def test_partial_blocks_and_empty_images_are_refused(tmp_path: Path) -> None:
    (tmp_path / "odd").write_bytes(bytes(BLOCK + 1))
    with pytest.raises(ValueError, match="whole number of 4096-byte blocks"):
        verity.build_tree(tmp_path / "odd", tmp_path / "tree")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        verity.build_tree(tmp_path / "empty", tmp_path / "tree")


# ----------------------------------------------------------------------------------------- the kernel, in a VM

# Each case: a data disk and a hash disk (virtio serials CASE-data / CASE-hash), all against the one table in
# /etc/nullbox/rootfs.verity; /init's functions open it, then the whole device is read.
TEST_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for case in good data-flipped tree-flipped; do
	sh -c '
		. /lib/nullbox-init
		NB_VERITY_NAME=$1
		dev=$(nb_verity_open "$(nb_named_device serial:$1-data)" "$(nb_named_device serial:$1-hash)") ||
			{ echo "CASE $1 OPEN-FAILED"; exit 0; }
		if dd if="$dev" of=/dev/null bs=4096 2>/tmp/err; then
			echo "CASE $1 READ $(sha256sum <"$dev" | cut -d" " -f1)"
		else
			echo "CASE $1 ERROR $(tr "\\n" " " </tmp/err)"
		fi
	' sh "$case"
done
dmesg | grep -i "verity" | sed "s/^/KERNEL /"
echo "CASES DONE"
poweroff -f
"""


def _appliance_kernel() -> Path:
    out = kernel_build.variant_dir("appliance")
    if not kernel_build.is_built("appliance", out):
        pytest.skip("the NullBox appliance kernel is not built (make kernel)")
    return out / "bzImage"


def _test_initramfs(tmp_path: Path, table: Verity) -> Path:
    busybox = Path("/bin/busybox")
    if not busybox.is_file() or not initrd.is_static_elf(busybox.read_bytes()):
        pytest.skip("busybox-static is not installed")
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    inputs = initrd.Inputs(
        init=TEST_INIT.encode(),
        busybox=busybox.read_bytes(),
        applets=applets.split(),
        kernel_version="none",
        modules=[],
        verity=table,
        nb_verity=initrd.compile_static(REPO / initrd.VERITY_HELPER),
    )
    entries = [*initrd.entries(inputs), cpio.regular("lib/nullbox-init", INIT.read_bytes(), 0o644)]
    path = tmp_path / "initrd.cpio"
    path.write_bytes(cpio.newc_archive(entries, EPOCH))
    return path


def test_the_nullbox_kernel_checks_every_block_it_reads(tmp_path: Path) -> None:
    kernel = _appliance_kernel()
    qemu = shutil.which(kvm.QEMU)
    if qemu is None:
        pytest.skip("QEMU is not installed")
    image = _image(tmp_path / "good-data", 300)
    table = verity.build_tree(image, tmp_path / "good-hash")
    for case in ("data-flipped", "tree-flipped"):
        shutil.copyfile(image, tmp_path / f"{case}-data")
        shutil.copyfile(tmp_path / "good-hash", tmp_path / f"{case}-hash")
    _flip(tmp_path / "data-flipped-data", 200 * BLOCK + 17)
    _flip(tmp_path / "tree-flipped-hash", 5)  # the top level's first digest
    argv = [qemu, "-M", "q35", "-accel", "tcg", "-m", "256", "-display", "none", "-no-reboot"]
    argv += ["-serial", "stdio", "-monitor", "none", "-kernel", str(kernel)]
    argv += ["-initrd", str(_test_initramfs(tmp_path, table)), "-append", "console=ttyS0 quiet panic=-1"]
    for index, name in enumerate(
        f"{c}-{p}" for c in ("good", "data-flipped", "tree-flipped") for p in ("data", "hash")
    ):
        argv += ["-drive", f"file={tmp_path / name},format=raw,if=none,id=d{index},readonly=on"]
        argv += ["-device", f"virtio-blk-pci,drive=d{index},serial={name}"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=240, check=False, env={**os.environ, "TMPDIR": str(tmp_path)}
    )
    console = done.stdout.replace("\r", "")
    assert "CASES DONE" in console, console + done.stderr
    cases = {line.split()[1]: line.split(maxsplit=2)[2] for line in console.splitlines() if line.startswith("CASE ")}
    assert cases["good"] == f"READ {table.image_sha256}", console
    # the corrupted block is an I/O error for the reader, and the kernel names exactly that block
    assert cases["data-flipped"].startswith("ERROR ") and "Input/output error" in cases["data-flipped"], console
    assert cases["tree-flipped"].startswith("ERROR ") and "Input/output error" in cases["tree-flipped"], console
    kernel_lines = [line for line in console.splitlines() if line.startswith("KERNEL ")]
    assert any("data block 200 is corrupted" in line for line in kernel_lines), console
    assert any("metadata block 0 is corrupted" in line for line in kernel_lines), console
    assert not any("corrupted" in line and " data block " in line and "block 200 " not in line for line in kernel_lines)
