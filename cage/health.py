"""Health checks of agent VMs: AGENT.toml's ``capabilities.health_check``, run by cage from the appliance.

``probe`` is one check: a TCP connect to the guest's address on the agent's private link, and with ``http_path`` an
HTTP/1.0 ``GET`` whose status line must say 2xx, all within the timeout.  It never raises for what the agent does
(refuses, resets, never answers, answers garbage): every outcome is a ``ProbeResult`` with a reason for a person.

``HealthWatch`` runs the checks of one run of a VM as one asyncio task (no thread per agent): the first probe one
interval after the start, one per interval after that.  Failures inside ``start_period_s`` do not count (a guest
boots first), and a success ends the start period early.  After ``retries`` consecutive counted failures the agent
is unhealthy and the watch calls ``on_unhealthy`` once and ends; cage then stops the VM and treats it as a failure
for the restart policy.  A paused VM is frozen, not unhealthy: ``suspend`` stops probing and ``resume`` starts
over with a fresh start period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from cage.manifest import HealthCheck


log = logging.getLogger("cage.health")

MAX_STATUS_LINE: Final = 1024
"""Longer than any real status line; a peer that sends more without a line end is not speaking HTTP."""
_STATUS_LINE: Final = re.compile(r"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: [^\r\n]*)?")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # "HTTP 200", "connection refused", "no answer within 2 s", ...


async def probe(host: str, port: int, http_path: str | None, timeout_s: float) -> ProbeResult:
    """One health check of ``host:port``; the whole exchange (connect, request, status line) within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _exchange(host, port, http_path)
    except TimeoutError:
        return ProbeResult(False, f"no answer within {timeout_s:g} s")
    except OSError as exc:  # asyncio's connect errors carry errno but a strerror of its own making
        return ProbeResult(False, (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__).lower())


async def _exchange(host: str, port: int, http_path: str | None) -> ProbeResult:
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_STATUS_LINE)
    try:
        if http_path is None:
            return ProbeResult(True, "TCP connect")
        request = f"GET {http_path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: nullbox-cage\r\n\r\n"
        writer.write(request.encode("ascii"))  # http_path is printable ASCII (the manifest checks it)
        await writer.drain()
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return ProbeResult(False, "the connection closed without an answer")
            line = exc.partial
        except asyncio.LimitOverrunError:
            return ProbeResult(False, f"no HTTP status line in the first {MAX_STATUS_LINE} bytes")
        return parse_status_line(line)
    finally:
        writer.close()  # not awaited: a peer that never reads must not hold the probe beyond its timeout


def parse_status_line(line: bytes) -> ProbeResult:
    """``HTTP/1.x 2xx ...`` is healthy; another status or anything else is a failure naming what came back."""
    text = line.decode("latin-1").rstrip("\r\n")
    match = _STATUS_LINE.fullmatch(text)
    if match is None:
        shown = text[:60].encode("unicode_escape").decode("ascii")
        return ProbeResult(False, f"not an HTTP status line: '{shown}'")
    status = int(match[1])
    return ProbeResult(200 <= status < 300, f"HTTP {status}")


Prober = Callable[[str, int, str | None, float], Awaitable[ProbeResult]]


@dataclass
class Health:
    """What ``status`` shows of an agent's health."""

    state: str = "starting"  # starting | healthy | unhealthy | paused
    failures: int = 0  # consecutive counted failures
    last: str | None = None  # the last probe's outcome
    checked_at: float | None = None  # wall clock of the last probe

    def to_json(self) -> dict[str, Any]:
        at = self.checked_at
        checked = None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")
        return {"state": self.state, "failures": self.failures, "last": self.last, "checked_at": checked}


class HealthWatch:
    """The checks of one run of an agent's VM (module docstring); ``on_unhealthy(reason)`` is called at most once."""

    def __init__(
        self, check: HealthCheck, host: str, on_unhealthy: Callable[[str], None], *, prober: Prober = probe
    ) -> None:
        self.check = check
        self.host = host
        self.health = Health()
        self._on_unhealthy = on_unhealthy
        self._prober = prober
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing with a fresh start period (also after ``suspend``)."""
        self._cancel()
        self.health.state, self.health.failures = "starting", 0
        self._task = asyncio.ensure_future(self._run())

    def suspend(self) -> None:
        """Stop probing while the VM is frozen; a probe in flight is abandoned and counts for nothing (and a verdict
        cage has not acted on yet is dropped: cage does not stop a paused VM)."""
        self._cancel()
        self.health.state = "paused"

    def resume(self) -> None:
        if self.health.state == "paused":
            self.start()

    def close(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _run(self) -> None:
        check, health = self.check, self.health
        loop = asyncio.get_running_loop()
        grace_until = loop.time() + check.start_period_s
        next_at = loop.time() + check.interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at + check.interval_s, loop.time())
            result = await self._prober(self.host, check.port, check.http_path, float(check.timeout_s))
            health.last, health.checked_at = result.detail, time.time()
            if result.ok:
                health.state, health.failures = "healthy", 0
                continue
            if health.state == "starting" and loop.time() < grace_until:
                continue  # still booting: a failure in the start period does not count
            health.failures += 1
            if health.failures >= check.retries:
                health.state = "unhealthy"
                self._task = None
                try:
                    self._on_unhealthy(f"{health.failures} health checks failed in a row, last: {result.detail}")
                except Exception:
                    log.exception("health check of %s: the unhealthy handler failed", self.host)
                return
