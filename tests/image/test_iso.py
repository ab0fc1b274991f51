"""image/grub_mformat.py: grub-mkrescue's EFI image made 1 MiB instead of a 2.88 MB floppy, by the real mtools."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from image import grub_mformat, iso


def test_only_grubs_floppy_geometry_is_rewritten() -> None:
    grub = ["-C", "-f", "2880", "-L", "16", "-i", "efi.img", "::"]
    assert grub_mformat.rewritten(grub) == [
        "-C",
        "-T",
        "2048",
        "-h",
        "2",
        "-s",
        "32",
        "-L",
        "16",
        "-i",
        "efi.img",
        "::",
    ]
    other = ["-C", "-f", "1440", "-i", "x.img", "::"]
    assert grub_mformat.rewritten(other) == other


@pytest.mark.skipif(shutil.which("mformat") is None or shutil.which("mcopy") is None, reason="mtools missing")
def test_the_wrapper_on_path_makes_a_1_mib_fat_that_holds_grubs_core_image(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "mformat").symlink_to(iso.MFORMAT_WRAPPER)
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    image = tmp_path / "efi.img"
    subprocess.run(["mformat", "-C", "-f", "2880", "-L", "16", "-i", str(image), "::"], env=env, check=True)
    assert image.stat().st_size == 1 << 20
    core = tmp_path / "bootx64.efi"
    core.write_bytes(os.urandom(600 * 1024))  # grub's is ~160 KB
    subprocess.run(["mmd", "-i", str(image), "::/efi", "::/efi/boot"], check=True)
    subprocess.run(["mcopy", "-i", str(image), str(core), "::/efi/boot/bootx64.efi"], check=True)
    back = tmp_path / "back.efi"
    subprocess.run(["mcopy", "-i", str(image), "::/efi/boot/bootx64.efi", str(back)], check=True)
    assert back.read_bytes() == core.read_bytes()
    # one too big for it fails loudly (grub-mkrescue then fails the build)
    core.write_bytes(os.urandom(1100 * 1024))
    failed = subprocess.run(["mcopy", "-i", str(image), str(core), "::/big.efi"], capture_output=True, check=False)
    assert failed.returncode != 0
