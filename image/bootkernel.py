"""Build step: the kernel the appliance boots -> build/boot/{vmlinuz,config,version,kernel.json}.

Which kernel (``Context.kernel``, ``python -m image.build --kernel auto|nullbox|debian``):
  nullbox   kernel.build's appliance kernel, build/kernel-nullbox/appliance/ (``make kernel``): everything the
            appliance needs built in, CONFIG_MODULES off, so the initramfs carries no modules
  debian    Debian's, as the kernel step unpacked it under build/kernel/: its modules go into the initramfs
  auto      (the default) nullbox when kernel.build has a complete build of it that is up to date (its own cache
            check, ``kernel.build.is_built``: build.json has today's fragment and build.py), else debian

The choice and the chosen kernel's identity (its release and the SHA-256 of its image and .config) are part of this
step's digest (``identity``), and so of every later step's: switching kernels, or rebuilding the NullBox one with
another config, rebuilds the initramfs and the ISO.  The kernel step (Debian's package) still runs either way: it
is the fallback, and cage boots agent VMs from it when the NullBox guest kernel is not built.

Outputs, under build/boot/:
  vmlinuz       the kernel image (the NullBox bzImage, or Debian's vmlinuz)
  config        its .config (what image.initrd reads for the initramfs compression)
  version       its release (uname -r), e.g. 6.1.192-nullbox
  kernel.json   {"kernel": "nullbox"|"debian", "release", "vmlinuz_sha256", "config_sha256", "modules"}; "modules" is
                the unpacked lib/modules/<release> tree relative to build/, or null when the kernel has none
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from image.context import Context
from image.kernel import sha256_file
from kernel import build as kernel_build

INPUTS: Final[list[str]] = ["image/bootkernel.py", "image/kernel.py"]
NULLBOX_VARIANT: Final = "appliance"
CHOICES: Final = ("auto", "nullbox", "debian")
OUT: Final = "boot"  # under build/


@dataclass(frozen=True)
class BootKernel:
    """A kernel the appliance can boot, and why it was chosen."""

    kind: str  # "nullbox" | "debian"
    vmlinuz: Path
    config: Path
    release: str
    modules: Path | None  # Debian's unpacked lib/modules/<release>; None: no loadable modules
    why: str

    def record(self) -> dict[str, str | None]:
        """kernel.json, and (as JSON) this kernel's identity in the step digest."""
        return {
            "kernel": self.kind,
            "release": self.release,
            "vmlinuz_sha256": sha256_file(self.vmlinuz),
            "config_sha256": sha256_file(self.config),
            "modules": None if self.modules is None else "kernel/modules",
        }

    def describe(self) -> str:
        name = "the NullBox appliance kernel" if self.kind == "nullbox" else "Debian's kernel"
        return f"{name} {self.release} ({self.why})"


def nullbox_dir(build: Path) -> Path:
    return kernel_build.variant_dir(NULLBOX_VARIANT, build)


def nullbox_unusable(build: Path) -> str | None:
    """None when kernel.build's appliance kernel is built and up to date (kernel.build's own check); else why not."""
    out = nullbox_dir(build)
    if kernel_build.is_built(NULLBOX_VARIANT, out):
        return None
    if not (out / "build.json").is_file():
        return f"{out.relative_to(build.parent) if out.is_relative_to(build.parent) else out} is not built"
    return "its build is out of date (kernel/appliance.config or kernel/build.py changed since)"


def nullbox_kernel(build: Path, why: str) -> BootKernel:
    out = nullbox_dir(build)
    return BootKernel("nullbox", out / "bzImage", out / ".config", (out / "version").read_text().strip(), None, why)


def debian_kernel(build: Path, why: str) -> BootKernel:
    """Debian's kernel as the kernel step left it in build/kernel/."""
    kernel = build / "kernel"
    release = (kernel / "version").read_text().strip()
    config = kernel / "deb" / "boot" / f"config-{release}"
    return BootKernel("debian", kernel / "vmlinuz", config, release, kernel / "modules", why)


def choose(build: Path, wanted: str = "auto") -> BootKernel:
    """The kernel to boot: ``wanted`` is one of CHOICES.  Asking for nullbox when it is not usable is an error."""
    if wanted not in CHOICES:
        raise ValueError(f"unknown kernel {wanted!r} (one of {', '.join(CHOICES)})")
    if wanted == "debian":
        return debian_kernel(build, "asked for")
    problem = nullbox_unusable(build)
    if problem is None:
        return nullbox_kernel(build, "asked for" if wanted == "nullbox" else "built and up to date")
    if wanted == "nullbox":
        raise RuntimeError(f"the NullBox kernel was asked for, but {problem}: python -m kernel.build appliance")
    return debian_kernel(build, f"the NullBox kernel is not used: {problem}; make kernel builds it")


def identity(ctx: Context) -> str:
    """This step's extra digest input: which kernel, and which build of it.  Also says so on the progress output."""
    chosen = choose(ctx.out, ctx.kernel)
    ctx.log(f"bootkernel: {chosen.describe()}")
    return json.dumps(chosen.record(), sort_keys=True)


def staged(build: Path) -> tuple[dict[str, str | None], Path | None]:
    """What the last build of this step chose: kernel.json, and the modules tree (None: the kernel has none)."""
    record = json.loads((build / OUT / "kernel.json").read_text())
    modules = record.get("modules")
    return record, None if modules is None else build / modules


def build(ctx: Context) -> None:
    chosen = choose(ctx.out, ctx.kernel)
    out = ctx.out / OUT
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(chosen.vmlinuz, out / "vmlinuz")
    shutil.copyfile(chosen.config, out / "config")
    (out / "version").write_text(chosen.release + "\n")
    (out / "kernel.json").write_text(json.dumps(chosen.record(), indent=1) + "\n")
    modules = "none (everything built in)" if chosen.modules is None else f"from {chosen.modules}"
    ctx.log(
        f"bootkernel: {chosen.kind} {chosen.release}, vmlinuz {(out / 'vmlinuz').stat().st_size // 1024} KiB, "
        f"modules {modules}"
    )
