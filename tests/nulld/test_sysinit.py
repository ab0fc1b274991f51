"""Hostname and loopback set-up, for real, in fresh UTS and network namespaces."""

from __future__ import annotations

from tests.nulld.conftest import run_in_namespaces

SCRIPT = """
import fcntl, json, socket, struct
from nulld import sysinit
def lo_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, sysinit.SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0)))[1]
    return bool(flags & sysinit.IFF_UP)
before = lo_up()
sysinit.set_hostname("nullbox-test")
ok = sysinit.loopback_up()
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname(), timeout=5)
print(json.dumps({"before": before, "after": lo_up(), "ok": ok, "hostname": socket.gethostname(), "connected": True}))
"""


def test_hostname_and_loopback_in_fresh_namespaces() -> None:
    report = run_in_namespaces(["--uts", "--net"], SCRIPT)
    assert report == {"before": False, "after": True, "ok": True, "hostname": "nullbox-test", "connected": True}
