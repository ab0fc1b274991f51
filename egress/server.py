"""The egress daemon's API socket: wire-protocol ops mapped onto the :class:`~egress.controller.Controller`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from egress import defaults
from egress.controller import Controller
from nullbox import notify
from nullbox.wire import ConnectionTracker, Op, Params, Reply, Request, bind_unix, op_table

log = logging.getLogger("egress")


@dataclass(frozen=True)
class ServerConfig:
    socket: Path = defaults.SOCKET


class EgressServer:
    def __init__(self, config: ServerConfig, controller: Controller) -> None:
        self.config = config
        self.controller = controller
        self._server: asyncio.Server | None = None
        self._ops: dict[str, Op] = {
            "add_agent": self._add_agent,
            "remove_agent": self._remove_agent,
            "update_agent": self._update_agent,
            "list": self._list,
            "status": self._status,
        }
        if controller.config.test_hooks:
            self._ops["test_fail_next"] = self._test_fail_next
        self._connections = ConnectionTracker(op_table(self._ops))

    async def start(self) -> None:
        # The socket first: a second instance fails here, before it could replace the running one's table.
        sock = bind_unix(self.config.socket, 0o600)
        try:
            await self.controller.start()
            self._server = await asyncio.start_unix_server(self._connections.serve, sock=sock)
        except BaseException:
            sock.close()
            self.config.socket.unlink(missing_ok=True)
            raise
        log.info("serving %s", self.config.socket)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._connections.close()
        await self.controller.close()
        self.config.socket.unlink(missing_ok=True)
        log.info("stopped; table %s stays in force", defaults.TABLE)

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; READY only once the base ruleset is in force."""
        await self.start()
        await notify.ready_until_signalled()
        log.info("signal received; shutting down")
        await self.stop()

    # ------------------------------------------------------------------------------------------------- ops

    async def _add_agent(self, request: Request) -> Reply:
        params = Params(request, {"agent", "interface", "allow"})
        allow = request.params.get("allow", [])
        return await self.controller.add_agent(params.raw("agent"), params.raw("interface"), allow)

    async def _remove_agent(self, request: Request) -> Reply:
        params = Params(request, {"agent"})
        return await self.controller.remove_agent(params.raw("agent"))

    async def _update_agent(self, request: Request) -> Reply:
        params = Params(request, {"agent", "allow"})
        return await self.controller.update_agent(params.raw("agent"), params.raw("allow"))

    async def _list(self, request: Request) -> Reply:
        Params(request, set())
        return self.controller.list_agents()

    async def _status(self, request: Request) -> Reply:
        Params(request, {"agent"})
        return await self.controller.status(request.params.get("agent"))

    async def _test_fail_next(self, request: Request) -> Reply:
        Params(request, set())
        return await self.controller.fail_next()
