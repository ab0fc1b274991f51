"""The control API over a character device, as nulld serves it on the virtio-serial port.

virtio-serial itself exists only in a VM (the e2e boot tests use it); here a pseudo-terminal in raw mode stands
in for the port's character device, and a fake sysfs for the port lookup.
"""

from __future__ import annotations

import asyncio
import json
import os
import tty
from pathlib import Path
from typing import Any

from nullbox.wire import Connection, Reply, Request
from nulld.serialport import find_port, serve_port


def test_find_port_by_name(tmp_path: Path) -> None:
    sysfs = tmp_path / "virtio-ports"
    for port, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", "org.nullbox.ctl")):
        (sysfs / port).mkdir(parents=True)
        (sysfs / port / "name").write_text(name + "\n")
    assert find_port(sysfs=sysfs, dev=Path("/dev")) == Path("/dev/vport1p1")
    assert find_port("org.nullbox.other", sysfs=sysfs) is None
    assert find_port(sysfs=tmp_path / "missing") is None


async def _handler(request: Request, conn: Connection[Any]) -> Reply:
    return {"echo": request.op}


def test_requests_over_a_character_device() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line editing: bytes pass as they are, like a virtio port
    path = Path(os.ttyname(slave))

    async def body() -> list[dict[str, Any]]:
        serving = asyncio.create_task(serve_port(path, _handler))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, os.write, master, b'{"id":1,"op":"status"}\n{"id":2,"op":"timings"}\n')
        data = b""
        while data.count(b"\n") < 2:
            data += await loop.run_in_executor(None, os.read, master, 4096)
        serving.cancel()
        return [json.loads(line) for line in data.splitlines()]

    try:
        replies = asyncio.run(body())
    finally:
        os.close(master)
        os.close(slave)
    assert replies == [{"id": 1, "ok": True, "echo": "status"}, {"id": 2, "ok": True, "echo": "timings"}]
