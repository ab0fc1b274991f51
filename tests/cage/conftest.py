"""Fixtures shared by the cage tests that boot real agent VMs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cage import guestimage
from cage.guestimage import KernelKind
from nullbox import kvm

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def guest_files() -> tuple[Path, Path]:
    """(kernel, initramfs) for the QEMU backend: the NullBox guest kernel (kernel.build's cached build)."""
    if shutil.which(kvm.QEMU) is None or shutil.which("mksquashfs") is None:
        pytest.skip(f"{kvm.QEMU} or mksquashfs is not installed")
    subprocess.run([sys.executable, "-m", "kernel.build", "guest"], cwd=REPO, check=True, timeout=3600)
    return guestimage.guest_files(kernel=KernelKind.NULLBOX)
