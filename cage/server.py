"""cage's API socket (``/run/nullbox/cage.sock``): wire-protocol ops mapped onto :class:`cage.runtime.Cage`.

Ops (docs/cage.md has examples): apply, remove, list, show, start, stop, pause, resume, status, logs (``follow``
streams), secret_set, secret_list, secret_grant, secret_revoke, secret_remove, approve; with ``CAGE_TEST_HOOKS=1``
also test_fail_next.  Request parameters are never logged (``secret_set`` carries a value).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from cage import defaults
from cage.runtime import STEPS, Cage, agent_name, follow_lines
from nullbox import notify
from nullbox.wire import (
    ConnectionTracker,
    ErrorCode,
    Op,
    Params,
    Reply,
    Request,
    Stream,
    WireError,
    bind_unix,
    invalid,
    op_table,
)

log = logging.getLogger("cage")


class CageServer:
    def __init__(self, cage: Cage) -> None:
        self.cage = cage
        self.socket = cage.paths.socket
        self._server: asyncio.Server | None = None
        self._ops: dict[str, Op] = {
            "apply": self._apply,
            "remove": self._remove,
            "list": self._list,
            "show": self._show,
            "start": self._start,
            "stop": self._stop,
            "pause": self._pause,
            "resume": self._resume,
            "status": self._status,
            "logs": self._logs,
            "secret_set": self._secret_set,
            "secret_list": self._secret_list,
            "secret_grant": self._secret_grant,
            "secret_revoke": self._secret_revoke,
            "secret_remove": self._secret_remove,
            "approve": self._approve,
        }
        if cage.test_hooks:
            self._ops["test_fail_next"] = self._test_fail_next
        self._connections = ConnectionTracker(op_table(self._ops))

    # --- lifecycle ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop every agent's VM."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sock = bind_unix(self.socket, 0o600)  # first: a second cage fails here, before touching VMs or TAPs
        try:
            await self.cage.prepare()
            self._server = await asyncio.start_unix_server(self._connections.serve, sock=sock)
        except BaseException:
            sock.close()
            self.socket.unlink(missing_ok=True)
            raise
        log.info("serving %s", self.socket)
        notify.ready()
        self.cage.autostart()
        await stop.wait()
        log.info("signal received; stopping every agent")
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.cage.shutdown()
        await self._connections.close()
        self.socket.unlink(missing_ok=True)
        log.info("stopped")

    # --- agents ---------------------------------------------------------------------------------------------------

    async def _apply(self, request: Request) -> Reply:
        params = Params(request, {"name", "manifest", "path", "rootfs"})
        name = params.optional_string("name")
        if name is not None:
            agent_name(name)
        text = params.optional_string("manifest")
        path = _abs_path(params, "path")
        rootfs = _abs_path(params, "rootfs")
        if (text is None) == (path is None):
            raise invalid("'apply' needs exactly one of 'path' (an agent directory on the appliance) or 'manifest'")
        manifest = text.encode("utf-8", "surrogatepass") if text is not None else None
        return await self.cage.apply(path=path, manifest=manifest, rootfs=rootfs, name=name)

    async def _remove(self, request: Request) -> Reply:
        return await self.cage.remove(_agent(request))

    async def _list(self, request: Request) -> Reply:
        Params(request, set())
        agents = []
        for installed in await asyncio.to_thread(self.cage.store.list):
            status = self.cage.status_of(installed.name)
            agents.append(
                {
                    "name": installed.name,
                    "version": installed.manifest.agent.version if installed.manifest else None,
                    "ok": installed.ok,
                    "state": status["state"],
                    "manifest_sha256": installed.manifest_sha256,
                    "installed_at": installed.installed_at,
                }
            )
        return {"agents": agents}

    async def _show(self, request: Request) -> Reply:
        name = _agent(request)
        installed = await asyncio.to_thread(self.cage.installed, name)
        info = installed.to_json()
        if installed.manifest is not None:
            policy = self.cage.policy
            approval = await asyncio.to_thread(policy.approval, name)
            info["policy"] = {
                "max_tool_risk": str(policy.max_tool_risk),
                "tools_above_limit": [
                    {"tool": tool, "risk": str(risk)} for tool, risk in policy.above_limit(installed.manifest.tools)
                ],
                "approval": approval.to_json() if approval is not None else None,
            }
        return {"agent": info, "status": self.cage.status_of(name)}

    async def _start(self, request: Request) -> Reply:
        return {"agent": await self.cage.start(_agent(request))}

    async def _stop(self, request: Request) -> Reply:
        return {"agent": await self.cage.stop(_agent(request))}

    async def _pause(self, request: Request) -> Reply:
        return {"agent": await self.cage.pause(_agent(request))}

    async def _resume(self, request: Request) -> Reply:
        return {"agent": await self.cage.resume(_agent(request))}

    async def _status(self, request: Request) -> Reply:
        params = Params(request, {"agent"})
        name = params.optional_string("agent")
        if name is None:
            return await self.cage.overview()
        agent_name(name)
        if name not in self.cage.runtimes:
            await asyncio.to_thread(self.cage.installed, name)  # not_found for an unknown agent
        return {"agent": self.cage.status_of(name)}

    async def _logs(self, request: Request) -> Reply:
        params = Params(request, {"agent", "lines", "follow"})
        name = agent_name(params.raw("agent"))
        lines = params.integer("lines", defaults.LOG_LINES, minimum=0, maximum=defaults.LOG_LINES_MAX)
        follow = request.params.get("follow", False)
        if not isinstance(follow, bool):
            raise invalid("'follow' must be true or false")
        if name not in self.cage.runtimes:
            await asyncio.to_thread(self.cage.installed, name)
        console = self.cage.runtime(name).console
        backlog = await asyncio.to_thread(console.tail, lines)
        if not follow:
            return {"agent": name, "lines": backlog}
        return Stream(follow_lines(console, backlog))

    # --- vault and policy -----------------------------------------------------------------------------------------

    async def _secret_set(self, request: Request) -> Reply:
        params = Params(request, {"name", "value"})
        name = params.string("name")
        value = params.raw("value")
        if not isinstance(value, str):
            raise invalid("'value' must be a string")
        info = await asyncio.to_thread(self.cage.vault.set, name, value)
        return {"secret": info.to_json()}

    async def _secret_list(self, request: Request) -> Reply:
        Params(request, set())
        infos = await asyncio.to_thread(self.cage.vault.list)
        return {"secrets": [info.to_json() for info in infos]}

    async def _secret_grant(self, request: Request) -> Reply:
        params = Params(request, {"name", "agent"})
        name, agent = params.string("name"), params.string("agent")
        granted = await asyncio.to_thread(self.cage.vault.grant, name, agent)
        return {"name": name, "agent": agent, "granted": granted}

    async def _secret_revoke(self, request: Request) -> Reply:
        params = Params(request, {"name", "agent"})
        name, agent = params.string("name"), params.string("agent")
        revoked = await asyncio.to_thread(self.cage.vault.revoke, name, agent)
        return {"name": name, "agent": agent, "revoked": revoked}

    async def _secret_remove(self, request: Request) -> Reply:
        name = Params(request, {"name"}).string("name")
        await asyncio.to_thread(self.cage.vault.remove, name)
        return {"name": name, "removed": True}

    async def _approve(self, request: Request) -> Reply:
        params = Params(request, {"agent", "manifest_sha256"})
        name = agent_name(params.raw("agent"))
        expected = params.optional_string("manifest_sha256")
        installed = await asyncio.to_thread(self.cage.installed, name)
        if installed.manifest_sha256 is None:
            raise WireError(ErrorCode.INVALID_REQUEST, f"agent {name}: its manifest cannot be read")
        if expected is not None and expected != installed.manifest_sha256:
            raise WireError(
                ErrorCode.CONFLICT,
                f"agent {name}'s installed manifest is {installed.manifest_sha256[:12]}..., not {expected[:12]}...; "
                "look at the installed one before approving it",
            )
        approval = await asyncio.to_thread(self.cage.policy.approve, name, installed.manifest_sha256)
        return {"approval": approval.to_json()}

    async def _test_fail_next(self, request: Request) -> Reply:
        step = Params(request, {"step"}).string("step")
        if step not in STEPS:
            raise invalid(f"'step' must be one of {', '.join(STEPS)}")
        self.cage.fail_next = step
        return {"step": step}


def _agent(request: Request) -> str:
    return agent_name(Params(request, {"agent"}).raw("agent"))


def _abs_path(params: Params, name: str) -> Path | None:
    text = params.optional_string(name)
    if text is None:
        return None
    if not text.startswith("/") or "\0" in text:
        raise invalid(f"'{name}' must be an absolute path on the appliance")
    return Path(text)
