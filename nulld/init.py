"""nulld's main: PID 1 (or a child subreaper in development), signals, the control API, shutdown.

PID 1 must never exit: an exception in the main coroutine puts nulld in *degraded* mode, where it still reaps
children, still serves the control socket and still shuts down on request.  Signals:

| signal  | as PID 1                         | as subreaper            |
|---------|----------------------------------|-------------------------|
| SIGCHLD | reap every child, orphans too    | same                    |
| SIGTERM, SIGUSR2 | stop services, power off | stop services, exit 0  |
| SIGINT (Ctrl-Alt-Del), SIGHUP | stop services, reboot | stop services, exit 0 |
| SIGUSR1 | stop services, halt              | stop services, exit 0   |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from nullbox import notify
from nullbox.wire import (
    VSOCK_CID_HOST,
    Connection,
    ErrorCode,
    Params,
    Reply,
    Request,
    Stream,
    WireError,
    bind_unix,
    bind_vsock,
    invalid,
    serve_connection,
)
from nulld import config as config_module
from nulld import frontdoor, mount, serialport, syscalls, sysinit
from nulld.config import Config, ConfigError
from nulld.power import PowerAction, power_down
from nulld.supervise import Supervisor

log = logging.getLogger("nulld")

DEFAULT_SOCKET: Final = Path("/run/nulld.sock")
DEFAULT_RUNTIME_DIR: Final = Path("/run/nulld")
TEST_HOOKS_ENV: Final = "NULLD_TEST_HOOKS"
BOOT_WARNINGS: Final = Path("/run/nullbox/boot-warnings")

SIGNAL_ACTIONS: Final = {
    signal.SIGTERM: PowerAction.POWEROFF,
    signal.SIGUSR2: PowerAction.POWEROFF,
    signal.SIGINT: PowerAction.REBOOT,
    signal.SIGHUP: PowerAction.REBOOT,
    signal.SIGUSR1: PowerAction.HALT,
}


#: The control API's vsock port (ARCHITECTURE.md: the host reaches nulld on vsock port 1024).
VSOCK_PORT: Final = 1024


@dataclass(frozen=True)
class Options:
    config: Path = config_module.DEFAULT_PATH
    socket: Path = DEFAULT_SOCKET
    runtime_dir: Path = DEFAULT_RUNTIME_DIR
    pid1: bool = False
    mounts: bool = True
    fallback: Path | None = None  # the built-in service set comes from here instead of the embedded one
    routes: Mapping[str, Path] = field(default_factory=lambda: dict(frontdoor.ROUTES))
    started: float | None = None  # monotonic time nulld's entry point began (default: now)
    imported: float | None = None  # monotonic time its imports were done (boot timings show the split)
    vsock_port: int | None = None  # the control API on AF_VSOCK too, for the host only (see _start_vsock)


class Nulld:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.started = time.monotonic() if options.started is None else options.started
        self.config: Config | None = None
        self.supervisor: Supervisor | None = None
        self.degraded: str | None = None
        self.power: asyncio.Future[PowerAction] | None = None
        self._fault: asyncio.Event | None = None
        self._control: asyncio.AbstractServer | None = None
        self._vsock: asyncio.AbstractServer | None = None
        self._boot_notes: list[str] = []
        self._serial: asyncio.Task[None] | None = None
        self.test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
        self._ops = {
            "status": self._status,
            "start": self._start,
            "stop": self._stop,
            "restart": self._restart,
            "logs": self._logs,
            "timings": self._timings,
            "poweroff": self._poweroff,
            "reboot": self._reboot,
        }
        if self.test_hooks:
            self._ops["test_fault"] = self._test_fault

    # ---------------------------------------------------------------------------------------------- the loop

    async def run(self) -> PowerAction:
        """Boot, supervise until a power request, stop everything; returns what was requested."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_log_loop_exception)
        self.power = loop.create_future()
        self._fault = asyncio.Event()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        for sig, action in SIGNAL_ACTIONS.items():
            loop.add_signal_handler(sig, self.request_power, action)
        try:
            await self._boot()
            await self._supervise()
        except Exception as exc:
            if isinstance(exc, ConfigError) and not self.options.pid1:
                raise  # in development a broken config is the developer's to fix: exit 2
            self.degraded = f"{type(exc).__name__}: {exc}"
            log.exception("nulld's main loop failed; running degraded (still reaping, still serving control)")
        action = await self.power
        log.info("%s requested; stopping services", action)
        if self.supervisor is not None:
            try:
                await self.supervisor.shutdown()
            except Exception:
                log.exception("ordered shutdown failed")
        self.reap()
        if self._control is not None:
            self._control.close()
            self.options.socket.unlink(missing_ok=True)
        if self._vsock is not None:
            self._vsock.close()
        return action

    async def _supervise(self) -> None:
        """Everything happens in callbacks; the main coroutine only waits for the end (or a test fault)."""
        assert self.power is not None and self._fault is not None
        fault: asyncio.Future[Any] = asyncio.ensure_future(self._fault.wait())
        power: asyncio.Future[Any] = self.power
        await asyncio.wait([power, fault], return_when=asyncio.FIRST_COMPLETED)
        fault.cancel()
        if self._fault.is_set() and not self.power.done():
            raise RuntimeError("fault injected into the main loop (test hook)")

    async def _boot(self) -> None:
        origin = self.started
        if self.options.pid1:
            if self.options.mounts:
                done = mount.mount_all()
                sysinit.unlimit_kmsg()
                self._boot_notes.append(f"mounted {', '.join(done) or 'nothing (all present)'}")
                enabled = mount.enable_cgroup_controllers()
                self._boot_notes.append(f"cgroup controllers: {' '.join(enabled) or 'none'}")
            with contextlib.suppress(OSError):
                syscalls.reboot(syscalls.RB_DISABLE_CAD)  # Ctrl-Alt-Del becomes SIGINT to us
            sysinit.loopback_up()
        else:
            syscalls.set_child_subreaper()
        mounts_done = time.monotonic()
        await self._start_control()  # first: whatever happens next, the control socket is there
        await self._start_vsock()
        port = serialport.find_port()
        if port is not None:
            self._serial = asyncio.create_task(self._serve_serial(port))
        control_ready = time.monotonic()
        self._boot_notes += _boot_warnings()
        self.config = self._load_config()
        if self.options.pid1:
            sysinit.set_hostname(self.config.hostname)
        self.supervisor = Supervisor(self.config, self.options.runtime_dir, origin=origin)
        if self.options.imported is not None:
            self.supervisor.mark("imports_done", at=self.options.imported)
        self.supervisor.mark("mounts_done", at=mounts_done)
        self.supervisor.mark("control_ready", at=control_ready)
        self.supervisor.start_all()
        notify.ready()

    def _load_config(self) -> Config:
        try:
            return config_module.load(self.options.config)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                log.error("%s", line)
            if not self.options.pid1:
                raise
            log.error("booting the built-in service set instead")
            if self.options.fallback is not None:
                fallback = config_module.load(self.options.fallback)
                return Config(
                    fallback.services, fallback.order, fallback.hostname, fallback.source, tuple(str(exc).splitlines())
                )
            return config_module.builtin(str(exc).splitlines())

    async def _start_control(self) -> None:
        self.options.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o711)  # services reach notify.sock
        sock = bind_unix(self.options.socket, 0o600)
        self._control = await asyncio.start_unix_server(
            lambda r, w: serve_connection(r, w, self._handle, None), sock=sock
        )

    async def _start_vsock(self) -> None:
        """The control API on vsock port ``vsock_port``, when the VM has a vsock device (vhost-vsock on the host).

        Only the host may use it (peer CID 2): were agent VMs ever given vsock inside the appliance, their
        connections (CID 3 and up) would reach this port too, and nulld's API is the operator's, not theirs."""
        if self.options.vsock_port is None:
            return
        try:
            sock = bind_vsock(self.options.vsock_port)
        except OSError as exc:
            port = self.options.vsock_port
            log.info("no vsock control port %d (%s): the control socket and serial port serve", port, exc)
            return
        self._vsock = await asyncio.start_server(self._serve_vsock, sock=sock)
        log.info("control API on vsock port %d (host only)", self.options.vsock_port)

    async def _serve_vsock(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        cid = peer[0] if isinstance(peer, tuple) and peer else None
        if cid != VSOCK_CID_HOST:
            log.warning("refused a vsock control connection from CID %s: only the host (CID 2) may use it", cid)
            writer.close()
            return
        await serve_connection(reader, writer, self._handle, None)

    async def _serve_serial(self, port: Path) -> None:
        try:
            await serialport.serve_port(port, self._handle)
        except Exception:
            log.exception("the control API on %s stopped", port)

    def reap(self) -> None:
        """SIGCHLD: collect every exited child, ours or orphaned, until none is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.supervisor is not None:
                try:
                    self.supervisor.on_exit(pid, status)
                except Exception:
                    log.exception("handling the exit of pid %d failed", pid)

    def request_power(self, action: PowerAction) -> None:
        if self.power is not None and not self.power.done():
            self.power.set_result(action)

    # ----------------------------------------------------------------------------------------- control API

    async def _handle(self, request: Request, conn: Connection[None]) -> Reply:
        target = frontdoor.route(request.op, self.options.routes)
        if target is not None:
            return await frontdoor.forward(request, *target)
        op = self._ops.get(request.op)
        if op is None:
            raise invalid(f"unknown op {request.op!r}; known: {', '.join(sorted(self._ops))}")
        return await op(request)

    def _service(self, params: Params) -> str:
        name = params.string("service")
        if self.supervisor is None or name not in self.supervisor.units:
            raise WireError(ErrorCode.NOT_FOUND, f"no service named {name!r}")
        return name

    def _supervisor(self) -> Supervisor:
        if self.supervisor is None:
            raise WireError(ErrorCode.UNAVAILABLE, "nulld has not loaded its services")
        return self.supervisor

    async def _status(self, request: Request) -> Reply:
        Params(request, set())
        config = self.config
        return {
            "nulld": {
                "pid": os.getpid(),
                "mode": "pid1" if self.options.pid1 else "subreaper",
                "uptime_s": round(time.monotonic() - self.started, 3),
                "degraded": self.degraded,
                "config": None if config is None else config.source,
                "config_errors": [] if config is None else list(config.errors),
                "boot": self._boot_notes,
                "root_readonly": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
                "shutting_down": self.power is not None and self.power.done(),
            },
            "services": [] if self.supervisor is None else self.supervisor.status(),
        }

    async def _start(self, request: Request) -> Reply:
        name = self._service(Params(request, {"service"}))
        return {"service": self._supervisor().start(name).to_json()}

    async def _stop(self, request: Request) -> Reply:
        name = self._service(Params(request, {"service"}))
        return {"service": (await self._supervisor().stop(name)).to_json()}

    async def _restart(self, request: Request) -> Reply:
        name = self._service(Params(request, {"service"}))
        return {"service": (await self._supervisor().restart(name)).to_json()}

    async def _logs(self, request: Request) -> Reply:
        params = Params(request, {"service", "lines", "follow"})
        name = self._service(params)
        lines = params.integer("lines", 100, minimum=0, maximum=1000)
        follow = params.raw("follow") if "follow" in request.params else False
        if not isinstance(follow, bool):
            raise invalid("'follow' must be true or false")
        supervisor = self._supervisor()
        backlog = list(supervisor.units[name].output)[-lines:] if lines else []
        if not follow:
            return {"service": name, "lines": [line.to_json() for line in backlog]}
        queue = supervisor.follow(name)

        async def events() -> Any:
            for old in backlog:
                yield old.to_json()
            while (new := await queue.get()) is not None:
                yield new.to_json()

        return Stream(events(), on_close=lambda: supervisor.unfollow(name, queue))

    async def _timings(self, request: Request) -> Reply:
        Params(request, set())
        supervisor = self._supervisor()
        return {"events": [t.to_json(supervisor.origin) for t in supervisor.timings]}

    async def _poweroff(self, request: Request) -> Reply:
        Params(request, set())
        asyncio.get_running_loop().call_soon(self.request_power, PowerAction.POWEROFF)
        return {"accepted": "poweroff"}

    async def _reboot(self, request: Request) -> Reply:
        Params(request, set())
        asyncio.get_running_loop().call_soon(self.request_power, PowerAction.REBOOT)
        return {"accepted": "reboot"}

    async def _test_fault(self, request: Request) -> Reply:
        """Test-only (NULLD_TEST_HOOKS=1): make the main loop or a loop callback raise."""
        where = Params(request, {"where"}).string("where")
        if where == "main":
            assert self._fault is not None
            self._fault.set()
        elif where == "callback":
            asyncio.get_running_loop().call_soon(_raise_injected)
        else:
            raise invalid("'where' must be 'main' or 'callback'")
        return {"injected": where}


def _boot_warnings(path: Path = BOOT_WARNINGS) -> list[str]:
    """What the initramfs had to warn about (e.g. /var on tmpfs), for `status`."""
    try:
        return [f"warning: {line}" for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _raise_injected() -> None:
    raise RuntimeError("fault injected into a loop callback (test hook)")


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    log.error("unhandled error in the event loop: %s", context.get("message"), exc_info=exc)


def run_forever(options: Options) -> int:
    """The process entry: as PID 1 never returns; otherwise returns the exit status."""
    while True:
        try:
            action = asyncio.run(Nulld(options).run())
        except ConfigError:
            return 2
        except BaseException:
            log.exception("nulld crashed")
            if not options.pid1:
                return 1
            time.sleep(1)  # PID 1 never exits: start over (services are gone with the old loop's children)
            continue
        if not options.pid1:
            return 0
        power_down(action, unmount=options.mounts)
        # reboot(2) failed: stay alive, reaping, so the kernel does not panic; sleep until a child exits.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                signal.pause()
