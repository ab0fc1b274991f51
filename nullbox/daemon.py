"""Run a NullBox daemon as a child process the way a supervisor does: argv, sd_notify readiness, SIGTERM, SIGKILL.

The demo, the tests and the benchmarks start every daemon through this, so they exercise the real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from nullbox.notify import ReadinessListener


class DaemonProcess:
    """A daemon whose files live under ``root``; subclasses say how to start it in :meth:`argv`."""

    name = "daemon"

    def __init__(self, root: Path, *, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = env or {}
        self.log = root / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        """Start it and wait for its READY=1; its stdout and stderr go to ``self.log``."""
        self.root.mkdir(parents=True, exist_ok=True)
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with ReadinessListener(str(notify_path)) as ready, self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), env={**os.environ, **self.env, **ready.env()}, stdout=log, stderr=log
            )
            proc = self.proc
            if not ready.wait_ready(timeout, alive=lambda: proc.poll() is None):
                status = proc.poll()
                self.kill()
                if status is not None:
                    raise RuntimeError(f"{self.name} exited with status {status} before it was ready; see {self.log}")
                raise RuntimeError(f"{self.name} did not become ready within {timeout}s; see {self.log}")
        return self

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

    def close(self) -> None:
        """Stop it if it still runs: cleanly when it can, by force when it will not."""
        if self.alive():
            try:
                self.stop(10)
            except subprocess.TimeoutExpired:
                self.kill()
