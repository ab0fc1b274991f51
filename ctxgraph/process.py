"""Run a ctxgraph daemon as a child process, the way a supervisor does: argv, readiness, SIGTERM, SIGKILL.

Used by the demo, the tests and the benchmark so that all of them exercise the real daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ctxgraph.client import CtxClient
from nullbox.notify import ReadinessListener


class ServerProcess:
    """A ctxgraph daemon rooted in ``root``: database, admin socket and agent sockets all live there."""

    def __init__(self, root: Path, *, vsock_port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.db = root / "ctxgraph.db"
        self.socket = root / "ctxgraph.sock"
        self.agents_dir = root / "agents"
        self.vsock_port = vsock_port
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "ctxgraph.log"

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def agent_address(self, agent: str) -> str:
        return f"unix:{self.agents_dir / (agent + '.sock')}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "ctxgraph", "serve", "--db", str(self.db), "--socket", str(self.socket)]
        argv += ["--agents-dir", str(self.agents_dir)]
        if self.vsock_port is not None:
            argv += ["--vsock-port", str(self.vsock_port)]
        return argv

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with ReadinessListener(str(notify_path)) as ready, self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), env={**os.environ, **self.env, **ready.env()}, stdout=log, stderr=log
            )
            if not ready.wait_ready(timeout):
                self.kill()
                raise RuntimeError(f"ctxgraph did not become ready within {timeout}s; see {self.log}")
        return self

    def client(self, agent: str | None = None, timeout: float | None = 30.0) -> CtxClient:
        return CtxClient(self.address if agent is None else self.agent_address(agent), timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the daemon's clean shutdown path.  Returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: what a crash or a power cut looks like to the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            try:
                self.stop(10)
            except subprocess.TimeoutExpired:
                self.kill()
