"""The per-agent DNS proxy: the only resolver an agent can reach, and the only way an address enters its allow set.

An agent's packets may go only to addresses in its nftables set, and addresses get there only here: a question for an
allowed name is forwarded to the appliance's own resolvers, the answer is stripped of addresses no agent may reach
(DNS rebinding), every remaining address is admitted for the allowed ports with a timeout derived from its TTL, and
only then is the answer handed out.  Names not on the allow list are REFUSED without asking upstream, so a denied
name leaks nothing and costs nothing.  Only A records are answered: agents get no IPv6, so AAAA and other types for
an allowed name are answered empty.  CNAME chains are followed here and flattened into A records for the question
name, which is the name the allow list matched; the agent never needs to resolve the intermediate names itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, Final, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from egress.blocked import blocked_reason
from egress.names import AllowList, normalise_query

log = logging.getLogger("egress")

DNS_PORT: Final = 53
#: EDNS payload we advertise upstream and to agents: the DNS Flag Day 2020 size, which avoids IP fragmentation.
EDNS_PAYLOAD: Final = 1232
MAX_CNAME_HOPS: Final = 8
#: UDP questions being worked on at once per agent; more are dropped (the agent retries), so a flood cannot grow memory.
MAX_INFLIGHT: Final = 256
MAX_TCP_CONNECTIONS: Final = 16
TCP_IDLE_S: Final = 10.0
ADMIT_TIMEOUT_S: Final = 5.0
#: Seconds the answer's TTL stays under the admission timeout, so the agent's cache expires before the set element.
TTL_MARGIN_S: Final = 1
WARN_INTERVAL_S: Final = 30.0
NAME_CACHE_SIZE: Final = 4096
#: The OPT record of every upstream question and EDNS reply: EDNS version 0, our payload size, no flags or options.
_OPT: Final = b"\x00" + struct.pack("!HHIH", 41, EDNS_PAYLOAD, 0, 0)
_QR: Final = 0x8000
_TC: Final = 0x0200
_RD: Final = 0x0100
_RA: Final = 0x0080
_TYPE_A: Final = 1
_TYPE_CNAME: Final = 5
_CLASS_IN: Final = 1
#: An answer record's owner as a compression pointer to the question name, which always starts at offset 12.
_QUESTION_POINTER: Final = b"\xc0\x0c"


@dataclass(frozen=True)
class Admission:
    """One address the agent may reach on one port until ``timeout_s`` passes, admitted for the allowed ``name``."""

    address: IPv4Address
    port: int
    timeout_s: int
    name: str


class _NoAnswer(Exception):
    """No upstream gave a usable answer (the agent gets SERVFAIL)."""


class _BadReply(Exception):
    """An upstream reply that does not answer the question asked."""


class _Truncated(Exception):
    """The UDP answer had TC set; ask again over TCP."""


@dataclass(frozen=True)
class _Resolution:
    rcode: int
    addresses: tuple[IPv4Address, ...] = ()
    ttl: int = 0


@dataclass
class _Reply:
    """The part of an upstream reply the proxy uses: its rcode, and the A and CNAME records by owner name."""

    rcode: int
    a: dict[dns.name.Name, tuple[list[IPv4Address], int]]
    cname: dict[dns.name.Name, tuple[dns.name.Name, int]]


class _UpstreamEndpoint(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream resolver, shared by every question to it.

    Connected, so the kernel delivers only datagrams from that resolver and reports ICMP unreachable as an error,
    which fails the waiting questions at once instead of after the timeout.
    """

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport (3.11), so no isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if len(data) < 12:
            return
        future = self.pending.get(int.from_bytes(data[:2], "big"))
        if future is not None and not future.done():
            future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionError("upstream socket closed"))

    def _fail(self, exc: Exception) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _AgentSide(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.proxy._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS proxy socket error: %s", exc)


class DnsProxy:
    """Answers one agent's questions on its gateway address (UDP and TCP), admitting addresses before answering."""

    def __init__(  # noqa: PLR0917 (the controller's call signature: six positional parameters)
        self,
        agent: str,
        listen: IPv4Address,
        allow: AllowList,
        upstreams: Callable[[], Sequence[tuple[str, int]]],
        admit: Callable[[str, list[Admission]], Awaitable[int | None]],
        on_denied: Callable[[str, str], None] | None = None,
        *,
        port: int = DNS_PORT,
        min_ttl: int = 60,
        max_ttl: int = 300,
        upstream_timeout_s: float = 2.0,
        deadline_s: float = 4.0,
    ) -> None:
        if not 1 <= min_ttl <= max_ttl:
            raise ValueError(f"TTL bounds must satisfy 1 <= min_ttl <= max_ttl, not {min_ttl}..{max_ttl}")
        if not 0 < upstream_timeout_s <= deadline_s:
            raise ValueError("timeouts must satisfy 0 < upstream_timeout_s <= deadline_s")
        self.agent = agent
        self.listen = listen
        self.port = port
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._allow = allow
        self._upstreams = upstreams
        self._admit = admit
        self._on_denied = on_denied
        self._upstream_timeout_s = upstream_timeout_s
        self._deadline_s = deadline_s
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._endpoints: dict[tuple[str, int], _UpstreamEndpoint] = {}
        self._endpoint_lock = asyncio.Lock()
        self._last_servers: tuple[tuple[str, int], ...] = ()
        self._warned: dict[str, float] = {}
        self._names: dict[dns.name.Name, tuple[str, frozenset[int]]] = {}

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP on the gateway address; an OSError names the agent and address when either cannot."""
        loop = asyncio.get_running_loop()
        where = f"{self.listen}:{self.port}"
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _AgentSide(self), local_addr=(str(self.listen), self.port)
            )
        except OSError as exc:
            raise OSError(exc.errno, f"DNS proxy for agent {self.agent} cannot listen on UDP {where}: {exc}") from exc
        self._udp = transport
        try:
            self._tcp = await asyncio.start_server(
                self._serve_tcp, str(self.listen), self.port, backlog=MAX_TCP_CONNECTIONS
            )
        except OSError as exc:
            transport.close()
            self._udp = None
            raise OSError(exc.errno, f"DNS proxy for agent {self.agent} cannot listen on TCP {where}: {exc}") from exc
        log.info("DNS proxy for agent %s listening on %s", self.agent, where)

    async def close(self) -> None:
        """Stop answering; questions in flight are abandoned, so nothing is admitted after close returns."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_writers):
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None
        for endpoint in self._endpoints.values():
            endpoint.close()
        self._endpoints.clear()

    def set_allow(self, allow: AllowList) -> None:
        """Replace the allow list; it is checked again just before admission, so a question in flight sees it too."""
        self._allow = allow
        self._names.clear()

    def _lookup(self, qname: dns.name.Name) -> tuple[str, frozenset[int]]:
        """The question name in allow-list form and its ports (none: not allowed), cached until the list changes.

        IDNA normalisation and matching cost more than the rest of a question; agents ask for few names, often.
        """
        found = self._names.get(qname)  # dnspython names hash and compare case-insensitively
        if found is None:
            name = normalise_query(qname.to_text(omit_final_dot=True))
            found = ("", frozenset()) if name is None else (name, self._allow.ports_for(name))
            if len(self._names) >= NAME_CACHE_SIZE:
                self._names.clear()
            self._names[qname] = found
        return found

    @property
    def allow(self) -> AllowList:
        return self._allow

    # --- agent side --------------------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_datagram(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if len(self._tasks) >= MAX_INFLIGHT:
            self._warn("inflight", "agent %s has %d DNS questions in flight; dropping more", self.agent, MAX_INFLIGHT)
            return
        self._spawn(self._udp_question(data, addr))

    async def _udp_question(self, data: bytes, addr: tuple[str | object, int]) -> None:
        reply = await self.answer(data, udp=True)
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_writers) >= MAX_TCP_CONNECTIONS:
            self._warn(
                "tcp", "agent %s has %d DNS TCP connections open; refusing more", self.agent, len(self._tcp_writers)
            )
            writer.close()
            return
        self._tcp_writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_S):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                reply = await self.answer(data, udp=False)
                if reply is None:
                    break  # not a question we answer: a stream cannot be resynchronised, so end it
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(TCP_IDLE_S):
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        """The reply to one question in wire form, or None when it deserves none (a response, or no header).

        Questions are parsed with dnspython; replies are built by hand, which is most of what keeps the proxy's
        added latency well under a millisecond.
        """
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return _formerr(data)
        if query.flags & dns.flags.QR:
            return None
        try:
            rcode, addresses, ttl = await self._decide(query)
        except Exception:
            log.exception("agent %s: answering a question failed", self.agent)
            rcode, addresses, ttl = dns.rcode.SERVFAIL, (), 0
        limit = (max(512, query.payload) if query.edns >= 0 else 512) if udp else 65535
        return _reply_wire(query, rcode, addresses, ttl, limit)

    async def _decide(self, query: dns.message.Message) -> tuple[int, tuple[IPv4Address, ...], int]:
        """(rcode, addresses, TTL) for the reply; every address returned has been admitted."""
        if query.opcode() != dns.opcode.QUERY:
            return dns.rcode.NOTIMP, (), 0
        if len(query.question) != 1:
            return dns.rcode.FORMERR, (), 0
        question = query.question[0]
        name, ports = self._lookup(question.name) if question.rdclass == dns.rdataclass.IN else ("", frozenset())
        if not ports:
            self._denied(question.name.to_text(omit_final_dot=True))
            return dns.rcode.REFUSED, (), 0
        if question.rdtype != dns.rdatatype.A:
            return dns.rcode.NOERROR, (), 0  # allowed name, but agents only ever get IPv4 addresses
        try:
            resolution = await self._resolve(question.name, time.monotonic() + self._deadline_s)
        except _NoAnswer as exc:
            self._warn("upstream", "agent %s: no answer for %s: %s", self.agent, name, exc)
            return dns.rcode.SERVFAIL, (), 0
        addresses = tuple(a for a in resolution.addresses if not self._stripped(name, a))
        if not addresses:
            return resolution.rcode, (), 0
        _, ports = self._lookup(question.name)
        if not ports:  # the allow list changed while upstream was asked
            self._denied(question.name.to_text(omit_final_dot=True))
            return dns.rcode.REFUSED, (), 0
        timeout = min(max(resolution.ttl, self.min_ttl), self.max_ttl)
        admissions = [Admission(a, p, timeout, name) for a in addresses for p in sorted(ports)]
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                guaranteed = await self._admit(self.agent, admissions)
        except Exception as exc:
            log.error("agent %s: admitting %s for %s failed; answering SERVFAIL: %s", self.agent, name, addresses, exc)
            return dns.rcode.SERVFAIL, (), 0
        if guaranteed is not None:  # the admitter kept a live element instead of refreshing it: that much is left
            timeout = min(timeout, guaranteed)
        return dns.rcode.NOERROR, addresses, max(min(resolution.ttl, timeout - TTL_MARGIN_S), 0)

    def _stripped(self, name: str, address: IPv4Address) -> bool:
        reason = blocked_reason(address)
        if reason is not None:
            self._warn(
                "stripped", "agent %s: dropped %s from the answer for %s (%s)", self.agent, address, name, reason
            )
        return reason is not None

    def _denied(self, qtext: str) -> None:
        log.debug("agent %s: refused %s", self.agent, qtext)
        if self._on_denied is not None:
            try:
                self._on_denied(self.agent, qtext)
            except Exception:
                log.exception("on_denied callback failed for agent %s", self.agent)

    def _warn(self, key: str, message: str, *args: object) -> None:
        """Log at most once per interval per key: an agent can repeat a failing question as fast as it likes."""
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_INTERVAL_S) >= WARN_INTERVAL_S:
            self._warned[key] = now
            log.warning(message, *args)
        else:
            log.debug(message, *args)

    # --- upstream side -----------------------------------------------------------------------------------------

    async def _resolve(self, qname: dns.name.Name, deadline: float) -> _Resolution:
        """A records for ``qname``, following CNAMEs (within one answer, then by asking for the chain's end).

        Only records on the chain from the question name count; anything else in an answer is ignored.
        """
        seen = {qname}
        current = qname
        ttl: int | None = None
        hops = 0
        while True:
            reply = await self._ask(current, deadline)
            name = current
            while True:
                found = reply.a.get(name)
                if found is not None:
                    addresses, a_ttl = found
                    return _Resolution(dns.rcode.NOERROR, tuple(addresses), a_ttl if ttl is None else min(ttl, a_ttl))
                cname = reply.cname.get(name)
                if cname is None:
                    break
                hops += 1
                target, c_ttl = cname
                if hops > MAX_CNAME_HOPS or target in seen:
                    raise _NoAnswer(f"CNAME chain from {qname} loops or is longer than {MAX_CNAME_HOPS}")
                seen.add(target)
                ttl = c_ttl if ttl is None else min(ttl, c_ttl)
                name = target
            if reply.rcode == dns.rcode.NXDOMAIN:
                return _Resolution(dns.rcode.NXDOMAIN)
            if name == current:
                return _Resolution(dns.rcode.NOERROR)  # the name exists but has no A records
            current = name

    def _servers(self) -> tuple[tuple[str, int], ...]:
        try:
            servers = tuple(self._upstreams())
        except Exception as exc:
            raise _NoAnswer(f"cannot read the upstream resolvers: {exc}") from exc
        if servers != self._last_servers:
            self._last_servers = servers
            for key in [k for k, e in self._endpoints.items() if k not in servers and not e.pending]:
                self._endpoints.pop(key).close()
        own = (str(self.listen), self.port)
        return tuple(s for s in servers if s != own)

    async def _ask(self, qname: dns.name.Name, deadline: float) -> _Reply:
        servers = self._servers()
        if not servers:
            raise _NoAnswer("no upstream resolvers are configured")
        question = cast(bytes, qname.to_wire()) + b"\x00\x01\x00\x01"  # A, IN; to_wire returns bytes given no file
        problems: list[str] = []
        for server in servers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                problems.append("out of time")
                break
            try:
                try:
                    async with asyncio.timeout(min(self._upstream_timeout_s, remaining)):
                        reply = await self._ask_udp(server, qname, question)
                except _Truncated:
                    async with asyncio.timeout(min(self._upstream_timeout_s, deadline - time.monotonic())):
                        reply = await self._ask_tcp(server, qname, question)
            except (OSError, EOFError, TimeoutError, dns.exception.DNSException, _BadReply) as exc:
                problems.append(f"{server[0]}:{server[1]} {type(exc).__name__} {exc}".rstrip())
                continue
            if reply.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return reply
            problems.append(f"{server[0]}:{server[1]} answered {dns.rcode.to_text(cast(dns.rcode.Rcode, reply.rcode))}")
        raise _NoAnswer("; ".join(problems))

    async def _endpoint(self, server: tuple[str, int]) -> _UpstreamEndpoint:
        endpoint = self._endpoints.get(server)
        if endpoint is not None and endpoint.usable:
            return endpoint
        async with self._endpoint_lock:
            endpoint = self._endpoints.get(server)
            if endpoint is not None and endpoint.usable:
                return endpoint
            loop = asyncio.get_running_loop()
            _, protocol = await loop.create_datagram_endpoint(_UpstreamEndpoint, remote_addr=server)
            self._endpoints[server] = protocol
            return protocol

    async def _ask_udp(self, server: tuple[str, int], qname: dns.name.Name, question: bytes) -> _Reply:
        endpoint = await self._endpoint(server)
        qid = secrets.randbits(16)
        while qid in endpoint.pending:
            qid = secrets.randbits(16)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        endpoint.pending[qid] = future
        try:
            assert endpoint.transport is not None
            endpoint.transport.sendto(_query_wire(qid, question))
            while True:
                data = await future
                if data[2] & (_TC >> 8):  # the rest may not even parse
                    raise _Truncated
                reply = _reply_to(qid, qname, data)
                if reply is not None:
                    return reply
                # Not the answer to this question (a stray or forged datagram with our ID): keep waiting.
                future = loop.create_future()
                endpoint.pending[qid] = future
        finally:
            endpoint.pending.pop(qid, None)

    async def _ask_tcp(self, server: tuple[str, int], qname: dns.name.Name, question: bytes) -> _Reply:
        qid = secrets.randbits(16)
        wire = _query_wire(qid, question)
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
        finally:
            writer.close()
        reply = _reply_to(qid, qname, data)
        if reply is None:
            raise _BadReply(f"{server[0]} answered a different question over TCP")
        return reply


def _query_wire(qid: int, question: bytes) -> bytes:
    """An upstream question, built by hand: dnspython's make_query costs more than the whole rest of the path."""
    return struct.pack("!HHHHHH", qid, dns.flags.RD, 1, 0, 0, 1) + question + _OPT


def _reply_to(qid: int, qname: dns.name.Name, data: bytes) -> _Reply | None:
    """The A and CNAME records of ``data`` if it answers our A question for ``qname``, else None.

    Parsed by hand (names through dnspython, which bounds compression pointers): building dnspython's full message,
    with its rdata sets and hashing, was the largest cost of a question.  Anything malformed is None, never an error.
    """
    try:
        qid_seen, flags, qdcount, ancount = struct.unpack_from("!HHHH", data)
        if qid_seen != qid or not flags & _QR or flags & 0x7800 or qdcount != 1:
            return None
        name, used = dns.name.from_wire(data, 12)
        offset = 12 + used
        qtype, qclass = struct.unpack_from("!HH", data, offset)
        if qtype != _TYPE_A or qclass != _CLASS_IN or name != qname:
            return None
        offset += 4
        reply = _Reply(flags & 0x000F, {}, {})
        for _ in range(ancount):
            owner, used = dns.name.from_wire(data, offset)
            offset += used
            rtype, rclass, ttl, size = struct.unpack_from("!HHIH", data, offset)
            offset += 10
            end = offset + size
            if end > len(data):
                return None
            ttl = 0 if ttl >= 1 << 31 else ttl  # RFC 2181 8: a TTL with the top bit set means zero
            if rclass == _CLASS_IN and rtype == _TYPE_A and size == 4:
                addresses, a_ttl = reply.a.get(owner, ([], ttl))
                address = IPv4Address(data[offset:end])
                if address not in addresses:
                    addresses.append(address)
                reply.a[owner] = (addresses, min(a_ttl, ttl))
            elif rclass == _CLASS_IN and rtype == _TYPE_CNAME and owner not in reply.cname:
                target, used = dns.name.from_wire(data, offset)
                if offset + used != end:
                    return None
                reply.cname[owner] = (target, ttl)
            offset = end
        return reply
    except (struct.error, ValueError, IndexError, dns.exception.DNSException):
        return None


def _reply_wire(
    query: dns.message.Message, rcode: int, addresses: Sequence[IPv4Address], ttl: int, limit: int
) -> bytes:
    """The reply to ``query``: its ID, opcode, RD and questions echoed, RA set, A records under the question name.

    An answer that does not fit ``limit`` goes out with TC set and no records, and the client asks again over TCP.
    """
    flags = _QR | (query.flags & _RD) | _RA | (query.flags & 0x7800) | (rcode & 0x000F)
    questions = b"".join(
        cast(bytes, q.name.to_wire()) + struct.pack("!HH", q.rdtype, q.rdclass) for q in query.question
    )
    opt = _OPT if query.edns >= 0 else b""
    record = struct.pack("!HHIH", _TYPE_A, _CLASS_IN, ttl, 4)
    answers = b"".join(_QUESTION_POINTER + record + a.packed for a in addresses) if query.question else b""
    count = len(addresses) if answers else 0
    if 12 + len(questions) + len(answers) + len(opt) > limit:
        flags, answers, count = flags | _TC, b"", 0
    header = struct.pack("!HHHHHH", query.id, flags, len(query.question), count, 0, 1 if opt else 0)
    return header + questions + answers + opt


def _formerr(data: bytes) -> bytes | None:
    """FORMERR for a question that does not parse but has a header; a response or a stub gets nothing."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    flags1 = 0x80 | (data[2] & 0x79)  # QR, the opcode and RD echoed
    flags2 = 0x80 | dns.rcode.FORMERR  # RA
    return data[:2] + bytes([flags1, flags2]) + bytes(8)


_resolv_cache: dict[Path, tuple[tuple[int, int, int], list[tuple[str, int]]]] = {}


def read_resolv_conf(path: Path) -> list[tuple[str, int]]:
    """The ``nameserver`` addresses in a resolv.conf, in order, each on port 53; a missing file gives none.

    Called for every question, so the parse is cached until the file changes (uplink replaces it atomically, which
    changes its inode).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return []
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _resolv_cache.get(path)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    servers: dict[tuple[str, int], None] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address: IPv4Address | IPv6Address = ip_address(fields[1])
        except ValueError:
            log.warning("ignoring nameserver %r in %s: not an IP address", fields[1], path)
            continue
        servers[(str(address), DNS_PORT)] = None
    result = list(servers)
    _resolv_cache[path] = (key, result)
    return list(result)
