"""Kernel benchmark: the appliance on Debian's kernel vs the NullBox kernel, in one run, under the same QEMU/TCG.

    .venv/bin/python -m bench.kernel_bench               # sizes, 3 BIOS boots of each ISO (alternating)
    .venv/bin/python -m bench.kernel_bench --quick       # sizes, 1 boot of each
    .venv/bin/python -m bench.kernel_bench --boots 5

First ``python -m kernel.build appliance`` and ``python -m image.build`` run in the repository (no-ops when up to
date), so build/ holds the NullBox appliance kernel, Debian's kernel (the kernel step always unpacks it) and the root
image.  Then, in a temporary directory, the image build's last steps (guest, squashfs, bootkernel, initrd, iso) run
twice from a hard-linked copy of the same build/rootfs tree, once with ``kernel = "debian"`` and once with
``kernel = "nullbox"``: two appliances that differ only in their kernels, the one it boots (Debian's initramfs
carries its ~70 modules, the NullBox one none) and the one its agents' VMs boot (in the root image: Debian's
vmlinux and an initramfs with its virtio modules, or the NullBox guest kernel), which is what a Debian-kernel
appliance ships.  Their output goes to <tmp>/<kernel>/steps.log.

  (1) sizes: kernel image, initramfs, both together, the agents' kernel + initramfs, the root image, the ISO; the
      NullBox ISO against the target (>= 8 MB smaller), and how much of the saving is the boot kernel alone
  (2) boots: each ISO booted ``--boots`` times under TCG, alternating which kernel goes first, through
      bench.image_bench's own boot (qemu.runner's preparation and command line, SeaBIOS, grub, 2 vCPUs, 1024 MiB,
      a fresh data disk), each to every service ready and powered off.  Medians per kernel:
        kernel -> /init started, -> exec /sbin/init: the uptime the initramfs prints on the console (guest clock)
        kernel -> nulld entry point: nulld's timings (guest CLOCK_MONOTONIC), the "boot to init" of the target
                  (NullBox <= 1/2 of Debian's)
        QEMU start -> nulld entry point, -> all services ready: host wall clock (firmware, grub, loading and
                  decompressing the kernel included, which the guest clock does not see)
  (3) agent VMs: bench.agent_vm_boot's boot (QEMU microvm under TCG, 1 vCPU, the agent's root image and config
      disk, its ctxgraph channel) with Debian's kernel and with the NullBox guest kernel, alternating: QEMU start ->
      the agent's first ctxgraph write (host wall), medians; ``python -m bench.agent_vm_boot`` has the details.

The ratio column compares each NullBox figure with Debian's measured in the same run.  Every process started here
is killed with its process group on any error, SIGTERM or SIGHUP (bench.nulld_bench's Janitor); the temporary
directory is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.agent_vm_boot import agent_boot_seconds
from bench.agent_vm_boot import build_kernels as build_guest_kernels
from bench.common import Report, log, verdict
from bench.image_bench import (
    BUILD,
    MB,
    MIB,
    PYTHON,
    REPO,
    SOCKET_PATH_MAX,
    Boot,
    bench_boot,
    machine_info,
    mounts_under,
    run_build,
    tail,
)
from bench.nulld_bench import Janitor, load_average, signals_unwind
from cage.guestimage import KernelKind
from image.bootkernel import staged
from image.build import STEPS
from image.context import Context
from image.guest import GUEST_DIR
from image.initrd import kernel_modules
from image.kernel import sha256_file
from nulld.syscalls import set_child_subreaper

KERNELS: Final = ("debian", "nullbox")  # the baseline first
NAMES: Final = {"debian": "Debian", "nullbox": "NullBox"}
FROM_STEP: Final = "guest"  # the image build's steps from here on depend on the kernels
LINKED: Final = ("kernel", "kernel-nullbox", "cache")  # from build/; build/rootfs is copied (hard links)
GUEST_FILES: Final = tuple(f"rootfs/{GUEST_DIR}/{name}" for name in ("vmlinux", "initrd.img"))  # image.guest's
TARGET_BOOT_RATIO: Final = 0.5  # NullBox kernel -> nulld at most half of Debian's
TARGET_ISO_SAVING_MB: Final = 8.0
KERNEL_BUILD_TIMEOUT_S: Final = 3600.0
DEFAULT_BOOTS: Final = 3
# The initramfs's console lines (image/initramfs/init), with the guest's uptime in parentheses.
INIT_STARTED: Final = re.compile(r"NullBox: initramfs started, kernel (\S+) \(([\d.]+)s\)")
INIT_EXEC: Final = re.compile(r"NullBox: switching to the verified root: exec /sbin/init \(([\d.]+)s\)")


# ------------------------------------------------------------------------------------------------------ builds


def build_kernel(janitor: Janitor, log_path: Path) -> float:
    """``python -m kernel.build appliance`` in the repository (cached when up to date); its wall time."""
    with log_path.open("wb") as out:
        started = time.monotonic()
        proc = janitor.spawn(
            [PYTHON, "-m", "kernel.build", "appliance"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            code = proc.wait(KERNEL_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            janitor.kill(proc)
            raise RuntimeError(
                f"python -m kernel.build took over {KERNEL_BUILD_TIMEOUT_S:g}s{tail(log_path)}"
            ) from None
        janitor.forget(proc)
    if code != 0:
        raise RuntimeError(f"python -m kernel.build appliance failed with status {code}{tail(log_path)}")
    return time.monotonic() - started


@contextlib.contextmanager
def stderr_into(path: Path) -> Iterator[None]:
    """File descriptor 2 (the steps' progress lines and their commands' output) appended to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("ab") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def kernel_steps() -> list[Callable[[Context], None]]:
    """The build functions of the image build's steps that depend on the kernel, in order."""
    names = [step.name for step in STEPS]
    return [step.load().build for step in STEPS[names.index(FROM_STEP) :]]


def build_variant(kernel: str, out: Path) -> float:
    """An ISO in ``out`` booting ``kernel`` (its agents too), from build/'s root tree; the wall time of its steps."""
    out.mkdir(parents=True)
    for name in LINKED:
        (out / name).symlink_to(BUILD / name)
    # the guest step replaces its files rather than writing into them, so hard links keep build/rootfs untouched
    subprocess.run(["cp", "-al", str(BUILD / "rootfs"), str(out / "rootfs")], check=True)
    ctx = Context(repo=REPO, out=out, kernel=kernel)
    started = time.monotonic()
    try:
        with stderr_into(out / "steps.log"):
            for build in kernel_steps():
                build(ctx)
    except Exception as exc:
        raise RuntimeError(f"building the {kernel} ISO failed: {exc}{tail(out / 'steps.log')}") from exc
    return time.monotonic() - started


# ------------------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Variant:
    kernel: str
    out: Path
    release: str
    vmlinuz: int
    initrd: int
    iso: int
    modules: int  # .ko files in the initramfs
    build_s: float
    guest: int  # the agents' kernel + initramfs in the root tree
    squashfs: int

    @property
    def boot_files(self) -> int:
        return self.vmlinuz + self.initrd


def measure_variant(kernel: str, out: Path, build_s: float) -> Variant:
    record, tree = staged(out)
    if record["kernel"] != kernel:
        raise RuntimeError(f"{out}: asked for the {kernel} kernel, the bootkernel step staged {record['kernel']}")
    modules = len(kernel_modules(tree)[0])  # what image.initrd put in the initramfs, resolved the same way
    vmlinuz, initrd, iso, squashfs = (
        (out / name).stat().st_size for name in ("boot/vmlinuz", "initrd.img", "nullbox.iso", "rootfs.squashfs")
    )
    guest = sum((out / name).stat().st_size for name in GUEST_FILES)
    return Variant(kernel, out, str(record["release"]), vmlinuz, initrd, iso, modules, build_s, guest, squashfs)


# ------------------------------------------------------------------------------------------------------- boots


@dataclass(frozen=True)
class Run:
    """One boot: nulld's timings and the initramfs's console lines."""

    boot: Boot
    release: str
    init_started_s: float  # guest uptime when /init printed its first line
    init_exec_s: float  # guest uptime when /init exec'd /sbin/init (nulld)

    @property
    def nulld_wall_s(self) -> float:
        """QEMU start -> nulld's entry point, host wall clock."""
        return self.boot.answered_wall_s - self.boot.uptime_at_answer_s


def console_times(console: str) -> tuple[str, float, float]:
    started, execd = INIT_STARTED.search(console), INIT_EXEC.search(console)
    if started is None or execd is None:
        raise RuntimeError(f"the console has no initramfs timings:\n{console[-3000:]}")
    return started.group(1), float(started.group(2)), float(execd.group(1))


def boot_variant(janitor: Janitor, variant: Variant, state: Path) -> Run:
    boot = bench_boot(janitor, state, variant.out)
    release, started, execd = console_times((state / "console.log").read_text(errors="replace"))
    if release != variant.release:
        raise RuntimeError(f"the {variant.kernel} ISO booted kernel {release}, not {variant.release}")
    return Run(boot, release, started, execd)


def boot_order(rounds: int) -> list[str]:
    """KERNELS once per round, alternating which goes first (a busy host's drift hits both alike)."""
    order: list[str] = []
    for index in range(rounds):
        order += list(KERNELS if index % 2 == 0 else reversed(KERNELS))
    return order


# -------------------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Settings:
    boots: int
    base: Path | None


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one boot of each ISO")
    parser.add_argument("--boots", type=int, default=DEFAULT_BOOTS, help="boots of each ISO (default %(default)s)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default: TMPDIR)")
    args = parser.parse_args(argv)
    if args.boots < 1:
        parser.error("--boots must be at least 1")
    return Settings(boots=1 if args.quick else args.boots, base=args.dir)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f} x Debian" if baseline else "-"


def median(runs: list[Run], metric: Callable[[Run], float]) -> float:
    return statistics.median(metric(run) for run in runs)


def spread(runs: list[Run], metric: Callable[[Run], float]) -> str:
    values = sorted(metric(run) for run in runs)
    return f"{values[0]:.2f}-{values[-1]:.2f} s over {len(values)}" if len(values) > 1 else "1 boot"


def size_rows(report: Report, variants: dict[str, Variant]) -> None:
    debian, nullbox = variants["debian"], variants["nullbox"]
    report.section("(1) sizes: the same root tree and grub; each appliance with its kernels (boot and agents')")
    rows: list[tuple[str, Callable[[Variant], int]]] = [
        ("(1a) kernel image (/boot/vmlinuz)", lambda v: v.vmlinuz),
        ("(1b) initramfs (/boot/initrd.img)", lambda v: v.initrd),
        ("(1c) kernel + initramfs", lambda v: v.boot_files),
        ("(1c') agents' kernel + initramfs (uncompressed)", lambda v: v.guest),
        ("(1c'') root image (SquashFS, holds 1c')", lambda v: v.squashfs),
        ("(1d) ISO", lambda v: v.iso),
    ]
    for label, size in rows:
        for variant in (debian, nullbox):
            versus = "baseline" if variant is debian else ratio(size(variant), size(debian))
            report.add(f"{label}, {NAMES[variant.kernel]}", f"{size(variant) / MIB:.2f}", "MiB", versus)
    saving = (debian.iso - nullbox.iso) / MB
    report.add(
        "(1e) ISO saving, Debian - NullBox",
        f"{saving:.2f}",
        "MB",
        f"target >= {TARGET_ISO_SAVING_MB:g} MB",
        verdict(saving >= TARGET_ISO_SAVING_MB),
    )
    report.add(
        "(1e') of which the boot kernel + initramfs",
        f"{(debian.boot_files - nullbox.boot_files) / MB:.2f}",
        "MB",
        f"the agents' kernels in the root image: {(debian.squashfs - nullbox.squashfs) / MB:.2f} MB",
    )
    report.notes.append(
        f"(1) kernels: Debian {debian.release} with {debian.modules} modules in its initramfs, NullBox "
        f"{nullbox.release} with {nullbox.modules}; bytes: ISO {debian.iso} / {nullbox.iso}, kernel {debian.vmlinuz} "
        f"/ {nullbox.vmlinuz}, initramfs {debian.initrd} / {nullbox.initrd}; MB = 10^6 bytes, MiB = 2^20 bytes"
    )


def agent_rows(report: Report, boots: int) -> None:
    """(3): agent VMs, each kernel ``2 * boots + 1`` times, alternating."""
    build_guest_kernels()
    runs = 2 * boots + 1
    times: dict[KernelKind, list[float]] = {KernelKind.DEBIAN: [], KernelKind.NULLBOX: []}
    for index in range(runs):
        order = (KernelKind.DEBIAN, KernelKind.NULLBOX) if index % 2 == 0 else (KernelKind.NULLBOX, KernelKind.DEBIAN)
        for kind in order:
            times[kind] += agent_boot_seconds(kind, 1)
        log(f"(3) agent VM boot {index + 1}/{runs}")
    report.section(f"(3) agent VM: QEMU start -> the agent's first ctxgraph write (host wall, median of {runs})")
    debian = statistics.median(times[KernelKind.DEBIAN])
    nullbox = statistics.median(times[KernelKind.NULLBOX])
    report.add("(3) agent VM, Debian's kernel", f"{debian:.2f}", "s", "baseline")
    report.add("(3) agent VM, NullBox guest kernel", f"{nullbox:.2f}", "s", ratio(nullbox, debian))


def boot_rows(report: Report, runs: dict[str, list[Run]]) -> None:
    report.section("(2) BIOS boots of each ISO under TCG (medians), fresh 1 GiB data disk, 2 vCPUs, 1024 MiB")
    metrics: list[tuple[str, Callable[[Run], float]]] = [
        ("(2a) kernel -> /init started (guest uptime, console)", lambda r: r.init_started_s),
        ("(2b) kernel -> exec /sbin/init (guest uptime, console)", lambda r: r.init_exec_s),
        ("(2c) kernel -> nulld entry point (guest monotonic)", lambda r: r.boot.nulld_start_s),
        ("(2d) kernel -> all services ready (guest monotonic)", lambda r: r.boot.nulld_start_s + r.boot.all_ready_s),
        ("(2e) QEMU start -> nulld entry point (host wall)", lambda r: r.nulld_wall_s),
        ("(2f) QEMU start -> all services ready seen (host wall)", lambda r: r.boot.all_ready_wall_s),
    ]
    for label, metric in metrics:
        baseline = median(runs["debian"], metric)
        for kernel in KERNELS:
            value = median(runs[kernel], metric)
            versus = "baseline" if kernel == "debian" else ratio(value, baseline)
            target = ""
            if kernel == "nullbox" and label.startswith("(2c)"):
                versus += f"; target <= {TARGET_BOOT_RATIO:g}"
                target = verdict(value <= TARGET_BOOT_RATIO * baseline)
            report.add(f"{label}, {NAMES[kernel]}", f"{value:.2f}", "s", versus, target)
    for kernel in KERNELS:
        report.notes.append(
            f"(2) {NAMES[kernel]}: kernel -> nulld {spread(runs[kernel], lambda r: r.boot.nulld_start_s)}, "
            f"QEMU start -> all ready {spread(runs[kernel], lambda r: r.boot.all_ready_wall_s)}; restarts before "
            f"ready: {sum(r.boot.restarts for r in runs[kernel])}"
        )
    report.notes.append(
        "(2) guest times start at the kernel's timekeeping init, after firmware, grub, loading and decompressing the "
        "kernel (Debian's XZ, the NullBox zstd payload); the host-wall rows include those.  Under TCG guest time is "
        "emulated time, and the host's other load shifts both."
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    for line in info:
        log(line)
    set_child_subreaper()
    janitor = Janitor()
    report = Report()
    variants: dict[str, Variant] = {}
    runs: dict[str, list[Run]] = {kernel: [] for kernel in KERNELS}
    leftovers = 0
    with signals_unwind():
        work = Path(tempfile.mkdtemp(prefix="nbkrn-", dir=settings.base))  # short: ctl.sock paths are limited
        try:
            if len(str(work / "boot-nullbox-9" / "ctl.sock")) > SOCKET_PATH_MAX:
                raise RuntimeError(f"{work} is too deep for a unix socket path; pass a shorter --dir")
            log("python -m kernel.build appliance (a no-op when it is up to date)")
            kernel_s = build_kernel(janitor, work / "kernel-build.log")
            log(f"kernel.build: {kernel_s:.1f} s; python -m image.build in {REPO}")
            real = run_build(janitor, REPO, work / "image-build.log")
            log(f"build/: {real.describe()} in {real.wall_s:.1f} s")
            for kernel in KERNELS:
                out = work / kernel
                took = build_variant(kernel, out)
                variants[kernel] = measure_variant(kernel, out, took)
                log(f"(1) {kernel}: ISO {variants[kernel].iso / MIB:.1f} MiB built in {took:.1f} s")
            for index, kernel in enumerate(boot_order(settings.boots)):
                log(f"(2) boot {index + 1}/{2 * settings.boots}: {kernel}")
                run = boot_variant(janitor, variants[kernel], work / f"boot-{kernel}-{index}")
                runs[kernel].append(run)
                log(
                    f"(2) {kernel}: /init at {run.init_started_s:.2f} s, nulld at {run.boot.nulld_start_s:.2f} s "
                    f"(guest), all ready {run.boot.all_ready_wall_s:.1f} s after QEMU started"
                )
            ours, shipped = variants["nullbox"].out / "nullbox.iso", BUILD / "nullbox.iso"
            same = sha256_file(ours) == sha256_file(shipped)
        finally:
            leftovers = janitor.sweep()
            janitor.cleanup()
            mounted = mounts_under(work)
            if mounted:
                log(f"NOT removing {work}: mount points below it: {' '.join(mounted)}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    size_rows(report, variants)
    boot_rows(report, runs)
    report.notes.append(
        f"the NullBox ISO built here is {'identical to' if same else 'NOT identical to'} build/nullbox.iso "
        f"({'what make image ships' if same else 'build/ boots another kernel or is stale'}); kernel.build took "
        f"{kernel_s:.1f} s, image.build {real.wall_s:.1f} s ({real.describe()})"
    )
    agent_rows(report, settings.boots)
    if leftovers:
        report.notes.append(f"{leftovers} orphaned processes were still alive at the end and were killed")
    report.show(
        f"kernel benchmark ({settings.boots} boot{'s' if settings.boots > 1 else ''} of each ISO)",
        info,
        f"total run time {time.perf_counter() - started:.0f} s; load average {load_average()} at the end",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
