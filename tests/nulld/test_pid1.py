"""nulld as a real PID 1: booted inside a fresh PID namespace with unshare(1) and observed from the host.

Each test runs ``unshare --pid --fork --mount-proc --uts --kill-child`` with nulld as the namespace's first process,
so ``os.getpid() == 1`` and nulld takes its PID 1 paths: orphans are reparented to it, signals from the host reach
it only through the handlers it installed, and its final ``reboot(2)`` ends the namespace (the kernel kills PID 1
with SIGINT for power-off/halt and SIGHUP for restart, and unshare re-raises that signal on itself).

Two additions to the plain command keep the host untouched and make nulld's log readable:
- ``--uts``: as PID 1 nulld sets the hostname; without its own UTS namespace it would rename the host;
- a regular file is bind-mounted over /dev/kmsg inside the namespace's private mount namespace, so nulld's
  kernel-log records (KmsgHandler, the real PID 1 code path) land in that file instead of the host's dmesg.

Everything the tests look at on the host side comes from /proc: processes whose /proc/<pid>/ns/pid is nulld's are
in the namespace, field 3 of /proc/<pid>/stat is the state (Z = zombie), NSpid maps namespace pids to host pids.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nullbox.wire import Client
from nulld.power import FINAL_TERM_GRACE

PYTHON = sys.executable
UNSHARE = shutil.which("unshare")
BOOT_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or UNSHARE is None, reason="needs root and unshare(1) to run nulld as PID 1 of a namespace"
)

# Runs as PID 1 of the new namespace: hide the host's kernel log behind a file, then become nulld (same pid).
KMSG_WRAPPER = 'mount --bind "$0" /dev/kmsg && exec "$@"'


# ------------------------------------------------------------------------------------------------ service programs

# Tells nulld it is ready (sd_notify), then waits.  On SIGTERM it appends "stop NAME T" (T = CLOCK_MONOTONIC, which
# every process on the machine shares) to a record file and exits, or with mode "ignore" appends "ignored NAME T"
# and keeps running, so only SIGKILL ends it.
STOPPER = """
import os, signal, socket, sys, time
name, record, mode = sys.argv[1], sys.argv[2], sys.argv[3]

def on_term(signum, frame):
    with open(record, "a") as f:
        f.write(f"{'stop' if mode == 'exit' else 'ignored'} {name} {time.monotonic():.6f}\\n")
    if mode == "exit":
        os._exit(0)

signal.signal(signal.SIGTERM, on_term)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.send(b"READY=1")
while True:
    signal.pause()
"""

# Double-forks COUNT daemons: each intermediate child forks a grandchild and exits at once, so the grandchild (which
# also leaves the service's session and process group) is orphaned and reparented to PID 1.  The grandchildren all
# block on a pipe and exit together, in one burst, once the RELEASE file appears and the spawner closes the pipe.
# The spawner itself stays running, as a long-running service.
SPAWNER = """
import os, sys, time
count, release = int(sys.argv[1]), sys.argv[2]
r, w = os.pipe()
for _ in range(count):
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            os.setsid()
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
os.close(r)
print(f"forked {count}", flush=True)
while not os.path.exists(release):
    time.sleep(0.01)
os.close(w)
print("released", flush=True)
while True:
    time.sleep(3600)
"""

# Leaves one daemon behind and exits 0 at once.  The daemon leaves the service's process group before the main
# process exits (so nulld's kill of the exited service's group cannot catch it), sleeps, appends its pid to MARKER
# and exits: an orphan that only nulld, as PID 1, can reap.
ORPHANER = """
import os, sys, time
marker = sys.argv[1]
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    os.write(w, b"x")
    time.sleep(0.3)
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\\n")
    os._exit(0)
os.read(r, 1)
os._exit(0)
"""

# Double-forks a daemon (orphaned to PID 1, out of the service's process group) that writes "ignored daemon T" to
# RECORD on every SIGTERM and keeps running: only the final stage of shutdown (SIGTERM to all, grace, SIGKILL to
# all) ends it.  The service itself keeps running.
LEAVER = """
import os, signal, sys, time
record = sys.argv[1]
r, w = os.pipe()
child = os.fork()
if child == 0:
    if os.fork() == 0:
        os.setsid()
        def on_term(signum, frame):
            with open(record, "a") as f:
                f.write(f"ignored daemon {time.monotonic():.6f}\\n")
        signal.signal(signal.SIGTERM, on_term)
        os.write(w, b"x")
        while True:
            signal.pause()
    os._exit(0)
os.waitpid(child, 0)
os.read(r, 1)
while True:
    time.sleep(3600)
"""

SLEEPER = """
import time
while True:
    time.sleep(3600)
"""

# Prints three lines tagged TAG: short ASCII, 600 "é" (1200 bytes of UTF-8), 3000 ASCII characters; then waits.
TALKER = """
import sys, time
tag = sys.argv[1]
print(f"{tag} ascii", flush=True)
print(f"{tag} utf8 " + "\u00e9" * 600, flush=True)
print(f"{tag} end " + "x" * 3000, flush=True)
while True:
    time.sleep(3600)
"""


# ------------------------------------------------------------------------------------------------ the namespace


@dataclass(frozen=True)
class NsProcess:
    """One process of the namespace as the host sees it."""

    host_pid: int
    ns_pid: int
    ppid: int  # host pid of its parent
    state: str  # field 3 of /proc/<pid>/stat: R, S, D, Z, ...
    comm: str


def _read_process(pid: int, namespace: str) -> NsProcess | None:
    """The process ``pid`` when it is in ``namespace`` (a /proc/<pid>/ns/pid link text); None otherwise or if gone."""
    try:
        if os.readlink(f"/proc/{pid}/ns/pid") != namespace:
            return None
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    close = stat.rindex(")")
    fields = stat[close + 2 :].split()
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
    return NsProcess(pid, int(nspid[-1]), int(fields[1]), fields[0], stat[stat.index("(") + 1 : close])


class Pid1:
    """nulld as PID 1 of its own PID namespace, with a scratch directory for its config, socket and log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "nulld.toml"
        self.socket = root / "ctl.sock"
        self.runtime = root / "run"
        self.kmsg = root / "kmsg.log"  # nulld's log: what it writes to /dev/kmsg
        self.stderr = root / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_pid = 0  # nulld's pid as the host sees it
        self.namespace = ""  # /proc/<nulld>/ns/pid, e.g. "pid:[4026532345]"

    # ---------------------------------------------------------------------------------------------- setup

    def program(self, name: str, source: str) -> str:
        path = self.root / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return str(path)

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text))
        return path

    def boot(
        self, config: str, *, fallback: Path | None = None, hooks: bool = False, real_kmsg: bool = False
    ) -> dict[str, Any]:
        """Start nulld as PID 1 with ``config`` (TOML text); returns its first status once it answers.

        nulld's log goes to ``self.kmsg``, or with ``real_kmsg`` to the host's /dev/kmsg as on an appliance.
        """
        assert UNSHARE is not None
        self.config.write_text(textwrap.dedent(config))
        self.kmsg.write_bytes(b"")
        argv = [UNSHARE, "--pid", "--fork", "--mount-proc", "--uts", "--kill-child", "--"]
        if not real_kmsg:
            argv += ["/bin/sh", "-c", KMSG_WRAPPER, str(self.kmsg)]
        argv += [PYTHON, "-m", "nulld", "--no-mounts", "--config", str(self.config), "--socket", str(self.socket)]
        argv += ["--runtime-dir", str(self.runtime)]
        if fallback is not None:
            argv += ["--fallback", str(fallback)]
        env = {k: v for k, v in os.environ.items() if k not in ("NULLD_TEST_HOOKS", "NOTIFY_SOCKET")}
        if hooks:
            env["NULLD_TEST_HOOKS"] = "1"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"unshare/nulld exited with {self.proc.returncode} during boot\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nulld did not answer on {self.socket} within {BOOT_TIMEOUT:g}s\n{self.logs()}")
            if self.socket.exists():
                try:
                    status = self.call("status")
                except OSError:
                    pass
                else:
                    break
            time.sleep(0.02)
        self.host_pid = self._find_nulld()
        self.namespace = os.readlink(f"/proc/{self.host_pid}/ns/pid")
        assert self.namespace != os.readlink("/proc/self/ns/pid")
        # The premise of every test here: nulld runs as PID 1, in pid1 mode.
        assert status["nulld"]["pid"] == 1
        assert status["nulld"]["mode"] == "pid1"
        assert self.process(self.host_pid).ns_pid == 1
        return status

    def _find_nulld(self) -> int:
        assert self.proc is not None
        children: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children += [int(pid) for pid in (task / "children").read_text().split()]
        assert len(children) == 1, f"unshare should have one child (nulld), has {children}"
        return children[0]

    # ---------------------------------------------------------------------------------------------- control

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        with Client(f"unix:{self.socket}", timeout=15) as client:
            return client.call(op, **params)

    def services(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.call("status")["services"]}

    def output(self, service: str) -> list[str]:
        return [line["line"] for line in self.call("logs", service=service, lines=1000)["lines"]]

    # --------------------------------------------------------------------------------------- observation

    def processes(self) -> list[NsProcess]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (proc := _read_process(int(entry), self.namespace)) is not None:
                found.append(proc)
        return found

    def process(self, host_pid: int) -> NsProcess:
        proc = _read_process(host_pid, self.namespace)
        assert proc is not None, f"host pid {host_pid} is not in nulld's namespace (any more)"
        return proc

    def host_pids(self, ns_pids: list[int]) -> list[int]:
        by_ns = {p.ns_pid: p.host_pid for p in self.processes()}
        missing = [pid for pid in ns_pids if pid not in by_ns]
        assert not missing, f"namespace pids {missing} are not running"
        return [by_ns[pid] for pid in ns_pids]

    def service_host_pids(self) -> set[int]:
        """Host pids of every service's main process, from nulld's own status."""
        ns_pids = [s["pid"] for s in self.services().values() if s["pid"] is not None]
        return set(self.host_pids(ns_pids))

    def census(self) -> str:
        procs = self.processes()
        states: dict[str, int] = {}
        for p in procs:
            states[p.state] = states.get(p.state, 0) + 1
        orphans = sum(1 for p in procs if p.ppid == self.host_pid)
        return f"{len(procs)} processes in the namespace, states {states}, {orphans} children of nulld"

    def logs(self) -> str:
        text = self.kmsg.read_text(errors="replace") if self.kmsg.exists() else ""
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"--- nulld log (kmsg) ---\n{text[-4000:]}\n--- stderr ---\n{err[-2000:]}"

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; {self.census()}\n{self.logs()}")
            time.sleep(0.05)

    def wait_end(self, timeout: float) -> int:
        """unshare's return code once the namespace has ended."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            census = self.census()
            raise AssertionError(f"the namespace did not end within {timeout:g}s; {census}\n{self.logs()}") from None

    def namespace_gone(self) -> bool:
        return not self.processes()

    # ---------------------------------------------------------------------------------------------- cleanup

    def kill(self) -> None:
        """SIGKILL the namespace (its PID 1 takes every process of the namespace with it) and unshare."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.host_pid and _read_process(self.host_pid, self.namespace) is not None:
            os.kill(self.host_pid, signal.SIGKILL)
        self.proc.kill()  # --kill-child: unshare's death SIGKILLs nulld too, should it not be known yet
        self.proc.wait(10)


class KernelLog:
    """The host's kernel log from now on: /dev/kmsg opened at its end, one record per read."""

    def __init__(self) -> None:
        self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.records: list[str] = []

    def read(self) -> list[str]:
        """Every record seen so far, as its text (the kernel shows bytes outside printable ASCII as \\xNN)."""
        while True:
            try:
                data = os.read(self._fd, 16384)
            except BlockingIOError:
                return self.records
            except BrokenPipeError:
                continue  # records were overwritten before we read them; the next read resynchronises
            self.records.append(data.decode("ascii", "replace").partition(";")[2].rstrip("\n"))

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def pid1() -> Iterator[Pid1]:
    root = Path(tempfile.mkdtemp(prefix="nd"))  # short: a unix socket path must stay under 108 bytes
    ns = Pid1(root)
    try:
        yield ns
    finally:
        try:
            ns.kill()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def stop_lines(record: Path) -> list[tuple[str, str, float]]:
    """(kind, name, monotonic time) for every line a STOPPER or a LEAVER's daemon wrote."""
    if not record.exists():
        return []
    out = []
    for line in record.read_text().splitlines():
        kind, name, stamp = line.split()
        out.append((kind, name, float(stamp)))
    return out


# ----------------------------------------------------------------------------------------------------- tests


def test_500_orphaned_grandchildren_leave_no_zombie(pid1: Pid1) -> None:
    count = 500
    release = pid1.root / "release"
    spawner = pid1.program("spawner", SPAWNER)
    sleeper = pid1.program("sleeper", SLEEPER)
    pid1.boot(f"""
        [service.sleeper]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        restart = "never"

        [service.spawner]
        binary = "{PYTHON}"
        args = ["{spawner}", "{count}", "{release}"]
        restart = "never"
        ready = "spawn"
    """)
    pid1.wait_for(lambda: f"forked {count}" in pid1.output("spawner"), 30, "the spawner to fork its daemons")
    services = pid1.service_host_pids()
    assert len(services) == 2

    # Every daemon is an orphan now, adopted by nulld: PID 1 of the namespace is their parent.
    orphans = [p for p in pid1.processes() if p.ppid == pid1.host_pid and p.host_pid not in services]
    assert len(orphans) == count, pid1.census()
    assert all(p.state != "Z" for p in orphans)

    # Let all 500 exit at once: a burst of SIGCHLDs that the kernel coalesces.
    release.touch()
    expected = {pid1.host_pid, *services}

    def settled() -> bool:
        procs = pid1.processes()
        return not any(p.state == "Z" for p in procs) and {p.host_pid for p in procs} == expected

    pid1.wait_for(settled, 15, "every orphan to be reaped")
    procs = pid1.processes()
    assert [p for p in procs if p.state == "Z"] == []
    assert {p.host_pid for p in procs} == expected  # nulld + the two long-running services, nothing else
    assert "released" in pid1.output("spawner")

    # nulld is unharmed: it answers, and both services are still up with the same processes.
    status = pid1.call("status")
    assert status["nulld"]["degraded"] is None
    assert {s["name"]: s["state"] for s in status["services"]} == {"sleeper": "ready", "spawner": "ready"}
    assert pid1.service_host_pids() == services


def test_sigterm_stops_services_in_reverse_dependency_order_then_powers_off(pid1: Pid1) -> None:
    stopper = pid1.program("stopper", STOPPER)
    leaver = pid1.program("leaver", LEAVER)
    record = pid1.root / "stops.txt"

    def service(name: str, mode: str, extra: str = "") -> str:
        return f"""
        [service.{name}]
        binary = "{PYTHON}"
        args = ["{stopper}", "{name}", "{record}", "{mode}"]
        restart = "always"
        ready = "notify"
        {extra}
        """

    pid1.boot(
        service("a", "exit")
        + service("b", "exit", 'depends_on = ["a"]')
        + service("c", "exit", 'depends_on = ["b"]')
        + service("ignorer", "ignore", "stop_timeout = 1")
        + f"""
        [service.leaver]
        binary = "{PYTHON}"
        args = ["{leaver}", "{record}"]
        """
    )
    pid1.wait_for(lambda: all(s["state"] == "ready" for s in pid1.services().values()), 20, "every service ready")
    services = pid1.service_host_pids()
    assert len(services) == 5

    def adopted() -> int:
        return sum(1 for p in pid1.processes() if p.ppid == pid1.host_pid and p.host_pid not in services)

    pid1.wait_for(lambda: adopted() == 1, 10, "the leaver's daemon to be adopted by nulld")

    sent = time.monotonic()
    os.kill(pid1.host_pid, signal.SIGTERM)
    returncode = pid1.wait_end(15)
    elapsed = time.monotonic() - sent

    # As PID 1 nulld ends with reboot(RB_POWER_OFF); in a PID namespace the kernel turns that into "PID 1 killed by
    # SIGINT", and unshare re-raises the signal that killed its child on itself.
    assert returncode == -signal.SIGINT, pid1.logs()
    assert pid1.namespace_gone()

    lines = stop_lines(record)
    stops = [name for kind, name, _ in lines if kind == "stop"]
    assert stops == ["c", "b", "a"], lines  # dependents before their dependencies, each exactly once
    assert [name for kind, name, _ in lines if kind == "ignored"] == ["ignorer", "daemon"], lines
    stamps = {name: stamp for _, name, stamp in lines}
    assert sent <= stamps["c"] <= stamps["b"] <= stamps["a"]
    # The leftover daemon belongs to no service: the final stage (after every service stopped) SIGTERMed it, waited
    # FINAL_TERM_GRACE, then SIGKILLed it; it is gone with everything else.
    assert stamps["a"] <= stamps["daemon"]

    # The SIGTERM-ignoring service held shutdown for its stop_timeout, then nulld killed it.
    log = pid1.kmsg.read_text()
    assert "ignorer did not stop within 1s; killing it" in log
    assert "ignorer stopped (killed by SIGKILL)" in log
    for name in ("a", "b", "c"):
        assert f"{name} stopped (exit code 0)" in log
    assert "final stage: poweroff" in log
    assert "leaver stopped (killed by SIGTERM)" in log
    assert 1.0 + FINAL_TERM_GRACE <= elapsed < 15, elapsed  # the ignorer's stop_timeout, then the final grace
    assert not pid1.socket.exists()  # nulld removed its control socket on the way out


def test_fault_in_a_loop_callback_is_logged_and_changes_nothing(pid1: Pid1) -> None:
    sleeper = pid1.program("sleeper", SLEEPER)
    pid1.boot(
        f"""
        [service.one]
        binary = "{PYTHON}"
        args = ["{sleeper}"]

        [service.two]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        depends_on = ["one"]
        """,
        hooks=True,
    )
    pid1.wait_for(lambda: all(s["state"] == "ready" for s in pid1.services().values()), 20, "both services ready")
    before = pid1.service_host_pids()

    assert pid1.call("test_fault", where="callback") == {"injected": "callback"}
    pid1.wait_for(lambda: "fault injected into a loop callback" in pid1.kmsg.read_text(), 10, "the fault's log line")
    assert "unhandled error in the event loop" in pid1.kmsg.read_text()

    status = pid1.call("status")
    assert status["nulld"]["degraded"] is None
    assert status["nulld"]["shutting_down"] is False
    assert pid1.service_host_pids() == before
    assert all(pid1.process(pid).state != "Z" for pid in before)

    # The loop still does its work: a restart replaces the process, and the old one is reaped.
    old = pid1.host_pids([pid1.services()["two"]["pid"]])[0]
    assert pid1.call("restart", service="two")["service"]["state"] == "ready"
    pid1.wait_for(lambda: _read_process(old, pid1.namespace) is None, 10, "the old process of 'two' to be reaped")
    assert len(pid1.service_host_pids()) == 2
    assert not any(p.state == "Z" for p in pid1.processes())


def test_fault_in_the_main_loop_degrades_but_keeps_reaping_and_serving(pid1: Pid1) -> None:
    sleeper = pid1.program("sleeper", SLEEPER)
    orphaner = pid1.program("orphaner", ORPHANER)
    marker = pid1.root / "orphans.txt"
    pid1.boot(
        f"""
        [service.sleeper]
        binary = "{PYTHON}"
        args = ["{sleeper}"]

        [service.orphaner]
        binary = "{PYTHON}"
        args = ["{orphaner}", "{marker}"]
        restart = "never"
        """,
        hooks=True,
    )
    pid1.wait_for(lambda: pid1.services()["orphaner"]["state"] == "exited", 20, "the orphaner's first run to end")
    pid1.wait_for(lambda: marker.exists() and len(marker.read_text().split()) == 1, 10, "the first orphan")
    before = pid1.service_host_pids()
    assert len(before) == 1  # the sleeper

    assert pid1.call("test_fault", where="main") == {"injected": "main"}
    pid1.wait_for(lambda: pid1.call("status")["nulld"]["degraded"] is not None, 10, "nulld to report degraded")
    status = pid1.call("status")
    degraded = status["nulld"]["degraded"]
    assert isinstance(degraded, str) and "fault injected into the main loop" in degraded
    assert status["nulld"]["shutting_down"] is False
    assert {s["name"] for s in status["services"]} == {"sleeper", "orphaner"}
    assert "main loop failed; running degraded" in pid1.kmsg.read_text()
    assert pid1.service_host_pids() == before
    assert all(pid1.process(pid).state != "Z" for pid in before)

    # Still supervising and still reaping: start the orphaner again after the fault.  Its main process exits at
    # once (a child of nulld) and its daemon is orphaned to nulld; both must be reaped, no zombie left behind.
    started = pid1.call("start", service="orphaner")["service"]
    assert started["state"] in ("ready", "exited")
    pid1.wait_for(lambda: pid1.services()["orphaner"]["state"] == "exited", 10, "the orphaner's second run to end")
    assert pid1.services()["orphaner"]["last_exit"]["code"] == 0
    pid1.wait_for(lambda: len(marker.read_text().split()) == 2, 10, "the second orphan")
    expected = {pid1.host_pid, *before}

    def settled() -> bool:
        procs = pid1.processes()
        return not any(p.state == "Z" for p in procs) and {p.host_pid for p in procs} == expected

    pid1.wait_for(settled, 10, "the orphan to be reaped")

    # And degraded nulld still shuts down on request.
    assert pid1.call("poweroff") == {"accepted": "poweroff"}
    assert pid1.wait_end(15) == -signal.SIGINT
    assert pid1.namespace_gone()
    assert "sleeper stopped" in pid1.kmsg.read_text()


def test_broken_config_boots_the_fallback_as_pid1(pid1: Pid1) -> None:
    sleeper = pid1.program("sleeper", SLEEPER)
    fallback = pid1.write(
        "fallback.toml",
        f"""
        [service.rescue]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        """,
    )
    pid1.boot(
        f"""
        [service.web]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        colour = "blue"
        restart = "sometimes"
        """,
        fallback=fallback,
    )
    pid1.wait_for(lambda: pid1.services().get("rescue", {}).get("state") == "ready", 20, "the fallback service")
    status = pid1.call("status")
    assert status["nulld"]["config"] == str(fallback)
    assert status["nulld"]["degraded"] is None
    allowed = "args, binary, depends_on, env, preload, ready, ready_timeout, restart, stop_timeout, user, working_dir"
    assert status["nulld"]["config_errors"] == [
        f"{pid1.config}: service.web.colour: unknown key; allowed: {allowed}",
        f"{pid1.config}: service.web.restart: must be one of always, on-failure, never (got 'sometimes')",
    ]
    assert [s["name"] for s in status["services"]] == ["rescue"]
    rescue = pid1.service_host_pids()
    assert len(rescue) == 1
    assert pid1.process(rescue.pop()).state != "Z"
    log = pid1.kmsg.read_text()
    assert "service.web.colour: unknown key" in log
    assert "booting the built-in service set instead" in log


@pytest.mark.parametrize(("op", "ending"), [("poweroff", signal.SIGINT), ("reboot", signal.SIGHUP)])
def test_power_op_is_accepted_then_the_namespace_ends(pid1: Pid1, op: str, ending: signal.Signals) -> None:
    stopper = pid1.program("stopper", STOPPER)
    record = pid1.root / "stops.txt"
    pid1.boot(f"""
        [service.svc]
        binary = "{PYTHON}"
        args = ["{stopper}", "svc", "{record}", "exit"]
        ready = "notify"
    """)
    pid1.wait_for(lambda: pid1.services()["svc"]["state"] == "ready", 20, "the service to be ready")

    assert pid1.call(op) == {"accepted": op}
    # reboot(2) in a PID namespace: power-off and halt end PID 1 with SIGINT, restart with SIGHUP.
    assert pid1.wait_end(15) == -ending, pid1.logs()
    assert pid1.namespace_gone()
    assert [(kind, name) for kind, name, _ in stop_lines(record)] == [("stop", "svc")]  # stopped, not just killed
    log = pid1.kmsg.read_text()
    assert f"{op} requested; stopping services" in log
    assert f"final stage: {op}" in log
    assert not pid1.socket.exists()


def test_service_output_reaches_the_real_kernel_log_whatever_its_encoding(pid1: Pid1) -> None:
    """As PID 1 nulld logs to /dev/kmsg, which refuses (EINVAL) any write over 1024 bytes.

    nulld forwards every captured service line there.  A long ASCII line is cut to fit and arrives; a line of
    non-ASCII text must arrive too (cut to fit), not vanish from the only log an appliance has.

    This test alone lets nulld write to the host's real /dev/kmsg (a handful of records, tagged).  It stays within
    the kernel's default per-writer burst of 10 records (printk.devkmsg=ratelimit), beyond which records are dropped.
    """
    tag = f"kmsgprobe{os.getpid()}n{time.monotonic_ns()}"
    talker = pid1.program("talker", TALKER)
    kernel = KernelLog()
    try:
        pid1.boot(
            f"""
            [service.talker]
            binary = "{PYTHON}"
            args = ["{talker}", "{tag}"]
            """,
            real_kmsg=True,
        )

        def seen(text: str) -> bool:
            return any(text in record for record in kernel.read())

        pid1.wait_for(lambda: seen(f"{tag} end xxx"), 10, "the talker's last line in the kernel log")
        assert seen(f"[talker] {tag} ascii")
        output = pid1.output("talker")
        assert f"{tag} utf8 " + "\u00e9" * 600 in output  # nulld did capture the line
        stderr = pid1.stderr.read_text(errors="replace").splitlines()
        errors = [line for line in stderr if "Logging error" in line or line.startswith("OSError")]
        assert seen(f"[talker] {tag} utf8 \\xc3\\xa9"), (
            f"the UTF-8 line never reached /dev/kmsg; nulld's stderr: {errors}"
        )
    finally:
        kernel.close()
