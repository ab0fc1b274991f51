"""Agent VM boot benchmark: Debian's kernel vs the NullBox guest kernel, in one run, under the same QEMU (TCG).

    .venv/bin/python -m bench.agent_vm_boot            # 7 boots per arm
    .venv/bin/python -m bench.agent_vm_boot --quick    # 3 boots per arm
    .venv/bin/python -m bench.agent_vm_boot --runs 11

First ``python -m image.build kernel`` (Debian's kernel) and ``python -m kernel.build guest`` (the NullBox guest
kernel) run in the repository, no-ops when their outputs are up to date, so that what is measured is what the
working tree builds.  Each arm boots what cage boots, through cage's own pieces: ``cage.guestimage.guest_files``
(the kernel QEMU loads and the guest initramfs), ``cage.qemu.QemuVM``/``Vm`` (the microvm command line, TCG, the
agent's SquashFS root and config) and the test agent of tests/cage (busybox; it reads a secret from its config
and writes it to ctxgraph through the virtio-serial port, then exits and the guest powers off).  A real
ctxgraph daemon takes the writes.  No network device: the benchmark needs no root (no TAP).

  (1) sizes: the bzImage, the kernel QEMU loads (the uncompressed PVH vmlinux), the guest initramfs
  (2) agent VM boot: QEMU start (host wall clock just before the fork) -> the agent's first ctxgraph write (the
      entry's ``created_ns``, ctxgraph's commit time on the same host clock); and from the console, the guest's
      uptime when its init starts and when the agent's command starts (guest clock: emulated time under TCG); and
      QEMU start -> its QMP socket answers (cage.qemu.Vm.start waits for that).
      Arms: Debian (PVH vmlinux extracted from its bzImage, 67-odd modules in the initramfs), NullBox (its PVH
      vmlinux, no modules), and NullBox booted from its compressed bzImage (what shipping only the 3 MB bzImage
      would cost).  Runs are interleaved (A B C A B C ...) so that load drift on a shared machine hits every arm.

Other benchmarks import :func:`agent_boot_seconds` (one arm, N boots, seconds to the first write).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.common import Report, cpu_model, first_line, log, repository_state, verdict
from bench.nulld_bench import load_average, median, signals_unwind
from cage import guestimage, qemu
from cage.guestimage import GuestKernel, KernelKind
from ctxgraph.process import ServerProcess
from nullbox.kvm import QEMU
from tests.cage.agent_rootfs import AGENT_PATH, agent_env, build_agent_rootfs

REPO: Final = Path(__file__).resolve().parents[1]
PYTHON: Final = sys.executable
MIB: Final = 1 << 20
AGENT: Final = "bench"
SECRET_VAR: Final = "AGENT_SECRET"
BOOT_TIMEOUT_S: Final = 120.0  # QEMU start -> power-off, under TCG on a busy 2-core machine
BUILD_TIMEOUT_S: Final = 3600.0
TARGET_RATIO: Final = 0.5  # issue 8: the NullBox kernel at most half of Debian's boot-to-init time under TCG
INIT_LINE: Final = re.compile(r"^nullbox-guest: agent \S+: init started, kernel (\S+) \(([\d.]+)s\)", re.MULTILINE)
START_LINE: Final = re.compile(r"^NULLBOX-AGENT-START ([\d.]+)s", re.MULTILINE)


@dataclass(frozen=True)
class Arm:
    """One way of booting the agent VM: a guest kernel, and whether QEMU gets its PVH vmlinux or its bzImage."""

    kernel: KernelKind
    pvh: bool = True

    @property
    def label(self) -> str:
        return f"{self.kernel}" + ("" if self.pvh else " (bzImage)")


@dataclass(frozen=True)
class Sample:
    to_write_s: float  # host wall: QEMU start -> ctxgraph committed the agent's write
    qmp_s: float  # host wall: QEMU start -> its QMP socket answered (QEMU set up, every drive open)
    init_uptime_s: float  # guest clock: the guest init started
    agent_uptime_s: float  # guest clock: the agent's command started
    release: str  # uname -r, as the guest init reported it


@dataclass(frozen=True)
class Files:
    kernel: GuestKernel
    boot: Path  # what QEMU's -kernel gets
    initramfs: Path


class BootRig:
    """A ctxgraph daemon, the test agent's root image and a scratch directory; boots agent VMs against them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ctxgraph = ServerProcess(work / "ctxgraph")
        self.image = guestimage.pack_rootfs(build_agent_rootfs(work / "agent-root"), work / "agent.sqfs")
        self.socket: Path | None = None
        self.files: dict[Arm, Files] = {}

    def __enter__(self) -> BootRig:
        self.ctxgraph.start()
        with self.ctxgraph.client() as admin:
            self.socket = Path(admin.register_agent(AGENT)["socket"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.ctxgraph.close()

    def prepare(self, arm: Arm) -> Files:
        """The arm's kernel and initramfs (built into build/cage/ when missing; the kernels must be built)."""
        if arm not in self.files:
            kernel = GuestKernel.from_build(kernel=arm.kernel)
            boot, initramfs = guestimage.guest_files(kernel=arm.kernel)
            self.files[arm] = Files(kernel, boot if arm.pvh else kernel.vmlinuz, initramfs)
        return self.files[arm]

    def boot(self, arm: Arm) -> Sample:
        """One boot of the agent VM to its power-off; raises unless the agent wrote its entry and exited 0."""
        files = self.prepare(arm)
        assert self.socket is not None
        run = uuid.uuid4().hex[:12]
        key, secret = f"bench/{run}", f"secret-{run}"
        directory = self.work / "vm" / run
        directory.mkdir(parents=True)
        spec = qemu.QemuVM(
            agent=AGENT,
            kernel=files.boot,
            initramfs=files.initramfs,
            rootfs=self.image,
            config=qemu.write_config(directory / "config.cpio", [AGENT_PATH], agent_env(key, SECRET_VAR, secret)),
            console_log=directory / "console.log",
            qmp_socket=directory / "qmp.sock",
            ctxgraph_socket=self.socket,
        )
        started_ns = time.time_ns()
        with qemu.Vm(spec) as vm:
            vm.start()
            qmp_ns = time.time_ns()
            outcome = vm.wait(BOOT_TIMEOUT_S)
        with self.ctxgraph.client() as admin:
            entries = admin.history(key)["entries"]
        init, start = INIT_LINE.search(outcome.console), START_LINE.search(outcome.console)
        if outcome.agent_status != 0 or not entries or init is None or start is None:
            raise RuntimeError(
                f"{arm.label}: the agent did not write and exit 0 (QEMU {outcome.qemu_status}, agent "
                f"{outcome.agent_status}, guest failure {outcome.guest_failure}); console:\n{outcome.console}"
            )
        return Sample(
            to_write_s=(min(e["created_ns"] for e in entries) - started_ns) / 1e9,
            qmp_s=(qmp_ns - started_ns) / 1e9,
            init_uptime_s=float(init.group(2)),
            agent_uptime_s=float(start.group(1)),
            release=init.group(1),
        )


@contextlib.contextmanager
def boot_rig(base: Path | None = None) -> Iterator[BootRig]:
    with tempfile.TemporaryDirectory(prefix="nbvm-", dir=base) as tmp, BootRig(Path(tmp)) as rig:
        yield rig


def build_kernels() -> None:
    """Debian's kernel (image.build) and the NullBox guest kernel (kernel.build): no-ops when up to date."""
    for argv in ([PYTHON, "-m", "image.build", "kernel"], [PYTHON, "-m", "kernel.build", "guest"]):
        log(" ".join(argv[1:]))
        subprocess.run(argv, cwd=REPO, check=True, timeout=BUILD_TIMEOUT_S)


def agent_boot_seconds(kernel: KernelKind, runs: int, *, pvh: bool = True) -> list[float]:
    """Seconds from QEMU's start to the agent's first ctxgraph write, ``runs`` boots with ``kernel`` (built before:
    ``build_kernels()``); ``pvh=False`` boots the bzImage instead of the uncompressed vmlinux."""
    with boot_rig() as rig:
        return [rig.boot(Arm(kernel, pvh)).to_write_s for _ in range(runs)]


# ------------------------------------------------------------------------------------------------------ report


@dataclass
class Results:
    samples: dict[Arm, list[Sample]] = field(default_factory=dict)

    def of(self, arm: Arm, what: str) -> list[float]:
        values: list[float] = [getattr(s, what) for s in self.samples[arm]]
        return values


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def size_rows(report: Report, rig: BootRig) -> None:
    report.section("(1) sizes (MiB)")
    debian = rig.prepare(Arm(KernelKind.DEBIAN))
    base = debian.kernel.vmlinuz.stat().st_size + debian.initramfs.stat().st_size
    for kind in KernelKind:
        files = rig.prepare(Arm(kind))
        bz, loaded, initrd = (p.stat().st_size for p in (files.kernel.vmlinuz, files.boot, files.initramfs))
        name = f"{kind} {files.kernel.version}"
        report.add(f"(1a) {name}: bzImage", f"{bz / MIB:.2f}", "MiB")
        report.add(f"(1b) {name}: kernel QEMU loads (PVH vmlinux)", f"{loaded / MIB:.2f}", "MiB", files.boot.name)
        modules = "no modules" if files.kernel.modules is None else "with its modules"
        report.add(f"(1c) {name}: guest initramfs", f"{initrd / MIB:.2f}", "MiB", modules)
        versus = "" if kind is KernelKind.DEBIAN else f"{(bz + initrd) / base:.2f} x Debian"
        report.add(f"(1d) {name}: bzImage + initramfs", f"{(bz + initrd) / MIB:.2f}", "MiB", versus)


def boot_rows(report: Report, results: Results, runs: int) -> None:
    report.section(f"(2) agent VM boot under TCG, {runs} runs per arm, interleaved; p50 and min-max")
    baseline = Arm(KernelKind.DEBIAN)
    rows = (
        ("(2a) QEMU start -> first ctxgraph write (host wall)", "to_write_s"),
        ("(2b) guest init starts (guest uptime)", "init_uptime_s"),
        ("(2c) agent command starts (guest uptime)", "agent_uptime_s"),
        ("(2d) QEMU start -> QMP answers (host wall)", "qmp_s"),
    )
    for title, what in rows:
        base = median(results.of(baseline, what))
        for arm in results.samples:
            values = results.of(arm, what)
            p50 = median(values)
            versus, judged = f"min-max {spread(values)}", ""
            if arm != baseline:
                versus += f"; {p50 / base:.2f} x Debian"
                if what == "init_uptime_s" and arm.pvh:
                    versus += f" (target <= {TARGET_RATIO:g})"
                    judged = verdict(p50 / base <= TARGET_RATIO)
            report.add(f"{title}: {arm.label}", f"{p50:.2f}", "s", versus, judged)
    for arm, samples in results.samples.items():
        releases = sorted({s.release for s in samples})
        report.notes.append(
            f"(2) {arm.label}: the guest ran {', '.join(releases)}; to-write runs, s: "
            + " ".join(f"{s.to_write_s:.2f}" for s in samples)
        )


def machine_info() -> list[str]:
    cpu = cpu_model()
    commit = repository_state(REPO)
    return [
        f"nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {platform.machine()}, {cpu}, "
        f"kernel {platform.release()}, load average {load_average()} at start",
        f"repository {REPO} at {commit}; python {platform.python_version()}",
        f"{first_line([QEMU, '--version'])}; cage's microvm argv with -accel tcg -cpu max, 1 vCPU, 256 MiB",
    ]


@dataclass(frozen=True)
class Settings:
    runs: int
    base: Path | None


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 boots per arm")
    parser.add_argument("--runs", type=int, default=None, help="boots per arm (7)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default: TMPDIR)")
    args = parser.parse_args(argv)
    runs: int = args.runs if args.runs is not None else (3 if args.quick else 7)
    if runs < 1:
        parser.error("--runs must be at least 1")
    return Settings(runs=runs, base=args.dir)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    for line in info:
        log(line)
    build_kernels()
    arms = [Arm(KernelKind.DEBIAN), Arm(KernelKind.NULLBOX), Arm(KernelKind.NULLBOX, pvh=False)]
    results = Results({arm: [] for arm in arms})
    report = Report()
    with signals_unwind(), boot_rig(settings.base) as rig:
        size_rows(report, rig)
        for run in range(settings.runs):
            for arm in arms:
                sample = rig.boot(arm)
                results.samples[arm].append(sample)
                log(f"run {run + 1}/{settings.runs} {arm.label}: {sample.to_write_s:.2f} s to the first write")
    boot_rows(report, results, settings.runs)
    report.notes.append(
        "(2a) counts from just before QEMU's fork: QEMU's own start-up (2d: it has then loaded kernel and initramfs "
        "and opened every drive) is in it; (2b)/(2c) count from the guest kernel's clock start (emulated time)"
    )
    elapsed = time.perf_counter() - started
    report.show(
        "agent VM boot benchmark", info, f"total run time {elapsed:.0f} s; load average {load_average()} at the end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
