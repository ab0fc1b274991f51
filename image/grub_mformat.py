#!/usr/bin/python3
"""``mformat`` as grub-mkrescue sees it (image/iso.py puts this first on its PATH): a 1 MiB EFI image, not 2.88 MB.

grub-mkrescue makes the EFI system partition image with ``mformat -C -f 2880 -L 16 -i efi.img ::``, a 2.88 MB floppy
of which its EFI core image uses ~160 KB; the rest is zeros in every ISO.  This asks mtools for the same FAT12
filesystem at 1 MiB (2048 sectors, still over six times the core image), and runs anything else unchanged.  A core
image that outgrows it makes grub-mkrescue's mcopy fail, so the build stops rather than ship a broken ESP.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Final

GRUB_FLOPPY: Final = ["-f", "2880"]
SMALLER: Final = ["-T", "2048", "-h", "2", "-s", "32"]  # 1 MiB; -L 16 (FAT sectors) stays as grub asked


def rewritten(argv: list[str]) -> list[str]:
    """``argv`` (without the program) with grub-mkrescue's 2.88 MB geometry replaced, anything else unchanged."""
    for i in range(len(argv) - 1):
        if argv[i : i + 2] == GRUB_FLOPPY:
            return [*argv[:i], *SMALLER, *argv[i + 2 :]]
    return argv


def real_mformat() -> str:
    """The next mformat on PATH after this one's directory."""
    here = Path(sys.argv[0]).absolute().parent  # the symlink's directory (not resolved: that would be image/)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if Path(d or ".").absolute() != here)
    found = shutil.which("mformat", path=path)
    if found is None:
        sys.exit("grub_mformat: no mformat on PATH (apt-get install mtools)")
    return found


if __name__ == "__main__":
    program = real_mformat()
    os.execv(program, [program, *rewritten(sys.argv[1:])])  # noqa: S606 (an argv list, no shell: exec is the point)
