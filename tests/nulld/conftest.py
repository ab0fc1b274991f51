"""A real nulld process, run as a child subreaper, with services written as small Python programs."""

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
from pathlib import Path
from typing import Any

import pytest

from nullbox.notify import ReadinessListener
from nullbox.wire import Client

PYTHON = sys.executable


class NulldProcess:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "nulld.toml"
        self.socket = root / "nulld.sock"
        self.runtime = root / "run"
        self.log = root / "nulld.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def program(self, name: str, source: str) -> str:
        """Write a service program; returns its path."""
        path = self.root / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return str(path)

    def write_config(self, text: str) -> None:
        self.config.write_text(textwrap.dedent(text))

    def start(self, *extra: str, env: dict[str, str] | None = None, timeout: float = 30) -> NulldProcess:
        argv = [PYTHON, "-m", "nulld", "--config", str(self.config), "--socket", str(self.socket)]
        argv += ["--runtime-dir", str(self.runtime), *extra]
        with ReadinessListener(str(self.root / "notify.sock")) as ready, self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env={**os.environ, **(env or {}), **ready.env()}, stdout=log, stderr=log)
            if not ready.wait_ready(timeout):
                self.kill()
                raise RuntimeError(f"nulld did not become ready; log:\n{self.log.read_text()}")
        return self

    def client(self) -> Client:
        return Client(f"unix:{self.socket}", timeout=30)

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        with self.client() as client:
            return client.call(op, **params)

    def service(self, name: str) -> dict[str, Any]:
        services: dict[str, dict[str, Any]] = {s["name"]: s for s in self.call("status")["services"]}
        return services[name]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; nulld log:\n{self.log.read_text()[-3000:]}")

    def wait_state(self, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
        self.wait_for(lambda: self.service(name)["state"] == state, timeout, f"{name} to be {state}")
        return self.service(name)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nulld() -> Iterator[NulldProcess]:
    # Short path: unix socket names are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="nd-"))
    proc = NulldProcess(root)
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            try:
                proc.terminate(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
