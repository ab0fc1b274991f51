"""The appliance, built once per test run (the build caches by inputs) and booted under QEMU for real."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nullbox.wire import Client, WireError

REPO = Path(__file__).resolve().parents[2]
BOOT_DEADLINE = 240.0  # seconds from QEMU start to nulld answering, under TCG on a busy 2-core machine


class Appliance:
    """One QEMU boot of the appliance, driven through the host side of its virtio-serial control port."""

    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.log = state / "console.log"
        argv = [str(REPO / "qemu" / "run"), "--state", str(state), "--log", str(self.log), "--timeout", "900", *args]
        # Its own session: qemu/run and the QEMU it starts are one process group, killed together in close().
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def socket(self) -> Path:
        return self.state / "ctl.sock"

    def console(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def call(self, op: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        with Client(f"serial:{self.socket}", timeout=timeout) as client:  # the VM's control port
            return client.call(op, **params)

    def wait_for_nulld(self, deadline: float = BOOT_DEADLINE, newer_than: float | None = None) -> dict[str, Any]:
        """Status once nulld answers (and, after a reboot, once it is a new boot: uptime below ``newer_than``)."""
        end = time.monotonic() + deadline
        last_error = "no attempt"
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}); console:\n{self.console()[-4000:]}")
            try:
                status = self.call("status", timeout=5)
            except (OSError, WireError, ValueError) as exc:
                last_error = repr(exc)
                time.sleep(1)
                continue
            if newer_than is None or status["nulld"]["uptime_s"] < newer_than:
                return status
            time.sleep(1)
        raise AssertionError(f"nulld never answered ({last_error}); console:\n{self.console()[-4000:]}")

    def wait_exit(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # QEMU too, even when qemu/run itself has exited
        self.proc.wait()


@pytest.fixture
def boot_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbe2e-"))  # short: unix socket paths are limited to 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)
