"""Build the appliance: ``python -m image.build [--force] [STEP ...]`` (``make image``).

Steps run in order; each is skipped when the digest of its inputs (its own declared files, the steps before
it, and SOURCE_DATE_EPOCH) matches the one recorded when its outputs were last built and the outputs exist.

    kernel      Debian's kernel package -> build/kernel/{vmlinuz,version,modules/}
    rootfs      mkosi tree, nullbox installed, trimmed -> build/rootfs/
    guest       agent VMs' kernel and initramfs, the demo agent -> build/rootfs/usr/{lib,share}/nullbox/...
    squashfs    build/rootfs -> build/rootfs.squashfs (+ .sha256), its dm-verity tree rootfs.verity (+ .json)
    bootkernel  the kernel the appliance boots: the NullBox one when built (make kernel), else Debian's
                -> build/boot/{vmlinuz,config,version,kernel.json}
    initrd      busybox initramfs that verifies and mounts the squashfs -> build/initrd.img
    iso         grub-mkrescue, BIOS + UEFI -> build/nullbox.iso

A step module may also define ``identity(ctx) -> str``: something its digest covers besides files (bootkernel:
which kernel was chosen, and which build of it), computed every run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

from image.bootkernel import CHOICES
from image.context import Context, context_from_env

REPO: Final = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    outputs: tuple[str, ...]  # relative to build/

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


STEPS: Final = (
    Step("kernel", "image.kernel", ("kernel/vmlinuz", "kernel/version", "kernel/modules")),
    Step("rootfs", "image.rootfs", ("rootfs",)),
    Step(
        "guest",
        "image.guest",
        (
            "rootfs/usr/lib/nullbox/guest/vmlinux",
            "rootfs/usr/lib/nullbox/guest/initrd.img",
            "rootfs/usr/share/nullbox/examples/demo/rootfs",
        ),
    ),
    Step(
        "squashfs",
        "image.squashfs",
        ("rootfs.squashfs", "rootfs.squashfs.sha256", "rootfs.verity", "rootfs.verity.json"),
    ),
    Step("bootkernel", "image.bootkernel", ("boot/vmlinuz", "boot/config", "boot/version", "boot/kernel.json")),
    Step("initrd", "image.initrd", ("initrd.img",)),
    Step("iso", "image.iso", ("nullbox.iso",)),
)


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and "__pycache__" not in child.parts:
                yield child
    elif path.exists():
        yield path


def digest_inputs(repo: Path, inputs: list[str], extra: str) -> str:
    """Content digest of the inputs (paths and bytes), plus ``extra`` (earlier steps, the epoch)."""
    digest = hashlib.sha256(extra.encode())
    for relative in sorted(set(inputs)):
        for file in _files(repo / relative):
            digest.update(str(file.relative_to(repo)).encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
            digest.update(b"x" if file.stat().st_mode & 0o111 else b"-")
    return digest.hexdigest()


def run(ctx: Context, wanted: list[str], force: bool) -> dict[str, str]:
    """Run the steps (all of them up to the last wanted one); returns each step's status for the report."""
    stamps = ctx.out / ".stamps"
    stamps.mkdir(parents=True, exist_ok=True)
    last = max((i for i, s in enumerate(STEPS) if s.name in wanted), default=len(STEPS) - 1)
    chain = f"epoch={ctx.source_date_epoch}"
    report: dict[str, str] = {}
    for step in STEPS[: last + 1]:
        module = step.load()
        build: Callable[[Context], None] = module.build
        identity: Callable[[Context], str] | None = getattr(module, "identity", None)
        extra = chain if identity is None else f"{chain}|identity={identity(ctx)}"
        digest = digest_inputs(ctx.repo, [*module.INPUTS, f"image/{step.module.split('.')[-1]}.py"], extra)
        stamp = stamps / f"{step.name}.json"
        recorded = json.loads(stamp.read_text()).get("digest") if stamp.exists() else None
        outputs_exist = all((ctx.out / o).exists() for o in step.outputs)
        if not force and recorded == digest and outputs_exist:
            ctx.log(f"{step.name}: up to date")
            report[step.name] = "cached"
        else:
            ctx.log(f"{step.name}: building")
            started = time.monotonic()
            stamp.unlink(missing_ok=True)
            build(ctx)
            missing = [o for o in step.outputs if not (ctx.out / o).exists()]
            if missing:
                raise RuntimeError(f"step {step.name} did not produce {', '.join(missing)}")
            stamp.write_text(json.dumps({"digest": digest}) + "\n")
            report[step.name] = f"built in {time.monotonic() - started:.1f}s"
            ctx.log(f"{step.name}: {report[step.name]}")
        chain += f"|{step.name}={digest}"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="*", help=f"build up to these steps ({', '.join(s.name for s in STEPS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even what is up to date")
    parser.add_argument(
        "--kernel",
        choices=CHOICES,
        default="auto",
        help="the kernel the appliance boots (default auto: the NullBox kernel when built and up to date)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.steps) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}")
    ctx = context_from_env(REPO, args.kernel)
    try:
        report = run(ctx, args.steps, args.force)
    except Exception as exc:  # one clear line; the failing command's own output is above it
        ctx.log(f"FAILED: {exc}")
        return 1
    for name, status in report.items():
        ctx.log(f"{name:10} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
