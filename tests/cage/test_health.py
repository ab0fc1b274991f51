"""cage.health: one probe against real local sockets, and the watch loop's counting, start period and pausing."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec

import pytest

from cage.health import MAX_STATUS_LINE, Health, HealthWatch, ProbeResult, parse_status_line, probe
from cage.manifest import HealthCheck
from nullctl.commands.agent import _status_fields
from nullctl.output import Output

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
P = ParamSpec("P")


def in_loop(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test in a fresh event loop (the project's tests use no pytest asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server on 127.0.0.1: (its port, the request heads it received)."""
    heads: list[bytes] = []
    tasks: set[asyncio.Task[None]] = set()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heads
    finally:
        server.close()
        for task in tasks:
            task.cancel()


def answering(data: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return handler


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@in_loop
async def test_a_2xx_answer_is_healthy_and_the_request_is_http_1_0() -> None:
    async with serving(answering(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")) as (port, heads):
        assert await probe("127.0.0.1", port, "/healthz", 2) == ProbeResult(True, "HTTP 200")
    request_line, *headers = heads[0].decode().split("\r\n")
    assert request_line == "GET /healthz HTTP/1.0"
    assert f"Host: 127.0.0.1:{port}" in headers


@in_loop
async def test_a_500_is_a_failure_naming_the_status() -> None:
    async with serving(answering(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")) as (port, _):
        assert await probe("127.0.0.1", port, "/healthz", 2) == ProbeResult(False, "HTTP 500")


@in_loop
async def test_a_server_that_accepts_but_never_answers_times_out() -> None:
    async with serving(silent) as (port, heads):
        started = time.monotonic()
        result = await probe("127.0.0.1", port, "/healthz", 0.3)
        elapsed = time.monotonic() - started
    assert result == ProbeResult(False, "no answer within 0.3 s")
    assert 0.3 <= elapsed < 2.0
    assert heads  # it did connect and send the request: the timeout covers the whole exchange


@in_loop
async def test_a_refused_port_fails_at_once() -> None:
    started = time.monotonic()
    result = await probe("127.0.0.1", free_port(), "/healthz", 5)
    assert result == ProbeResult(False, "connection refused")
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (b"hello there\r\n", "not an HTTP status line: 'hello there'"),
        (b"HTTP/1.0 2000 OK\r\n", "not an HTTP status line: 'HTTP/1.0 2000 OK'"),
        (b"HTTP/1.0 OK 200\r\n", "not an HTTP status line: 'HTTP/1.0 OK 200'"),
        (b"\x00\xff\r\n", "not an HTTP status line: '\\x00\\xff'"),
        (b"HTTP/1.0 20", "not an HTTP status line: 'HTTP/1.0 20'"),  # cut short, then closed
        (b"", "the connection closed without an answer"),
        (b"x" * (MAX_STATUS_LINE + 10), f"no HTTP status line in the first {MAX_STATUS_LINE} bytes"),
    ],
)
@in_loop
async def test_anything_but_a_status_line_is_a_failure_saying_what_came(answer: bytes, detail: str) -> None:
    async with serving(answering(answer)) as (port, _):
        assert await probe("127.0.0.1", port, "/healthz", 2) == ProbeResult(False, detail)


@in_loop
async def test_without_http_path_a_connect_is_enough() -> None:
    async with serving(silent) as (port, heads):
        assert await probe("127.0.0.1", port, None, 2) == ProbeResult(True, "TCP connect")
    assert heads == []  # nothing was sent


def test_status_lines() -> None:
    assert parse_status_line(b"HTTP/1.1 204\r\n") == ProbeResult(True, "HTTP 204")
    assert parse_status_line(b"HTTP/1.0 299 Fine\n") == ProbeResult(True, "HTTP 299")
    assert parse_status_line(b"HTTP/1.0 301 Moved\r\n") == ProbeResult(False, "HTTP 301")
    assert parse_status_line(b"HTTP/1.0 199 Early\r\n") == ProbeResult(False, "HTTP 199")


# --------------------------------------------------------------------------------------------------- the watch


class Script:
    """A prober answering from a list (then healthy forever), recording when it was asked."""

    def __init__(self, *results: bool) -> None:
        self.results = list(results)
        self.calls: list[float] = []

    async def __call__(self, host: str, port: int, http_path: str | None, timeout_s: float) -> ProbeResult:
        self.calls.append(time.monotonic())
        ok = self.results.pop(0) if self.results else True
        return ProbeResult(ok, "fine" if ok else f"failure {len(self.calls)}")


def check(**fields: float) -> HealthCheck:
    """A HealthCheck with sub-second timings (the manifest allows whole seconds only; the loop does not care)."""
    values: dict[str, Any] = {"port": 8080, "http_path": None, "interval_s": 0.05, "timeout_s": 0.05}
    values |= {"retries": 3, "start_period_s": 0}
    return HealthCheck.model_construct(**(values | fields))


async def until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@in_loop
async def test_failures_in_the_start_period_do_not_count_and_retries_make_it_unhealthy() -> None:
    reasons: list[str] = []
    prober = Script(False, False, True, False, True, False, False, False)
    watch = HealthWatch(check(start_period_s=0.12, retries=3), "10.0.0.2", reasons.append, prober=prober)
    assert watch.health.state == "starting"
    watch.start()
    await until(lambda: watch.health.state == "healthy")
    assert watch.health.failures == 0  # the two failures fell in the start period
    await until(lambda: watch.health.state == "unhealthy")
    assert reasons == ["3 health checks failed in a row, last: failure 8"]  # the lone failure 4 was reset by 5
    assert watch.health.failures == 3 and watch.health.last == "failure 8" and watch.health.checked_at is not None
    calls = len(prober.calls)
    await asyncio.sleep(0.2)
    assert len(prober.calls) == calls and len(reasons) == 1  # it stopped probing and reported once
    assert watch.health.to_json()["state"] == "unhealthy"


@in_loop
async def test_without_a_start_period_boot_failures_count() -> None:
    reasons: list[str] = []
    watch = HealthWatch(check(retries=2), "10.0.0.2", reasons.append, prober=Script(False, False))
    watch.start()
    await until(lambda: bool(reasons))
    assert watch.health.state == "unhealthy" and watch.health.failures == 2


@in_loop
async def test_pausing_stops_probing_and_resuming_starts_over() -> None:
    reasons: list[str] = []
    prober = Script(True, *[False] * 50)
    watch = HealthWatch(check(retries=4), "10.0.0.2", reasons.append, prober=prober)
    watch.start()
    await until(lambda: watch.health.failures == 2)
    watch.suspend()
    assert watch.health.state == "paused"
    calls = len(prober.calls)
    await asyncio.sleep(0.3)  # six intervals: paused, nothing is probed and nothing becomes unhealthy
    assert len(prober.calls) == calls and reasons == []
    watch.resume()
    assert (watch.health.state, watch.health.failures) == ("starting", 0)
    await until(lambda: bool(reasons))
    assert len(prober.calls) >= calls + 4  # the failures before the pause did not count
    watch.close()


@in_loop
async def test_close_stops_the_watch() -> None:
    prober = Script()
    watch = HealthWatch(check(), "10.0.0.2", lambda reason: None, prober=prober)
    watch.start()
    await until(lambda: len(prober.calls) >= 2)
    watch.close()
    await asyncio.sleep(0.01)
    calls = len(prober.calls)
    await asyncio.sleep(0.2)
    assert len(prober.calls) == calls


def test_nullctl_shows_the_health_cage_reports() -> None:
    """``nullctl agent status`` prints status fields selectively: health and an unhealthy exit are among them."""
    health = Health(state="starting", failures=2, last="connection refused", checked_at=1_767_225_600.0)
    status = {
        "state": "running",
        "restarts": 1,
        "health": health.to_json(),
        "last_exit": {
            "at": "2026-01-01T00:00:00+00:00",
            "unhealthy": "3 health checks failed in a row, last: HTTP 500",
        },
    }
    fields = dict(_status_fields(Output(json_mode=False, colour=False), status))
    assert fields["health"] == (
        "starting, 2 failures in a row, last connection refused at 2026-01-01T00:00:00+00:00",
        "yellow",
    )
    assert "unhealthy: 3 health checks failed in a row, last: HTTP 500" in str(fields["last exit"])
