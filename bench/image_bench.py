"""Image benchmark: sizes of the built appliance, its boot timings under TCG, and build wall times, in one run.

    .venv/bin/python -m bench.image_bench            # full run: sizes, one boot, clean build + no-change rebuild
    .venv/bin/python -m bench.image_bench --quick    # sizes, one boot, no-change rebuild of the real build/ only

First ``python -m image.build`` runs in the repository (a no-op when build/ is up to date), so that what is
measured is what the working tree builds.  Then:

  (1) sizes of build/nullbox.iso, build/rootfs.squashfs, build/initrd.img and build/boot/vmlinuz (the kernel the
      image boots: bench.kernel_bench compares the NullBox one with Debian's)
  (2) one BIOS boot of build/nullbox.iso under TCG (SeaBIOS, grub, 2 vCPUs, 1024 MiB) with a fresh data disk in a
      temporary state directory, through qemu.runner's own preparation and QEMU command line (what ``qemu/run
      --state DIR --log FILE --accel tcg`` runs; QEMU is started here so that its start time and its process are
      exactly known).  The host polls nulld's status over <state>/ctl.sock until every service is ready, reads
      ``timings``, and powers the appliance off.  Guest times come from nulld's timings: ``monotonic_s`` is the
      guest's CLOCK_MONOTONIC (seconds since the kernel's timekeeping started) and ``since_nulld_s`` counts from
      nulld's entry point, so ``monotonic_s - since_nulld_s`` is when nulld started.
  (3) wall time of ``python -m image.build`` from scratch and of a no-change rebuild.  image.build always writes
      <repo>/build, so the clean build runs in a temporary copy of the working tree (the files git tracks or
      would track: ``git ls-files --cached --others --exclude-standard``), with .venv a symlink to the
      repository's own (image/rootfs.py copies the runtime dependencies from <repo>/.venv); the developer's
      build/ is never touched by it.  The clean build downloads Debian (mkosi) and the kernel package.  With
      --quick the clean build is skipped and the no-change rebuild is timed in the repository itself.  The copy's
      build/kernel-nullbox is a symlink to the repository's (kernel.build's output, compiled by ``make kernel``, not
      by image.build), so the copy boots the same kernel as build/.

Every process started here gets its own session and is killed (with its process group) on any error, SIGTERM
or SIGHUP; the benchmark is a child subreaper, so nothing a build or QEMU orphans outlives it either.  The
temporary directories are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.common import Report, cpu_model, first_line, log, repository_state, verdict
from bench.nulld_bench import Janitor, load_average, signals_unwind
from image.kernel import sha256_file
from nullbox.kvm import Accel, probe_kvm
from nullbox.wire import Client, WireError
from nulld.syscalls import set_child_subreaper
from qemu.runner import Options, prepare, qemu_argv

REPO: Final = Path(__file__).resolve().parents[1]
PYTHON: Final = sys.executable
BUILD: Final = REPO / "build"
MIB: Final = 1 << 20
MB: Final = 1_000_000
TARGET_ISO_MB: Final = 48
STRETCH_ISO_MB: Final = 40
TARGET_RATIO: Final = 1.5
STEP_NAMES: Final = ("kernel", "rootfs", "squashfs", "bootkernel", "initrd", "iso")
BUILD_TIMEOUT_S: Final = 3600.0
ANSWER_TIMEOUT_S: Final = 600.0  # QEMU start -> nulld answers, under TCG on a busy 2-core machine
READY_TIMEOUT_S: Final = 300.0  # nulld answers -> every service ready
EXIT_TIMEOUT_S: Final = 180.0  # poweroff -> QEMU exits
CALL_TIMEOUT_S: Final = 2.0  # one status attempt while the guest boots
POLL_S: Final = 0.1
READY_POLL_S: Final = 0.25
SOCKET_PATH_MAX: Final = 107
# image.build's closing summary, one line per step: "[image   12.3s] rootfs    built in 80.1s" or "... cached"
SUMMARY_LINE: Final = re.compile(r"^\[image\s+[\d.]+s\] (\w+)\s+(cached|built in ([\d.]+)s)$")


# ---------------------------------------------------------------------------------------------------- builds


@dataclass(frozen=True)
class BuildRun:
    wall_s: float
    steps: dict[str, str]  # step -> "cached" | "built in 12.3s", from image.build's summary
    log: Path

    @property
    def all_cached(self) -> bool:
        return bool(self.steps) and all(status == "cached" for status in self.steps.values())

    def step_s(self, name: str) -> float | None:
        status = self.steps.get(name, "")
        return float(status.removeprefix("built in ").removesuffix("s")) if status.startswith("built in") else None

    def describe(self) -> str:
        return ", ".join(f"{name} {status}" for name, status in self.steps.items()) or "no summary"


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"; {path} ends with:\n  " + "\n  ".join(text) if text else ""


def run_build(janitor: Janitor, repo: Path, log_path: Path) -> BuildRun:
    """``python -m image.build`` in ``repo``, its output to ``log_path``: wall time and each step's status."""
    with log_path.open("wb") as out:
        started = time.monotonic()
        proc = janitor.spawn(
            [PYTHON, "-m", "image.build"], cwd=repo, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            code = proc.wait(BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            janitor.kill(proc)
            raise RuntimeError(
                f"python -m image.build in {repo} took over {BUILD_TIMEOUT_S:g}s{tail(log_path)}"
            ) from None
        wall = time.monotonic() - started
        janitor.forget(proc)
    if code != 0:
        raise RuntimeError(f"python -m image.build in {repo} failed with status {code}{tail(log_path)}")
    steps: dict[str, str] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        match = SUMMARY_LINE.match(line)
        if match and match.group(1) in STEP_NAMES:
            steps[match.group(1)] = match.group(2)
    return BuildRun(wall, steps, log_path)


def working_tree_files(repo: Path) -> list[str]:
    """What git tracks or would track (untracked files that are not ignored), and that exists right now."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    names = sorted({name.decode() for name in listed.split(b"\0") if name})
    return [name for name in names if os.path.lexists(repo / name)]


def copy_working_tree(repo: Path, target: Path) -> int:
    """Copy the working tree's files (modes and symlinks kept) and link .venv to the repository's; returns count."""
    files = working_tree_files(repo)
    for name in files:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, destination, follow_symlinks=False)
    (target / ".venv").symlink_to(repo / ".venv")
    return len(files)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace (a build must leave none)."""
    prefix = str(path.resolve())
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


@dataclass(frozen=True)
class CleanBuild:
    clean: BuildRun
    rebuild: BuildRun
    files: int
    iso_identical: bool | None  # the copy's ISO byte for byte the same as build/nullbox.iso


def bench_clean_build(janitor: Janitor, work: Path) -> CleanBuild:
    """(3) a build from scratch in a copy of the working tree, then a no-change rebuild there."""
    source = work / "src"
    source.mkdir()
    files = copy_working_tree(REPO, source)
    nullbox_kernels = BUILD / "kernel-nullbox"
    if nullbox_kernels.is_dir():  # kernel.build's output, not image.build's: compiling it is not what (3) times
        (source / "build").mkdir()
        (source / "build" / "kernel-nullbox").symlink_to(nullbox_kernels)
    log(f"(3) copied {files} files of the working tree to {source}; clean build (downloads Debian and the kernel)")
    clean = run_build(janitor, source, work / "build-clean.log")
    log(f"(3) clean build: {clean.wall_s:.1f} s ({clean.describe()}); no-change rebuild")
    rebuild = run_build(janitor, source, work / "build-again.log")
    log(f"(3) no-change rebuild: {rebuild.wall_s:.1f} s ({rebuild.describe()})")
    ours, theirs = source / "build" / "nullbox.iso", BUILD / "nullbox.iso"
    identical = sha256_file(ours) == sha256_file(theirs) if ours.is_file() and theirs.is_file() else None
    return CleanBuild(clean, rebuild, files, identical)


# ------------------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    iso: int
    squashfs: int
    initrd: int
    kernel: int


def measure_sizes(build: Path) -> Sizes:
    paths = [build / "nullbox.iso", build / "rootfs.squashfs", build / "initrd.img", build / "boot" / "vmlinuz"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} after python -m image.build")
    iso, squashfs, initrd, kernel = (p.stat().st_size for p in paths)
    return Sizes(iso, squashfs, initrd, kernel)


# ------------------------------------------------------------------------------------------------------- boot


@dataclass(frozen=True)
class Boot:
    nulld_start_s: float  # guest CLOCK_MONOTONIC at nulld's entry point
    all_ready_s: float  # the last 'ready' event, since nulld's entry point
    answered_wall_s: float  # QEMU start -> first status answer (host)
    all_ready_wall_s: float  # QEMU start -> status shows every service ready (host)
    uptime_at_answer_s: float  # nulld's uptime in that first answer
    poweroff_s: float  # poweroff request -> QEMU exited (host)
    events: list[dict[str, Any]]
    services: list[str]
    restarts: int
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return (self.nulld_start_s + self.all_ready_s) / self.nulld_start_s

    def since_nulld(self, event: str, service: str | None = None) -> float | None:
        times = [e["since_nulld_s"] for e in self.events if e["event"] == event and e["service"] == service]
        return min(times) if times else None


class Guest:
    """One QEMU boot of <build>/nullbox.iso with a fresh state directory; QEMU is killed unless it exited."""

    def __init__(self, janitor: Janitor, state: Path, build: Path = BUILD) -> None:
        self.janitor = janitor
        self.opts = Options(build=build, state=state, log=state / "console.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        for note in prepare(self.opts):  # the data disk (mkfs.ext4), the state directory: before the clock
            log(f"(2) {note}")
        argv = qemu_argv(self.opts, Accel("tcg", ("the benchmark measures TCG",)))
        with (self.opts.state_dir / "qemu.stderr").open("wb") as stderr:
            self.started = time.monotonic()
            self.proc = self.janitor.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    def call(self, op: str, timeout: float = 60.0) -> dict[str, Any]:
        with Client(f"unix:{self.opts.ctl_socket}", timeout=timeout) as client:
            return client.call(op)

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with status {self.proc.returncode}{self.diagnostics()}")

    def wait_answer(self) -> tuple[dict[str, Any], float]:
        """The first status nulld answers, and when (host monotonic)."""
        deadline = self.started + ANSWER_TIMEOUT_S
        last = "no attempt"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status = self.call("status", timeout=CALL_TIMEOUT_S)
            except (OSError, WireError, ValueError) as exc:  # no socket yet, nobody reading the port yet
                last = repr(exc)
                time.sleep(POLL_S)
                continue
            return status, time.monotonic()
        raise RuntimeError(f"nulld did not answer within {ANSWER_TIMEOUT_S:g}s ({last}){self.diagnostics()}")

    def wait_all_ready(self) -> tuple[dict[str, Any], float]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            self.check_alive()
            status = self.call("status")
            now = time.monotonic()
            services = status["services"]
            if services and all(s["ready"] for s in services):
                return status, now
            if now > deadline:
                states = ", ".join(f"{s['name']} {s['state']} ({s['message']})" for s in services)
                raise RuntimeError(f"not every service ready within {READY_TIMEOUT_S:g}s: {states}{self.diagnostics()}")
            time.sleep(READY_POLL_S)

    def poweroff(self) -> float:
        assert self.proc is not None
        asked = time.monotonic()
        reply = self.call("poweroff")
        if reply != {"accepted": "poweroff"}:
            raise RuntimeError(f"poweroff answered {reply}")
        try:
            code = self.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"QEMU still runs {EXIT_TIMEOUT_S:g}s after poweroff{self.diagnostics()}") from None
        took = time.monotonic() - asked
        self.janitor.forget(self.proc)
        if code != 0:
            raise RuntimeError(f"QEMU exited with status {code} after poweroff{self.diagnostics()}")
        return took

    def close(self) -> None:
        if self.proc is not None:
            self.janitor.kill(self.proc)  # a no-op once QEMU exited; else SIGKILL to its process group

    def diagnostics(self) -> str:
        text = ""
        for name in ("console.log", "qemu.stderr"):
            text += tail(self.opts.state_dir / name, 20)
        return text


def bench_boot(janitor: Janitor, state: Path, build: Path = BUILD) -> Boot:
    """(2) one BIOS boot of <build>/nullbox.iso under TCG with a fresh data disk, then poweroff; the console stays in
    <state>/console.log."""
    guest = Guest(janitor, state, build)
    try:
        guest.start()
        first, answered = guest.wait_answer()
        log(f"(2) nulld answered {answered - guest.started:.1f} s after QEMU started; waiting for all services")
        status, all_ready = guest.wait_all_ready()
        events: list[dict[str, Any]] = guest.call("timings")["events"]
        log(f"(2) all services ready {all_ready - guest.started:.1f} s after QEMU started; powering off")
        poweroff = guest.poweroff()
    finally:
        guest.close()
    if not events:
        raise RuntimeError("nulld's timings are empty")
    origins = sorted(e["monotonic_s"] - e["since_nulld_s"] for e in events)
    if origins[-1] - origins[0] > 1e-5:
        raise RuntimeError(f"the timings disagree on when nulld started: {origins[0]:.6f} .. {origins[-1]:.6f}")
    ready = [e["since_nulld_s"] for e in events if e["event"] == "ready"]
    services = [s["name"] for s in status["services"]]
    if not {e["service"] for e in events if e["event"] == "ready"} >= set(services):
        raise RuntimeError(f"timings have no 'ready' event for some of {services}: {events}")
    return Boot(
        nulld_start_s=origins[0],
        all_ready_s=max(ready),
        answered_wall_s=answered - guest.started,
        all_ready_wall_s=all_ready - guest.started,
        uptime_at_answer_s=float(first["nulld"]["uptime_s"]),
        poweroff_s=poweroff,
        events=events,
        services=services,
        restarts=sum(int(s["restarts"]) for s in status["services"]),
        status=status,
    )


# ------------------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Settings:
    quick: bool
    base: Path | None


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="skip the clean build; time a no-change rebuild of the repository's build/"
    )
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default: TMPDIR)")
    args = parser.parse_args(argv)
    return Settings(quick=args.quick, base=args.dir)


def machine_info() -> list[str]:
    cpu = cpu_model()
    commit = repository_state(REPO)
    kvm = probe_kvm(run_guest=False)
    return [
        f"nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {platform.machine()}, {cpu}, "
        f"kernel {platform.release()}, load average {load_average()} at start",
        f"repository {REPO} at {commit}",
        f"{first_line(['qemu-system-x86_64', '--version'])}; {first_line(['mkosi', '--version'])}; "
        f"python {platform.python_version()} ({PYTHON})",
        f"boot: TCG (-accel tcg,thread=multi -cpu max), q35, SeaBIOS; qemu/run's auto choice here: {kvm.name.upper()}",
    ]


def size_rows(report: Report, sizes: Sizes) -> None:
    report.section("(1) sizes of build/ (the working tree, built by python -m image.build)")
    iso = sizes.iso / MIB
    report.add(
        "(1a) build/nullbox.iso",
        f"{iso:.1f}",
        "MiB",
        f"{sizes.iso / MB:.2f} MB; target <= {TARGET_ISO_MB} MB ({TARGET_ISO_MB * MB / MIB:.1f} MiB)",
        verdict(sizes.iso <= TARGET_ISO_MB * MB),
    )
    report.add(
        "(1b) build/nullbox.iso, stretch target",
        f"{iso:.1f}",
        "MiB",
        f"{sizes.iso / MB:.2f} MB; stretch <= {STRETCH_ISO_MB} MB ({STRETCH_ISO_MB * MB / MIB:.1f} MiB)",
        verdict(sizes.iso <= STRETCH_ISO_MB * MB),
    )
    for label, size in (
        ("(1c) build/rootfs.squashfs", sizes.squashfs),
        ("(1d) build/initrd.img", sizes.initrd),
        ("(1e) build/boot/vmlinuz", sizes.kernel),
    ):
        report.add(label, f"{size / MIB:.1f}", "MiB", f"{100 * size / sizes.iso:.0f} % of the ISO")
    rest = sizes.iso - sizes.squashfs - sizes.initrd - sizes.kernel
    report.add("(1f) ISO minus those three (grub BIOS + EFI, filesystem)", f"{rest / MIB:.1f}", "MiB")
    report.notes.append(
        f"(1) bytes: ISO {sizes.iso}, squashfs {sizes.squashfs}, initrd {sizes.initrd}, kernel {sizes.kernel}; "
        "MB = 10^6 bytes, MiB = 2^20 bytes"
    )


def boot_rows(report: Report, boot: Boot) -> None:
    report.section("(2) one BIOS boot of build/nullbox.iso under TCG, fresh 1 GiB data disk, 2 vCPUs, 1024 MiB")
    report.add("(2a) kernel -> nulld entry point (guest monotonic)", f"{boot.nulld_start_s:.2f}", "s")
    report.add(
        "(2b) nulld entry point -> all services ready (last 'ready')",
        f"{boot.all_ready_s:.2f}",
        "s",
        f"{len(boot.services)} services: {' '.join(boot.services)}",
    )
    report.add(
        "(2c) kernel -> all ready / kernel -> nulld",
        f"{boot.ratio:.2f}",
        "x",
        f"({boot.nulld_start_s:.2f} + {boot.all_ready_s:.2f}) / {boot.nulld_start_s:.2f}; target <= {TARGET_RATIO:g}",
        verdict(boot.ratio <= TARGET_RATIO),
    )
    report.add("(2d) QEMU start -> nulld answers status (host wall)", f"{boot.answered_wall_s:.2f}", "s")
    report.section("diagnostics for (2)")
    imports, mounts, control = (boot.since_nulld(e) for e in ("imports_done", "mounts_done", "control_ready"))
    if imports is not None and mounts is not None and control is not None:
        report.add(
            "(2e) nulld entry point -> imports / mounts / control ready",
            f"{imports:.2f} / {mounts:.2f} / {control:.2f}",
            "s",
        )
    for name in boot.services:
        spawned, ready = boot.since_nulld("spawned", name), boot.since_nulld("ready", name)
        if spawned is not None and ready is not None:
            report.add(
                f"(2f) {name}: nulld -> spawned -> ready",
                f"{spawned:.2f} -> {ready:.2f}",
                "s",
                f"{ready - spawned:.2f} s",
            )
    report.add("(2g) QEMU start -> every service ready seen via status", f"{boot.all_ready_wall_s:.2f}", "s")
    before_kernel = boot.answered_wall_s - (boot.nulld_start_s + boot.uptime_at_answer_s)
    report.add(
        "(2h) QEMU start -> kernel's clock starts (host wall - guest time)",
        f"{before_kernel:.2f}",
        "s",
        "SeaBIOS, grub (timeout 1 s), loading",
    )
    report.add("(2i) poweroff request -> QEMU exited", f"{boot.poweroff_s:.2f}", "s")
    if boot.restarts:
        report.notes.append(f"(2) services restarted {boot.restarts} times before all were ready; (2b) is the last")
    nulld = boot.status.get("nulld", {})
    report.notes.append(
        f"(2) nulld pid {nulld.get('pid')}, mode {nulld.get('mode')}, degraded {nulld.get('degraded')}, "
        f"config errors {nulld.get('config_errors')}; status polled every {POLL_S:g} s until it answered"
    )
    report.notes.append(
        "(2a) the guest's CLOCK_MONOTONIC starts at the kernel's timekeeping init: firmware, grub, loading and "
        "decompressing the kernel come before it (see 2h); under TCG guest time is emulated time"
    )


def build_rows(report: Report, real: BuildRun, clean: CleanBuild | None, quick_rebuild: BuildRun | None) -> None:
    report.section("(3) wall time of python -m image.build")
    if clean is None:
        report.add("(3a) clean build", "skipped", "", "--quick (the full run builds a copy of the working tree)")
    else:
        report.add(
            "(3a) clean build, in a temporary copy of the working tree",
            f"{clean.clean.wall_s:.1f}",
            "s",
            "downloads Debian (mkosi) and the kernel .deb",
        )
        for name in STEP_NAMES:
            took = clean.clean.step_s(name)
            if took is not None:
                report.add(f"(3a') step {name}", f"{took:.1f}", "s", f"{100 * took / clean.clean.wall_s:.0f} %")
        report.add(
            "(3b) no-change rebuild, same copy",
            f"{clean.rebuild.wall_s:.1f}",
            "s",
            "every step cached" if clean.rebuild.all_cached else f"NOT all cached: {clean.rebuild.describe()}",
        )
        same = {True: "identical to", False: "differs from", None: "not comparable with"}[clean.iso_identical]
        report.notes.append(f"(3a) the copy ({clean.files} files) built an ISO {same} build/nullbox.iso")
    if quick_rebuild is not None:
        report.add(
            "(3b) no-change rebuild of the repository's build/",
            f"{quick_rebuild.wall_s:.1f}",
            "s",
            "every step cached" if quick_rebuild.all_cached else f"NOT all cached: {quick_rebuild.describe()}",
        )
    state = "was up to date" if real.all_cached else f"was rebuilt first ({real.describe()})"
    report.notes.append(f"(3) the repository's build/ {state}: python -m image.build took {real.wall_s:.1f} s")


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    for line in info:
        log(line)
    set_child_subreaper()
    janitor = Janitor()
    report = Report()
    clean: CleanBuild | None = None
    quick_rebuild: BuildRun | None = None
    leftovers = 0
    with signals_unwind():
        work = Path(tempfile.mkdtemp(prefix="nbimg-", dir=settings.base))  # short: ctl.sock paths are limited
        try:
            if len(str(work / "boot" / "ctl.sock")) > SOCKET_PATH_MAX:
                raise RuntimeError(f"{work} is too deep for a unix socket path; pass a shorter --dir")
            log(f"python -m image.build in {REPO} (a no-op when build/ is up to date); output in {work}/build-real.log")
            real = run_build(janitor, REPO, work / "build-real.log")
            log(f"build/: {real.describe()} in {real.wall_s:.1f} s")
            sizes = measure_sizes(BUILD)
            log(f"(1) ISO {sizes.iso / MIB:.1f} MiB; (2) booting it under TCG")
            boot = bench_boot(janitor, work / "boot")
            if settings.quick:
                log("(3) --quick: no clean build; timing a no-change rebuild of the repository's build/")
                quick_rebuild = run_build(janitor, REPO, work / "build-again.log")
            else:
                clean = bench_clean_build(janitor, work)
        finally:
            leftovers = janitor.sweep()  # orphans still alive (a build's daemon, say): counted, killed
            janitor.cleanup()
            mounted = mounts_under(work)
            if mounted:
                log(f"NOT removing {work}: mount points below it: {' '.join(mounted)}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    size_rows(report, sizes)
    boot_rows(report, boot)
    build_rows(report, real, clean, quick_rebuild)
    if leftovers:
        report.notes.append(f"{leftovers} orphaned processes were still alive at the end and were killed")
    elapsed = time.perf_counter() - started
    report.show(
        "image benchmark" + (" (--quick)" if settings.quick else ""),
        info,
        f"total run time {elapsed:.0f} s; load average {load_average()} at the end",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
