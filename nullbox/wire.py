"""The NullBox wire protocol: newline-delimited JSON over any stream socket.

Every endpoint (nulld, egress, ctxgraph, cage) speaks it, so framing, error codes, request parsing, the server
loop and the clients live here once.  See docs/protocol.md for the contract as a client in any language sees it.

Server behaviour that callers rely on:
- one JSON object per line, at most ``MAX_LINE`` bytes; anything else gets ``invalid_request`` and the
  connection stays usable;
- requests on one connection are handled concurrently, replies are written in request order;
- a handler may answer with a :class:`Stream`; its events are written as they come, interleaved with later
  replies (each line carries its request id), until the client closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

MAX_LINE: Final = 1 << 20
"""Longest line (without its newline) either side accepts."""

MAX_ID_LENGTH: Final = 256
READ_CHUNK: Final = 1 << 16
DEFAULT_MAX_INFLIGHT: Final = 1024
MAX_INFLIGHT_BYTES: Final = 8 * MAX_LINE

log = logging.getLogger("nullbox.wire")

JSONObject = dict[str, Any]
RequestId = int | str | None


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class WireError(Exception):
    """An error that travels to the peer as ``{"ok": false, "error": {...}}``.

    Raised by handlers for anything the caller did wrong or cannot have, and by clients when the peer answered
    with an error.  ``message`` is one sentence for a person and never contains secrets.
    """

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.message = message

    def to_json(self) -> JSONObject:
        return {"code": str(self.code), "message": self.message}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def invalid(message: str) -> WireError:
    return WireError(ErrorCode.INVALID_REQUEST, message)


class ConnectionClosed(WireError):
    """The peer went away before answering."""

    def __init__(self, message: str = "the connection was closed before a reply arrived") -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


# --------------------------------------------------------------------------------------------------- encoding


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(data: bytes | str) -> Any:
    """Strict JSON decoding: UTF-8 only, no NaN/Infinity, nesting bounded by the interpreter."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise invalid("the line is not valid UTF-8") from None
    except RecursionError:
        raise invalid("the JSON nests too deeply") from None
    except ValueError as exc:
        raise invalid(f"the line is not valid JSON ({_first_line(str(exc))})") from None


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def encode(obj: Mapping[str, Any]) -> bytes:
    """One protocol line.  Strings that cannot be UTF-8 (lone surrogates) fall back to ASCII escapes."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class RawObject:
    """A result or event that is already JSON text: a complete object, e.g. ``'{"entry":{...}}'``.

    Lets a server send stored JSON (ctxgraph's canonical values) byte for byte instead of decoding and
    re-encoding it.  The producer guarantees ``text`` is one valid JSON object, starting with ``{`` and ending
    with ``}`` without surrounding whitespace, in UTF-8-encodable text.
    """

    text: str


def _raw_line(request_id: RequestId, raw: RawObject, member: str | None) -> bytes:
    head = f'{{"id":{json.dumps(request_id, ensure_ascii=False)},"ok":true'
    if member is not None:
        return f'{head},"{member}":{raw.text}}}\n'.encode()
    if raw.text == "{}":
        return f"{head}}}\n".encode()
    return f"{head},{raw.text[1:]}\n".encode()  # splice the object's members in after "ok"


def encode_success(request_id: RequestId, result: Mapping[str, Any] | RawObject) -> bytes:
    if isinstance(result, RawObject):
        return _raw_line(request_id, result, None)
    return encode(success(request_id, result))


def encode_event(request_id: RequestId, payload: Mapping[str, Any] | RawObject) -> bytes:
    if isinstance(payload, RawObject):
        return _raw_line(request_id, payload, "event")
    return encode(event(request_id, payload))


def success(request_id: RequestId, result: Mapping[str, Any]) -> JSONObject:
    reply: JSONObject = {"id": request_id, "ok": True}
    reply.update(result)
    return reply


def failure(request_id: RequestId, error: WireError) -> JSONObject:
    return {"id": request_id, "ok": False, "error": error.to_json()}


def event(request_id: RequestId, payload: Mapping[str, Any]) -> JSONObject:
    return {"id": request_id, "ok": True, "event": payload}


# --------------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    id: RequestId
    op: str
    params: JSONObject

    def __post_init__(self) -> None:
        # Handlers read parameters by name; "id" and "op" are protocol fields, not parameters.
        assert "id" not in self.params and "op" not in self.params


class BadRequest(WireError):
    """A line that could not become a :class:`Request`; remembers the id when one could be read."""

    def __init__(self, request_id: RequestId, message: str) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, message)
        self.request_id = request_id


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, str):
        if len(value) > MAX_ID_LENGTH:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    return False


def parse_request(line: bytes) -> Request:
    try:
        obj = decode_json(line)
    except WireError as exc:
        raise BadRequest(None, exc.message) from None
    if not isinstance(obj, dict):
        raise BadRequest(None, "a request must be a JSON object")
    request_id = obj.get("id")
    if request_id is not None and not _valid_id(request_id):
        raise BadRequest(None, f"'id' must be an integer or a string of at most {MAX_ID_LENGTH} characters")
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        raise BadRequest(request_id, "a request needs 'op', a non-empty string")
    params = {k: v for k, v in obj.items() if k not in ("id", "op")}
    return Request(request_id, op, params)


# ------------------------------------------------------------------------------------------------- parameters


class Params:
    """Typed access to request parameters; every mistake becomes one ``invalid_request`` naming the field."""

    def __init__(self, request: Request, allowed: set[str] | frozenset[str]) -> None:
        unknown = sorted(set(request.params) - set(allowed))
        if unknown:
            raise invalid(f"'{request.op}' does not take {', '.join(repr(u) for u in unknown)}")
        self._params = request.params
        self._op = request.op

    def raw(self, name: str) -> Any:
        if name not in self._params:
            raise invalid(f"'{self._op}' needs '{name}'")
        return self._params[name]

    def string(self, name: str, default: str | None = None) -> str:
        if name not in self._params and default is not None:
            return default
        value = self.raw(name)
        if not isinstance(value, str):
            raise invalid(f"'{name}' must be a string")
        return value

    def optional_string(self, name: str) -> str | None:
        if self._params.get(name) is None:
            return None
        return self.string(name)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._params.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{name}' must be an integer")
        if not minimum <= value <= maximum:
            raise invalid(f"'{name}' must be between {minimum} and {maximum}")
        return value

    def optional_integer(self, name: str, *, minimum: int, maximum: int) -> int | None:
        if self._params.get(name) is None:
            return None
        return self.integer(name, 0, minimum=minimum, maximum=maximum)

    def string_list(self, name: str) -> list[str] | None:
        value = self._params.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise invalid(f"'{name}' must be a list of strings")
        return value


# --------------------------------------------------------------------------------------------------- framing


class _Oversized:
    """Marker returned by :class:`LineReader` for a line longer than the limit."""


OVERSIZED: Final = _Oversized()


class LineReader:
    """Splits a byte stream into lines, refusing (and skipping) any line over ``limit`` bytes."""

    def __init__(self, reader: asyncio.StreamReader, limit: int = MAX_LINE) -> None:
        self._reader = reader
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0
        self._discarding = False
        self._eof = False

    async def next(self) -> bytes | _Oversized | None:
        """The next line (without newline), ``OVERSIZED`` once per too-long line, or None at end of stream."""
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                self._scanned = 0
                if self._discarding:
                    self._discarding = False
                    continue
                if len(line) > self._limit:
                    return OVERSIZED
                return line
            self._scanned = len(self._buffer)
            if len(self._buffer) > self._limit:
                # Drop what we hold; keep dropping until the newline that ends this line.
                self._buffer.clear()
                self._scanned = 0
                if not self._discarding:
                    self._discarding = True
                    return OVERSIZED
            if self._eof:
                if self._buffer and not self._discarding:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    return line
                return None
            chunk = await self._reader.read(READ_CHUNK)
            if not chunk:
                self._eof = True
            self._buffer += chunk


# ----------------------------------------------------------------------------------------------------- server


@dataclass
class Stream:
    """A handler's answer for streaming verbs: event payloads until the source ends or the client closes."""

    events: AsyncIterator[Mapping[str, Any] | RawObject]
    on_close: Callable[[], None] | None = None


Reply = Mapping[str, Any] | RawObject | Stream
C = TypeVar("C")
Handler = Callable[[Request, "Connection[C]"], Awaitable[Reply]]


@dataclass
class Connection(Generic[C]):
    """One client connection as a handler sees it: who is on the other end, and per-connection state."""

    context: C
    state: dict[str, Any] = field(default_factory=dict)


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler[C],
    context: C,
    *,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
) -> None:
    """Run the protocol on one connection until the peer closes it.  Never raises for anything the peer sends.

    At most ``max_inflight`` requests and ``MAX_INFLIGHT_BYTES`` of request lines are being worked on per
    connection; beyond that the server stops reading, so a client that pipelines without reading replies
    holds bounded memory.
    """
    conn: Connection[C] = Connection(context=context)
    replies: asyncio.Queue[_Pending | None] = asyncio.Queue(max_inflight)
    budget = _ByteBudget(MAX_INFLIGHT_BYTES)
    streams: set[asyncio.Task[None]] = set()
    lines = LineReader(reader)
    sender = asyncio.create_task(_send_replies(replies, writer, streams, conn, budget))
    try:
        while not sender.done():
            line = await lines.next()
            if line is None:
                break
            if isinstance(line, bytes) and not line.strip():
                continue  # blank lines (keep-alives, trailing CR/LF) are not requests
            size = len(line) if isinstance(line, bytes) else 0
            await budget.acquire(size)
            request_id, future = _dispatch(line, handler, conn)
            await replies.put(_Pending(request_id, future, size))
    except (ConnectionError, OSError):
        pass
    finally:
        await replies.put(None)
        with contextlib.suppress(Exception):
            await sender
        for task in streams:
            task.cancel()
        for task in list(streams):
            with contextlib.suppress(BaseException):
                await task
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


Op = Callable[[Request], Awaitable[Reply]]


def op_table(ops: Mapping[str, Op]) -> Handler[None]:
    """A connection handler dispatching on ``request.op``; an unknown op names the ones that exist."""

    async def handle(request: Request, conn: Connection[None]) -> Reply:
        op = ops.get(request.op)
        if op is None:
            raise invalid(f"unknown op {request.op!r}; known: {', '.join(sorted(ops))}")
        return await op(request)

    return handle


class ConnectionTracker:
    """A server's live connections, so that shutdown can let them finish briefly and then cancel the rest."""

    def __init__(self, handler: Handler[None]) -> None:
        self.handler = handler
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """For asyncio.start_unix_server: one connection, tracked while it lasts."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await serve_connection(reader, writer, self.handler, None)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def close(self, grace: float = 1.0) -> None:
        tasks = set(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


@dataclass(frozen=True, slots=True)
class _Pending:
    request_id: RequestId
    future: asyncio.Future[Reply]
    size: int


class _ByteBudget:
    """Bytes of request lines a connection has in flight; the reader waits while the budget is spent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def acquire(self, size: int) -> None:
        while self.used and self.used + size > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        self._freed.set()


def _dispatch(
    line: bytes | _Oversized, handler: Handler[C], conn: Connection[C]
) -> tuple[RequestId, asyncio.Future[Reply]]:
    loop = asyncio.get_running_loop()
    if isinstance(line, _Oversized):
        done: asyncio.Future[Reply] = loop.create_future()
        done.set_exception(invalid(f"the line is longer than {MAX_LINE} bytes"))
        return None, done
    try:
        request = parse_request(line)
    except BadRequest as exc:
        failed: asyncio.Future[Reply] = loop.create_future()
        failed.set_exception(exc)
        return exc.request_id, failed
    return request.id, asyncio.ensure_future(handler(request, conn))


async def _send_replies(
    replies: asyncio.Queue[_Pending | None],
    writer: asyncio.StreamWriter,
    streams: set[asyncio.Task[None]],
    conn: Connection[Any],
    budget: _ByteBudget,
) -> None:
    """Write replies in request order; hand streams to their own pump so later replies are not held up.

    Replies that are ready together leave in one write (one syscall for a pipelined burst); nothing ready is
    ever held back while waiting for a slower reply behind it.
    """
    out = bytearray()

    async def flush() -> None:
        if out:
            writer.write(bytes(out))
            out.clear()
        await writer.drain()

    try:
        while True:
            if out and (replies.empty() or len(out) >= READ_CHUNK):
                await flush()
            item = await replies.get()
            if item is None:
                break
            if out and not item.future.done():
                await flush()
            try:
                reply = await item.future
            except WireError as exc:
                out += encode(failure(item.request_id, exc))
            except Exception:
                log.exception("handler failed on request id=%r", item.request_id)
                out += encode(failure(item.request_id, WireError(ErrorCode.INTERNAL, "internal error; see the log")))
            else:
                if isinstance(reply, Stream):
                    await flush()
                    task = asyncio.create_task(_pump_stream(item.request_id, reply, writer))
                    streams.add(task)
                    task.add_done_callback(streams.discard)
                else:
                    out += encode_success(item.request_id, reply)
            budget.release(item.size)
        await flush()
    except (ConnectionError, OSError):
        # Keep consuming so the reader never blocks on a full queue or a spent budget of a dead connection.
        budget.limit = 2**62
        budget.release(0)
        while await replies.get() is not None:
            pass


async def _pump_stream(request_id: RequestId, stream: Stream, writer: asyncio.StreamWriter) -> None:
    try:
        async for payload in stream.events:
            writer.write(encode_event(request_id, payload))
            await writer.drain()
    except WireError as exc:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(encode(failure(request_id, exc)))
    except (ConnectionError, OSError):
        pass
    finally:
        if stream.on_close is not None:
            stream.on_close()


class SocketInUse(OSError):
    pass


def prepare_unix_path(path: Path) -> None:
    """Make room for a listening socket at ``path``: remove a stale socket, refuse to clobber anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
    else:
        raise SocketInUse(f"{path} is in use by another running server")
    finally:
        probe.close()


def bind_unix(path: Path, mode: int = 0o600, *, uid: int | None = None, gid: int | None = None) -> socket.socket:
    """A listening unix socket that is never reachable with wider permissions than ``mode``."""
    prepare_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        path.chmod(mode)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        sock.listen(128)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    sock.setblocking(False)
    return sock


#: AF_VSOCK addresses: any local CID (to listen on), and the host's (the hypervisor side of a guest's vsock).
VSOCK_CID_ANY: Final = 0xFFFFFFFF
VSOCK_CID_HOST: Final = 2


def bind_vsock(port: int, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking AF_VSOCK stream socket on ``port`` for any local CID; OSError when the kernel has
    no vsock transport for it (no virtio-vsock device, no vhost-vsock) or the port is taken."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((VSOCK_CID_ANY, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# ----------------------------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Address:
    """Where an endpoint listens: ``unix:PATH``, ``vsock:CID:PORT``, or ``serial:PATH`` (a bare absolute path
    means unix).  ``serial:`` is the host side of a VM's virtio-serial port as QEMU exposes it: a unix stream
    socket with a single peer, spoken to exactly like ``unix:``."""

    kind: str
    path: str = ""
    cid: int = 0
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("/"):
            return cls("unix", path=text)
        kind, _, rest = text.partition(":")
        if kind in ("unix", "serial") and rest:
            return cls(kind, path=rest)
        if kind == "vsock":
            cid, _, port = rest.partition(":")
            if cid.isdigit() and port.isdigit():
                return cls("vsock", cid=int(cid), port=int(port))
        raise ValueError(f"bad address {text!r}: expected unix:PATH, serial:PATH or vsock:CID:PORT")

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else f"vsock:{self.cid}:{self.port}"

    def connect(self, timeout: float | None = None) -> socket.socket:
        if self.kind in ("unix", "serial"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.path
        else:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            target = (self.cid, self.port)
        sock.settimeout(timeout)
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock


def _check_reply(reply: Any) -> JSONObject:
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise WireError(ErrorCode.INTERNAL, "the server sent a reply that is not a protocol object")
    if not reply["ok"]:
        err = reply.get("error") or {}
        raise WireError(str(err.get("code", "internal")), str(err.get("message", "unknown error")))
    return reply


def _connection_error_check(reply: JSONObject) -> JSONObject:
    """Raise an error line that carries no id: our clients always send ids, so it concerns the connection
    (e.g. the server refused it), not one request."""
    if reply.get("id") is None and reply.get("ok") is False:
        _check_reply(reply)
    return reply


def _result(reply: JSONObject) -> JSONObject:
    return {k: v for k, v in reply.items() if k not in ("id", "ok")}


class Client:
    """Blocking client: one request at a time, or a pipelined batch with :meth:`call_many`."""

    def __init__(self, address: Address | str, *, timeout: float | None = 30.0) -> None:
        self.address = Address.parse(address) if isinstance(address, str) else address
        self._sock = self.address.connect(timeout)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()

    def _read_line(self) -> JSONObject:
        line = self._file.readline(MAX_LINE + 2)
        if not line:
            raise ConnectionClosed()
        if not line.endswith(b"\n") and len(line) > MAX_LINE:
            self.close()  # the rest of that line would be read as the next reply: this connection is done
            raise WireError(ErrorCode.INTERNAL, f"the server sent a line longer than {MAX_LINE} bytes")
        reply = decode_json(line)
        if not isinstance(reply, dict):
            raise WireError(ErrorCode.INTERNAL, "the server sent a reply that is not a protocol object")
        return _connection_error_check(reply)

    def send(self, op: str, **params: Any) -> int:
        request_id = next(self._ids)
        self._sock.sendall(encode({"id": request_id, "op": op, **params}))
        return request_id

    def call(self, op: str, **params: Any) -> JSONObject:
        request_id = self.send(op, **params)
        while True:
            reply = self._read_line()
            if reply.get("id") == request_id:
                return _result(_check_reply(reply))

    def call_many(self, requests: list[tuple[str, JSONObject]]) -> list[JSONObject | WireError]:
        """Pipeline ``requests``: send them all while reading replies; a failed one is returned as its WireError.

        Sending happens on a helper thread because the server stops reading once its replies back up: a client
        that wrote everything before reading anything would deadlock on a large batch.
        """
        payload = bytearray()
        first = next(self._ids)
        ids = [first + i for i in range(len(requests))]
        self._ids = itertools.count(first + len(requests))
        for request_id, (op, params) in zip(ids, requests, strict=True):
            payload += encode({"id": request_id, "op": op, **params})
        send_errors: list[OSError] = []

        def send() -> None:
            try:
                self._sock.sendall(payload)
            except OSError as exc:
                send_errors.append(exc)

        sender = threading.Thread(target=send, name="nullbox-wire-send", daemon=True)
        sender.start()
        results: dict[Any, JSONObject | WireError] = {}
        try:
            while len(results) < len(ids):
                reply = self._read_line()
                try:
                    results[reply.get("id")] = _result(_check_reply(reply))
                except WireError as exc:
                    results[reply.get("id")] = exc
        finally:
            sender.join()
        if send_errors:
            raise send_errors[0]
        return [results[i] for i in ids]

    def stream(self, op: str, **params: Any) -> Iterator[JSONObject]:
        """Events of a streaming verb, forever until the caller stops iterating (then the connection closes)."""
        request_id = self.send(op, **params)
        try:
            while True:
                reply = _check_reply(self._read_line())
                if reply.get("id") == request_id and "event" in reply:
                    yield reply["event"]
        finally:
            self.close()


class AsyncClient:
    """asyncio client that multiplexes many outstanding requests and streams over one connection by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[RequestId, asyncio.Future[JSONObject]] = {}
        self._streams: dict[RequestId, asyncio.Queue[JSONObject | WireError]] = {}
        self._pump = asyncio.create_task(self._read_replies())

    @classmethod
    async def connect(cls, address: Address | str) -> AsyncClient:
        addr = Address.parse(address) if isinstance(address, str) else address
        if addr.kind in ("unix", "serial"):
            reader, writer = await asyncio.open_unix_connection(addr.path, limit=MAX_LINE + 2)
        else:
            sock = await asyncio.to_thread(addr.connect)
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_LINE + 2)
        return cls(reader, writer)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._pump.cancel()
        with contextlib.suppress(BaseException):
            await self._pump

    async def _read_replies(self) -> None:
        error: WireError = ConnectionClosed()
        try:
            while line := await self._reader.readline():
                reply = decode_json(line)
                if not isinstance(reply, dict):
                    continue
                request_id = _connection_error_check(reply).get("id")
                if request_id in self._streams:
                    queue = self._streams[request_id]
                    try:
                        queue.put_nowait(_check_reply(reply)["event"] if "event" in reply else {})
                    except WireError as exc:
                        queue.put_nowait(exc)
                elif (future := self._waiting.pop(request_id, None)) is not None and not future.done():
                    try:
                        future.set_result(_result(_check_reply(reply)))
                    except WireError as exc:
                        future.set_exception(exc)
        except (ConnectionError, OSError, ValueError, WireError) as exc:
            error = exc if isinstance(exc, WireError) else ConnectionClosed(f"connection failed: {exc}")
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(error)
            self._waiting.clear()
            for queue in self._streams.values():
                queue.put_nowait(error)

    async def call(self, op: str, **params: Any) -> JSONObject:
        if self._pump.done():
            raise ConnectionClosed()
        request_id = next(self._ids)
        future: asyncio.Future[JSONObject] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._writer.write(encode({"id": request_id, "op": op, **params}))
        await self._writer.drain()
        return await future

    async def stream(self, op: str, **params: Any) -> AsyncIterator[JSONObject]:
        if self._pump.done():
            raise ConnectionClosed()
        request_id = next(self._ids)
        queue: asyncio.Queue[JSONObject | WireError] = asyncio.Queue()
        self._streams[request_id] = queue
        self._writer.write(encode({"id": request_id, "op": op, **params}))
        await self._writer.drain()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, WireError):
                    raise item
                yield item
        finally:
            self._streams.pop(request_id, None)
