"""Build step: Debian bookworm's kernel, fetched as a .deb and unpacked, never installed on the host.

Outputs, under build/kernel/:
  deb/        the unpacked package (boot/config-<ver> says what the kernel supports)
  vmlinuz     the kernel image
  version     "<ver>\\n", e.g. "6.1.0-56-amd64"
  modules/    the package's lib/modules/<ver> tree (moved out of deb/, not copied: it is ~400 MB)

The .deb is kept in build/cache/deb/ and reused as long as its SHA-256 matches what apt's index says, so a rebuild
does not download again.  The version is whatever `linux-image-amd64` depends on in the host's apt index.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from image.context import Context

INPUTS: Final[list[str]] = ["image/kernel.py"]
META_PACKAGE: Final = "linux-image-amd64"


def kernel_package(ctx: Context) -> str:
    """The versioned package the meta package depends on, e.g. linux-image-6.1.0-56-amd64."""
    for attempt in range(2):
        try:
            text = ctx.output(["apt-cache", "depends", META_PACKAGE])
        except subprocess.CalledProcessError:
            text = ""
        found: list[str] = re.findall(r"Depends:\s*(linux-image-\d\S*-amd64)\s*$", text, re.MULTILINE)
        if found:
            return sorted(found)[-1]
        if attempt == 0:  # a fresh machine: apt knows no packages until its index is fetched once
            ctx.log(f"apt-cache does not know {META_PACKAGE}; running apt-get update once")
            ctx.run(["apt-get", "update"])
    raise RuntimeError(f"cannot resolve the kernel package behind {META_PACKAGE} with apt-cache")


def package_record(ctx: Context, package: str) -> dict[str, str]:
    """The candidate version's fields from apt's index (Version, SHA256, ...)."""
    text = ctx.output(["apt-cache", "show", "--no-all-versions", package])
    record: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and not key.startswith(" "):
            record.setdefault(key, value.strip())
    return record


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_deb(ctx: Context, package: str) -> Path:
    """The package's .deb from build/cache/deb/, downloaded there with `apt-get download` when missing or stale."""
    record = package_record(ctx, package)
    version, expected = record.get("Version", ""), record.get("SHA256", "")
    cache = ctx.out / "cache" / "deb"
    cache.mkdir(parents=True, exist_ok=True)
    # apt-get download names the file <package>_<version with ':' as %3a>_amd64.deb
    name = f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    cached = cache / name
    if cached.is_file() and (not expected or sha256_file(cached) == expected):
        ctx.log(f"kernel: using cached {cached.relative_to(ctx.out)}")
        return cached
    ctx.log(f"kernel: downloading {package} {version}")
    download_deb(cached, package, version, expected, lambda argv, cwd: ctx.run(argv, cwd=cwd))
    return cached


def download_deb(
    cached: Path, package: str, version: str, expected: str, run: Callable[[list[str], Path], object]
) -> None:
    """``apt-get download package=version`` into ``cached``, checked against apt's SHA-256 (``expected``) when
    known; other versions of the package's .deb beside it are removed.  ``run(argv, cwd)`` runs a command."""
    cache = cached.parent
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        # apt-get download as root drops privileges to _apt, which must be able to write the directory
        Path(tmp).chmod(0o777)
        run(["apt-get", "download", f"{package}={version}" if version else package], Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} left {len(debs)} .deb files")
        if expected and sha256_file(debs[0]) != expected:
            raise RuntimeError(f"{debs[0].name}: SHA-256 differs from apt's index")
        debs[0].replace(cached)
    for stale in cache.glob(f"{package}_*.deb"):
        if stale != cached:
            stale.unlink()


def build(ctx: Context) -> None:
    package = kernel_package(ctx)
    version = package.removeprefix("linux-image-")
    deb = fetch_deb(ctx, package)
    out = ctx.out / "kernel"
    if out.exists():
        shutil.rmtree(out)
    unpacked = out / "deb"
    unpacked.mkdir(parents=True)
    ctx.run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    vmlinuz = unpacked / "boot" / f"vmlinuz-{version}"
    modules = unpacked / "lib" / "modules" / version
    if not vmlinuz.is_file() or not modules.is_dir():
        raise RuntimeError(f"{deb.name} has no boot/vmlinuz-{version} or lib/modules/{version}")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    modules.replace(out / "modules")
    (out / "version").write_text(version + "\n")
    ctx.log(f"kernel: {version}, vmlinuz {(out / 'vmlinuz').stat().st_size // 1024} KiB")
