#!/usr/bin/python3
"""Install what NullBox's development and test environment needs; idempotent, and quick when nothing changed.

Runs with Debian's /usr/bin/python3 (the interpreter the image ships) before any venv exists, so stdlib only.
Steps: apt packages that are missing -> .venv (with system site-packages, for Debian's python3-nftables) ->
editable install of the project with its dev tools, redone only when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".nullbox-installed"
APT_PACKAGES = [
    "python3-venv",
    "python3-nftables",
    "python3-cryptography",
    # the appliance image (make image) and its boot tests
    "mkosi",
    "systemd-container",
    "debootstrap",
    "squashfs-tools",
    "busybox-static",
    "cpio",
    "zstd",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "dosfstools",
    "ovmf",
    "qemu-system-x86",
    "qemu-utils",
    "e2fsprogs",
    "ca-certificates",
    # the NullBox kernel (make kernel; its config tests need the kconfig tools): kernel/build.py BUILD_DEPS
    "gcc",
    "make",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "xz-utils",
    # static helpers compiled by the image build and cage (image/initramfs/nb-verity.c, cage/guest/nb-vsock.c): libc.a
    # and the kernel's uapi headers (linux/dm-ioctl.h, linux/vm_sockets.h)
    "libc6-dev",
    "linux-libc-dev",
]


def run(argv: list[str], **env: str) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, env={**os.environ, **env})


def missing_apt_packages() -> list[str]:
    missing = []
    for package in APT_PACKAGES:
        probe = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.stdout.strip() != "installed":
            missing.append(package)
    return missing


def ensure_apt() -> None:
    missing = missing_apt_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bootstrap: missing Debian packages {missing}; run as root or install them first")
    run(["apt-get", "update", "-q"])
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        DEBIAN_FRONTEND="noninteractive",
    )


def ensure_venv() -> None:
    python = VENV / "bin" / "python"
    if not python.exists():
        run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(VENV)])
    fingerprint = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, "--upgrade", "pip>=23.1"])
    run([*pip, "-e", f"{ROOT}[dev]"])
    STAMP.write_text(fingerprint)


def main() -> None:
    ensure_apt()
    ensure_venv()


if __name__ == "__main__":
    main()
