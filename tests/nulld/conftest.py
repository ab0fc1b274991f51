"""A real nulld process, run as a child subreaper, with services written as small Python programs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nullbox.daemon import DaemonProcess
from nullbox.wire import Client

PYTHON = sys.executable


class NulldProcess(DaemonProcess):
    name = "nulld"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.config = root / "nulld.toml"
        self.socket = root / "nulld.sock"
        self.runtime = root / "run"
        self.extra: list[str] = []

    def program(self, name: str, source: str) -> str:
        """Write a service program; returns its path."""
        path = self.root / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return str(path)

    def write_config(self, text: str) -> None:
        self.config.write_text(textwrap.dedent(text))

    def argv(self) -> list[str]:
        argv = [PYTHON, "-m", "nulld", "--config", str(self.config), "--socket", str(self.socket)]
        return [*argv, "--runtime-dir", str(self.runtime), *self.extra]

    def start(self, timeout: float = 30) -> NulldProcess:
        try:
            super().start(timeout)
        except RuntimeError:
            raise RuntimeError(f"nulld did not become ready; log:\n{self.log.read_text()}") from None
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
        return self.stop(timeout)


def run_in_namespaces(namespaces: list[str], script: str, *args: str) -> Any:
    """Run a Python snippet in fresh namespaces (e.g. ["--mount", "--propagation", "private"]); its JSON output."""
    result = subprocess.run(
        ["unshare", *namespaces, PYTHON, "-c", script, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def nulld() -> Iterator[NulldProcess]:
    # Short path: unix socket names are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="nd-"))
    proc = NulldProcess(root)
    try:
        yield proc
    finally:
        proc.close()
        shutil.rmtree(root, ignore_errors=True)
