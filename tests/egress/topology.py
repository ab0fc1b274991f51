"""A real network for egress tests: an internet, an appliance and agents, each a network namespace of its own.

::

    agent ns (eth0 10.200.N.2/30) == appliance ns (nb-<x> 10.200.N.1/30, up0 198.51.100.2/24) == internet ns

The internet namespace holds an authoritative-and-recursive-looking DNS server (198.51.100.53, UDP and TCP, zone
given by the test) and TCP servers that answer with their own address, on TEST-NET addresses and on the addresses
a default-deny ruleset must stop (cloud metadata, RFC 1918, IPv6).  Routes exist both ways for IPv4 and IPv6, the
appliance forwards, and nothing else does: with no ruleset every server is reachable from every agent, so whatever
stops a packet in a test is the ruleset under test.  Traffic never leaves the namespaces.

The server programs live here too: ``python -m tests.egress.topology dns CONFIG`` and ``... tcp CONFIG``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from types import TracebackType
from typing import Any, Final, cast

REPO: Final = Path(__file__).resolve().parents[2]
PYTHON: Final = sys.executable

UPLINK: Final = "up0"
INTERNET_GATEWAY: Final = IPv4Address("198.51.100.1")
UPLINK_ADDRESS: Final = IPv4Address("198.51.100.2")
INTERNET_GATEWAY6: Final = IPv6Address("2001:db8:100::1")
UPLINK_ADDRESS6: Final = IPv6Address("2001:db8:100::2")
DNS_SERVER: Final = IPv4Address("198.51.100.53")
#: Exists in the internet namespace but nothing listens on port 53: ICMP port unreachable, at once.
DNS_REFUSING: Final = IPv4Address("198.51.100.54")
#: Routed to a blackhole in the internet namespace: queries vanish without any ICMP, so only a timeout tells.
DNS_SILENT: Final = IPv4Address("203.0.113.99")
#: TCP servers on TEST-NET addresses (RFC 5737): the "public internet" agents may reach when allowed.
WEB: Final = (
    IPv4Address("192.0.2.10"),
    IPv4Address("192.0.2.11"),
    IPv4Address("192.0.2.12"),
    IPv4Address("192.0.2.13"),
    IPv4Address("198.51.100.10"),
    IPv4Address("198.51.100.11"),
    IPv4Address("203.0.113.10"),
    IPv4Address("203.0.113.11"),
)
#: Addresses no agent may reach whatever DNS says, each with a server so only the ruleset can stop a connection.
METADATA: Final = IPv4Address("169.254.169.254")
PRIVATE: Final = IPv4Address("10.99.0.10")
SERVER6: Final = IPv6Address("2001:db8:ff::10")
SERVER_PORTS: Final = (80, 443, 8443)
AGENT_PREFIX6: Final = "2001:db8:200"

#: name -> [(type, value, ttl)]; types A, AAAA, CNAME, plus the test-only RCODE (answer with that rcode) and DROP.
Zone = Mapping[str, Sequence[tuple[str, str, int]]]


def served(address: IPv4Address | IPv6Address | str, port: int) -> str:
    """What the TCP server on ``address:port`` answers, so a test can tell which server it reached."""
    addr = ip_address(address) if isinstance(address, str) else address
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def run(
    netns: str, argv: Sequence[str], *, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside a network namespace; its output as text."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def ip(*args: str, netns: str | None = None) -> None:
    """One ``ip`` command (in ``netns`` when given); raises with its message on failure."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def python(netns: str, snippet: str, *args: str, timeout: float = 30) -> Any:
    """Run a Python snippet inside a network namespace; it prints one JSON value, which is returned."""
    result = run(netns, [PYTHON, "-c", snippet, *args], timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"snippet in {netns} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


_CONNECT = """
import json, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        data = b""
        while not data.endswith(b"\\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    print(json.dumps({"answer": data.decode().strip() or None, "error": None}))
except OSError as exc:
    print(json.dumps({"answer": None, "error": type(exc).__name__}))
"""


def connect(netns: str, address: IPv4Address | IPv6Address | str, port: int, timeout: float = 1.0) -> str | None:
    """What the server at ``address:port`` answers when dialled from ``netns``; None when no connection was made."""
    return attempt(netns, address, port, timeout)[0]


def attempt(
    netns: str, address: IPv4Address | IPv6Address | str, port: int, timeout: float = 1.0
) -> tuple[str | None, str | None]:
    """(answer, error class name) for one connection: a drop shows as TimeoutError, a reject as a refusal."""
    out = python(netns, _CONNECT, str(address), str(port), str(timeout), timeout=timeout + 30)
    return out["answer"], out["error"]


_DIG = """
import json, sys, time
import dns.exception, dns.flags, dns.message, dns.query, dns.rcode, dns.rdatatype
server, name, qtype, transport, timeout, port = sys.argv[1:7]
tcp, timeout, port = transport == "tcp", float(timeout), int(port)
query = dns.message.make_query(name, qtype)
sent = time.monotonic()
try:
    if tcp:
        reply = dns.query.tcp(query, server, timeout=timeout, port=port)
    else:
        reply = dns.query.udp(query, server, timeout=timeout, port=port, ignore_unexpected=True)
except (dns.exception.Timeout, OSError, EOFError) as exc:
    print(json.dumps({"rcode": "TIMEOUT" if isinstance(exc, dns.exception.Timeout) else type(exc).__name__,
                      "addresses": [], "ttl": None, "flags": "", "sent": sent, "received": time.monotonic(),
                      "records": [], "question": None}))
    sys.exit(0)
received = time.monotonic()
kinds = (dns.rdatatype.A, dns.rdatatype.AAAA)
addresses = [rd.address for rrset in reply.answer if rrset.rdtype in kinds for rd in rrset]
print(json.dumps({
    "rcode": dns.rcode.to_text(reply.rcode()),
    "addresses": addresses,
    "ttl": min((rrset.ttl for rrset in reply.answer), default=None),
    "flags": dns.flags.to_text(reply.flags),
    "sent": sent,
    "received": received,
    "records": [rrset.to_text() for rrset in reply.answer],
    "question": [q.to_text() for q in reply.question],
}))
"""


@dataclass(frozen=True)
class Answer:
    """One DNS reply as seen by a client; ``rcode`` is TIMEOUT when none came.  Times are CLOCK_MONOTONIC."""

    rcode: str
    addresses: list[str]
    ttl: int | None
    flags: str
    sent: float
    received: float
    records: list[str]
    question: list[str] | None


def dig(
    netns: str,
    server: IPv4Address | str,
    name: str,
    qtype: str = "A",
    *,
    tcp: bool = False,
    timeout: float = 3.0,
    port: int = 53,
) -> Answer:
    """Ask ``server`` one question from inside ``netns`` with dnspython, over UDP (or TCP)."""
    out = python(
        netns, _DIG, str(server), name, qtype, "tcp" if tcp else "udp", str(timeout), str(port), timeout=timeout + 30
    )
    return Answer(**out)


@dataclass(frozen=True)
class AgentLink:
    """One agent's network: its namespace and the veth pair to the appliance (``iface`` is the appliance side)."""

    name: str
    netns: str
    iface: str
    gateway: IPv4Address
    address: IPv4Address
    gateway6: IPv6Address
    address6: IPv6Address


@dataclass
class _Server:
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Topology:
    """The namespaces, links and servers; a context manager that removes all of it on exit, even after a failure."""

    zone: Zone = field(default_factory=dict)
    agents: Sequence[str] = ("a1",)
    no_chase: Sequence[str] = ()

    def __post_init__(self) -> None:
        tag = secrets.token_hex(3)
        self.internet = f"nbt-{tag}-inet"
        self.appliance = f"nbt-{tag}-app"
        self.dir = Path(tempfile.mkdtemp(prefix=f"nbt-{tag}-"))
        self.links: dict[str, AgentLink] = {}
        self._namespaces: list[str] = []
        self._servers: list[_Server] = []
        self._tag = tag

    # --- lifecycle ---

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for server in self._servers:
            if server.proc.poll() is None:
                server.proc.terminate()
                try:
                    server.proc.wait(5)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()
        self._servers.clear()
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        self._namespaces.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _netns(self, name: str) -> str:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("link", "set", "lo", "up", netns=name)
        # No duplicate address detection: with it, IPv6 (link-local addresses too) works only a second or two later.
        for scope in ("default", "all"):
            sysctl(name, f"net.ipv6.conf.{scope}.accept_dad", "0")
        return name

    def _build(self) -> None:
        inet, app = self._netns(self.internet), self._netns(self.appliance)
        ip("link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", inet, netns=app)
        ip("addr", "add", f"{UPLINK_ADDRESS}/24", "dev", UPLINK, netns=app)
        ip("addr", "add", f"{UPLINK_ADDRESS6}/64", "dev", UPLINK, "nodad", netns=app)
        ip("link", "set", UPLINK, "up", netns=app)
        ip("route", "add", "default", "via", str(INTERNET_GATEWAY), netns=app)
        ip("-6", "route", "add", "default", "via", str(INTERNET_GATEWAY6), netns=app)
        sysctl(app, "net.ipv4.ip_forward", "1")
        sysctl(app, "net.ipv6.conf.all.forwarding", "1")

        ip("addr", "add", f"{INTERNET_GATEWAY}/24", "dev", "eth0", netns=inet)
        ip("addr", "add", f"{INTERNET_GATEWAY6}/64", "dev", "eth0", "nodad", netns=inet)
        ip("link", "set", "eth0", "up", netns=inet)
        for address in (DNS_SERVER, DNS_REFUSING, *WEB, METADATA, PRIVATE):
            ip("addr", "add", f"{address}/32", "dev", "lo", netns=inet)
        ip("addr", "add", f"{SERVER6}/128", "dev", "lo", "nodad", netns=inet)
        ip("route", "add", "blackhole", f"{DNS_SILENT}/32", netns=inet)
        # Routes back to the agents, so replies arrive whether or not the appliance masquerades.
        ip("route", "add", "10.200.0.0/16", "via", str(UPLINK_ADDRESS), netns=inet)
        ip("-6", "route", "add", f"{AGENT_PREFIX6}::/48", "via", str(UPLINK_ADDRESS6), netns=inet)

        for name in self.agents:
            self.add_agent(name)
        wait_links_up([inet, app, *(link.netns for link in self.links.values())])
        self.set_zone(self.zone)
        self._start("dns", {"addresses": [str(DNS_SERVER)], "port": 53, "zone": str(self.dir / "zone.json")})
        listen = [[str(a), p] for a in (*WEB, METADATA, PRIVATE, SERVER6) for p in SERVER_PORTS]
        self._start("tcp", {"listen": listen})

    def add_agent(self, name: str) -> AgentLink:
        """A new agent namespace linked to the appliance by ``nb-<name>`` (names up to 12 characters)."""
        if name in self.links or not 1 <= len(name) <= 12:
            raise ValueError(f"agent link name {name!r} is taken or not 1-12 characters")
        n = len(self.links) + 1
        netns = self._netns(f"nbt-{self._tag}-{name}")
        link = AgentLink(
            name=name,
            netns=netns,
            iface=f"nb-{name}",
            gateway=IPv4Address(f"10.200.{n}.1"),
            address=IPv4Address(f"10.200.{n}.2"),
            gateway6=IPv6Address(f"{AGENT_PREFIX6}:{n:x}::1"),
            address6=IPv6Address(f"{AGENT_PREFIX6}:{n:x}::2"),
        )
        app = self.appliance
        ip("link", "add", link.iface, "type", "veth", "peer", "name", "eth0", "netns", netns, netns=app)
        ip("addr", "add", f"{link.gateway}/30", "dev", link.iface, netns=app)
        ip("addr", "add", f"{link.gateway6}/64", "dev", link.iface, "nodad", netns=app)
        ip("link", "set", link.iface, "up", netns=app)
        ip("addr", "add", f"{link.address}/30", "dev", "eth0", netns=netns)
        ip("addr", "add", f"{link.address6}/64", "dev", "eth0", "nodad", netns=netns)
        ip("link", "set", "eth0", "up", netns=netns)
        ip("route", "add", "default", "via", str(link.gateway), netns=netns)
        ip("-6", "route", "add", "default", "via", str(link.gateway6), netns=netns)
        self.links[name] = link
        if self._servers:  # added after the build: wait here, as the build does for its own links
            wait_links_up([app, netns])
        return link

    def agent(self, name: str | None = None) -> AgentLink:
        """The named agent link, or the first one."""
        return self.links[name] if name is not None else next(iter(self.links.values()))

    def set_zone(self, zone: Zone, no_chase: Sequence[str] | None = None) -> None:
        """Replace the DNS server's zone; it rereads the file before the next question."""
        names = self.no_chase if no_chase is None else no_chase
        data = {
            "records": {k.lower().rstrip("."): [list(r) for r in v] for k, v in zone.items()},
            "no_chase": [n.lower().rstrip(".") for n in names],
        }
        target = self.dir / "zone.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(target)
        self.zone = zone

    def dns_log(self) -> list[dict[str, Any]]:
        """Every question the DNS server received: name, type, transport."""
        path = self.dir / "dns-queries.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def _start(self, kind: str, config: dict[str, Any]) -> None:
        config_path = self.dir / f"{kind}.json"
        config["log"] = str(self.dir / f"{kind}-queries.jsonl")
        config_path.write_text(json.dumps(config))
        log = self.dir / f"{kind}.log"
        with log.open("ab") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.internet, PYTHON, "-m", "tests.egress.topology", kind, str(config_path)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self._servers.append(_Server(proc, log))
        wait_ready(proc, f"{kind} server", log)


def wait_ready(proc: subprocess.Popen[bytes], what: str, log: Path | None = None, timeout: float = 20) -> None:
    """Wait for the child's ``ready`` line on stdout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.1)
        if readable:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:
                break
    detail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not become ready (exit status {proc.poll()}):\n{detail}")


def wait_links_up(namespaces: Sequence[str], timeout: float = 10) -> None:
    """Wait until every link in ``namespaces`` is operationally up.

    The kernel reports carrier changes lazily (linkwatch, up to a second); until then IPv6 neither configures its
    link-local address nor sends neighbour solicitations, so the first IPv6 packets of a test would be lost.
    """
    deadline = time.monotonic() + timeout
    for netns in namespaces:
        while True:
            out = subprocess.run(
                ["ip", "-j", "-n", netns, "link", "show"], capture_output=True, text=True, timeout=30, check=True
            )
            states = [link.get("operstate") for link in json.loads(out.stdout) if link.get("ifname") != "lo"]
            if all(state == "UP" for state in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"links in {netns} are not up after {timeout}s: {states}")
            time.sleep(0.05)


def sysctl(netns: str, key: str, value: str) -> None:
    run(netns, ["sysctl", "-q", "-w", f"{key}={value}"])


# --- the server programs, run inside the internet namespace ---------------------------------------------------


class _ZoneFile:
    """The zone, reread when the file is replaced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key: tuple[int, int] = (0, 0)
        self.records: dict[str, list[list[Any]]] = {}
        self.no_chase: set[str] = set()

    def load(self) -> None:
        st = self.path.stat()
        if (st.st_ino, st.st_mtime_ns) != self.key:
            data = json.loads(self.path.read_text())
            self.records, self.no_chase = data["records"], set(data["no_chase"])
            self.key = (st.st_ino, st.st_mtime_ns)


async def _dns_reply(zone: _ZoneFile, wire: bytes, transport: str, log: Path) -> bytes | None:
    try:
        return await _dns_answer(zone, wire, transport, log)
    except Exception:
        traceback.print_exc()  # to the server's log; the client sees a timeout
        return None


async def _dns_answer(zone: _ZoneFile, wire: bytes, transport: str, log: Path) -> bytes | None:
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None
    zone.load()
    response = dns.message.make_response(query, recursion_available=True)
    question = query.question[0]
    qname = question.name.to_text(omit_final_dot=True).lower()
    qtype = dns.rdatatype.to_text(question.rdtype)
    with log.open("a") as f:
        f.write(json.dumps({"name": qname, "type": qtype, "transport": transport}) + "\n")
    current = qname
    for _ in range(16):
        records = zone.records.get(current)
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            break
        for kind, value, _ in records:
            if kind == "DROP":
                return None
            if kind == "DELAY":
                await asyncio.sleep(float(value))
            if kind == "RCODE":
                response.set_rcode(dns.rcode.from_text(value))
                return response.to_wire()
        owner = dns.name.from_text(current)
        cnames = [r for r in records if r[0] == "CNAME"]
        if cnames and qtype != "CNAME":
            response.answer.append(
                dns.rrset.from_text_list(
                    owner, min(r[2] for r in cnames), "IN", "CNAME", [cnames[0][1].rstrip(".") + "."]
                )
            )
            if current in zone.no_chase:
                break
            current = cnames[0][1].lower().rstrip(".")
            continue
        matching = [r for r in records if r[0] == qtype]
        if matching:
            ttl = min(r[2] for r in matching)
            response.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", qtype, [r[1] for r in matching]))
        break
    if transport == "udp":
        limit = max(512, query.payload) if query.edns >= 0 else 512
        return response.to_wire(max_size=limit, prefer_truncation=True)
    return response.to_wire(max_size=65535)  # else dnspython limits it to the query's EDNS payload


def _serve_dns(config: dict[str, Any]) -> None:
    zone = _ZoneFile(Path(config["zone"]))
    log = Path(config["log"])

    tasks: set[asyncio.Task[None]] = set()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
            task = asyncio.ensure_future(self.reply(data, addr))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def reply(self, data: bytes, addr: tuple[str | Any, int]) -> None:
            wire = await _dns_reply(zone, data, "udp", log)
            if wire is not None:
                self.transport.sendto(wire, addr)

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = await _dns_reply(zone, await reader.readexactly(size), "tcp", log)
                if wire is None:
                    break
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for address in config["addresses"]:
            await loop.create_datagram_endpoint(Udp, local_addr=(address, config["port"]))
            await asyncio.start_server(tcp, address, config["port"])
        _ready()
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_tcp(config: dict[str, Any]) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("sockname")[:2]
        writer.write(served(host, port).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def main() -> None:
        for address, port in config["listen"]:
            await asyncio.start_server(answer, address, port)
        _ready()
        await asyncio.Event().wait()

    asyncio.run(main())


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def main(argv: Sequence[str]) -> None:
    kind, config_path = argv
    config = json.loads(Path(config_path).read_text())
    {"dns": _serve_dns, "tcp": _serve_tcp}[kind](config)


if __name__ == "__main__":
    main(sys.argv[1:])
