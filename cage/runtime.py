"""The agents' lifecycle: start (six steps, undone in reverse on failure), monitor, restart with backoff, stop.

Start sequence of one agent (docs/cage.md); each step registers its undo, and a failure runs the undos of the steps
already done, newest first, so a failed start leaves nothing behind:

1. the installed manifest is valid (``InstalledAgent.require``), the tool-risk policy allows it (cage.policy), and
   every credential it lists is in the vault and granted to it (cage.vault: the refusal names them, never values);
2. its TAP (``nb-<hash>``) with the gateway address of its /30, up (cage.network);
3. egress ``add_agent {agent, interface, allow}``: the agent's default-deny rules and DNS proxy;
4. ctxgraph ``register_agent {agent, uid, gid, max_calls_per_hour, cid?}``: the agent's own socket, which the VM's
   virtio-serial port connects to, with the manifest's ``max_api_calls_per_hour`` as its budget, and, for QEMU on a
   host with vhost-vsock, the VM's vsock CID (defaults.VSOCK_CID_BASE + slot), which ctxgraph maps to the agent;
5. its cgroup (cpu.max, memory.max = max_memory_mb + VMM overhead, pids.max; controllers the hierarchy lacks are
   reported, not fatal);
6. the VMM: QEMU (root image packed once per install, env + secrets in its initramfs, QMP) or libkrun (launcher);
   its pid is moved into the cgroup right after the fork.

A monitor waits for the VMM to exit (pidfd), records how it ended (QEMU's status, the guest's
``NULLBOX-AGENT-EXIT``/``NULLBOX-GUEST-FAIL`` console lines) and undoes everything; ``agent.restart`` and
nullbox.backoff decide whether and when it starts again.  With ``capabilities.health_check`` it also runs the
agent's health checks (cage.health); an unhealthy VM is stopped and that counts as a failure.  Stopping asks the
guest to power down (QMP ``system_powerdown``), then SIGTERMs the VMM, then kills the cgroup, waiting
``stop_timeout_s`` between steps.

The VM's console goes through a FIFO that cage reads into ``<log dir>/<agent>.log`` (rotated at 1 MiB, two old files
kept) and to ``logs`` followers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from cage import defaults, network, qemu
from cage.agents import AgentNotFound, AgentStore, InstalledAgent, StoreError, check_name
from cage.cgroup import CgroupError, Group, Hierarchy, Limits
from cage.config import CageConfig
from cage.health import HealthWatch
from cage.network import Link, NetworkError, Pool, SlotMap
from cage.policy import Policy
from cage.terms import ManifestError, Restart
from cage.vault import Vault
from nullbox.backoff import Backoff
from nullbox.wire import AsyncClient, ErrorCode, WireError

if TYPE_CHECKING:  # pydantic's models load when an agent is applied or started, not at cage's start-up
    from cage.manifest import HealthCheck, Manifest

log = logging.getLogger("cage")

STEPS: Final = ("tap", "egress", "ctxgraph", "cgroup", "backend")
ACTIVE: Final = frozenset({"starting", "running", "paused", "stopping", "restarting"})
READ_CHUNK: Final = 1 << 16
CALL_TIMEOUT_S: Final = 30.0


def _unavailable(message: str) -> WireError:
    return WireError(ErrorCode.UNAVAILABLE, message)


def agent_name(value: object) -> str:
    """An agent name from a request, or ``invalid_request`` (never a path: ``..``, ``a/b``)."""
    try:
        return check_name(value)
    except StoreError as exc:
        raise WireError(exc.code, str(exc)) from None


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Paths:
    """Everything cage touches outside its config; all configurable so tests run in temporary directories."""

    socket: Path = defaults.SOCKET
    agents: Path = defaults.AGENTS_DIR
    vault: Path = defaults.VAULT_DIR
    state: Path = defaults.STATE_DIR
    run: Path = defaults.RUN_DIR
    logs: Path = defaults.LOG_DIR
    egress: Path = defaults.EGRESS_SOCKET
    ctxgraph: Path = defaults.CTXGRAPH_SOCKET
    cgroup_root: Path = defaults.CGROUP_ROOT
    cgroup_parent: Path = defaults.CGROUP_PARENT

    @property
    def images(self) -> Path:
        return self.state / "images"

    @property
    def approvals(self) -> Path:
        return self.vault / "approvals.json"


# ---------------------------------------------------------------------------------------------- console logs


class ConsoleLog:
    """One agent's console log: ``<dir>/<agent>.log``, rotated at ``max_bytes`` keeping ``keep`` old files.

    Survives the agent's runs (each run appends).  Complete lines also go to followers (``logs`` with ``follow``).
    """

    def __init__(self, path: Path, max_bytes: int = defaults.LOG_MAX_BYTES, keep: int = defaults.LOG_KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._file: IO[bytes] | None = None
        self._size = 0
        self._partial = b""
        self._followers: set[asyncio.Queue[str | None]] = set()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            self._file = os.fdopen(fd, "ab", buffering=0)
            self._size = os.fstat(fd).st_size
        return self._file

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for index in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            newer = self.path.with_name(f"{self.path.name}.{index - 1}") if index > 1 else self.path
            if index == self.keep:
                older.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                newer.rename(older)
        if self.keep == 0:
            self.path.unlink(missing_ok=True)

    def write(self, data: bytes) -> list[bytes]:
        """Append ``data``; returns the lines it completed (without line ends)."""
        if not data:
            return []
        try:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            handle = self._open()
            handle.write(data)
            self._size += len(data)
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc)
        text = self._partial + data
        *lines, self._partial = text.split(b"\n")
        if len(self._partial) > READ_CHUNK:  # a "line" that never ends is passed on in pieces
            lines.append(self._partial)
            self._partial = b""
        lines = [line.rstrip(b"\r") for line in lines]
        for line in lines:
            self._publish(line.decode(errors="replace"))
        return lines

    def note(self, text: str) -> None:
        """A line of cage's own (start, exit), on a line of its own."""
        prefix = b"\n" if self._partial else b""
        self.write(prefix + f"nullbox-cage: {text}\n".encode())

    def _publish(self, line: str) -> None:
        for queue in list(self._followers):
            try:
                queue.put_nowait(line)
            except asyncio.QueueFull:
                self._followers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)  # tells the stream it fell behind

    def follow(self, size: int = defaults.FOLLOW_QUEUE) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(size)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str | None]) -> None:
        self._followers.discard(queue)

    def tail(self, count: int) -> list[str]:
        """The last ``count`` lines, from the rotated files too when the current one holds fewer."""
        if count <= 0:
            return []
        lines: list[str] = []
        files = [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.keep, 0, -1)] + [self.path]
        for path in reversed(files):
            try:
                text = path.read_bytes().decode(errors="replace")
            except FileNotFoundError:
                continue
            found = [line.rstrip("\r") for line in text.split("\n")]
            if found and found[-1] == "":
                found.pop()
            lines = found + lines
            if len(lines) >= count:
                break
        return lines[-count:]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -------------------------------------------------------------------------------------------------- the VMM


@functools.cache
def usable_exec_helper(path: Path) -> Path | None:
    """``path`` when it is an executable file, else None (said once: QEMU still starts as the agent, only slower)."""
    if path.is_file() and os.access(path, os.X_OK):
        return path
    log.warning("no exec helper at %s (backend.exec_helper): QEMU starts as the agent through a fork of cage", path)
    return None


@dataclass
class CagedVm(qemu.Vm):
    """cage.qemu's Vm, with the VMM moved into the agent's cgroup right after the fork and in a session of its own
    (a ^C to cage's process group never reaches it; cage stops its VMs itself).  It runs as the agent's uid and gid
    (the spec's; qemu.Vm._popen)."""

    cgroup: Group | None = None

    def _spawn(self) -> None:
        with self.qemu_log.open("wb") as out:
            self.proc = self._popen(out, start_new_session=True)
        if self.cgroup is not None:
            try:
                self.cgroup.add(self.proc.pid)
            except CgroupError:
                self.proc.kill()
                self.proc.wait()
                raise


@dataclass
class Run:
    """One run of an agent's VM, with what its start set up (``undo``, newest last)."""

    agent: str
    slot: int
    uid: int
    link: Link
    directory: Path
    undo: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    group: Group | None = None
    skipped_limits: list[str] = field(default_factory=list)
    ctx_socket: Path | None = None
    backend: str = ""
    proc: subprocess.Popen[bytes] | None = None
    qmp: Path | None = None
    exited: asyncio.Future[int] | None = None
    console_fd: int | None = None
    agent_status: int | None = None
    guest_failure: str | None = None
    started_mono: float = 0.0
    started_wall: float = 0.0
    stop_requested: bool = False
    finished: bool = False
    cid: int | None = None  # the VM's vsock CID, registered with ctxgraph (QEMU on a host with vhost-vsock)
    health: HealthWatch | None = None  # with capabilities.health_check
    unhealthy: str | None = None  # why the health check stopped this run


@dataclass
class AgentRuntime:
    name: str
    console: ConsoleLog
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: str = "stopped"
    desired: bool = False
    run: Run | None = None
    backoff: Backoff = field(default_factory=Backoff)
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    last_error: str | None = None
    restart_task: asyncio.Task[None] | None = None
    restart_at: float | None = None  # monotonic
    monitor: asyncio.Task[None] | None = None


# ------------------------------------------------------------------------------------------------------ cage


class Cage:
    """Every agent on this appliance: the store, the vault, the policy, and one AgentRuntime per agent."""

    def __init__(self, config: CageConfig, paths: Paths, *, test_hooks: bool = False) -> None:
        self.config = config
        self.paths = paths
        self.store = AgentStore(paths.agents)
        self.vault = Vault(paths.vault)
        self.policy = Policy(config.policy.max_tool_risk, paths.approvals)
        self.pool = Pool(config.pool)
        self.slots = SlotMap(paths.state / network.SLOTS_FILE, self.pool.capacity)
        self.hierarchy = Hierarchy(paths.cgroup_root, paths.cgroup_parent)
        self.cgroup_missing: list[str] = []
        self.cgroup_error: str | None = None
        self.test_hooks = test_hooks
        self.fail_next: str | None = None
        self.runtimes: dict[str, AgentRuntime] = {}
        self._backend: tuple[str, str] | None = None
        self._backend_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # --- start-up and shutdown ----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Before serving: repair the store, remove what a killed cage left (VMMs, cgroups, TAPs, run files)."""
        for repair in await asyncio.to_thread(self.store.recover):
            log.info("agent store: %s", repair)
        try:
            self.cgroup_missing = await asyncio.to_thread(self.hierarchy.prepare)
            if self.cgroup_missing:
                log.warning(
                    "cgroup controllers not available in %s: %s (their limits are not enforced)",
                    self.hierarchy.root,
                    ", ".join(self.cgroup_missing),
                )
            for stale in self.hierarchy.groups():
                log.warning("removing the stale cgroup of agent %s (and any VMM still in it)", stale)
                try:
                    await asyncio.to_thread(self.hierarchy.group(stale).remove)
                except CgroupError as exc:
                    log.error("%s", exc)
        except CgroupError as exc:
            self.cgroup_error = str(exc)
            log.error("no cgroup v2 hierarchy: %s; agents cannot start", exc)
        try:
            for tap in await network.remove_stale():
                log.warning("removed the stale TAP %s", tap)
        except NetworkError as exc:
            log.error("%s", exc)
        if self.paths.run.is_dir():
            for entry in self.paths.run.iterdir():
                await asyncio.to_thread(_remove_tree, entry)
        self.paths.run.mkdir(parents=True, exist_ok=True, mode=0o700)

    def autostart(self) -> None:
        """Start every healthy agent with ``autostart = true``, in the background."""
        for agent in self.store.list():
            if agent.ok and agent.manifest is not None and agent.manifest.agent.autostart:
                self._background(self._autostart(agent.name))

    async def _autostart(self, name: str) -> None:
        try:
            await self.start(name)
        except WireError as exc:
            log.error("agent %s: autostart failed: %s", name, exc.message)

    def _background(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Stop every VM (cage's SIGTERM): no VMM outlives cage."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        stops = [self.stop(name) for name, rt in self.runtimes.items() if rt.state in ACTIVE or rt.run is not None]
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("stopping an agent at shutdown failed: %s", result)
        for rt in self.runtimes.values():
            rt.console.close()

    # --- backend selection --------------------------------------------------------------------------------------

    async def backend(self) -> tuple[str, str]:
        """(kind, why): the configured backend, or for ``auto`` libkrun when it is usable here, else QEMU."""
        async with self._backend_lock:
            if self._backend is None:
                self._backend = await asyncio.to_thread(self._choose_backend)
                log.info("backend %s: %s", *self._backend)
            return self._backend

    async def _kvm(self) -> bool:
        """Whether QEMU runs its VMs under KVM here: vhost's in-kernel datapath (vhost-vsock) relies on KVM's
        ioeventfd/irqfd, so under TCG a VM gets the virtio-serial channel only."""
        return (await asyncio.to_thread(qemu.detect_accel)).name == "kvm"

    def _choose_backend(self) -> tuple[str, str]:
        kind = self.config.backend
        if kind == "qemu":
            return "qemu", f"configured; {qemu.detect_accel().explain()}"
        from cage.libkrun import libkrun_usable  # noqa: PLC0415 (only when libkrun may be used)

        usable, why = libkrun_usable(self.config.libkrun)
        if kind == "libkrun":
            return "libkrun", f"configured; {why}"
        if usable:
            return "libkrun", f"auto: {why}"
        return "qemu", f"auto: {why}; QEMU with {qemu.detect_accel().explain()}"

    # --- helpers ------------------------------------------------------------------------------------------------

    def runtime(self, name: str) -> AgentRuntime:
        rt = self.runtimes.get(name)
        if rt is None:
            rt = AgentRuntime(name, ConsoleLog(self.paths.logs / f"{name}.log"))
            rt.backoff = Backoff(self.config.backoff)
            self.runtimes[name] = rt
        return rt

    def installed(self, name: str) -> InstalledAgent:
        try:
            return self.store.show(name)
        except StoreError as exc:
            raise WireError(exc.code, str(exc)) from None

    async def _call(self, service: str, socket: Path, op: str, **params: Any) -> dict[str, Any]:
        try:
            client = await AsyncClient.connect(f"unix:{socket}")
        except OSError as exc:
            raise _unavailable(f"{service} is not reachable at {socket} ({exc.strerror or exc})") from None
        try:
            return await asyncio.wait_for(client.call(op, **params), CALL_TIMEOUT_S)
        except TimeoutError:
            raise _unavailable(f"{service} did not answer {op} within {CALL_TIMEOUT_S:g}s") from None
        finally:
            await client.close()

    def _hook(self, step: str) -> None:
        if self.fail_next == step:
            self.fail_next = None
            raise _unavailable(f"test hook: step {step} failed on purpose")

    # --- start ----------------------------------------------------------------------------------------------------

    async def start(self, name: str) -> dict[str, Any]:
        agent_name(name)
        if self._closing:
            raise _unavailable("cage is shutting down")
        installed = self.installed(name)
        rt = self.runtime(name)
        async with rt.lock:
            if rt.state in ("running", "paused", "starting", "stopping"):
                raise WireError(ErrorCode.CONFLICT, f"agent {name} is already {rt.state}")
            self._cancel_restart(rt)
            rt.desired = True
            rt.backoff.reset()
            rt.restarts = 0  # counts restarts since the last start an operator asked for
            await self._launch(rt, installed)
        return self.status_of(name)

    async def _launch(self, rt: AgentRuntime, installed: InstalledAgent) -> None:
        """The six start steps (module docstring); on failure every step done is undone and the error raised."""
        name = rt.name
        rt.state = "starting"
        rt.last_error = None
        try:
            manifest, env = await self._preflight(installed)
        except WireError as exc:
            rt.state = "failed"
            rt.last_error = exc.message
            raise
        slot = self.slots.assign(name)
        run = Run(
            agent=name,
            slot=slot,
            uid=defaults.UID_BASE + slot,
            link=network.link_for(name, self.pool, slot),
            directory=self.paths.run / name,
        )
        try:
            await self._set_up(run, installed, manifest, env)
        except BaseException as exc:
            await self._undo(run)
            rt.state = "failed"
            rt.last_error = exc.message if isinstance(exc, WireError) else str(exc)
            if isinstance(exc, WireError):
                log.warning("agent %s did not start: %s", name, exc.message)
                raise
            if isinstance(exc, Exception):
                log.exception("agent %s did not start", name)
                raise WireError(ErrorCode.INTERNAL, f"agent {name} did not start: {exc}") from exc
            raise
        rt.run = run
        rt.state = "running"
        rt.console.note(f"agent {name} started ({run.backend}, pid {run.proc.pid if run.proc else '?'})")
        log.info("agent %s running (%s, pid %s)", name, run.backend, run.proc.pid if run.proc else "?")
        rt.monitor = asyncio.ensure_future(self._monitor(rt, run, manifest.capabilities.health_check))

    async def _preflight(self, installed: InstalledAgent) -> tuple[Manifest, dict[str, str]]:
        """Step 1: manifest, policy, credentials.  Nothing to undo."""
        name = installed.name
        try:
            manifest = installed.require()
        except ManifestError as exc:
            raise WireError(ErrorCode.INVALID_REQUEST, "; ".join(exc.lines)) from None
        if installed.manifest_sha256 is None:
            raise WireError(ErrorCode.INVALID_REQUEST, f"agent {name}: its manifest cannot be read")
        sha = installed.manifest_sha256
        await asyncio.to_thread(self.policy.check, name, manifest.tools, sha)
        credentials = await asyncio.to_thread(self.vault.env_for, name, manifest.capabilities.credential_refs)
        secrets = credentials.require()  # CredentialsRefused names what is missing or ungranted, never values
        return manifest, {**manifest.agent.env, **secrets}

    async def _set_up(self, run: Run, installed: InstalledAgent, manifest: Manifest, env: dict[str, str]) -> None:
        """Steps 2-6; each appends its undo to ``run.undo`` once done."""
        await self._step_tap(run)
        await self._step_egress(run, manifest)
        await self._step_ctxgraph(run, manifest)
        await self._step_cgroup(run, manifest)
        await self._step_backend(run, installed, manifest, env)

    async def _step_tap(self, run: Run) -> None:
        self._hook("tap")
        try:
            await network.create_link(run.link, uid=run.uid, gid=run.uid)
        except NetworkError as exc:
            raise _unavailable(str(exc)) from None
        run.undo.append(("tap", functools.partial(self._undo_tap, run.link.tap)))

    async def _step_egress(self, run: Run, manifest: Manifest) -> None:
        self._hook("egress")
        name, tap = run.agent, run.link.tap
        allow = list(manifest.capabilities.network.allow)
        try:
            await self._call("egress", self.paths.egress, "add_agent", agent=name, interface=tap, allow=allow)
        except WireError as exc:
            if exc.code != ErrorCode.CONFLICT or "already exists" not in exc.message:
                raise _refused("egress", name, exc) from None
            # a registration left by a cage that was killed: replace it
            log.warning("agent %s: egress had it registered already (%s); replacing", name, exc.message)
            try:
                await self._call("egress", self.paths.egress, "remove_agent", agent=name)
                await self._call("egress", self.paths.egress, "add_agent", agent=name, interface=tap, allow=allow)
            except WireError as again:
                raise _refused("egress", name, again) from None
        run.undo.append(("egress", functools.partial(self._undo_egress, name)))

    async def _step_ctxgraph(self, run: Run, manifest: Manifest) -> None:
        self._hook("ctxgraph")
        name = run.agent
        calls = manifest.capabilities.max_api_calls_per_hour  # ctxgraph is the one appliance API a VM reaches
        if (await self.backend())[0] == "qemu" and qemu.VHOST_VSOCK.exists() and await self._kvm():
            run.cid = defaults.VSOCK_CID_BASE + run.slot  # ctxgraph maps connections from this CID to the agent
        vsock = {} if run.cid is None else {"cid": run.cid}
        try:
            reply = await self._call(
                "ctxgraph",
                self.paths.ctxgraph,
                "register_agent",
                agent=name,
                uid=run.uid,
                gid=run.uid,
                max_calls_per_hour=calls,
                **vsock,
            )
        except WireError as exc:
            raise _refused("ctxgraph", name, exc) from None
        run.undo.append(("ctxgraph", functools.partial(self._undo_ctxgraph, name)))
        run.ctx_socket = Path(str(reply["socket"]))

    async def _step_cgroup(self, run: Run, manifest: Manifest) -> None:
        self._hook("cgroup")
        name = run.agent
        if self.cgroup_error is not None:
            raise _unavailable(f"agent {name} cannot start without a cgroup: {self.cgroup_error}")
        caps = manifest.capabilities
        limits = Limits(
            cpu_percent=caps.max_cpu_percent,
            memory_mib=caps.max_memory_mb + self.config.vmm_overhead_mb,
            pids=defaults.PIDS_MAX,
        )
        group = self.hierarchy.group(name)
        try:
            if group.exists():
                await asyncio.to_thread(group.remove)
            run.skipped_limits = await asyncio.to_thread(group.create, limits)
        except CgroupError as exc:
            with contextlib.suppress(CgroupError):
                await asyncio.to_thread(group.remove)
            raise _unavailable(f"agent {name}: {exc}") from None
        run.group = group
        run.undo.append(("cgroup", functools.partial(self._undo_cgroup, group)))

    async def _step_backend(self, run: Run, installed: InstalledAgent, manifest: Manifest, env: dict[str, str]) -> None:
        self._hook("backend")
        kind, _ = await self.backend()
        run.backend = kind
        run.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        run.undo.append(("files", functools.partial(self._undo_files, run)))
        console = self._open_console(run)
        try:
            if kind == "qemu":
                vm = await asyncio.to_thread(self._start_qemu, run, installed, manifest, env, console)
                run.proc, run.qmp = vm.proc, vm.spec.qmp_socket
            else:
                run.proc = await asyncio.to_thread(self._start_libkrun, run, installed, manifest, env, console)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            raise _unavailable(f"agent {run.agent}: the {kind} VM did not start: {_one_line(exc)}") from None
        run.undo.append(("vmm", functools.partial(self._undo_vmm, run)))
        run.started_mono, run.started_wall = time.monotonic(), time.time()
        run.exited = self._watch_exit(run.proc)

    # --- the backends (in a worker thread) -----------------------------------------------------------------------

    def _open_console(self, run: Run) -> Path:
        """A FIFO the VMM writes its console to; cage holds it open read-write (so it never sees EOF) and reads it."""
        path = run.directory / "console"
        path.unlink(missing_ok=True)
        os.mkfifo(path, 0o600)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        run.console_fd = fd
        rt = self.runtimes[run.agent]
        asyncio.get_running_loop().add_reader(fd, self._read_console, rt, run)
        return path

    def _read_console(self, rt: AgentRuntime, run: Run) -> None:
        fd = run.console_fd
        if fd is None:
            return
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("agent %s: console read failed: %s", run.agent, exc)
                return
            if not data:
                return
            for line in rt.console.write(data):
                status, failure = qemu.parse_console(line)
                if status is not None:
                    run.agent_status = status
                if failure is not None:
                    run.guest_failure = failure

    def _close_console(self, run: Run) -> None:
        fd = run.console_fd
        if fd is None:
            return
        rt = self.runtimes.get(run.agent)
        if rt is not None:
            self._read_console(rt, run)  # what is still in the pipe
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        run.console_fd = None

    def _root_image(self, installed: InstalledAgent) -> Path:
        """The agent's root as a SquashFS image: the installed one, or its directory packed once per install."""
        if installed.rootfs_path is None:
            raise RuntimeError(f"agent {installed.name} has no rootfs")
        if installed.rootfs_kind == "squashfs":
            return installed.rootfs_path
        image = self.paths.images / f"{installed.name}.sqfs"
        stamp = image.with_name(image.name + ".key")
        key = f"{installed.manifest_sha256} {installed.installed_ns}\n"
        with contextlib.suppress(OSError):
            if image.is_file() and stamp.read_text() == key:
                return image
        self.paths.images.mkdir(parents=True, exist_ok=True, mode=0o755)
        stamp.unlink(missing_ok=True)
        log.info("agent %s: packing its rootfs into %s", installed.name, image)
        # Imported here: cage.guestimage builds on the image build's helpers (image.*), which the appliance does not
        # ship; cage itself must import there.
        from cage import guestimage  # noqa: PLC0415

        guestimage.pack_rootfs(installed.rootfs_path, image)
        image.chmod(0o644)
        stamp.write_text(key)
        return image

    def _start_qemu(
        self, run: Run, installed: InstalledAgent, manifest: Manifest, env: Mapping[str, str], console: Path
    ) -> qemu.Vm:
        for what, path in (("kernel", self.config.kernel), ("initramfs", self.config.initramfs)):
            if not path.is_file():
                raise RuntimeError(f"the guest {what} {path} does not exist (backend.{what} in cage.toml)")
        from cage import shares as data_shares  # noqa: PLC0415 (imports cage.manifest's data_path)

        image = self._root_image(installed)
        data = data_shares.data_dir(self.paths.state, run.agent)
        shares = data_shares.plan(data, manifest.capabilities.filesystem)
        data_shares.prepare(data, shares, run.uid, run.uid)
        config = qemu.write_config(run.directory / "config.cpio", manifest.agent.argv, env, "/", shares)
        spec = qemu.QemuVM(
            agent=run.agent,
            kernel=self.config.kernel,
            initramfs=self.config.initramfs,
            rootfs=image,
            config=config,
            console_log=console,
            memory_mb=manifest.capabilities.max_memory_mb,
            cpus=1,
            net=run.link.guest_net(),
            ctxgraph_socket=run.ctx_socket,
            vsock_cid=run.cid,
            qmp_socket=run.directory / "qmp.sock",
            shares=tuple(shares),
            uid=run.uid,
            gid=run.uid,
            exec_helper=usable_exec_helper(self.config.exec_helper),
        )
        return CagedVm(spec, cgroup=run.group).start(qemu.detect_accel())  # it removes the config, whatever happens

    def _start_libkrun(
        self, run: Run, installed: InstalledAgent, manifest: Manifest, env: Mapping[str, str], console: Path
    ) -> subprocess.Popen[bytes]:
        from cage import shares as data_shares  # noqa: PLC0415
        from cage.launcher import LibkrunBackend  # noqa: PLC0415 (only with libkrun)
        from cage.vmspec import Share, VmSpec  # noqa: PLC0415

        if installed.rootfs_path is None or installed.rootfs_kind is None or run.ctx_socket is None:
            raise RuntimeError(f"agent {installed.name} has no rootfs or no ctxgraph socket")
        data = data_shares.data_dir(self.paths.state, run.agent)
        shares = data_shares.plan(data, manifest.capabilities.filesystem)
        data_shares.prepare(data, shares, run.uid, run.uid)
        spec = VmSpec(
            agent=run.agent,
            vcpus=1,
            memory_mib=manifest.capabilities.max_memory_mb,
            rootfs=installed.rootfs_path,
            rootfs_kind=installed.rootfs_kind,
            command=manifest.agent.argv,
            env=env,
            tap=run.link.tap,
            mac=run.link.mac,
            ctxgraph_socket=run.ctx_socket,
            uid=run.uid,
            gid=run.uid,
            # virtio-fs, opened by path after the launcher's privilege drop; the guest mounts them (tag data<N>)
            shares=tuple(Share(s.tag, s.host_path, s.read_only) for s in shares),
            console_log=console,
        )
        proc = LibkrunBackend(self.config.libkrun).start(spec)
        if run.group is not None:
            try:
                run.group.add(proc.pid)
            except CgroupError:
                proc.kill()
                proc.wait()
                raise
        return proc

    def _watch_exit(self, proc: subprocess.Popen[bytes] | None) -> asyncio.Future[int]:
        """A future that resolves to the VMM's exit status (pidfd readiness; no thread per VM)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if proc is None:
            future.set_result(-1)
            return future
        if proc.returncode is not None:
            future.set_result(proc.returncode)
            return future
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            future.set_result(proc.wait())
            return future

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not future.done():
                future.set_result(proc.wait())

        loop.add_reader(pidfd, exited)
        return future

    # --- monitor, restart ---------------------------------------------------------------------------------------

    async def _monitor(self, rt: AgentRuntime, run: Run, check: HealthCheck | None) -> None:
        """Wait for the VMM's exit; meanwhile probe the agent with the health check of the manifest it started with."""
        assert run.exited is not None
        if check is not None:
            on_unhealthy = functools.partial(self._background_unhealthy, rt, run)
            run.health = HealthWatch(check, str(run.link.guest.ip), on_unhealthy)
            run.health.start()
        await asyncio.shield(run.exited)
        async with rt.lock:
            if run.finished:
                return  # stop() tore it down
            await self._finish(rt, run)
            if self._closing or not rt.desired:
                return
            failed = rt.last_exit is not None and rt.last_exit["failed"]
            policy = rt.last_exit["restart"] if rt.last_exit is not None else "never"
            if policy == Restart.ALWAYS or (policy == Restart.ON_FAILURE and failed):
                uptime = rt.last_exit["uptime_s"] if rt.last_exit is not None else 0.0
                self._schedule_restart(rt, rt.backoff.next_delay(uptime))
            else:
                rt.desired = False

    def _background_unhealthy(self, rt: AgentRuntime, run: Run, reason: str) -> None:
        self._background(self._stop_unhealthy(rt, run, reason))

    async def _stop_unhealthy(self, rt: AgentRuntime, run: Run, reason: str) -> None:
        """The health check gave up on this run: stop its VM; the monitor then restarts it as after a crash."""
        async with rt.lock:
            if rt.run is not run or run.finished or run.stop_requested or rt.state != "running":
                return  # stopped, paused or ended meanwhile
            run.unhealthy = reason
            rt.state = "stopping"
            rt.console.note(f"agent {run.agent} is unhealthy ({reason}); stopping its VM")
            log.warning("agent %s is unhealthy (%s); stopping its VM", run.agent, reason)
            await self._stop_vmm(run)

    async def _finish(self, rt: AgentRuntime, run: Run) -> None:
        """The VMM has exited: record how, undo the start, set the state (the caller holds rt.lock)."""
        run.finished = True
        if run.health is not None:
            run.health.close()
        assert run.exited is not None
        status = run.exited.result() if run.exited.done() else None
        self._close_console(run)
        uptime = time.monotonic() - run.started_mono
        agent_status = run.agent_status
        if run.backend == "libkrun" and agent_status is None and status is not None and status >= 0:
            agent_status = status  # libkrun's process ends with the workload's status
        failed = run.guest_failure is not None or run.unhealthy is not None or agent_status != 0
        try:
            restart = self.installed(run.agent).require().agent.restart
        except (WireError, ManifestError):
            restart = Restart.NEVER
        rt.last_exit = {
            "at": _iso(time.time()),
            "uptime_s": round(uptime, 3),
            "vmm_status": status,
            "agent_status": agent_status,
            "guest_failure": run.guest_failure,
            "stopped": run.stop_requested,
            "failed": failed and not run.stop_requested,
            "restart": str(restart),
            "unhealthy": run.unhealthy,
        }
        detail = f"agent status {agent_status}" if agent_status is not None else "no agent status"
        if run.guest_failure:
            detail += f", guest failure: {run.guest_failure}"
        if run.unhealthy:
            detail += f", unhealthy: {run.unhealthy}"
        rt.console.note(f"agent {run.agent} ended (VMM status {status}, {detail})")
        log.info("agent %s ended after %.1fs (VMM status %s, %s)", run.agent, uptime, status, detail)
        await self._undo(run)
        rt.run = None
        if run.stop_requested:
            rt.state = "stopped"
        else:
            rt.state = "failed" if failed else "exited"

    def _schedule_restart(self, rt: AgentRuntime, delay: float) -> None:
        rt.state = "restarting"
        rt.restart_at = time.monotonic() + delay
        log.info("agent %s: restarting in %.1fs (failure %d)", rt.name, delay, rt.backoff.failures)
        rt.restart_task = asyncio.ensure_future(self._restart_later(rt, delay))

    async def _restart_later(self, rt: AgentRuntime, delay: float) -> None:
        await asyncio.sleep(delay)
        async with rt.lock:
            if rt.state != "restarting" or not rt.desired or self._closing:
                return
            rt.restart_task = None
            rt.restart_at = None
            rt.restarts += 1
            try:
                installed = self.installed(rt.name)
                await self._launch(rt, installed)
            except WireError as exc:
                rt.last_error = exc.message
                if rt.desired and not self._closing:
                    self._schedule_restart(rt, rt.backoff.next_delay(0.0))

    def _cancel_restart(self, rt: AgentRuntime) -> None:
        if rt.restart_task is not None and rt.restart_task is not asyncio.current_task():
            rt.restart_task.cancel()
        rt.restart_task = None
        rt.restart_at = None

    # --- stop, pause, resume ------------------------------------------------------------------------------------

    async def stop(self, name: str) -> dict[str, Any]:
        agent_name(name)
        rt = self.runtimes.get(name)
        if rt is None:
            self.installed(name)  # not_found for an unknown agent
            rt = self.runtime(name)
        rt.desired = False
        self._cancel_restart(rt)
        async with rt.lock:
            run = rt.run
            if run is None or run.finished:
                if rt.state == "restarting":
                    rt.state = "stopped"
                return self.status_of(name)
            rt.state = "stopping"
            run.stop_requested = True
            await self._stop_vmm(run)
            await self._finish(rt, run)
        return self.status_of(name)

    async def _stop_vmm(self, run: Run) -> None:
        """Power-down request, then SIGTERM, then cgroup.kill (SIGKILL to everything in the group)."""
        assert run.exited is not None
        grace = self.config.stop_timeout_s
        if run.group is not None:
            with contextlib.suppress(CgroupError):
                if run.group.frozen():
                    await asyncio.to_thread(run.group.thaw)
        if run.qmp is not None and not run.exited.done():
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                await asyncio.to_thread(qemu.qmp, run.qmp, "system_powerdown", timeout=grace)
            if await _wait(run.exited, grace):
                return
        if run.proc is not None and not run.exited.done():
            with contextlib.suppress(ProcessLookupError):
                run.proc.terminate()
            if await _wait(run.exited, grace):
                return
        log.warning("agent %s: the VMM ignored SIGTERM; killing its cgroup", run.agent)
        if run.group is not None:
            with contextlib.suppress(CgroupError):
                run.group.kill()
        if run.proc is not None and not run.exited.done():
            with contextlib.suppress(ProcessLookupError):
                run.proc.kill()
        await _wait(run.exited, 10.0)

    async def pause(self, name: str) -> dict[str, Any]:
        rt = self._active(name)
        async with rt.lock:
            if rt.state != "running" or rt.run is None or rt.run.group is None:
                raise WireError(ErrorCode.CONFLICT, f"agent {name} is {rt.state}, not running")
            health = rt.run.health
            if health is not None:
                health.suspend()  # a frozen VM does not answer, and is not unhealthy for it
            try:
                await asyncio.to_thread(rt.run.group.freeze)
            except CgroupError as exc:
                if health is not None:
                    health.resume()
                raise _unavailable(str(exc)) from None
            rt.state = "paused"
            log.info("agent %s paused", name)
        return self.status_of(name)

    async def resume(self, name: str) -> dict[str, Any]:
        rt = self._active(name)
        async with rt.lock:
            if rt.state != "paused" or rt.run is None or rt.run.group is None:
                raise WireError(ErrorCode.CONFLICT, f"agent {name} is {rt.state}, not paused")
            try:
                await asyncio.to_thread(rt.run.group.thaw)
            except CgroupError as exc:
                raise _unavailable(str(exc)) from None
            rt.state = "running"
            if rt.run.health is not None:
                rt.run.health.resume()  # probing starts over, with a fresh start period
            log.info("agent %s resumed", name)
        return self.status_of(name)

    def _active(self, name: str) -> AgentRuntime:
        agent_name(name)
        rt = self.runtimes.get(name)
        if rt is None:
            self.installed(name)
            raise WireError(ErrorCode.CONFLICT, f"agent {name} is not running")
        return rt

    # --- undo steps -----------------------------------------------------------------------------------------------

    async def _undo(self, run: Run) -> None:
        while run.undo:
            step, action = run.undo.pop()
            try:
                await action()
            except Exception as exc:
                log.error("agent %s: undoing %s failed: %s", run.agent, step, _one_line(exc))

    async def _undo_tap(self, tap: str) -> None:
        await network.delete_link(tap)

    async def _undo_egress(self, name: str) -> None:
        try:
            await self._call("egress", self.paths.egress, "remove_agent", agent=name)
        except WireError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise

    async def _undo_ctxgraph(self, name: str) -> None:
        try:
            await self._call("ctxgraph", self.paths.ctxgraph, "unregister_agent", agent=name)
        except WireError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise

    async def _undo_cgroup(self, group: Group) -> None:
        await asyncio.to_thread(group.remove)

    async def _undo_files(self, run: Run) -> None:
        self._close_console(run)
        await asyncio.to_thread(_remove_tree, run.directory)

    async def _undo_vmm(self, run: Run) -> None:
        if run.exited is not None and not run.exited.done():
            run.stop_requested = True
            await self._stop_vmm(run)

    # --- queries ------------------------------------------------------------------------------------------------

    def status_of(self, name: str) -> dict[str, Any]:
        rt = self.runtimes.get(name)
        if rt is None:
            return {"agent": name, "state": "stopped", "restarts": 0, "last_exit": None}
        out: dict[str, Any] = {"agent": name, "state": rt.state, "restarts": rt.restarts, "last_exit": rt.last_exit}
        if rt.last_error is not None:
            out["error"] = rt.last_error
        if rt.restart_at is not None:
            out["restart_in_s"] = round(max(0.0, rt.restart_at - time.monotonic()), 3)
        out["backoff_failures"] = rt.backoff.failures
        run = rt.run
        if run is not None and not run.finished:
            out["backend"] = run.backend
            out["pid"] = run.proc.pid if run.proc is not None else None
            out["uid"] = run.uid
            out["started_at"] = _iso(run.started_wall)
            out["uptime_s"] = round(time.monotonic() - run.started_mono, 3)
            out["network"] = run.link.to_json()
            out["ctxgraph_socket"] = str(run.ctx_socket) if run.ctx_socket else None
            out["vsock_cid"] = run.cid
            if run.health is not None:
                out["health"] = run.health.health.to_json()
            if run.group is not None:
                out["cgroup"] = self._cgroup_status(run)
        return out

    def _cgroup_status(self, run: Run) -> dict[str, Any]:
        assert run.group is not None
        info: dict[str, Any] = {"path": str(run.group.path), "limits_not_set": run.skipped_limits}
        try:
            usage = run.group.usage()
            info.update(
                cpu_usec=usage.cpu_usec,
                memory_bytes=usage.memory_bytes,
                pids=usage.pids,
                frozen=usage.frozen,
                limits=run.group.limits(),
            )
        except (CgroupError, ValueError) as exc:
            info["error"] = str(exc)
        return info

    async def overview(self) -> dict[str, Any]:
        kind, why = self._backend if self._backend is not None else (self.config.backend, "not chosen yet")
        names = sorted({a.name for a in self.store.list()} | set(self.runtimes))
        return {
            "backend": {"kind": kind, "reason": why},
            "cgroup": {
                "root": str(self.hierarchy.root),
                "parent": str(self.hierarchy.parent),
                "missing_controllers": self.cgroup_missing,
                "error": self.cgroup_error,
            },
            "config": self.config.to_json(),
            "agents": [self.status_of(name) for name in names],
        }

    # --- install and remove ---------------------------------------------------------------------------------------

    async def apply(
        self, *, path: Path | None, manifest: bytes | None, rootfs: Path | None, name: str | None
    ) -> dict[str, Any]:
        """Install or update an agent; a running agent is stopped, updated and started again."""
        source: Path | bytes
        if path is not None:
            source = path
        elif manifest is not None:
            source = manifest
        else:
            raise WireError(ErrorCode.INVALID_REQUEST, "'apply' needs 'path' (an agent directory) or 'manifest'")
        target = name
        if target is None:
            from cage.manifest import load as load_manifest  # noqa: PLC0415 (pydantic: see the imports)
            from cage.manifest import parse_bytes  # noqa: PLC0415

            try:
                if isinstance(source, bytes):
                    target = parse_bytes(source).agent.name
                else:
                    target = (await asyncio.to_thread(load_manifest, source)).agent.name
            except ManifestError as exc:
                raise WireError(ErrorCode.INVALID_REQUEST, "; ".join(exc.lines)) from None
        assert target is not None
        agent_name(target)
        rt = self.runtime(target)
        was_active = rt.state in ACTIVE
        if was_active:
            await self.stop(target)
        async with rt.lock:
            try:
                result = await asyncio.to_thread(self.store.apply, source, rootfs, expect_name=name)
            except ManifestError as exc:
                raise WireError(ErrorCode.INVALID_REQUEST, "; ".join(exc.lines)) from None
            except StoreError as exc:
                raise WireError(exc.code, str(exc)) from None
        log.info(
            "agent %s %s (manifest %s)",
            target,
            "installed" if result.created else "updated",
            result.agent.manifest_sha256,
        )
        reply: dict[str, Any] = {
            "agent": result.agent.to_json(),
            "created": result.created,
            "manifest_changed": result.manifest_changed,
            "restarted": False,
        }
        if was_active:
            try:
                await self.start(target)
                reply["restarted"] = True
            except WireError as exc:
                reply["start_error"] = exc.message
        return reply

    async def remove(self, name: str) -> dict[str, Any]:
        agent_name(name)
        self.installed(name)
        await self.stop(name)
        rt = self.runtime(name)
        async with rt.lock:
            try:
                removed = await asyncio.to_thread(self.store.remove, name)
            except AgentNotFound as exc:
                raise WireError(ErrorCode.NOT_FOUND, str(exc)) from None
            grants = await asyncio.to_thread(self.vault.forget_agent, name)
            with contextlib.suppress(WireError):
                await asyncio.to_thread(self.policy.revoke_approval, name)
            for leftover in (self.paths.images / f"{name}.sqfs", self.paths.images / f"{name}.sqfs.key"):
                leftover.unlink(missing_ok=True)
            self.slots.release(name)
            rt.console.close()
            self.runtimes.pop(name, None)
        log.info("agent %s removed", name)
        return {"agent": name, "removed": removed.to_json(), "grants_dropped": grants}


def _refused(service: str, agent: str, exc: WireError) -> WireError:
    return WireError(exc.code, f"{service} refused agent {agent}: {exc.message}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:500]


async def _wait(future: asyncio.Future[int], seconds: float) -> bool:
    """True once ``future`` is done, False after ``seconds`` (the future is not cancelled)."""
    try:
        await asyncio.wait_for(asyncio.shield(future), seconds)
    except TimeoutError:
        return False
    return True


def _remove_tree(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


async def follow_lines(console: ConsoleLog, backlog: list[str]) -> AsyncIterator[dict[str, Any]]:
    """A ``logs`` stream: the backlog, then new console lines as they come."""
    queue = console.follow()
    try:
        for old in backlog:
            yield {"line": old}
        while (new := await queue.get()) is not None:
            yield {"line": new}
        raise _unavailable("this log follower fell too far behind; ask again")
    finally:
        console.unfollow(queue)
