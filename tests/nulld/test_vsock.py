"""nulld's control API on vsock (the host's way in where it has vhost-vsock).

No vsock transport carries traffic on the build host (no loopback, no vhost-vsock), so a connection cannot be made
end to end here; what can be: nulld binds the port it is given (a second bind of it is refused), says so, and a
connection from any CID but the host's is turned away before a single request is read.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
from typing import Any

import pytest

from nullbox.wire import VSOCK_CID_HOST, bind_vsock
from nulld.init import Nulld, Options
from tests.nulld.conftest import NulldProcess


def test_nulld_listens_on_the_vsock_port_it_is_given(nulld: NulldProcess) -> None:
    port = random.randrange(20000, 60000)
    nulld.extra += ["--vsock-port", str(port)]
    nulld.write_config("")
    nulld.start()
    assert nulld.call("status")["nulld"]["mode"] == "subreaper"
    assert f"control API on vsock port {port} (host only)" in nulld.log.read_text()
    with pytest.raises(OSError) as taken:
        bind_vsock(port).close()
    assert taken.value.errno == errno.EADDRINUSE  # nulld holds it


class _Writer:
    """What serve_connection needs of a StreamWriter, recording what would have been sent."""

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.closed = False
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str) -> Any:
        return (self.cid, 5000) if name == "peername" else None

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("cid", [3, 42, socket.VMADDR_CID_ANY])
def test_only_the_host_may_use_the_vsock_control_port(cid: int) -> None:
    """A guest's connection (CID 3 and up: an agent VM, were it ever given vsock) is closed unread."""
    nulld = Nulld(Options())
    writer = _Writer(cid)

    async def connect() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b'{"id":1,"op":"poweroff"}\n')
        reader.feed_eof()
        await nulld._serve_vsock(reader, writer)  # type: ignore[arg-type]

    asyncio.run(connect())
    assert writer.closed and writer.sent == b"" and nulld.power is None  # not one request read or answered
    assert VSOCK_CID_HOST == 2 and cid != VSOCK_CID_HOST
