"""The shared wire protocol: framing, request parsing, the server loop and both clients, over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nullbox import log as nullbox_log
from nullbox import notify
from nullbox.daemon import DaemonProcess
from nullbox.wire import (
    MAX_INFLIGHT_BYTES,
    MAX_LINE,
    OVERSIZED,
    Address,
    AsyncClient,
    BadRequest,
    Client,
    Connection,
    ErrorCode,
    LineReader,
    Params,
    RawObject,
    Reply,
    Request,
    SocketInUse,
    Stream,
    WireError,
    bind_unix,
    encode,
    encode_event,
    encode_success,
    parse_request,
    serve_connection,
)


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def _lines(data: bytes, limit: int) -> list[Any]:
    lines = LineReader(_reader(data), limit)
    out: list[Any] = []
    while (line := await lines.next()) is not None:
        out.append(line)
    return out


def test_line_reader_skips_oversized_lines_and_keeps_going() -> None:
    data = b"short\n" + b"x" * 50 + b"\n" + b"y" * 500_000 + b"\nafter\nunterminated"
    assert asyncio.run(_lines(data, 20)) == [b"short", OVERSIZED, OVERSIZED, b"after", b"unterminated"]


def test_line_reader_limit_is_inclusive() -> None:
    assert asyncio.run(_lines(b"a" * 20 + b"\n", 20)) == [b"a" * 20]
    assert asyncio.run(_lines(b"a" * 21 + b"\n", 20)) == [OVERSIZED]


@pytest.mark.parametrize(
    ("line", "request_id", "fragment"),
    [
        (b"{", None, "not valid JSON"),
        (b"\xff\xfe", None, "UTF-8"),
        (b"[1]", None, "JSON object"),
        (b'{"id": true, "op": "x"}', None, "'id'"),
        (b'{"id": 1.5, "op": "x"}', None, "'id'"),
        (b'{"id": 7}', 7, "'op'"),
        (b'{"id": "a", "op": ""}', "a", "'op'"),
        (b'{"op": "x", "v": NaN}', None, "NaN"),
        (b'{"op": "x", "v": -Infinity}', None, "Infinity"),
        (b"[" * 100_000, None, "nests too deeply"),
    ],
)
def test_bad_requests(line: bytes, request_id: Any, fragment: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_request(line)
    assert exc.value.code == ErrorCode.INVALID_REQUEST
    assert exc.value.request_id == request_id
    assert fragment in exc.value.message


def test_request_fields() -> None:
    assert parse_request(b'{"id": "x", "op": "put", "key": "k"}') == Request("x", "put", {"key": "k"})
    assert parse_request(b'  {"op": "stats"}\r') == Request(None, "stats", {})


def test_params_name_the_field() -> None:
    request = Request(1, "query", {"limit": "ten", "extra": 1})
    with pytest.raises(WireError, match="'query' does not take 'extra'"):
        Params(request, {"limit"})
    params = Params(request, {"limit", "extra"})
    with pytest.raises(WireError, match="'limit' must be an integer"):
        params.integer("limit", 1, minimum=1, maximum=5)
    with pytest.raises(WireError, match="'query' needs 'prefix'"):
        params.raw("prefix")


def test_encode_never_emits_invalid_utf8() -> None:
    line = encode({"ok": True, "s": "\ud800 \u00e9"})
    assert line.endswith(b"\n")
    assert json.loads(line.decode("utf-8")) == {"ok": True, "s": "\ud800 \u00e9"}
    assert encode({"s": "\u00e9"}) == '{"s":"\u00e9"}\n'.encode()
    with pytest.raises(ValueError, match="JSON compliant"):
        encode({"v": float("nan")})


def test_raw_objects_are_spliced_verbatim() -> None:
    assert encode_success(7, RawObject("{}")) == b'{"id":7,"ok":true}\n'
    assert encode_success("x", RawObject('{"a":1,"v":{"b":[2]}}')) == b'{"id":"x","ok":true,"a":1,"v":{"b":[2]}}\n'
    assert encode_success(None, {"a": 1}) == b'{"id":null,"ok":true,"a":1}\n'
    line = encode_event(3, RawObject('{"type":"entry","n":"\u00e9"}'))
    assert json.loads(line) == {"id": 3, "ok": True, "event": {"type": "entry", "n": "\u00e9"}}


def test_address_parsing() -> None:
    assert Address.parse("unix:/run/x.sock") == Address("unix", path="/run/x.sock")
    assert Address.parse("/run/x.sock") == Address("unix", path="/run/x.sock")
    assert Address.parse("vsock:3:1024") == Address("vsock", cid=3, port=1024)
    assert str(Address.parse("vsock:3:1024")) == "vsock:3:1024"
    assert Address.parse("serial:/build/run/ctl.sock") == Address("serial", path="/build/run/ctl.sock")
    assert str(Address.parse("serial:/x.sock")) == "serial:/x.sock"
    for bad in ("tcp:1.2.3.4:5", "vsock:x:1", "unix:", "serial:", "relative/path"):
        with pytest.raises(ValueError, match="bad address"):
            Address.parse(bad)


# --------------------------------------------------------------------------------------------- live server


async def _echo_handler(request: Request, conn: Connection[str]) -> Reply:
    if request.op == "sleep":
        await asyncio.sleep(float(request.params["s"]))
        return {"slept": request.params["s"]}
    if request.op == "hold":
        concurrency.append(concurrency[-1] + 1 if concurrency else 1)
        await asyncio.sleep(0.01)
        concurrency.append(concurrency[-1] - 1)
        return {}
    if request.op == "who":
        return {"context": conn.context}
    if request.op == "fail":
        raise WireError(ErrorCode.NOT_FOUND, "nothing here")
    if request.op == "crash":
        raise RuntimeError("handler bug")
    if request.op == "count":

        async def events() -> AsyncIterator[dict[str, Any]]:
            for i in range(int(request.params["n"])):
                yield {"i": i}
            await asyncio.Event().wait()  # then stay open until the client leaves

        closed.append(False)
        return Stream(events(), on_close=lambda: closed.__setitem__(0, True))
    raise WireError(ErrorCode.INVALID_REQUEST, f"unknown op {request.op!r}")


closed: list[bool] = []
concurrency: list[int] = []


async def _with_server(path: Path, body: Callable[[], Awaitable[None]]) -> None:
    sock = bind_unix(path)
    server = await asyncio.start_unix_server(lambda r, w: serve_connection(r, w, _echo_handler, "ctx-value"), sock=sock)
    try:
        await body()
    finally:
        server.close()
        await server.wait_closed()


def test_replies_keep_request_order_while_handlers_overlap(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    async def body() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"id":1,"op":"sleep","s":0.2}\n{"id":2,"op":"sleep","s":0}\n{"id":3,"op":"who"}\n')
        started = asyncio.get_running_loop().time()
        replies = [json.loads(await reader.readline()) for _ in range(3)]
        assert [r["id"] for r in replies] == [1, 2, 3]
        assert replies[2] == {"id": 3, "ok": True, "context": "ctx-value"}
        assert asyncio.get_running_loop().time() - started < 5
        writer.close()

    asyncio.run(_with_server(path, body))


def test_errors_leave_the_connection_usable(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    async def body() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=4 * MAX_LINE)
        writer.write(b"not json\n" + b"z" * (MAX_LINE + 10) + b"\n")
        writer.write(b'\n   \n{"id":"f","op":"fail"}\n{"id":"c","op":"crash"}\n{"id":9,"op":"who"}\n')
        replies = [json.loads(await reader.readline()) for _ in range(5)]
        codes = [r.get("error", {}).get("code") for r in replies]
        assert codes == ["invalid_request", "invalid_request", "not_found", "internal", None]
        assert "longer than" in replies[1]["error"]["message"]
        assert replies[3]["error"]["message"] == "internal error; see the log"  # no internals leak
        assert replies[4]["context"] == "ctx-value"
        writer.close()

    asyncio.run(_with_server(path, body))


def test_streams_interleave_with_replies_and_end_when_the_client_closes(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    closed.clear()

    async def body() -> None:
        client = await AsyncClient.connect(f"unix:{path}")
        events = client.stream("count", n=3)
        assert [await anext(events) for _ in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert await client.call("who") == {"context": "ctx-value"}  # same connection, while streaming
        with pytest.raises(WireError) as exc:
            await client.call("fail")
        assert exc.value.code == ErrorCode.NOT_FOUND
        await client.close()
        for _ in range(100):
            if closed[0]:
                break
            await asyncio.sleep(0.02)
        assert closed == [True]

    asyncio.run(_with_server(path, body))


def test_inflight_request_bytes_are_bounded(tmp_path: Path) -> None:
    """A client pipelining big requests gets them all answered, but never more than ~8 MiB worked on at once."""
    path = tmp_path / "s.sock"
    concurrency.clear()
    pad = "p" * 600_000

    async def body() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        for i in range(30):
            writer.write(encode({"id": i, "op": "hold", "pad": pad}))
        await writer.drain()
        replies = [json.loads(await reader.readline()) for _ in range(30)]
        assert [r["id"] for r in replies] == list(range(30))
        writer.close()

    asyncio.run(_with_server(path, body))
    assert max(concurrency) <= MAX_INFLIGHT_BYTES // 600_000 + 1
    assert max(concurrency) > 1  # pipelining still overlaps work


def test_async_client_multiplexes_concurrent_calls(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    async def body() -> None:
        async with await AsyncClient.connect(f"unix:{path}") as client:
            results = await asyncio.gather(*(client.call("sleep", s=0.01 * (i % 3)) for i in range(50)))
            assert [r["slept"] for r in results] == [0.01 * (i % 3) for i in range(50)]

    asyncio.run(_with_server(path, body))


def test_sync_client_against_live_server(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    async def body() -> None:
        def blocking() -> None:
            with Client(f"unix:{path}") as client:
                assert client.call("who") == {"context": "ctx-value"}
                many = client.call_many([("who", {}), ("fail", {}), ("sleep", {"s": 0})])
                assert many[0] == {"context": "ctx-value"}
                assert isinstance(many[1], WireError) and many[1].code == ErrorCode.NOT_FOUND
                assert many[2] == {"slept": 0}
                stream = client.stream("count", n=2)
                assert [next(stream), next(stream)] == [{"i": 0}, {"i": 1}]

        await asyncio.to_thread(blocking)

    asyncio.run(_with_server(path, body))


def test_bind_unix_is_private_and_refuses_to_clobber(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "s.sock"
    sock = bind_unix(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SocketInUse, match="in use by another running server"):
        bind_unix(path)
    sock.close()
    again = bind_unix(path)  # a stale socket (nobody listening) is replaced
    again.close()
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(SocketInUse, match="not a socket"):
        bind_unix(plain)
    assert plain.read_text() == "keep me"


# ------------------------------------------------------------------------------------- notify and logging


def test_notify_reaches_a_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False  # no supervisor: a no-op
    with notify.ReadinessListener(str(tmp_path / "n.sock")) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
        assert notify.notify("STATUS=starting") is True
        assert notify.ready("serving") is True
        assert listener.wait_ready(5) is True
        assert listener.wait_ready(0.05) is False


def test_waiting_for_readiness_ends_when_the_process_is_gone(tmp_path: Path) -> None:
    with notify.ReadinessListener(str(tmp_path / "n.sock")) as listener:
        started = time.monotonic()
        assert listener.wait_ready(30, alive=lambda: time.monotonic() - started < 0.3) is False
        assert time.monotonic() - started < 10  # not the 30 s timeout: the dead process was noticed


def test_a_daemon_that_dies_before_ready_is_reported_at_once(tmp_path: Path) -> None:
    class Dying(DaemonProcess):
        name = "dying"

        def argv(self) -> list[str]:
            return [sys.executable, "-c", "import sys; sys.exit(7)"]

    with pytest.raises(RuntimeError, match="exited with status 7 before it was ready"):
        Dying(tmp_path).start(timeout=60)


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"nullbox-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert receiver.recv(100) == b"READY=1"


def test_log_setup_names_the_component(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nullbox_log.ENV_LEVEL, "warning")
    logger = nullbox_log.setup("testcomp")
    logger.info("hidden")
    logger.warning("shown %d", 1)
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "testcomp[" in err and "WARNING testcomp: shown 1" in err
    logging.getLogger().handlers.clear()
