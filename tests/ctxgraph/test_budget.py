"""Agents' call budgets (``max_calls_per_hour``): the window itself, and the daemon enforcing it per agent socket."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ctxgraph.budget import BUCKET_S, BUCKETS, RATE_LIMITED, CallBudget
from ctxgraph.client import CtxClient
from ctxgraph.process import ServerProcess
from ctxgraph.server import CtxGraphServer, ServerConfig
from nullbox.wire import ErrorCode, WireError

HOUR = 3600.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _error(call: Any, *args: Any, **kwargs: Any) -> WireError:
    with pytest.raises(WireError) as exc:
        call(*args, **kwargs)
    return exc.value


# -------------------------------------------------------------------------------------------------- the window


def test_the_limit_then_a_wait_until_the_oldest_minute_leaves_the_window() -> None:
    clock = FakeClock(0.0)
    budget = CallBudget(3, clock)
    assert [budget.take() for _ in range(3)] == [None, None, None]
    assert budget.take() == BUCKETS * BUCKET_S  # 61 minutes: the minute of the calls has left the window
    assert budget.used() == 3  # refusals are not counted
    clock.now = BUCKETS * BUCKET_S - 0.5
    assert budget.take() == 0.5
    clock.now = BUCKETS * BUCKET_S
    assert budget.take() is None
    assert budget.used() == 1


def test_calls_spread_over_the_hour_come_back_one_minute_at_a_time() -> None:
    clock = FakeClock(0.0)
    budget = CallBudget(3, clock)
    for minute in (0, 10, 20):
        clock.now = minute * 60.0 + 5
        assert budget.take() is None
    clock.now = 30 * 60.0
    assert budget.take() == (61 - 30) * 60.0  # when minute 0's call expires
    clock.now = 61 * 60.0
    assert budget.take() is None
    assert budget.take() == 10 * 60.0  # now minute 10's call is the oldest


def test_zero_means_counted_but_never_refused() -> None:
    clock = FakeClock()
    budget = CallBudget(0, clock)
    assert all(budget.take() is None for _ in range(10_000))
    assert budget.used() == 10_000
    clock.now += 2 * HOUR  # a gap longer than the whole window clears it
    assert budget.used() == 0


def test_never_more_than_the_limit_in_any_rolling_hour() -> None:
    rng = random.Random(7)
    clock = FakeClock(0.0)
    limit = 20
    budget = CallBudget(limit, clock)
    accepted: list[float] = []
    for _ in range(20_000):
        clock.now += rng.expovariate(1 / 40.0)  # about 90 attempts an hour, bursty
        if budget.take() is None:
            accepted.append(clock.now)
    assert len(accepted) > 5 * limit  # the budget did come back, many times
    start = 0
    for end, at in enumerate(accepted):
        while accepted[start] <= at - HOUR:
            start += 1
        assert end - start + 1 <= limit, f"{end - start + 1} calls in the hour up to {at}"


# ------------------------------------------------------------------------------------ the daemon, in process


@contextmanager
def in_process(tmp_path: Path, clock: FakeClock) -> Iterator[CtxGraphServer]:
    """A real ctxgraph server (sockets, SQLite file) on an event loop in a thread, with the test's clock."""
    server = CtxGraphServer(ServerConfig(tmp_path / "db", tmp_path / "admin.sock", tmp_path / "agents"), clock=clock)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield server
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def _client(server: CtxGraphServer, agent: str | None = None) -> CtxClient:
    path = server.config.socket if agent is None else server.config.agents_dir / f"{agent}.sock"
    return CtxClient(f"unix:{path}", timeout=30)


def test_n_calls_then_rate_limited_on_that_socket_only(tmp_path: Path) -> None:
    clock = FakeClock()
    with in_process(tmp_path, clock) as server, _client(server) as admin:
        admin.register_agent("limited", max_calls_per_hour=3)
        admin.register_agent("other", max_calls_per_hour=3)
        with _client(server, "limited") as limited, _client(server, "other") as other:
            written = limited.put("k", 1)  # 1
            assert _error(limited.get, "0" * 64).code == ErrorCode.NOT_FOUND  # 2: refused calls count too
            assert limited.stats()["agents"] == 2  # 3
            refused = _error(limited.put, "k", 2)
            assert refused.code == RATE_LIMITED
            assert "'limited' has used its 3 calls of the last hour (max_calls_per_hour)" in refused.message
            wait = (clock.now // BUCKET_S + BUCKETS) * BUCKET_S - clock.now  # when the calls' minute leaves the window
            assert f"the next call is allowed in {math.ceil(wait)} s" in refused.message
            assert _error(limited.rpc.call, "no_such_op").code == RATE_LIMITED  # any op, before anything else
            # other agents and the admin socket are unaffected
            assert other.put("k", 1)["created"] is True
            for _ in range(20):
                admin.stats()
            assert admin.get(written["hash"])["value"] == 1
            listed = {a["agent"]: a for a in admin.list_agents()}
            assert (listed["limited"]["max_calls_per_hour"], listed["limited"]["calls_last_hour"]) == (3, 3)
            assert (listed["other"]["max_calls_per_hour"], listed["other"]["calls_last_hour"]) == (3, 1)

            clock.now += 10 * 60
            assert _error(limited.stats).code == RATE_LIMITED  # ten minutes later: still the same hour
            clock.now += 51 * 60
            assert limited.put("k", 2)["created"] is True  # the same connection, an hour and a minute later
            assert limited.stats()["entries"] == 3
            assert limited.stats()["entries"] == 3
            assert _error(limited.stats).code == RATE_LIMITED


def test_the_budget_outlives_reregistration_and_a_zero_limit_lifts_it(tmp_path: Path) -> None:
    clock = FakeClock()
    with in_process(tmp_path, clock) as server, _client(server) as admin:
        admin.register_agent("a", max_calls_per_hour=2)
        with _client(server, "a") as agent:
            agent.stats()
            agent.stats()
            assert _error(agent.stats).code == RATE_LIMITED
            admin.register_agent("a", max_calls_per_hour=3)  # a live connection gets the new limit...
            agent.stats()  # ...and its calls so far still count
            refused = _error(agent.stats)
            assert refused.code == RATE_LIMITED and "its 3 calls" in refused.message
        admin.unregister_agent("a")  # a VM restart: cage unregisters, then registers the agent again
        admin.register_agent("a", max_calls_per_hour=3)
        with _client(server, "a") as agent:
            assert _error(agent.stats).code == RATE_LIMITED  # crashing does not buy a fresh hour
            admin.register_agent("a")  # without max_calls_per_hour: no limit
            assert agent.stats()["agents"] == 1
        assert admin.list_agents()[0]["max_calls_per_hour"] == 0


def test_a_watch_counts_once(tmp_path: Path) -> None:
    clock = FakeClock()
    with in_process(tmp_path, clock) as server, _client(server) as admin:
        admin.register_agent("w", max_calls_per_hour=2)
        with _client(server, "w") as watcher, _client(server, "w") as writer:
            events = watcher.watch("n/")
            assert next(events)["type"] == "subscribed"
            for i in range(3):
                admin.put(f"n/{i}", i, agent="w")
            assert [next(events)["entry"]["value"] for _ in range(3)] == [0, 1, 2]  # events are not calls
            writer.stats()
            assert _error(writer.stats).code == RATE_LIMITED


# ---------------------------------------------------------------------------------------- the daemon process


@pytest.mark.parametrize("value", [-1, 1_000_001, "10", True, 1.5, [3]])
def test_bad_limits_are_refused_naming_the_field(server: ServerProcess, value: Any) -> None:
    with server.client() as admin:
        error = _error(admin.rpc.call, "register_agent", agent="a", max_calls_per_hour=value)
        assert error.code == ErrorCode.INVALID_REQUEST
        assert "'max_calls_per_hour'" in error.message
        assert admin.list_agents() == []  # nothing registered, and the daemon still answers
    assert server.alive()


def test_pipelined_over_budget_requests_get_one_error_each_and_the_connection_stays(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("burst", max_calls_per_hour=3, write=["b/"])
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(server.agents_dir / "burst.sock"))
        lines = [{"id": i, "op": "put", "key": f"b/{i}", "value": i} for i in range(6)]
        sock.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        reader = sock.makefile("rb")
        replies = [json.loads(reader.readline()) for _ in lines]
        assert [r["id"] for r in replies] == list(range(6))
        assert [r["ok"] for r in replies] == [True, True, True, False, False, False]
        assert {r["error"]["code"] for r in replies[3:]} == {RATE_LIMITED}
        sock.sendall(b'{"id": 9, "op": "stats"}\n')  # still open: answered (refused) rather than dropped
        assert json.loads(reader.readline())["error"]["code"] == RATE_LIMITED
    with server.client() as admin:
        assert [e["key"] for e in admin.query("b/")["entries"]] == ["b/2", "b/1", "b/0"]


def test_the_limit_survives_a_restart_of_ctxgraph(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("kept", max_calls_per_hour=2)
    assert server.stop() == 0
    server.start()
    with server.client() as admin:
        assert admin.list_agents()[0]["max_calls_per_hour"] == 2
    with server.client("kept") as agent:
        agent.stats()
        agent.stats()
        assert _error(agent.stats).code == RATE_LIMITED
