"""nulld's control API on the virtio-serial port ``org.nullbox.ctl``: the host's way in without a network.

One request stream at a time (a serial port has one peer).  Event-driven like the rest of nulld: while no
host is connected the port reports POLLHUP, and virtio_console sends SIGIO when the host side opens, so
nulld sleeps until then instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import signal
from pathlib import Path
from typing import Any, Final

from nullbox.wire import Handler, serve_connection

log = logging.getLogger("nulld")

PORT_NAME: Final = "org.nullbox.ctl"
SYSFS_PORTS: Final = Path("/sys/class/virtio-ports")


def find_port(name: str = PORT_NAME, sysfs: Path = SYSFS_PORTS, dev: Path = Path("/dev")) -> Path | None:
    """The device of a named virtio-serial port.  No udev on the appliance, so no /dev/virtio-ports/ links:
    the name is read from sysfs."""
    try:
        ports = sorted(sysfs.iterdir())
    except OSError:
        return None
    for port in ports:
        with contextlib.suppress(OSError):
            if (port / "name").read_text().strip() == name:
                return dev / port.name
    return None


def _host_connected(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return not any(events & select.POLLHUP for _, events in poller.poll(0))


async def serve_port(path: Path, handler: Handler[Any]) -> None:
    """Serve the protocol on the port forever, one host connection after another."""
    loop = asyncio.get_running_loop()
    host_changed = asyncio.Event()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        loop.add_signal_handler(signal.SIGIO, host_changed.set)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        log.info("control API on %s (%s)", path, PORT_NAME)
        while True:
            host_changed.clear()
            if not _host_connected(fd):
                await host_changed.wait()
                continue
            await _serve_once(fd, handler)
    finally:
        loop.remove_signal_handler(signal.SIGIO)
        os.close(fd)


async def _serve_once(fd: int, handler: Handler[Any]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**21)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    write_transport, write_protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(os.dup(fd), "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(write_transport, write_protocol, reader, loop)
    try:
        await serve_connection(reader, writer, handler, None)
    finally:
        read_transport.close()
        write_transport.close()
