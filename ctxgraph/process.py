"""A ctxgraph daemon as a child process (for the demo, the tests and the benchmark)."""

from __future__ import annotations

import sys
from pathlib import Path

from ctxgraph.client import CtxClient
from nullbox.daemon import DaemonProcess


class ServerProcess(DaemonProcess):
    """A ctxgraph daemon rooted in ``root``: database, admin socket and agent sockets all live there."""

    name = "ctxgraph"

    def __init__(self, root: Path, *, vsock_port: int | None = None, env: dict[str, str] | None = None) -> None:
        super().__init__(root, env=env)
        self.db = root / "ctxgraph.db"
        self.socket = root / "ctxgraph.sock"
        self.agents_dir = root / "agents"
        self.vsock_port = vsock_port

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def agent_address(self, agent: str) -> str:
        return f"unix:{self.agents_dir / (agent + '.sock')}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "ctxgraph", "serve", "--db", str(self.db), "--socket", str(self.socket)]
        argv += ["--agents-dir", str(self.agents_dir)]
        if self.vsock_port is not None:
            argv += ["--vsock-port", str(self.vsock_port)]
        return argv

    def start(self, timeout: float = 30.0) -> ServerProcess:
        super().start(timeout)
        return self

    def client(self, agent: str | None = None, timeout: float | None = 30.0) -> CtxClient:
        return CtxClient(self.address if agent is None else self.agent_address(agent), timeout=timeout)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
