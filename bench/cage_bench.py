"""cage benchmark: start overhead, agent boot against a bare QEMU boot, and the VMM's memory, in one run.

    .venv/bin/python -m bench.cage_bench             # 40 starts/stops per daemon, 15 boots per arm
    .venv/bin/python -m bench.cage_bench --quick     # 10 starts/stops per daemon, 3 boots per arm
    .venv/bin/python -m bench.cage_bench --runs 30 --boots 5
    .venv/bin/python -m bench.cage_bench --no-build  # use the guest kernel build/ holds (no kernel.build run)

Needs root (a network namespace, TAPs, a cgroup2 mount in a private mount namespace).  The set-up is
tests/cage/test_daemon.py's appliance: a network namespace the benchmark creates (and deletes) plays the appliance,
a real egress daemon runs in it (uplink ``up0``, a TAP nobody uses), a real ctxgraph daemon next to it, and cage
runs in it too, in a private mount namespace where a fresh cgroup2 hierarchy is mounted (the host's cgroups are v1
here; the cpu, memory and pids controllers stay bound to v1, so cage reports them missing and writes no limits: the
cgroup step runs, minus those writes).  Two cage daemons run side by side, each with its own address pool, cgroup
parent and agents:

  plain  ``python -m cage serve`` exactly (exec'd after the cgroup2 mount)
  timed  the same ``cage.__main__.main`` with cage.runtime.Cage replaced by a subclass that times every
         ``Cage._step_*`` method, ``_preflight`` and ``_root_image``, and (patched in that process only)
         cage.qemu.write_config, CagedVm._spawn and Vm._wait_for_qmp: perf_counter_ns around each call, one
         JSON line per ``start`` appended to a file the benchmark reads.  Nothing in cage/ is changed.

Agents: tests/cage/agent_rootfs.py's busybox root with its own /agent/run: it writes one ctxgraph entry at once
(its guest's boot id, so every boot makes a new entry) through the virtio-serial port, then exits (the guest powers
off) or, with BENCH_IDLE=1, sleeps.  256 MiB, 1 vCPU, restart "never".  Every agent is started and stopped once,
untimed, before anything is measured (its root image is packed then; later starts use the cached pack).

  (1) cage ``start`` -> VMM running (QMP answers: every drive open), excluding guest boot: --runs starts, each
      followed by a stop, alternating between the daemons.  Client side: the request's round trip.  The plain
      daemon also gives request -> QEMU forked from /proc/PID/stat's starttime (10 ms ticks).  The timed daemon
      splits its ``start`` into cage's steps and QEMU's start-up (fork/exec -> QMP answers, which includes the
      20 ms polls of Vm._wait_for_qmp); cage's own overhead = start - QEMU's start-up, against the 50 ms target.
  (2) agent boot: the plain daemon's ``start`` request (host wall clock) -> the agent's entry's ``created_ns``
      (ctxgraph's commit time, same clock; read once QEMU has exited: the benchmark waits on the QEMU process's
      pidfd, as the bare arm waits on its child, so that no polling of its own loads the host during the boot);
      from its console, the guest's uptime when its init and the agent's
      command started (guest clock: emulated time under TCG).  Against a bare boot in the same run: the same QEMU
      binary with the microvm machine, accelerator, CPU, memory, sandbox and kernel command line taken from
      cage.qemu.qemu_argv, the same guest kernel cage boots, no disks or devices, and a minimal initramfs (static
      busybox; /init runs ``poweroff -f``), measured QEMU start -> QEMU exit.  Arms interleave A B B A ...;
      target <= 1.2 x, checked on the median of the rounds' paired ratios (agent / bare of one round's two boots,
      run back to back); the ratio of the arms' medians is shown too.  Then --cold-boots more rounds, each boot after
      COLD_SETTLE_S of an idle host (the rows (2g)).
      These rounds run with the host's free page reporting paused (bench.host_memory: this host is a VM whose
      balloon hands freed memory back to the hypervisor 2 s after it was freed, and a boot that gets such pages runs
      about 25 % slower; the agent's boot, which touches more memory, gets them more often).  When there was
      reporting to pause, the same rounds again with the host as configured: (2h) interleaved, (2i) after idling.
  (3) memory of an idle VM, 3 s after the agent wrote its entry (the bare guest: after its /init printed a line;
      both then sleep), from /proc/PID/smaps: RSS, PSS, and the guest RAM mapping's resident part (the anonymous
      mapping of exactly the guest's size); the VMM's own = RSS - guest RAM resident (under TCG that includes the
      translation cache).  Then 3 agents at once: the QEMU processes' summed RSS/PSS, per-agent increase.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import inspect
import json
import os
import platform
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import host_memory
from bench.agent_vm_boot import INIT_LINE, START_LINE
from bench.common import Report, cpu_model, first_line, log, repository_state, verdict
from bench.nulld_bench import load_average, signals_unwind
from cage import guestimage, qemu
from cage.guestimage import KernelKind
from ctxgraph.process import ServerProcess
from nullbox.cpio import chardev, newc_archive, regular
from nullbox.daemon import DaemonProcess
from nullbox.kvm import QEMU
from nullbox.wire import Client
from tests.cage.agent_rootfs import build_agent_rootfs, manifest

REPO: Final = Path(__file__).resolve().parents[1]
PYTHON: Final = sys.executable
BUSYBOX: Final = Path("/bin/busybox")
TARGET_OVERHEAD_MS: Final = 50.0  # issue 6: cage's own part of start -> VMM running
TARGET_BOOT_RATIO: Final = 1.2  # issue 6: agent boot to first write <= 1.2 x a bare boot of the same kernel
MEMORY_MB: Final = 256
STOP_TIMEOUT_S: Final = 0.2  # cage.toml backend.stop_timeout_s: an early-booting guest ignores the power button
BOOT_TIMEOUT_S: Final = 180.0
CALL_TIMEOUT_S: Final = 120.0
SETTLE_S: Final = 3.0  # an idle guest, after its last visible action, before its memory is read
COLD_SETTLE_S: Final = 5.0  # (2g)/(2i): the host idle this long before each boot (its reporting waits 2 s)
BUILD_TIMEOUT_S: Final = 3600.0
POLL_S: Final = 0.05
WAIT_POLL_S: Final = 0.2  # polls whose result carries its own timestamp (ctxgraph's created_ns): fewer, less load
DAEMONS: Final = ("plain", "timed")
POOLS: Final = {"plain": "10.201.0.0/24", "timed": "10.202.0.0/24"}
CTX_KEY: Final = "bench/boot"
IDLE_MARK: Final = "NULLBOX-BENCH-IDLE"
BARE_NAME: Final = "nullbox-bench-bare"  # not nullbox-agent-*: tests look for leftover agent VMs by that name
# The bare guests' /init: busybox sh (the same static busybox as the agent's), then power off the way cage's guest
# init does (a reboot ends QEMU too: -no-reboot), or say so and sleep.
POWEROFF_INIT: Final = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n/bin/busybox reboot -f\n"
IDLE_INIT: Final = f"#!/bin/busybox sh\necho {IDLE_MARK}\nexec /bin/busybox sleep 2147483647\n".encode()
# The options of cage's QEMU command line a bare boot keeps (with their values); everything else (disks, devices,
# chardevs, QMP, network, -kernel/-initrd/-name) is dropped.  Memory backends stay: -M may name one.
KEEP_OPTIONS: Final = frozenset({"-M", "-machine", "-accel", "-cpu", "-m", "-smp", "-sandbox", "-append", "-display"})
KEEP_FLAGS: Final = frozenset({"-nodefaults", "-no-user-config", "-no-reboot", "-enable-kvm"})
KEEP_OBJECTS: Final = ("memory-backend",)
AGENT_SCRIPT: Final = """#!/bin/sh
# bench.cage_bench's agent: one ctxgraph entry at once (the boot id: a new entry every boot), then exit or idle.
port=/dev/virtio-ports/org.nullbox.ctxgraph
read -r boot </proc/sys/kernel/random/boot_id
exec 3<>"$port"
printf '{"id":1,"op":"put","key":"%s","value":"%s"}\\n' "$BENCH_KEY" "$boot" >&3
IFS= read -r reply <&3
exec 3>&-
echo "agent: ctxgraph replied $reply"
case "$reply" in *'"ok":true'*) ;; *) exit 5 ;; esac
[ -z "${BENCH_IDLE:-}" ] || while :; do sleep 3600; done
exit 0
"""
# Labels of the timed daemon's spans (method names; unknown _step_* methods show under their own name).
SPAN_LABELS: Final = {
    "_preflight": "step 1: manifest, tool policy, vault",
    "_step_tap": "step 2: TAP created",
    "_step_egress": "step 3: egress add_agent",
    "_step_ctxgraph": "step 4: ctxgraph register_agent",
    "_step_cgroup": "step 5: cgroup set up",
    "_root_image": "step 6: root image (cached pack)",
    "write_config": "step 6: config written",
    "backend_rest": "step 6: the rest (run dir, console FIFO, argv, thread hop)",
    "start_rest": "start's rest (lock, slot, state, log, monitor)",
    "_spawn": "QEMU fork/exec (Popen, cgroup move)",
    "_wait_for_qmp": "QEMU start-up -> QMP answers (20 ms polls)",
}
QEMU_SPANS: Final = ("_spawn", "_wait_for_qmp")
BACKEND_PARTS: Final = ("_root_image", "write_config", *QEMU_SPANS)


# ------------------------------------------------------------------------------------------- pure helpers


def percentile(values: Sequence[float], q: int) -> float:
    """The q-th percentile (inclusive method: p50 is the median, p100 the maximum); NaN without values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    if q == 50:
        return float(statistics.median(values))
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1])


def paired_ratios(bare: Sequence[float], agent: Sequence[float]) -> list[float]:
    """agent[i] / bare[i]: the two boots of one round ran back to back (A B, then B A), so a slow spell of the host
    (this host is itself a VM, whose speed varies over seconds) slows both of a pair and cancels in its ratio, where
    it shifts a median of either arm alone."""
    return [a / b for b, a in zip(bare, agent, strict=True) if b > 0]


def bare_initramfs(init: bytes, busybox: bytes) -> bytes:
    """An uncompressed newc cpio: /init (``init``, 0755), /bin/busybox and /dev/console (the kernel opens it for
    init's stdio before any devtmpfs)."""
    entries = [regular("init", init, 0o755), regular("bin/busybox", busybox, 0o755), chardev("dev/console", 5, 1)]
    return newc_archive(entries, 0)


def _option_pairs(argv: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(option, value or None) over a QEMU argv without its binary: a value is a next word not starting with -."""
    index = 0
    while index < len(argv):
        option = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) and not argv[index + 1].startswith("-") else None
        yield option, value
        index += 1 if value is None else 2


def bare_qemu_argv(cage_argv: Sequence[str], *, kernel: Path, initramfs: Path, console: Path) -> list[str]:
    """A bare ``qemu -kernel -initrd`` boot with the machine of ``cage_argv`` (cage.qemu.qemu_argv's): its binary,
    machine, accelerator, CPU, memory, vCPUs, sandbox and kernel command line; no disks, devices or sockets; the
    console on the same kind of chardev file cage uses."""
    out = [cage_argv[0], "-name", BARE_NAME]
    for option, value in _option_pairs(cage_argv[1:]):
        if value is None and option in KEEP_FLAGS:
            out.append(option)
        elif value is not None and (
            option in KEEP_OPTIONS or (option == "-object" and value.startswith(KEEP_OBJECTS)) or option == "-numa"
        ):
            out += [option, value]
    console_value = str(console).replace(",", ",,")
    out += ["-kernel", str(kernel), "-initrd", str(initramfs)]
    out += ["-chardev", f"file,id=console,path={console_value}", "-serial", "chardev:console"]
    return out


@dataclass(frozen=True)
class Memory:
    """One process's memory from /proc/PID/smaps, KiB; guest_* is the guest RAM mapping's (None: not found)."""

    rss: int
    pss: int
    guest_rss: int | None
    guest_pss: int | None

    @property
    def vmm_rss(self) -> int:
        return self.rss - (self.guest_rss or 0)

    @property
    def vmm_pss(self) -> int:
        return self.pss - (self.guest_pss or 0)


def parse_smaps(text: str, guest_kib: int) -> Memory:
    """Sum Rss and Pss over every mapping; the guest RAM is the mapping of exactly ``guest_kib`` (the resident one
    when several match)."""
    rss = pss = 0
    mappings: list[dict[str, int]] = []
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            mappings.append({})
            continue
        name, _, rest = line.partition(":")
        if name in ("Size", "Rss", "Pss") and mappings:
            mappings[-1][name] = int(rest.split()[0])
    for mapping in mappings:
        rss += mapping.get("Rss", 0)
        pss += mapping.get("Pss", 0)
    guest = [m for m in mappings if m.get("Size") == guest_kib]
    best = max(guest, key=lambda m: m.get("Rss", 0)) if guest else None
    return Memory(rss, pss, None if best is None else best.get("Rss", 0), None if best is None else best.get("Pss", 0))


def agent_manifest(name: str, *, idle: bool, memory_mb: int = MEMORY_MB) -> str:
    """The benchmark agent's AGENT.toml: writes one entry under CTX_KEY, then exits, or idles with ``idle``."""
    if idle:
        return manifest(
            name, allow=("api.example.com",), cpu_percent=100, memory_mb=memory_mb, BENCH_KEY=CTX_KEY, BENCH_IDLE="1"
        )
    return manifest(name, allow=("api.example.com",), cpu_percent=100, memory_mb=memory_mb, BENCH_KEY=CTX_KEY)


def start_boottime_s(pid: int) -> float:
    """When ``pid`` was forked, in seconds of CLOCK_BOOTTIME (/proc/PID/stat's starttime: clock ticks)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")


def boottime_s() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_memory(pid: int, guest_kib: int) -> Memory:
    return parse_smaps(Path(f"/proc/{pid}/smaps").read_text(), guest_kib)


# ---------------------------------------------------------------------------------- the timed daemon (serve)

_SPANS: list[tuple[str, int, int]] = []


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (sync or async) with its duration appended to _SPANS; list.append is atomic, so worker threads may."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                _SPANS.append((label, began, time.perf_counter_ns()))

        return timed_async

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _SPANS.append((label, began, time.perf_counter_ns()))

    return timed


def _wrap(owner: object, name: str, label: str | None = None) -> bool:
    """Replace the plain function ``owner.name`` by its timed version; False when there is none (cage changed)."""
    found = inspect.getattr_static(owner, name, None)
    if not inspect.isfunction(found):
        return False
    setattr(owner, name, _timed(label or name, found))
    return True


def _mount_cgroup2(target: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", os.fsencode(target), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t cgroup2 none {target}: {os.strerror(err)}")


def serve(argv: list[str]) -> int:
    """``--serve plain|timed --cgroup DIR [--timings FILE] -- serve ...``: mount cgroup2 on DIR (in the private
    mount namespace ``unshare`` made), then run cage: exec ``python -m cage`` (plain) or cage.__main__.main with
    the timed Cage in this process."""
    parser = argparse.ArgumentParser(prog="bench.cage_bench --serve")
    parser.add_argument("mode", choices=DAEMONS)
    parser.add_argument("--cgroup", type=Path, required=True)
    parser.add_argument("--timings", type=Path)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    cage_argv = argv[split + 1 :]
    _mount_cgroup2(args.cgroup)
    if args.mode == "plain":
        os.execv(PYTHON, [PYTHON, "-m", "cage", *cage_argv])
    if args.timings is None:
        parser.error("timed needs --timings")
    return _serve_timed(cage_argv, args.timings)


def _serve_timed(cage_argv: list[str], timings: Path) -> int:
    import cage.__main__ as cage_main  # noqa: PLC0415 (its lean imports first, as python -m cage does)
    from cage import runtime  # noqa: PLC0415

    missing: list[str] = []

    class TimedCage(runtime.Cage):
        async def start(self, name: str) -> dict[str, Any]:
            _SPANS.clear()
            began = time.perf_counter_ns()
            ok = False
            try:
                reply: dict[str, Any] = await super().start(name)
                ok = True
                return reply
            finally:
                ended = time.perf_counter_ns()
                record = {
                    "agent": name,
                    "ok": ok,
                    "total_ns": ended - began,
                    "spans": [[label, a - began, b - began] for label, a, b in _SPANS],
                    "missing": missing,
                }
                with timings.open("a") as out:
                    out.write(json.dumps(record) + "\n")

    wanted = ["_preflight", "_root_image", *sorted(n for n in vars(runtime.Cage) if n.startswith("_step_"))]
    for name in wanted:
        if not _wrap(TimedCage, name):  # getattr_static finds the inherited function; the subclass gets the wrapper
            missing.append(f"Cage.{name}")
    for owner, name, where in (
        (qemu, "write_config", "cage.qemu.write_config"),
        (getattr(runtime, "CagedVm", qemu.Vm), "_spawn", "CagedVm._spawn"),
        (qemu.Vm, "_wait_for_qmp", "Vm._wait_for_qmp"),
    ):
        if not _wrap(owner, name):
            missing.append(where)
    runtime.Cage = TimedCage  # type: ignore[misc]  # cage.__main__.main imports it from cage.runtime at call time
    return cage_main.main(cage_argv)


# -------------------------------------------------------------------------------------- the appliance


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


class Netns:
    """A named network namespace (``ip netns add``) with lo up and an unused uplink TAP ``up0``."""

    def __init__(self) -> None:
        self.name = f"cgb-{secrets.token_hex(4)}"
        self.created = False

    def create(self) -> None:
        for argv in (
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "-n", self.name, "tuntap", "add", "dev", "up0", "mode", "tap"],
        ):
            done = _run(argv)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
            self.created = True

    def delete(self) -> None:
        if self.created:
            _run(["ip", "netns", "del", self.name])
            self.created = False


class EgressDaemon(DaemonProcess):
    name = "egress"

    def __init__(self, root: Path, netns: str) -> None:
        super().__init__(root)
        self.netns = netns
        self.socket = root / "egress.sock"

    def argv(self) -> list[str]:
        (self.root / "resolv.conf").write_text("nameserver 192.0.2.53\n")
        return [
            *("ip", "netns", "exec", self.netns, PYTHON, "-m", "egress", "serve", "--socket", str(self.socket)),
            *("--uplink", "up0", "--resolv-conf", str(self.root / "resolv.conf"), "--state-dir", str(self.root / "st")),
        ]


class CageDaemon(DaemonProcess):
    """One cage daemon (plain or timed) in the appliance's network namespace and a private mount namespace."""

    def __init__(self, root: Path, mode: str, netns: str, egress: Path, ctxgraph: Path) -> None:
        super().__init__(root, env={"PYTHONPATH": str(REPO)})
        self.name = f"cage-{mode}"
        self.mode = mode
        self.netns = netns
        self.socket = root / "cage.sock"
        self.cgroup = root / "cg"
        self.timings = root / "timings.jsonl"
        self.egress = egress
        self.ctxgraph = ctxgraph

    def configure(self, kernel: Path, initramfs: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cage.toml").write_text(
            textwrap.dedent(
                f"""\
                [backend]
                kind = "qemu"
                kernel = "{kernel}"
                initramfs = "{initramfs}"
                exec_helper = "{guestimage.exec_helper_path()}"
                stop_timeout_s = {STOP_TIMEOUT_S}

                [network]
                pool = "{POOLS[self.mode]}"
                """
            )
        )

    def argv(self) -> list[str]:
        self.cgroup.mkdir(exist_ok=True)
        serve_argv = [PYTHON, "-m", "bench.cage_bench", "--serve", self.mode, "--cgroup", str(self.cgroup)]
        if self.mode == "timed":
            serve_argv += ["--timings", str(self.timings)]
        cage_argv = ["serve", "--config", str(self.root / "cage.toml"), "--socket", str(self.socket)]
        for flag, sub in (("--agents-dir", "agents"), ("--vault-dir", "vault"), ("--state-dir", "state")):
            cage_argv += [flag, str(self.root / sub)]
        cage_argv += ["--run-dir", str(self.root / "run"), "--log-dir", str(self.root / "logs")]
        cage_argv += ["--egress-socket", str(self.egress), "--ctxgraph-socket", str(self.ctxgraph)]
        cage_argv += ["--cgroup-root", str(self.cgroup), "--cgroup-parent", f"nullbox-{self.mode}/agents"]
        return [
            *("ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private"),
            *serve_argv,
            "--",
            *cage_argv,
        ]

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        with Client(f"unix:{self.socket}", timeout=CALL_TIMEOUT_S) as client:
            return client.call(op, **params)

    def last_timing(self, agent: str) -> dict[str, Any]:
        lines = self.timings.read_text().splitlines() if self.timings.exists() else []
        record: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        if record.get("agent") != agent or not record.get("ok"):
            raise RuntimeError(f"{self.name}: no timing record of a good start of {agent}: {record}")
        return record

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""


@dataclass
class Appliance:
    work: Path
    kernel: Path
    initramfs: Path
    netns: Netns = field(default_factory=Netns)
    started: list[DaemonProcess] = field(default_factory=list)
    cages: dict[str, CageDaemon] = field(default_factory=dict)
    ctxgraph: ServerProcess | None = None

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.netns.create()
        egress = EgressDaemon(self.work / "eg", self.netns.name)
        self._start(egress)
        self.ctxgraph = ServerProcess(self.work / "cx")
        self._start(self.ctxgraph)
        for mode in DAEMONS:
            cage = CageDaemon(self.work / mode[0], mode, self.netns.name, egress.socket, self.ctxgraph.socket)
            cage.configure(self.kernel, self.initramfs)
            self._start(cage)
            self.cages[mode] = cage

    def _start(self, daemon: DaemonProcess) -> None:
        self.started.append(daemon)
        log(f"starting {daemon.name}")
        try:
            daemon.start(timeout=90)
        except RuntimeError as exc:
            tail = daemon.log.read_text(errors="replace")[-3000:] if daemon.log.exists() else ""
            raise RuntimeError(f"{exc}\n{tail}") from None

    def install(self, cage: CageDaemon, name: str, *, idle: bool) -> None:
        source = self.work / "src" / name
        build_agent_rootfs(source / "rootfs")
        run = source / "rootfs" / "agent" / "run"
        run.write_text(AGENT_SCRIPT)
        run.chmod(0o755)
        (source / "AGENT.toml").write_text(agent_manifest(name, idle=idle))
        cage.call("apply", path=str(source))

    def newest_entry(self, agent: str) -> dict[str, Any] | None:
        assert self.ctxgraph is not None
        with self.ctxgraph.client() as client:
            entries: list[dict[str, Any]] = client.by_agent(agent, limit=1)["entries"]
        return entries[0] if entries else None

    def wait_for_entry(self, agent: str, after_ns: int, timeout: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        """The agent's newest entry, once one was committed after ``after_ns`` (wall clock)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.newest_entry(agent)
            if entry is not None and entry["created_ns"] > after_ns:
                return entry
            time.sleep(WAIT_POLL_S)
        raise RuntimeError(f"agent {agent} wrote no entry within {timeout:g}s{self.console(agent)}")

    def wait_ended(self, cage: CageDaemon, agent: str, timeout: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status: dict[str, Any] = cage.call("status", agent=agent)["agent"]
            if status["state"] in ("exited", "failed", "stopped"):
                return status
            time.sleep(WAIT_POLL_S)
        raise RuntimeError(f"agent {agent} did not end within {timeout:g}s{self.console(agent)}")

    def console(self, agent: str) -> str:
        for cage in self.cages.values():
            with contextlib.suppress(Exception):
                lines = cage.call("logs", agent=agent, lines=40)["lines"]
                return "; its console:\n" + "\n".join(lines)
        return ""

    def close(self) -> None:
        for daemon in reversed(self.started):
            try:
                daemon.close()
            except Exception as exc:
                log(f"closing {daemon.name}: {exc}")
        self.started.clear()
        for pid in leftover_qemus(self.work):
            log(f"killing QEMU {pid}, left behind by a cage daemon")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.netns.delete()


def leftover_qemus(work: Path) -> list[int]:
    """QEMU processes whose command line names a file under ``work`` (only ours: cage's VMs of this run)."""
    found: list[int] = []
    marker = os.fsencode(work) + b"/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(os.fsdecode(argv[0])).name == Path(QEMU).name and any(marker in a for a in argv):
            found.append(int(entry.name))
    return found


# ----------------------------------------------------------------------------------------- bare QEMU boots


@dataclass
class BareVm:
    """A bare QEMU boot (``bare_qemu_argv``), its own session; killed on exit from the ``with``."""

    argv: list[str]
    console: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.console.unlink(missing_ok=True)
        with self.console.with_name(self.console.name + ".qemu").open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )

    def __enter__(self) -> BareVm:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""


def exited_within(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` exits within ``timeout`` s, woken by its pidfd at once (Popen.wait(timeout) polls
    with sleeps of up to 50 ms, which would quantise the bare boot's time), without polling or host CPU meanwhile.
    A child of ours is not reaped; a process that is already gone (another's child, reaped) has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    return bool(readable)


@dataclass(frozen=True)
class Bare:
    """How to boot the bare baseline: cage's machine options, the guest kernel, the two initramfs files."""

    cage_argv: list[str]
    kernel: Path
    poweroff: Path
    idle: Path
    work: Path

    def argv(self, initramfs: Path, console: Path) -> list[str]:
        return bare_qemu_argv(self.cage_argv, kernel=self.kernel, initramfs=initramfs, console=console)

    def boot_s(self) -> float:
        """QEMU start -> QEMU exit (the guest powered off), host wall clock."""
        console = self.work / "bare-off.console"
        with BareVm(self.argv(self.poweroff, console), console) as vm:
            began = time.perf_counter()
            vm.start()
            assert vm.proc is not None
            if not exited_within(vm.proc.pid, BOOT_TIMEOUT_S):
                raise RuntimeError(f"the bare guest did not power off within {BOOT_TIMEOUT_S:g}s")
            elapsed = time.perf_counter() - began
            status = vm.proc.wait()
            if status != 0:
                raise RuntimeError(f"bare QEMU exited with {status}; console:\n{vm.console_text()[-2000:]}")
        return elapsed

    @contextlib.contextmanager
    def idle_vm(self) -> Iterator[int]:
        """A bare guest booted to its idle /init: yields QEMU's pid once the guest said so."""
        console = self.work / "bare-idle.console"
        with BareVm(self.argv(self.idle, console), console) as vm:
            vm.start()
            assert vm.proc is not None
            deadline = time.monotonic() + BOOT_TIMEOUT_S
            while IDLE_MARK not in vm.console_text():
                if vm.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the idle bare guest did not come up; console:\n{vm.console_text()[-2000:]}")
                time.sleep(POLL_S)
            yield vm.proc.pid


def make_bare(work: Path, kernel: Path, initramfs: Path) -> Bare:
    busybox = BUSYBOX.read_bytes()
    poweroff, idle = work / "bare-poweroff.cpio", work / "bare-idle.cpio"
    poweroff.write_bytes(bare_initramfs(POWEROFF_INIT, busybox))
    idle.write_bytes(bare_initramfs(IDLE_INIT, busybox))
    spec = qemu.QemuVM(
        agent="bench",
        kernel=kernel,
        initramfs=initramfs,
        rootfs=work / "unused-root",
        config=work / "unused-config",
        console_log=work / "unused-console",
        memory_mb=MEMORY_MB,
        cpus=1,
    )
    return Bare(qemu.qemu_argv(spec, qemu.detect_accel()), kernel, poweroff, idle, work)


# --------------------------------------------------------------------------------------------- (1) overhead


@dataclass
class Overhead:
    rtt_ms: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in DAEMONS})
    to_fork_ms: list[float] = field(default_factory=list)  # plain: request -> QEMU forked (/proc, 10 ms ticks)
    fork_to_reply_ms: list[float] = field(default_factory=list)
    spans_ms: dict[str, list[float]] = field(default_factory=dict)  # timed: label -> per start
    total_ms: list[float] = field(default_factory=list)  # timed: Cage.start
    qemu_ms: list[float] = field(default_factory=list)  # timed: fork/exec -> QMP answers
    own_ms: list[float] = field(default_factory=list)  # timed: start - QEMU's part
    order: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def start_stop(cage: CageDaemon, agent: str) -> tuple[float, float, float, float]:
    """One timed start, then a stop: (round trip, request, reply, QEMU's fork), the last three CLOCK_BOOTTIME; s."""
    sent_boot = boottime_s()
    began = time.perf_counter()
    reply = cage.call("start", agent=agent)["agent"]
    rtt = time.perf_counter() - began
    replied_boot = sent_boot + rtt
    pid = int(reply["pid"])
    try:
        forked = start_boottime_s(pid)
    finally:
        cage.call("stop", agent=agent)
    return rtt, sent_boot, replied_boot, forked


def record_timing(result: Overhead, record: dict[str, Any]) -> None:
    sums: dict[str, float] = {}
    for label, began, ended in record["spans"]:
        sums[label] = sums.get(label, 0.0) + (ended - began) / 1e6
        if label not in result.order and label not in ("_step_backend", *BACKEND_PARTS):
            result.order.append(label)
    total = record["total_ns"] / 1e6
    if "_step_backend" in sums:
        sums["backend_rest"] = sums["_step_backend"] - sum(sums.get(p, 0.0) for p in BACKEND_PARTS)
    steps = sum(v for k, v in sums.items() if k.startswith("_step_") or k == "_preflight")
    sums["start_rest"] = total - steps
    for label, value in sums.items():
        if label != "_step_backend":
            result.spans_ms.setdefault(label, []).append(value)
    qemu_part = sum(sums.get(p, 0.0) for p in QEMU_SPANS)
    result.total_ms.append(total)
    result.qemu_ms.append(qemu_part)
    result.own_ms.append(total - qemu_part)
    result.missing = list(record.get("missing", []))


def bench_overhead(app: Appliance, agents: dict[str, str], runs: int) -> Overhead:
    result = Overhead()
    for run in range(runs):
        order = DAEMONS if run % 2 == 0 else tuple(reversed(DAEMONS))
        for mode in order:
            cage, agent = app.cages[mode], agents[mode]
            rtt, sent, replied, forked = start_stop(cage, agent)
            result.rtt_ms[mode].append(rtt * 1000)
            if mode == "plain":
                result.to_fork_ms.append((forked - sent) * 1000)
                result.fork_to_reply_ms.append((replied - forked) * 1000)
            else:
                record_timing(result, cage.last_timing(agent))
        log(
            f"(1) start/stop {run + 1}/{runs}: plain {result.rtt_ms['plain'][-1]:.0f} ms, timed "
            f"{result.rtt_ms['timed'][-1]:.0f} ms (cage's own {result.own_ms[-1]:.1f} ms)"
        )
    return result


# ------------------------------------------------------------------------------------------------ (2) boot


@dataclass
class Boot:
    bare_s: list[float] = field(default_factory=list)
    agent_s: list[float] = field(default_factory=list)  # start request -> first write
    fork_s: list[float] = field(default_factory=list)  # QEMU forked -> first write
    to_fork_s: list[float] = field(default_factory=list)  # start request -> QEMU forked
    init_uptime_s: list[float] = field(default_factory=list)  # guest clock: its init started
    agent_uptime_s: list[float] = field(default_factory=list)  # guest clock: the agent's command started


def agent_boot(app: Appliance, cage: CageDaemon, agent: str, result: Boot) -> None:
    sent_wall, sent_boot = time.time_ns(), boottime_s()
    reply = cage.call("start", agent=agent)["agent"]
    pid = int(reply["pid"])
    forked = start_boottime_s(pid)
    if not exited_within(pid, BOOT_TIMEOUT_S):  # the entry's created_ns is ctxgraph's commit time, read afterwards
        raise TimeoutError(f"agent {agent}: its QEMU still runs after {BOOT_TIMEOUT_S:g}s{app.console(agent)}")
    entry = app.wait_for_entry(agent, sent_wall, timeout=CALL_TIMEOUT_S)
    status = app.wait_ended(cage, agent)
    last = status.get("last_exit") or {}
    if last.get("agent_status") != 0:
        raise RuntimeError(f"agent {agent} ended badly: {last}{app.console(agent)}")
    console = "\n".join(cage.call("logs", agent=agent, lines=400)["lines"])
    inits, starts = INIT_LINE.findall(console), START_LINE.findall(console)
    if inits and starts:  # the last ones: this boot's (the console log keeps earlier runs)
        result.init_uptime_s.append(float(inits[-1][1]))
        result.agent_uptime_s.append(float(starts[-1]))
    forked_wall = sent_wall + (forked - sent_boot) * 1e9
    result.agent_s.append((entry["created_ns"] - sent_wall) / 1e9)
    result.fork_s.append((entry["created_ns"] - forked_wall) / 1e9)
    result.to_fork_s.append((forked_wall - sent_wall) / 1e9)


@dataclass(frozen=True)
class Condition:
    """The state of the host a set of boot rounds runs in."""

    label: str  # the rows' tag: (2), (2g), ...
    settle_s: float  # the host idle this long before each boot
    paused: bool  # the host's free page reporting paused (bench.host_memory)

    def describe(self) -> str:
        idle = f"each boot after {self.settle_s:g} s idle" if self.settle_s else "interleaved, back to back"
        pages = "free page reporting paused" if self.paused else "host as configured"
        return f"{idle}; {pages}"


def bench_boot(app: Appliance, bare: Bare, agent: str, boots: int, condition: Condition) -> Boot:
    """``boots`` rounds of a bare and an agent boot (order alternating), each after ``condition.settle_s`` idle."""
    result = Boot()
    cage = app.cages["plain"]
    for run in range(boots):
        arms = ("bare", "agent") if run % 2 == 0 else ("agent", "bare")
        guest = ""
        for arm in arms:
            time.sleep(condition.settle_s)
            if arm == "bare":
                result.bare_s.append(bare.boot_s())
                continue
            seen = len(result.init_uptime_s)
            agent_boot(app, cage, agent, result)
            if len(result.init_uptime_s) > seen:  # where a slow boot lost its time: host or guest, and which part
                guest = (
                    f" (forked after {result.to_fork_s[-1] * 1000:.0f} ms; guest uptime: init"
                    f" {result.init_uptime_s[-1]:.2f} s, command {result.agent_uptime_s[-1]:.2f} s)"
                )
        times = f"bare {result.bare_s[-1]:.2f} s, agent {result.agent_s[-1]:.2f} s"
        log(f"{condition.label} boot {run + 1}/{boots}: {times}{guest}")
    return result


def bench_boots(
    app: Appliance, bare: Bare, settings: Settings, reporting: host_memory.FreePageReporting | None
) -> list[tuple[Condition, Boot]]:
    """(2) with the host's free page reporting paused, then (2g) idle; (2h) and (2i) the same with it on, when
    there is reporting to pause.  The first is the one with the target."""

    def back_to_back_then_idle(labels: tuple[str, str], paused: bool) -> list[tuple[Condition, Boot]]:
        plan = ((labels[0], 0.0, settings.boots), (labels[1], COLD_SETTLE_S, settings.cold_boots))
        conditions = [(Condition(label, settle_s, paused), count) for label, settle_s, count in plan if count]
        return [(condition, bench_boot(app, bare, "boot", count, condition)) for condition, count in conditions]

    with host_memory.reporting_paused(reporting) as paused:
        results = back_to_back_then_idle(("(2)", "(2g)"), paused)
    if paused:  # the host as it is: what its reporting does to either arm
        results += back_to_back_then_idle(("(2h)", "(2i)"), False)
    return results


# ---------------------------------------------------------------------------------------------- (3) memory


@dataclass
class MemoryResult:
    bare: Memory | None = None
    agent: Memory | None = None
    three: list[Memory] = field(default_factory=list)
    one_again: Memory | None = None


def start_idle(app: Appliance, cage: CageDaemon, agent: str) -> int:
    sent_wall = time.time_ns()
    pid = int(cage.call("start", agent=agent)["agent"]["pid"])
    app.wait_for_entry(agent, sent_wall)
    return pid


def bench_memory(app: Appliance, bare: Bare, idle_agents: list[str]) -> MemoryResult:
    guest_kib = MEMORY_MB * 1024
    result = MemoryResult()
    with bare.idle_vm() as pid:
        time.sleep(SETTLE_S)
        result.bare = read_memory(pid, guest_kib)
    log(f"(3) bare idle QEMU: RSS {result.bare.rss // 1024} MiB")
    cage = app.cages["plain"]
    first, *others = idle_agents
    try:
        pid = start_idle(app, cage, first)
        time.sleep(SETTLE_S)
        result.agent = read_memory(pid, guest_kib)
        log(f"(3) one idle agent: RSS {result.agent.rss // 1024} MiB")
        pids = [pid, *(start_idle(app, cage, a) for a in others)]
        time.sleep(SETTLE_S)
        result.three = [read_memory(p, guest_kib) for p in pids]
        log(f"(3) {len(pids)} idle agents: RSS {sum(m.rss for m in result.three) // 1024} MiB together")
    finally:
        for agent in idle_agents:
            with contextlib.suppress(Exception):
                cage.call("stop", agent=agent)
    return result


# -------------------------------------------------------------------------------------------------- report


def p50_p90(values: list[float], unit_format: str = "{:.1f}") -> tuple[str, str]:
    return unit_format.format(percentile(values, 50)), "p90 " + unit_format.format(percentile(values, 90))


def overhead_rows(report: Report, result: Overhead, runs: int) -> None:
    report.section(f"(1) cage start -> VMM running (QMP answers), no guest boot; {runs} starts/stops per daemon")
    for mode, title in (("plain", "python -m cage serve"), ("timed", "timed daemon")):
        p50, p90 = p50_p90(result.rtt_ms[mode])
        report.add(f"(1a) start request round trip, {title}", p50, "ms p50", p90)
    p50, p90 = p50_p90(result.to_fork_ms, "{:.0f}")
    report.add("(1b) plain: request -> QEMU forked (/proc starttime)", p50, "ms p50", p90 + " (10 ms ticks)")
    p50, p90 = p50_p90(result.fork_to_reply_ms, "{:.0f}")
    report.add("(1c) plain: QEMU forked -> reply", p50, "ms p50", p90 + " (10 ms ticks)")
    p50, p90 = p50_p90(result.total_ms)
    report.add("(1d) timed: Cage.start, whole", p50, "ms p50", p90)
    labels = [*result.order, *(p for p in BACKEND_PARTS if p not in QEMU_SPANS), "backend_rest", "start_rest"]
    for label in labels:
        if label in result.spans_ms:
            p50, p90 = p50_p90(result.spans_ms[label], "{:.2f}")
            report.add(f"      {SPAN_LABELS.get(label, label)}", p50, "ms p50", p90)
    for label in QEMU_SPANS:
        if label in result.spans_ms:
            p50, p90 = p50_p90(result.spans_ms[label], "{:.2f}")
            report.add(f"      (QEMU) {SPAN_LABELS[label]}", p50, "ms p50", p90)
    p50, p90 = p50_p90(result.qemu_ms)
    report.add("(1e) QEMU's own start-up: fork/exec -> QMP answers", p50, "ms p50", p90)
    own = percentile(result.own_ms, 50)
    complete = all(label in result.spans_ms for label in QEMU_SPANS)
    report.add(
        "(1f) cage's own overhead: Cage.start - (1e)",
        f"{own:.1f}",
        "ms p50",
        f"p90 {percentile(result.own_ms, 90):.1f}; target p50 <= {TARGET_OVERHEAD_MS:g}",
        verdict(own <= TARGET_OVERHEAD_MS) if complete else "n/a: QEMU's part not timed",
    )
    if "_spawn" in result.spans_ms:
        with_fork = [o + f for o, f in zip(result.own_ms, result.spans_ms["_spawn"], strict=True)]
        p50, p90 = p50_p90(with_fork)
        report.add("(1f') the same, counting QEMU's fork/exec as cage's", p50, "ms p50", p90)
    wire = [r - t for r, t in zip(result.rtt_ms["timed"], result.total_ms, strict=True)]
    p50, p90 = p50_p90(wire, "{:.2f}")
    report.add("(1g) timed: wire + server dispatch (round trip - Cage.start)", p50, "ms p50", p90)
    if result.missing:
        report.notes.append(f"(1) not timed (cage changed?): {', '.join(result.missing)}")


def rounds(result: Boot) -> str:
    count = len(result.bare_s)
    return f"{count} round" if count == 1 else f"{count} rounds"


def runs_note(label: str, result: Boot) -> str:
    """Every boot's time, both arms, in run order: the spread behind a median."""
    bare, agent = (" ".join(f"{v:.2f}" for v in values) for values in (result.bare_s, result.agent_s))
    return f"{label} runs, s: bare {bare}; agent {agent}"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def boot_rows(report: Report, result: Boot, condition: Condition) -> None:
    report.section(f"(2) agent boot to first ctxgraph write vs bare boot, {rounds(result)}: {condition.describe()}")
    base = percentile(result.bare_s, 50)

    report.add(
        "(2a) bare QEMU: start -> exit (/init powers off)", f"{base:.2f}", "s p50", f"min-max {spread(result.bare_s)}"
    )
    agent = percentile(result.agent_s, 50)
    report.add(
        "(2b) agent: cage start request -> first write",
        f"{agent:.2f}",
        "s p50",
        f"{agent / base:.2f} x bare p50; min-max {spread(result.agent_s)}",
    )
    paired = percentile(paired_ratios(result.bare_s, result.agent_s), 50)
    report.add(
        "(2b') agent / bare, paired: each round's two boots",
        f"{paired:.2f}",
        "x p50",
        f"target <= {TARGET_BOOT_RATIO:g}",
        verdict(paired <= TARGET_BOOT_RATIO),
    )
    fork = percentile(result.fork_s, 50)
    report.add("(2c) agent: QEMU forked -> first write", f"{fork:.2f}", "s p50", f"{fork / base:.2f} x bare")
    to_fork = percentile(result.to_fork_s, 50)
    report.add("(2d) agent: start request -> QEMU forked", f"{to_fork * 1000:.0f}", "ms p50", "(10 ms ticks)")
    if result.init_uptime_s:
        init, start = percentile(result.init_uptime_s, 50), percentile(result.agent_uptime_s, 50)
        report.add("(2e) agent: guest init starts (guest uptime)", f"{init:.2f}", "s p50", "guest clock")
        report.add("(2f) agent: agent's command starts (guest uptime)", f"{start:.2f}", "s p50", "guest clock")
    report.notes.append(runs_note("(2)", result))


def condition_rows(report: Report, condition: Condition, result: Boot) -> None:
    """The (2) comparison in another state of the host: both arms' medians and the paired ratio, no target."""
    if not result.bare_s:
        return  # no rounds
    bare, agent = percentile(result.bare_s, 50), percentile(result.agent_s, 50)
    paired = percentile(paired_ratios(result.bare_s, result.agent_s), 50)
    tag = condition.label
    report.section(f"{tag} the same, {rounds(result)}: {condition.describe()}")
    report.add(f"{tag} bare QEMU: start -> exit", f"{bare:.2f}", "s p50", f"min-max {spread(result.bare_s)}")
    versus = f"{agent / bare:.2f} x bare; min-max {spread(result.agent_s)}"
    report.add(f"{tag} agent: start request -> first write", f"{agent:.2f}", "s p50", versus)
    report.add(f"{tag} agent / bare, paired", f"{paired:.2f}", "x p50", "for comparison with (2b'): no target")
    report.notes.append(runs_note(tag, result))


def memory_rows(report: Report, result: MemoryResult) -> None:
    report.section(f"(3) QEMU memory of an idle VM ({MEMORY_MB} MiB guest), from /proc/PID/smaps")

    def guest(m: Memory) -> str:
        return (
            "guest RAM mapping not found" if m.guest_rss is None else f"guest RAM resident {m.guest_rss / 1024:.0f} MiB"
        )

    bare, agent = result.bare, result.agent
    if bare is None or agent is None:
        report.add("(3) not measured", "", "")
        return
    for title, m in (("bare QEMU", bare), ("agent (cage)", agent)):
        report.add(f"(3a) {title}: RSS", f"{m.rss / 1024:.1f}", "MiB", f"PSS {m.pss / 1024:.1f}; {guest(m)}")
    for title, m in (("bare QEMU", bare), ("agent (cage)", agent)):
        report.add(
            f"(3b) {title}: VMM's own (RSS - guest RAM)",
            f"{m.vmm_rss / 1024:.1f}",
            "MiB",
            f"PSS {m.vmm_pss / 1024:.1f}",
        )
    report.add(
        "(3c) agent - bare: VMM's own RSS",
        f"{(agent.vmm_rss - bare.vmm_rss) / 1024:+.1f}",
        "MiB",
        f"{agent.vmm_rss / max(bare.vmm_rss, 1):.2f} x bare; all RSS {(agent.rss - bare.rss) / 1024:+.1f} MiB",
    )
    if len(result.three) > 1:
        count = len(result.three)
        rss = sum(m.rss for m in result.three)
        pss = sum(m.pss for m in result.three)
        report.add(
            f"(3d) {count} idle agents at once: QEMU RSS, summed", f"{rss / 1024:.1f}", "MiB", f"PSS {pss / 1024:.1f}"
        )
        report.add(
            f"(3e) per added agent, 1 -> {count} agents: RSS",
            f"{(rss - agent.rss) / (count - 1) / 1024:.1f}",
            "MiB",
            f"PSS {(pss - agent.pss) / (count - 1) / 1024:.1f}; VMM's own PSS "
            f"{(sum(m.vmm_pss for m in result.three) - agent.vmm_pss) / (count - 1) / 1024:.1f}",
        )


# ---------------------------------------------------------------------------------------------------- main


def build_kernel() -> None:
    argv = [PYTHON, "-m", "kernel.build", "guest"]
    log(" ".join(argv[1:]))
    subprocess.run(argv, cwd=REPO, check=True, timeout=BUILD_TIMEOUT_S)


def machine_info(kernel: Path, kind: KernelKind) -> list[str]:
    accel = qemu.detect_accel()
    return [
        f"nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {platform.machine()}, {cpu_model()}, "
        f"kernel {platform.release()}, load average {load_average()} at start",
        f"repository {REPO} at {repository_state(REPO)}; python {platform.python_version()}",
        f"{first_line([QEMU, '--version'])}; {accel.explain()}",
        f"guest kernel ({kind}): {kernel}; agents and bare guests: {MEMORY_MB} MiB, 1 vCPU",
    ]


@dataclass(frozen=True)
class Settings:
    runs: int
    boots: int
    cold_boots: int
    build: bool
    base: Path | None


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10 starts/stops per daemon, 3 boots per arm")
    parser.add_argument("--runs", type=int, default=None, help="(1) starts/stops per daemon (40)")
    parser.add_argument("--boots", type=int, default=None, help="(2) boots per arm (15)")
    idle_help = f"(2g)/(2i) boots per arm after {COLD_SETTLE_S:g} s idle (5; 0: none)"
    parser.add_argument("--cold-boots", type=int, default=None, help=idle_help)
    parser.add_argument("--no-build", action="store_true", help="do not run kernel.build guest first")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default /tmp)")
    args = parser.parse_args(argv)
    runs: int = args.runs if args.runs is not None else (10 if args.quick else 40)
    boots: int = args.boots if args.boots is not None else (3 if args.quick else 15)
    cold: int = args.cold_boots if args.cold_boots is not None else (1 if args.quick else 5)
    if runs < 1 or boots < 1 or cold < 0:
        parser.error("--runs and --boots must be at least 1, --cold-boots at least 0")
    return Settings(runs=runs, boots=boots, cold_boots=cold, build=not args.no_build, base=args.dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1:])
    settings = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.cage_bench needs root (network namespace, TAPs, a cgroup2 mount)", file=sys.stderr)
        return 2
    for tool in ("ip", "nft", "unshare", "mksquashfs", QEMU):
        if shutil.which(tool) is None:
            print(f"bench.cage_bench needs {tool}", file=sys.stderr)
            return 2
    started = time.perf_counter()
    if settings.build:
        build_kernel()
    kind = guestimage.choose_kernel()
    kernel, initramfs = guestimage.guest_files(kernel=kind)
    reporting = host_memory.free_page_reporting()
    info = [
        *machine_info(kernel, kind),
        reporting.describe() if reporting is not None else "free page reporting: none on this host",
    ]
    for line in info:
        log(line)
    report = Report()
    # short: unix socket paths (ctxgraph's agents/<name>.sock) are limited to 108 bytes
    with (
        signals_unwind(),
        tempfile.TemporaryDirectory(prefix="cgb-", dir=settings.base) as tmp,
        Appliance(Path(tmp), kernel, initramfs) as app,
    ):
        work = Path(tmp)
        work.chmod(0o711)  # QEMU may run as the agent's uid: it must reach the agents' ctxgraph sockets in here
        bare = make_bare(work, kernel, initramfs)
        app.start()
        plain, timed = app.cages["plain"], app.cages["timed"]
        overview = plain.call("status")
        agents = {"plain": "hold", "timed": "timed"}
        idle_agents = ["hold", "idle1", "idle2"]
        for name in idle_agents:
            app.install(plain, name, idle=True)
        app.install(plain, "boot", idle=False)
        app.install(timed, "timed", idle=True)
        log("warm-up: one start/stop per agent (packs its root image)")
        for cage, name in [(plain, n) for n in (*idle_agents, "boot")] + [(timed, "timed")]:
            start_stop(cage, name)
        bare.boot_s()
        overhead = bench_overhead(app, agents, settings.runs)
        boots = bench_boots(app, bare, settings, reporting)
        memory = bench_memory(app, bare, idle_agents)
    overhead_rows(report, overhead, settings.runs)
    (main_condition, main_result), *others = boots
    boot_rows(report, main_result, main_condition)
    for condition, result in others:
        condition_rows(report, condition, result)
    memory_rows(report, memory)
    cgroup = overview.get("cgroup", {})
    if cgroup.get("error"):
        report.notes.append(f"(1) cgroup: {cgroup['error']} (the cgroup step did not run)")
    else:
        missing = ", ".join(cgroup.get("missing_controllers") or []) or "none"
        report.notes.append(
            "(1) cgroup step: on a cgroup2 hierarchy the benchmark mounted in cage's mount namespace (this host's "
            f"cgroups are v1); controllers missing there: {missing}, so those limits were not written"
        )
    report.notes.append(
        "(1) cage's own overhead (1f) is the timed daemon's Cage.start minus QEMU's fork/exec -> QMP answers (1e); "
        "(1a) is what a client sees; (1b)/(1c) split the unmodified daemon's start at QEMU's fork (10 ms ticks)"
    )
    report.notes.append(
        "(2) the agent arm counts from the start request (host wall clock) to ctxgraph's commit of the agent's "
        "entry; the bare arm from just before QEMU's fork to its exit; same kernel, machine, accel and cmdline"
    )
    report.notes.append(
        "(3) VMM's own = RSS - the guest RAM mapping's resident pages; under TCG that includes the translation "
        "cache and the loaded kernel image (file pages); PSS splits shared libraries between the QEMUs"
    )
    elapsed = time.perf_counter() - started
    report.show("cage benchmark", info, f"total run time {elapsed:.0f} s; load average {load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
