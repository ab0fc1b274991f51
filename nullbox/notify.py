"""sd_notify readiness: how a service tells its supervisor (nulld, or systemd in development) it is ready.

The protocol is a datagram such as ``READY=1`` sent to the unix socket named by ``$NOTIFY_SOCKET``; a leading
``@`` names an abstract socket.  Without ``$NOTIFY_SOCKET`` this is a no-op, so daemons call it unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

#: How often wait_ready checks that the process it waits for is still alive.
ALIVE_POLL_S: Final = 0.1

log = logging.getLogger("nullbox.notify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the supervisor; True when a supervisor was told."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify the supervisor at %s: %s", target, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={status}")


class ReadinessListener:
    """The supervisor's side: a datagram socket a child names in ``$NOTIFY_SOCKET`` to report readiness."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)

    def __enter__(self) -> ReadinessListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()
        Path(self.path).unlink(missing_ok=True)

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def wait_ready(self, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
        """True once a datagram carrying ``READY=1`` arrives; False after ``timeout`` seconds without one, or as
        soon as ``alive()`` says the process that should send it has gone (checked every ALIVE_POLL_S)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self._sock.settimeout(remaining if alive is None else min(remaining, ALIVE_POLL_S))
            try:
                message = self._sock.recv(4096)
            except TimeoutError:
                if alive is not None and not alive():
                    return False
                continue
            if "READY=1" in message.decode(errors="replace").splitlines():
                return True
        return False


async def ready_until_signalled() -> None:
    """Send READY=1, then return on the first SIGTERM or SIGINT: a daemon's main coroutine between start and stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready()
    await stop.wait()
