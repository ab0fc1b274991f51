"""nulld benchmark: idle memory, idle wakeups and time to all-ready for many notify services, in one run.

    .venv/bin/python -m bench.nulld_bench            # full run: 100 notify services, 10 s idle window, 7 runs/arm
    .venv/bin/python -m bench.nulld_bench --quick    # smoke run: 20 services, 3 s idle window, 3 runs/arm

nulld runs as a child subreaper (``python -m nulld --config F --socket S --runtime-dir D``), exactly as in
development; its READY=1 arrives on a ReadinessListener, and it is asked about its services over the control
socket.  Everything lives in one temporary directory.  The benchmark makes itself a child subreaper as well, so
a service that outlives nulld becomes our child: it is counted (nulld must leave nothing behind) and killed.
nulld gets PR_SET_PDEATHSIG = SIGTERM, so even a SIGKILLed benchmark leaves neither nulld nor its services behind.

Phases:
  (1) nulld's resident memory (VmRSS) supervising 3 long-running services (2 x /bin/sleep with ready = "spawn",
      1 x a notify program with ready = "notify"), once all are ready and nulld has idled for a couple of seconds;
      for context, the RSS of a bare interpreter that imported asyncio, and of one that imported nulld's modules
  (2) wakeups of that idle nulld: voluntary + nonvoluntary context switches summed over /proc/PID/task/*/status,
      sampled --idle seconds apart while nobody talks to it
  (3) time to all-ready for --services services with ready = "notify" (a `python -S` program that sends READY=1
      to $NOTIFY_SOCKET and sleeps), against a baseline in the same run: the same programs spawned by a plain
      subprocess.Popen loop that waits for their READY=1 datagrams on one shared socket.  The arms alternate,
      after one untimed warm-up of each; medians of --runs runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

from bench.common import Report, log, process_cpu_s, status_fields, status_kib, verdict
from nullbox.notify import ReadinessListener
from nullbox.wire import Client
from nulld.syscalls import set_child_subreaper

REPO: Final = Path(__file__).resolve().parents[1]
PYTHON: Final = sys.executable
TARGET_RSS_MIB: Final = 20.0
TARGET_WAKEUPS_PER_S: Final = 0.0
TARGET_RATIO: Final = 1.5
IDLE_SERVICES: Final = 3
SETTLE_S: Final = 2.0
STATUS_POLL_S: Final = 0.01
BOOT_TIMEOUT_S: Final = 30.0
READY_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 30.0
STATUS_SAMPLES: Final = 20
PR_SET_PDEATHSIG: Final = 1
# The notify service of phases (1)-(3): _socket instead of socket keeps the start-up as cheap as it gets, so any
# supervisor overhead shows.  Both arms of (3) run this exact argv with the same environment.
NOTIFY_PROGRAM: Final = (
    "import _socket, os, time\n"
    "s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)\n"
    "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
    "s.close()\n"
    "time.sleep(10**6)\n"
)
NOTIFY_ARGV: Final = (PYTHON, "-S", "-c", NOTIFY_PROGRAM)
# What nulld gives every service (nulld.supervise.BASE_ENV); the baseline arm passes the same.
SERVICE_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
BARE_PROGRAM: Final = "import asyncio, sys, time\nsys.stdout.write('ok\\n')\nsys.stdout.flush()\ntime.sleep(60)\n"
IMPORTS_PROGRAM: Final = (
    "import sys, time\nimport nulld.__main__, nulld.init, nulld.supervise\n"
    "sys.stdout.write('ok\\n')\nsys.stdout.flush()\ntime.sleep(60)\n"
)


# ---------------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Switches:
    voluntary: int
    nonvoluntary: int
    threads: int

    @property
    def total(self) -> int:
        return self.voluntary + self.nonvoluntary


def context_switches(pid: int) -> Switches:
    """Context switches summed over every thread of ``pid`` (a thread's own counts live in its task's status)."""
    voluntary = nonvoluntary = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            fields = status_fields(task / "status")
            voluntary += int(fields["voluntary_ctxt_switches"])
            nonvoluntary += int(fields["nonvoluntary_ctxt_switches"])
            threads += 1
    return Switches(voluntary, nonvoluntary, threads)


def children_of(pid: int) -> list[int]:
    """Live and zombie children of ``pid``, by scanning /proc (no /proc/PID/task/TID/children on every kernel)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def ms(seconds: float) -> float:
    return seconds * 1000


def mib(kib: int) -> float:
    return kib / 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], scale: Callable[[float], float] = ms) -> str:
    return " ".join(f"{scale(v):.0f}" for v in values)


class Janitor:
    """Every process the benchmark starts, so that none outlives it, whatever goes wrong.

    Each process gets its own session (the services nulld starts get theirs from nulld); the benchmark is a child
    subreaper, so services orphaned by a dead nulld become our children and :meth:`sweep` finds them.
    """

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str] | tuple[str, ...], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
        self._live.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc``'s process group and reap ``proc``."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.forget(proc)

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ValueError):
            self._live.remove(proc)

    def sweep(self) -> int:
        """Kill and reap every child not started through :meth:`spawn` (orphans); returns how many were alive."""
        tracked = {p.pid for p in self._live}
        alive = 0
        for _ in range(10):  # an orphan's own children become ours in turn
            strays = [pid for pid in children_of(os.getpid()) if pid not in tracked]
            if not strays:
                break
            for pid in strays:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        alive += 1
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for pid in strays:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        return alive

    def cleanup(self) -> None:
        for proc in list(self._live):
            self.kill(proc)
        self.sweep()


def _die_with_parent() -> None:
    """preexec_fn for nulld: SIGTERM it (it then stops its services) should the benchmark die even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: block, so the janitor runs


@dataclass
class Nulld:
    """One nulld child subreaper with its own config, control socket and runtime directory."""

    janitor: Janitor
    work: Path
    config: str
    proc: subprocess.Popen[bytes] | None = None
    launched: float = 0.0
    booted: float = 0.0

    @property
    def socket(self) -> Path:
        return self.work / "ctl.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.work.mkdir(parents=True)
        (self.work / "nulld.toml").write_text(self.config)
        with (
            ReadinessListener(str(self.work / "ready.sock")) as listener,
            (self.work / "nulld.log").open("wb") as stderr,
        ):
            self.launched = time.monotonic()
            self.proc = self.janitor.spawn(
                [
                    PYTHON,
                    "-m",
                    "nulld",
                    "--config",
                    str(self.work / "nulld.toml"),
                    "--socket",
                    str(self.socket),
                    "--runtime-dir",
                    str(self.work / "run"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **listener.env()},
                cwd=REPO,
                preexec_fn=_die_with_parent,  # only nulld: the baseline's children keep the vfork fast path
            )
            if not listener.wait_ready(BOOT_TIMEOUT_S):
                raise RuntimeError(f"nulld sent no READY=1 within {BOOT_TIMEOUT_S:g}s{self.log_tail()}")
            self.booted = time.monotonic()

    def client(self) -> Client:
        return Client(f"unix:{self.socket}", timeout=30)

    def wait_all_ready(self, client: Client, count: int) -> tuple[float, int]:
        """Poll status until ``count`` services are ready: (monotonic time it was seen, status calls made)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        polls = 0
        while True:
            services = client.call("status")["services"]
            polls += 1
            now = time.monotonic()
            if len(services) == count and all(s["ready"] for s in services):
                return now, polls
            dead = [s for s in services if s["state"] in ("failed", "exited", "blocked", "backoff")]
            if dead:
                raise RuntimeError(f"service {dead[0]['name']} is {dead[0]['state']}: {dead[0]['message']}")
            if now > deadline:
                raise RuntimeError(f"services not all ready within {READY_TIMEOUT_S:g}s{self.log_tail()}")
            time.sleep(STATUS_POLL_S)

    def stop(self) -> tuple[float, int]:
        """SIGTERM (nulld stops its services and exits 0): (seconds it took, processes it left behind)."""
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"nulld did not exit within {STOP_TIMEOUT_S:g}s of SIGTERM{self.log_tail()}") from None
        took = time.monotonic() - start
        self.janitor.forget(self.proc)
        if code != 0:
            raise RuntimeError(f"nulld exited with status {code} after SIGTERM{self.log_tail()}")
        return took, self.janitor.sweep()

    def log_tail(self) -> str:
        try:
            lines = (self.work / "nulld.log").read_text(errors="replace").splitlines()[-10:]
        except OSError:
            return ""
        return "; nulld's log ends with:\n  " + "\n  ".join(lines) if lines else ""


def service_table(name: str, argv: tuple[str, ...] | list[str], ready: str, depends_on: tuple[str, ...] = ()) -> str:
    args = ", ".join(_toml_string(a) for a in argv[1:])
    depends = ", ".join(_toml_string(d) for d in depends_on)
    return (
        f"[service.{name}]\n"
        f"binary = {_toml_string(argv[0])}\n"
        f"args = [{args}]\n"
        f"depends_on = [{depends}]\n"
        'restart = "never"\n'
        f"ready = {_toml_string(ready)}\n"
        f"ready_timeout = {READY_TIMEOUT_S:g}\n"
        "stop_timeout = 5\n\n"
    )


def _toml_string(text: str) -> str:
    """A TOML basic string; escapes backslash, quote and newline (our strings hold no other control characters)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def notify_config(count: int) -> str:
    return "".join(service_table(f"svc-{i:03d}", NOTIFY_ARGV, "notify") for i in range(count))


# ----------------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class IdleResult:
    rss_kib: int
    hwm_kib: int
    anon_kib: int
    file_kib: int
    before: Switches
    after: Switches
    window_s: float
    cpu_s: float
    boot_s: float
    boot_cpu_s: float
    leftovers: int


def bench_idle(janitor: Janitor, work: Path, idle_s: float) -> IdleResult:
    """(1) and (2): one nulld with three long-running services, idle."""
    config = (
        service_table("sleep-a", ("/bin/sleep", "100000"), "spawn")
        + service_table("notify-b", NOTIFY_ARGV, "notify")
        + service_table("sleep-c", ("/bin/sleep", "100000"), "spawn", depends_on=("notify-b",))
    )
    nulld = Nulld(janitor, work, config)
    nulld.start()
    with nulld.client() as client:
        nulld.wait_all_ready(client, IDLE_SERVICES)
    boot_cpu = process_cpu_s(nulld.pid)
    time.sleep(SETTLE_S)
    fields = status_fields(Path(f"/proc/{nulld.pid}/status"))
    before = context_switches(nulld.pid)
    cpu_before = process_cpu_s(nulld.pid)
    start = time.monotonic()
    time.sleep(idle_s)
    after = context_switches(nulld.pid)
    window = time.monotonic() - start
    cpu = process_cpu_s(nulld.pid) - cpu_before
    with nulld.client() as client:  # still healthy after the window?
        nulld.wait_all_ready(client, IDLE_SERVICES)
    _, leftovers = nulld.stop()
    return IdleResult(
        rss_kib=int(fields["VmRSS"].split()[0]),
        hwm_kib=int(fields["VmHWM"].split()[0]),
        anon_kib=int(fields["RssAnon"].split()[0]),
        file_kib=int(fields["RssFile"].split()[0]),
        before=before,
        after=after,
        window_s=window,
        cpu_s=cpu,
        boot_s=nulld.booted - nulld.launched,
        boot_cpu_s=boot_cpu,
        leftovers=leftovers,
    )


def interpreter_rss(janitor: Janitor, program: str) -> int:
    """VmRSS (KiB) of an interpreter that ran ``program`` up to its 'ok' line (then sleeps)."""
    proc = janitor.spawn([PYTHON, "-c", program], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ok\n":
            raise RuntimeError(f"{PYTHON} -c {program!r} did not start")
        time.sleep(0.2)
        return status_kib(proc.pid, "VmRSS")
    finally:
        janitor.kill(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass(frozen=True)
class BaselineRun:
    to_all_s: float  # before the first Popen -> last READY=1 received
    span_s: float  # first Popen returned -> last READY=1 received (nulld's "first spawned -> last ready")
    spawn_loop_s: float  # the Popen loop alone
    cpu_s: float  # the benchmark's own CPU from the first Popen to the last READY=1
    kill_s: float


def bench_baseline(janitor: Janitor, work: Path, count: int) -> BaselineRun:
    """(3) baseline: a Popen loop starts ``count`` notify programs and waits for all their READY=1."""
    procs: list[subprocess.Popen[bytes]] = []
    with ReadinessListener(str(work / "baseline.sock")) as listener:
        env = {**SERVICE_ENV, **listener.env()}
        try:
            cpu_start = time.process_time()
            start = time.monotonic()
            first = 0.0
            for _ in range(count):
                procs.append(
                    janitor.spawn(
                        NOTIFY_ARGV,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        env=env,
                        cwd="/",
                    )
                )
                if not first:
                    first = time.monotonic()
            spawned = time.monotonic()
            deadline = start + READY_TIMEOUT_S
            for received in range(count):
                if not listener.wait_ready(deadline - time.monotonic()):
                    raise RuntimeError(f"baseline: {received} of {count} READY=1 within {READY_TIMEOUT_S:g}s")
            done = time.monotonic()
            cpu = time.process_time() - cpu_start
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"baseline: pid {proc.pid} exited early with {proc.returncode}")
        finally:
            killing = time.monotonic()
            for proc in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for proc in procs:
                janitor.kill(proc)
            killed = time.monotonic()
    return BaselineRun(done - start, done - first, spawned - start, cpu, killed - killing)


@dataclass(frozen=True)
class NulldRun:
    span_s: float  # timings: first 'spawned' -> last 'ready'
    launch_to_seen_s: float  # launching nulld -> status shows every service ready
    launch_to_last_ready_s: float  # launching nulld -> last 'ready' (nulld's monotonic clock is ours)
    launch_to_booted_s: float  # launching nulld -> its READY=1 (sent right after it spawned every service)
    spawn_loop_s: float  # timings: first 'spawned' -> last 'spawned'
    polls: int
    cpu_s: float  # nulld's CPU from its launch until all ready was seen
    status_p50_s: float
    stop_s: float
    leftovers: int


def bench_nulld(janitor: Janitor, work: Path, count: int) -> NulldRun:
    """(3) nulld: ``count`` notify services, all-ready as nulld's timings and its status report it."""
    nulld = Nulld(janitor, work, notify_config(count))
    nulld.start()
    with nulld.client() as client:
        seen, polls = nulld.wait_all_ready(client, count)
        cpu = process_cpu_s(nulld.pid)
        events = client.call("timings")["events"]
        round_trips: list[float] = []
        for _ in range(STATUS_SAMPLES):
            before = time.perf_counter()
            client.call("status")
            round_trips.append(time.perf_counter() - before)
    stop, leftovers = nulld.stop()
    spawned = [e["monotonic_s"] for e in events if e["event"] == "spawned"]
    ready = [e["monotonic_s"] for e in events if e["event"] == "ready"]
    if len(spawned) != count or len(ready) != count:
        raise RuntimeError(f"nulld's timings have {len(spawned)} spawned and {len(ready)} ready, expected {count}")
    return NulldRun(
        span_s=max(ready) - min(spawned),
        launch_to_seen_s=seen - nulld.launched,
        launch_to_last_ready_s=max(ready) - nulld.launched,
        launch_to_booted_s=nulld.booted - nulld.launched,
        spawn_loop_s=max(spawned) - min(spawned),
        polls=polls,
        cpu_s=cpu,
        status_p50_s=median(round_trips),
        stop_s=stop,
        leftovers=leftovers,
    )


def bench_readiness(janitor: Janitor, work: Path, count: int, runs: int) -> tuple[list[BaselineRun], list[NulldRun]]:
    log(f"(3) warm-up: one untimed run of each arm, {count} services")
    bench_baseline(janitor, work, count)
    bench_nulld(janitor, work / "nulld-warmup", count)
    baselines: list[BaselineRun] = []
    nullds: list[NulldRun] = []
    for run in range(runs):
        baselines.append(bench_baseline(janitor, work, count))
        nullds.append(bench_nulld(janitor, work / f"nulld-{run}", count))
        log(
            f"(3) run {run + 1}/{runs}: baseline {ms(baselines[-1].span_s):.0f} ms, "
            f"nulld {ms(nullds[-1].span_s):.0f} ms (first spawn -> last ready)"
        )
    return baselines, nullds


# ------------------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Settings:
    services: int
    idle_s: float
    runs: int
    base: Path | None


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run (20 services, 3 s idle window, 3 runs)")
    parser.add_argument("--services", type=int, default=None, help="notify services in phase (3) (100)")
    parser.add_argument("--idle", type=float, default=None, help="idle window of phase (2), seconds (10)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs of each arm in phase (3) (7)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default: TMPDIR)")
    args = parser.parse_args(argv)
    quick: bool = args.quick
    settings = Settings(
        services=args.services if args.services is not None else (20 if quick else 100),
        idle_s=args.idle if args.idle is not None else (3.0 if quick else 10.0),
        runs=args.runs if args.runs is not None else (3 if quick else 7),
        base=args.dir,
    )
    if settings.services < 2 or settings.runs < 1 or settings.idle_s <= 0:
        parser.error("--services must be at least 2, --runs at least 1, --idle more than 0")
    return settings


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_info() -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "nulld", "nullbox"],
            capture_output=True,
            text=True,
            check=True,
        )
        commit = head.stdout.strip() + (" (nulld/nullbox modified)" if dirty.stdout.strip() else "")
    return [
        f"nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {platform.machine()}, {cpu}, "
        f"kernel {platform.release()}, load average {load_average()} at start",
        f"python {platform.python_version()} ({PYTHON}), nulld from {REPO} at {commit}",
        f"notify service: {PYTHON} -S -c <send READY=1 with _socket, sleep> (same argv and env in both arms)",
    ]


def idle_rows(report: Report, idle: IdleResult, bare_kib: int, imports_kib: int, idle_s: float) -> None:
    report.section(
        f"(1) nulld memory: {IDLE_SERVICES} services ready (2 x /bin/sleep spawn, 1 x notify), "
        f"after {SETTLE_S:g} s idle"
    )
    rss = mib(idle.rss_kib)
    report.add(
        "(1) nulld VmRSS",
        f"{rss:.1f}",
        "MiB",
        f"target <= {TARGET_RSS_MIB:g} MiB",
        verdict(rss <= TARGET_RSS_MIB),
    )
    report.add("(1) nulld RssAnon / RssFile", f"{mib(idle.anon_kib):.1f} / {mib(idle.file_kib):.1f}", "MiB")
    report.add("(1) nulld VmHWM (peak)", f"{mib(idle.hwm_kib):.1f}", "MiB")
    report.add(
        "(1') bare python -c 'import asyncio, time'",
        f"{mib(bare_kib):.1f}",
        "MiB",
        f"nulld = {idle.rss_kib / bare_kib:.2f} x this",
    )
    report.add(
        "(1') python -c 'import nulld.__main__, ...' (imports only)",
        f"{mib(imports_kib):.1f}",
        "MiB",
        f"nulld = {idle.rss_kib / imports_kib:.2f} x this",
    )
    delta = idle.after.total - idle.before.total
    rate = delta / idle.window_s
    report.section(f"(2) idle nulld wakeups: context switches of all its threads over {idle.window_s:.1f} s")
    report.add(
        "(2) context switches per second",
        f"{rate:.2f}",
        "/s",
        f"target {TARGET_WAKEUPS_PER_S:g} /s",
        verdict(rate <= TARGET_WAKEUPS_PER_S),
    )
    report.add(
        "(2) voluntary before -> after",
        f"{idle.before.voluntary} -> {idle.after.voluntary}",
        "switches",
    )
    report.add(
        "(2) nonvoluntary before -> after",
        f"{idle.before.nonvoluntary} -> {idle.after.nonvoluntary}",
        "switches",
    )
    report.add("(2) threads before / after", f"{idle.before.threads} / {idle.after.threads}", "")
    report.add("(2) nulld CPU during the window", f"{ms(idle.cpu_s):.0f}", "ms")
    report.notes.append(
        f"(1) nulld launch -> READY=1 {ms(idle.boot_s):.0f} ms, CPU to all ready {ms(idle.boot_cpu_s):.0f} ms; "
        f"processes left behind after its exit: {idle.leftovers}"
    )
    if idle_s < 10:
        report.notes.append(f"(2) idle window {idle_s:g} s (the full run uses 10 s)")


def readiness_rows(
    report: Report, count: int, baselines: list[BaselineRun], nullds: list[NulldRun], idle: IdleResult
) -> None:
    runs = len(nullds)
    report.section(f"(3) time to all-ready, {count} notify services, median of {runs} runs per arm (alternating)")
    base_span = median([b.span_s for b in baselines])
    base_all = median([b.to_all_s for b in baselines])
    span = median([n.span_s for n in nullds])
    seen = median([n.launch_to_seen_s for n in nullds])
    report.add("(3a) baseline Popen loop: first spawned -> last READY=1", f"{ms(base_span):.0f}", "ms", "1.00 (base)")
    ratio = span / base_span
    report.add(
        "(3b) nulld timings: first spawned -> last ready",
        f"{ms(span):.0f}",
        "ms",
        f"{ratio:.2f} x (3a); target <= {TARGET_RATIO:g}",
        verdict(ratio <= TARGET_RATIO),
    )
    report.add("(3c) baseline: before first Popen -> all READY=1", f"{ms(base_all):.0f}", "ms", "1.00 (base)")
    wall_ratio = seen / base_all
    report.add(
        "(3d) nulld: launch -> all ready seen via status",
        f"{ms(seen):.0f}",
        "ms",
        f"{wall_ratio:.2f} x (3c); target <= {TARGET_RATIO:g}",
        verdict(wall_ratio <= TARGET_RATIO),
    )
    report.section("diagnostics for (3), medians")
    report.add(
        "(3e) nulld: launch -> its READY=1 (interpreter, imports, boot, spawns)",
        f"{ms(median([n.launch_to_booted_s for n in nullds])):.0f}",
        "ms",
    )
    report.add(
        "(3e) nulld: launch -> last ready (timings clock)",
        f"{ms(median([n.launch_to_last_ready_s for n in nullds])):.0f}",
        "ms",
    )
    nulld_per_spawn = median([n.spawn_loop_s for n in nullds]) / (count - 1)
    base_per_spawn = median([b.spawn_loop_s for b in baselines]) / count
    report.add(
        "(3f) spawn loop per service: nulld / baseline",
        f"{ms(nulld_per_spawn):.2f} / {ms(base_per_spawn):.2f}",
        "ms",
        f"{nulld_per_spawn / base_per_spawn:.2f} x",
    )
    nulld_cpu = median([n.cpu_s for n in nullds])
    report.add("(3g) nulld CPU, launch -> all ready seen", f"{ms(nulld_cpu):.0f}", "ms")
    nulld_cpu_each = (nulld_cpu - idle.boot_cpu_s) / (count - IDLE_SERVICES)
    base_cpu_each = median([b.cpu_s for b in baselines]) / count
    report.add(
        "(3g) CPU per service: nulld (minus its 3-service boot) / baseline loop",
        f"{ms(nulld_cpu_each):.2f} / {ms(base_cpu_each):.2f}",
        "ms",
        f"{nulld_cpu_each / base_cpu_each:.2f} x",
    )
    report.add(
        f"(3h) status round trip with {count} services, p50",
        f"{ms(median([n.status_p50_s for n in nullds])):.2f}",
        "ms",
    )
    report.add(
        f"(3i) nulld stop: SIGTERM -> exit with {count} services",
        f"{ms(median([n.stop_s for n in nullds])):.0f}",
        "ms",
        f"baseline SIGKILL + reap {ms(median([b.kill_s for b in baselines])):.0f} ms",
    )
    leftovers = sum(n.leftovers for n in nullds)
    report.add(
        "(3j) processes nulld left behind after exit, all runs",
        f"{leftovers}",
        "",
        "expected 0",
        verdict(not leftovers),
    )
    report.notes.append(
        f"(3g) nulld CPU comes from /proc/PID/stat in 1/{os.sysconf('SC_CLK_TCK')} s ticks; the baseline's from "
        "process_time(); children's CPU is in neither"
    )
    report.notes.append(f"(3a) runs, ms: {spread([b.span_s for b in baselines])}")
    report.notes.append(f"(3b) runs, ms: {spread([n.span_s for n in nullds])}")
    report.notes.append(f"(3c) runs, ms: {spread([b.to_all_s for b in baselines])}")
    report.notes.append(f"(3d) runs, ms: {spread([n.launch_to_seen_s for n in nullds])}")
    report.notes.append(
        f"(3d) status polled every {ms(STATUS_POLL_S):.0f} ms after nulld's READY=1; "
        f"polls per run: {' '.join(str(n.polls) for n in nullds)}"
    )


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    report = Report()
    info = machine_info()
    for line in info:
        log(line)
    set_child_subreaper()
    janitor = Janitor()
    with signals_unwind(), tempfile.TemporaryDirectory(prefix="nulld-bench-", dir=settings.base) as tmp:
        work = Path(tmp)
        try:
            log(
                f"(1)+(2) nulld with {IDLE_SERVICES} services, {SETTLE_S:g} s settle, {settings.idle_s:g} s idle window"
            )
            idle = bench_idle(janitor, work / "idle", settings.idle_s)
            log("(1') interpreter baselines")
            bare = interpreter_rss(janitor, BARE_PROGRAM)
            imports = interpreter_rss(janitor, IMPORTS_PROGRAM)
            log(f"(3) {settings.services} notify services, {settings.runs} runs per arm")
            baselines, nullds = bench_readiness(janitor, work, settings.services, settings.runs)
        finally:
            janitor.cleanup()
    idle_rows(report, idle, bare, imports, settings.idle_s)
    readiness_rows(report, settings.services, baselines, nullds, idle)
    elapsed = time.perf_counter() - started
    report.show("nulld benchmark", info, f"total run time {elapsed:.0f} s; load average {load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
