"""Service supervision: start in dependency order on readiness, capture output, restart with backoff, stop.

Event-driven throughout: process exits arrive from the SIGCHLD reaper (:meth:`Supervisor.on_exit`), readiness
from notify datagrams or a socket probe, output from pipe readers, restarts and kill deadlines from loop timers.
Nothing polls, so an idle supervisor never wakes up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import socket
import struct
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from nullbox.backoff import Backoff
from nulld import preload
from nulld.config import Config, ReadyKind, Restart, Service
from nulld.graph import dependents

log = logging.getLogger("nulld")

RING_LINES: Final = 1000
MAX_LOG_LINE: Final = 4096
BASE_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
SOCKET_PROBE_INITIAL: Final = 0.01
SOCKET_PROBE_MAX: Final = 0.25


class State(StrEnum):
    WAITING = "waiting"  # for its dependencies to become ready
    STARTING = "starting"  # spawned, not ready yet
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"  # stopped by the operator or by shutdown
    EXITED = "exited"  # ended by itself and is not restarted (success)
    FAILED = "failed"  # ended badly and is not restarted, or cannot be started at all
    BACKOFF = "backoff"  # waiting to be restarted
    BLOCKED = "blocked"  # a dependency failed


RUNNING: Final = frozenset({State.STARTING, State.READY, State.STOPPING})
DEAD_ENDS: Final = frozenset({State.FAILED, State.BLOCKED})


@dataclass(frozen=True, slots=True)
class LogLine:
    time_ns: int
    stream: str
    line: str

    def to_json(self) -> dict[str, Any]:
        return {"time_ns": self.time_ns, "stream": self.stream, "line": self.line}


@dataclass
class Unit:
    """The live state of one service."""

    service: Service
    state: State = State.WAITING
    popen: subprocess.Popen[bytes] | preload.ForkedProcess | None = None
    ready: bool = False
    wanted: bool = True
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    message: str | None = None
    blocked_by: str | None = None
    since: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)
    output: deque[LogLine] = field(default_factory=lambda: deque(maxlen=RING_LINES))
    followers: set[asyncio.Queue[LogLine | None]] = field(default_factory=set)
    timers: list[asyncio.Handle] = field(default_factory=list)
    pipes: list[int] = field(default_factory=list)
    partial: dict[str, bytes] = field(default_factory=dict)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def set_state(self, state: State, message: str | None = None) -> None:
        self.state = state
        self.message = message
        self.since = time.monotonic()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": str(self.state),
            "pid": self.pid,
            "ready": self.ready,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "since_s": round(time.monotonic() - self.since, 3),
            "blocked_by": self.blocked_by,
            "message": self.message,
            "depends_on": list(self.service.depends_on),
        }


@dataclass(frozen=True, slots=True)
class Timing:
    event: str
    service: str | None
    monotonic: float

    def to_json(self, origin: float) -> dict[str, Any]:
        return {
            "event": self.event,
            "service": self.service,
            "monotonic_s": round(self.monotonic, 6),
            "since_nulld_s": round(self.monotonic - origin, 6),
        }


class Supervisor:
    def __init__(self, config: Config, runtime_dir: Path, *, origin: float | None = None) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.units = {name: Unit(config.services[name]) for name in config.order}
        self._graph = {name: s.depends_on for name, s in config.services.items()}
        self._direct_dependents: dict[str, list[str]] = {name: [] for name in config.order}
        for name in config.order:  # in start order, so dependents are considered in a deterministic order
            for dep in config.services[name].depends_on:
                self._direct_dependents[dep].append(name)
        self._by_pid: dict[int, Unit] = {}
        self.origin = time.monotonic() if origin is None else origin
        self.timings: list[Timing] = []
        self.shutting_down = False
        self._notify: socket.socket | None = None

    # ---------------------------------------------------------------------------------------------- timings

    def mark(self, event: str, service: str | None = None, *, at: float | None = None) -> None:
        self.timings.append(Timing(event, service, time.monotonic() if at is None else at))

    # ----------------------------------------------------------------------------------------------- start

    def start_all(self) -> None:
        for name in self.config.order:
            self._consider(self.units[name])

    def _consider(self, unit: Unit) -> None:
        """Start ``unit`` if it is waiting and every dependency is ready; block it if one can never be."""
        if self.shutting_down or not unit.wanted or unit.state not in (State.WAITING, State.BLOCKED):
            return
        for dep in unit.service.depends_on:
            other = self.units[dep]
            if other.state in DEAD_ENDS or (other.state == State.STOPPED and not other.wanted):
                if unit.state != State.BLOCKED or unit.blocked_by != dep:
                    unit.blocked_by = dep
                    unit.set_state(State.BLOCKED, f"dependency '{dep}' is {other.state}")
                    log.warning("%s blocked: dependency %s is %s", unit.name, dep, other.state)
                    self._consider_dependents(unit)
                return
        if unit.state == State.BLOCKED:
            unit.blocked_by = None
            unit.set_state(State.WAITING)
        if all(self.units[dep].state == State.READY for dep in unit.service.depends_on):
            self._spawn(unit)

    def _consider_dependents(self, unit: Unit) -> None:
        for name in self._direct_dependents[unit.name]:
            self._consider(self.units[name])

    def _spawn(self, unit: Unit) -> None:
        service = unit.service
        env = dict(BASE_ENV)
        env.update(service.env)
        try:
            user = _resolve_user(service.user)
            if service.ready == ReadyKind.NOTIFY:
                env["NOTIFY_SOCKET"] = self._notify_path()
            forkable = preload.module_argv(service.binary, service.args) if service.preload else None
            popen: subprocess.Popen[bytes] | preload.ForkedProcess
            if forkable is not None:
                popen = preload.spawn(*forkable, env, service.working_dir, user)
            else:
                popen = subprocess.Popen(
                    service.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd=service.working_dir,
                    start_new_session=True,  # its own process group: stop signals reach all of it
                    close_fds=True,
                    user=None if user is None else user[0],
                    group=None if user is None else user[1],
                    extra_groups=None if user is None else [],
                )
        except (FileNotFoundError, PermissionError, NotADirectoryError, KeyError) as exc:
            reason = _spawn_error(service, exc)
            log.error("%s cannot start: %s", unit.name, reason)
            unit.ready = False
            unit.set_state(State.FAILED, reason)
            self._consider_dependents(unit)
            return
        except OSError as exc:
            log.error("%s failed to spawn: %s", unit.name, exc)
            unit.last_exit = {"error": str(exc)}
            self._after_failure(unit, uptime=0.0)
            return
        unit.popen = popen
        unit.exited = asyncio.Event()
        unit.started_at = time.monotonic()
        unit.ready = False
        unit.set_state(State.STARTING)
        self._by_pid[popen.pid] = unit
        self.mark("spawned", unit.name)
        how = " forked from nulld" if isinstance(popen, preload.ForkedProcess) else ""
        log.info("%s started (pid %d%s)", unit.name, popen.pid, how)
        loop = asyncio.get_running_loop()
        for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            assert pipe is not None
            fd = os.dup(pipe.fileno())
            pipe.close()
            os.set_blocking(fd, False)
            unit.pipes.append(fd)
            loop.add_reader(fd, self._read_output, unit, fd, stream)
        if service.ready == ReadyKind.SPAWN:
            self._became_ready(unit)
            return
        unit.timers.append(loop.call_later(service.ready_timeout, self._ready_timeout, unit, popen.pid))
        if service.ready == ReadyKind.SOCKET:
            assert service.ready_socket is not None
            unit.timers.append(loop.call_soon(self._probe_socket, unit, popen.pid, SOCKET_PROBE_INITIAL))

    def _notify_path(self) -> str:
        """One datagram socket for every notify service; senders are told apart by their kernel-checked pid."""
        if self._notify is None:
            self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
            path = self.runtime_dir / "notify.sock"
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(str(path))
            path.chmod(0o666)  # services of any user may report; only a service's own processes count
            asyncio.get_running_loop().add_reader(sock.fileno(), self._read_notify)
            self._notify = sock
        return str(self.runtime_dir / "notify.sock")

    def _sender(self, pid: int) -> Unit | None:
        """The service a notify datagram came from: its main process, or any process in its process group."""
        unit = self._by_pid.get(pid)
        if unit is None:
            with contextlib.suppress(OSError):
                unit = self._by_pid.get(os.getpgid(pid))
        return unit

    # -------------------------------------------------------------------------------------------- readiness

    def _read_notify(self) -> None:
        assert self._notify is not None
        while True:
            try:
                message, ancillary, _flags, _addr = self._notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("notify socket: %s", exc)
                return
            pid = next(
                (
                    struct.unpack("3i", data[:12])[0]
                    for level, kind, data in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12
                ),
                None,
            )
            unit = None if pid is None else self._sender(pid)
            if unit is None:
                continue  # not from a service we run: ignored
            fields = message.decode("utf-8", "replace").splitlines()
            for item in fields:
                if item.startswith("STATUS="):
                    unit.message = item[len("STATUS=") :][:200]
            if "READY=1" in fields and unit.state == State.STARTING and unit.service.ready == ReadyKind.NOTIFY:
                self._became_ready(unit)

    def _probe_socket(self, unit: Unit, pid: int, delay: float) -> None:
        if unit.state != State.STARTING or unit.pid != pid:
            return
        assert unit.service.ready_socket is not None
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(unit.service.ready_socket)
        except OSError:
            loop = asyncio.get_running_loop()
            unit.timers.append(loop.call_later(delay, self._probe_socket, unit, pid, min(delay * 2, SOCKET_PROBE_MAX)))
            return
        finally:
            probe.close()
        self._became_ready(unit)

    def _became_ready(self, unit: Unit) -> None:
        for timer in unit.timers:
            timer.cancel()
        unit.timers.clear()
        unit.ready = True
        unit.set_state(State.READY, unit.message)  # keeps what the service said with STATUS=
        self.mark("ready", unit.name)
        log.info("%s is ready", unit.name)
        self._consider_dependents(unit)

    def _ready_timeout(self, unit: Unit, pid: int) -> None:
        if unit.state != State.STARTING or unit.pid != pid:
            return
        reason = f"not ready within {unit.service.ready_timeout:g}s"
        log.error("%s %s; killing it", unit.name, reason)
        unit.message = reason
        unit.last_exit = {"reason": reason}
        _signal_group(pid, signal.SIGKILL)

    # ----------------------------------------------------------------------------------------------- output

    def _read_output(self, unit: Unit, fd: int, stream: str) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
            unit.pipes.remove(fd)
            rest = unit.partial.pop(stream, b"")
            if rest:
                self._emit(unit, stream, rest)
            return
        data = unit.partial.pop(stream, b"") + chunk
        *lines, rest = data.split(b"\n")
        for line in lines:
            self._emit(unit, stream, line)
        if len(rest) > MAX_LOG_LINE:
            self._emit(unit, stream, rest)
            rest = b""
        if rest:
            unit.partial[stream] = rest

    def _emit(self, unit: Unit, stream: str, raw: bytes) -> None:
        text = raw[:MAX_LOG_LINE].decode("utf-8", "replace").rstrip("\r")
        line = LogLine(time.time_ns(), stream, text)
        unit.output.append(line)
        for queue in list(unit.followers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(line)
        log.info("[%s] %s", unit.name, text)

    # ------------------------------------------------------------------------------------------------ exits

    def on_exit(self, pid: int, status: int) -> bool:
        """A reaped child.  True when it was a service's main process."""
        unit = self._by_pid.pop(pid, None)
        if unit is None:
            return False
        _signal_group(pid, signal.SIGKILL)  # anything the service left behind in its group goes with it
        for timer in unit.timers:
            timer.cancel()
        unit.timers.clear()
        assert unit.popen is not None
        unit.popen.returncode = os.waitstatus_to_exitcode(status)  # we reaped it; keep Popen consistent
        unit.popen = None
        uptime = time.monotonic() - unit.started_at
        exit_info = _describe_exit(status)
        if unit.last_exit and "reason" in unit.last_exit:
            exit_info["reason"] = unit.last_exit["reason"]
        unit.last_exit = exit_info
        unit.ready = False
        unit.exited.set()
        self.mark("exited", unit.name)
        if unit.state == State.STOPPING or not unit.wanted or self.shutting_down:
            log.info("%s stopped (%s)", unit.name, _exit_text(exit_info))
            unit.set_state(State.STOPPED)
            return True
        clean = exit_info.get("code") == 0 and "reason" not in exit_info
        log.log(
            logging.INFO if clean else logging.WARNING,
            "%s exited (%s) after %.1fs",
            unit.name,
            _exit_text(exit_info),
            uptime,
        )
        restart = unit.service.restart == Restart.ALWAYS or (unit.service.restart == Restart.ON_FAILURE and not clean)
        if restart:
            self._after_failure(unit, uptime)
        elif clean:
            unit.set_state(State.EXITED)
        else:
            unit.set_state(State.FAILED, unit.last_exit.get("reason") or _exit_text(exit_info))
            self._consider_dependents(unit)
        return True

    def _after_failure(self, unit: Unit, uptime: float) -> None:
        delay = unit.backoff.next_delay(uptime)
        unit.set_state(State.BACKOFF, f"restarting in {delay:g}s")
        loop = asyncio.get_running_loop()
        unit.timers.append(loop.call_later(delay, self._restart_now, unit))

    def _restart_now(self, unit: Unit) -> None:
        unit.timers.clear()
        if unit.state != State.BACKOFF or self.shutting_down or not unit.wanted:
            return
        unit.restarts += 1
        unit.set_state(State.WAITING)
        self._consider(unit)

    # --------------------------------------------------------------------------------------- operator verbs

    async def stop(self, name: str) -> Unit:
        unit = self.units[name]
        unit.wanted = False
        for timer in unit.timers:
            timer.cancel()
        unit.timers.clear()
        if unit.popen is None:
            if unit.state not in (State.FAILED, State.EXITED):
                unit.set_state(State.STOPPED)
            return unit
        pid = unit.popen.pid
        exited = unit.exited
        unit.set_state(State.STOPPING)
        _signal_group(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(exited.wait(), unit.service.stop_timeout)
        except TimeoutError:
            log.warning("%s did not stop within %gs; killing it", name, unit.service.stop_timeout)
            _signal_group(pid, signal.SIGKILL)
            await exited.wait()
        return unit

    def start(self, name: str) -> Unit:
        unit = self.units[name]
        unit.wanted = True
        if unit.popen is not None:
            return unit
        for timer in unit.timers:
            timer.cancel()
        unit.timers.clear()
        unit.backoff.reset()
        unit.blocked_by = None
        unit.set_state(State.WAITING)
        self._consider(unit)
        # Services that were blocked by this one may be able to start once it is ready.
        for other in dependents(self._graph, name):
            other_unit = self.units[other]
            if other_unit.state == State.BLOCKED and other_unit.wanted:
                other_unit.set_state(State.WAITING)
        return unit

    async def restart(self, name: str) -> Unit:
        await self.stop(name)
        return self.start(name)

    async def shutdown(self) -> None:
        """Stop everything, dependents before their dependencies; independent services in parallel."""
        self.shutting_down = True
        self.mark("shutdown")
        stopping: dict[str, asyncio.Task[Unit]] = {}

        async def stop_after_dependents(name: str) -> Unit:
            # Each service stops as soon as everything that depends on it has stopped, not a layer later.
            await asyncio.gather(*(stopping[other] for other in dependents(self._graph, name)))
            return await self.stop(name)

        for name in reversed(self.config.order):
            stopping[name] = asyncio.create_task(stop_after_dependents(name))
        await asyncio.gather(*stopping.values())
        if self._notify is not None:
            asyncio.get_running_loop().remove_reader(self._notify.fileno())
            self._notify.close()
            self._notify = None
            (self.runtime_dir / "notify.sock").unlink(missing_ok=True)
        self.mark("stopped")

    def follow(self, name: str) -> asyncio.Queue[LogLine | None]:
        queue: asyncio.Queue[LogLine | None] = asyncio.Queue(RING_LINES)
        self.units[name].followers.add(queue)
        return queue

    def unfollow(self, name: str, queue: asyncio.Queue[LogLine | None]) -> None:
        self.units[name].followers.discard(queue)

    def status(self) -> list[dict[str, Any]]:
        return [u.to_json() for u in self.units.values()]


def _resolve_user(user: str | int | None) -> tuple[int, int] | None:
    """(uid, gid) of a service's user; KeyError names an unknown one."""
    if user is None:
        return None
    if isinstance(user, int):
        try:
            return user, pwd.getpwuid(user).pw_gid
        except KeyError:
            return user, user
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _spawn_error(service: Service, exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"unknown user {service.user!r}"
    if isinstance(exc, FileNotFoundError) and exc.filename == service.working_dir:
        return f"working_dir {service.working_dir} does not exist"
    if isinstance(exc, FileNotFoundError):
        return f"binary {service.binary} not found"
    if isinstance(exc, NotADirectoryError):
        return f"working_dir {service.working_dir} is not a directory"
    return f"binary {service.binary} cannot be executed ({exc.strerror if isinstance(exc, OSError) else exc})"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe_exit(status: int) -> dict[str, Any]:
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name, "at_ns": time.time_ns()}
    return {"code": os.WEXITSTATUS(status), "at_ns": time.time_ns()}


def _exit_text(info: dict[str, Any]) -> str:
    if "signal" in info:
        return f"killed by {info['signal']}"
    return f"exit code {info.get('code')}"
