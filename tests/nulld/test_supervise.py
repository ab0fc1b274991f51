"""nulld as a child subreaper on the host, supervising real processes through its control socket."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nullbox.wire import ErrorCode, Request, WireError
from nulld import frontdoor
from tests.nulld.conftest import PYTHON, NulldProcess

NOTIFY_AFTER = """
import os, socket, sys, time
time.sleep(float(sys.argv[1]))
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.send(f"READY=1\\nSTATUS=up after {sys.argv[1]}".encode())
time.sleep(100000)
"""

LISTEN_AFTER = """
import socket, sys, time
time.sleep(float(sys.argv[2]))
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
time.sleep(100000)
"""

SLEEPER = """
import signal, sys, time
log = sys.argv[1] if len(sys.argv) > 1 else None
def stop(*_):
    if log:
        with open(log, "a") as f:
            f.write(f"stop {sys.argv[2]} {time.monotonic()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
while True:
    time.sleep(1000)
"""


def _events(nulld: NulldProcess, event: str, service: str) -> list[float]:
    return [
        e["monotonic_s"] for e in nulld.call("timings")["events"] if e["event"] == event and e["service"] == service
    ]


def test_services_start_in_dependency_order_on_readiness(nulld: NulldProcess) -> None:
    notify = nulld.program("notify", NOTIFY_AFTER)
    listen = nulld.program("listen", LISTEN_AFTER)
    sleeper = nulld.program("sleeper", SLEEPER)
    sock = nulld.root / "c.sock"
    nulld.write_config(f"""
        [service.a]
        binary = "{PYTHON}"
        args = ["{notify}", "0.4"]
        ready = "notify"
        [service.b]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        depends_on = ["a"]
        [service.c]
        binary = "{PYTHON}"
        args = ["{listen}", "{sock}", "0.3"]
        ready = "{sock}"
        depends_on = ["b"]
        [service.independent]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
    """)
    nulld.start()
    nulld.wait_state("c", "ready")
    (a_ready,) = _events(nulld, "ready", "a")
    (b_spawned,) = _events(nulld, "spawned", "b")
    (b_ready,) = _events(nulld, "ready", "b")
    (c_spawned,) = _events(nulld, "spawned", "c")
    (c_ready,) = _events(nulld, "ready", "c")
    (a_spawned,) = _events(nulld, "spawned", "a")
    (free_spawned,) = _events(nulld, "spawned", "independent")
    assert a_spawned + 0.4 <= a_ready <= b_spawned  # b waited for a's READY=1, not for a's spawn
    assert b_ready <= c_spawned
    assert c_spawned + 0.3 <= c_ready  # ready only once the socket accepted a connection
    assert free_spawned < a_ready  # independent services do not wait for unrelated ones
    status = nulld.call("status")
    assert [s["name"] for s in status["services"]] == ["a", "independent", "b", "c"]
    assert all(s["ready"] and s["pid"] for s in status["services"])


def test_crash_loop_backs_off(nulld: NulldProcess) -> None:
    crasher = nulld.program("crash", "import sys; print('crashing', flush=True); sys.exit(3)\n")
    nulld.write_config(f"""
        [service.crash]
        binary = "{PYTHON}"
        args = ["{crasher}"]
        restart = "on-failure"
    """)
    nulld.start()
    nulld.wait_for(lambda: len(_events(nulld, "spawned", "crash")) >= 4, 20, "three restarts")
    spawns = _events(nulld, "spawned", "crash")
    exits = _events(nulld, "exited", "crash")
    waits = [spawns[i + 1] - exits[i] for i in range(3)]
    assert waits[0] >= 0.95 and waits[1] >= 1.95 and waits[2] >= 3.95, waits  # 1 s, 2 s, 4 s
    state = nulld.service("crash")
    assert state["restarts"] >= 3
    assert state["last_exit"]["code"] == 3
    lines = nulld.call("logs", service="crash")["lines"]
    assert [entry["line"] for entry in lines][:3] == ["crashing"] * 3


def test_missing_binary_fails_one_service_and_blocks_its_dependents(nulld: NulldProcess) -> None:
    sleeper = nulld.program("sleeper", SLEEPER)
    nulld.write_config(f"""
        [service.broken]
        binary = "/nonexistent/daemon"
        restart = "always"
        [service.needs_broken]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        depends_on = ["broken"]
        [service.indirect]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        depends_on = ["needs_broken"]
        [service.fine]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
    """)
    nulld.start()
    nulld.wait_state("fine", "ready")
    broken = nulld.service("broken")
    assert broken["state"] == "failed"
    assert broken["message"] == "binary /nonexistent/daemon not found"
    blocked = nulld.service("needs_broken")
    assert (blocked["state"], blocked["blocked_by"], blocked["pid"]) == ("blocked", "broken", None)
    assert nulld.service("indirect")["blocked_by"] == "needs_broken"


def test_restart_policies(nulld: NulldProcess) -> None:
    ok = nulld.program("ok", "print('done')\n")
    bad = nulld.program("bad", "raise SystemExit(7)\n")
    nulld.write_config(f"""
        [service.clean_on_failure]
        binary = "{PYTHON}"
        args = ["{ok}"]
        restart = "on-failure"
        [service.bad_never]
        binary = "{PYTHON}"
        args = ["{bad}"]
        restart = "never"
        [service.clean_always]
        binary = "{PYTHON}"
        args = ["{ok}"]
        restart = "always"
    """)
    nulld.start()
    assert nulld.wait_state("clean_on_failure", "exited")["last_exit"]["code"] == 0
    failed = nulld.wait_state("bad_never", "failed")
    assert failed["last_exit"]["code"] == 7 and failed["message"] == "exit code 7"
    nulld.wait_for(lambda: nulld.service("clean_always")["restarts"] >= 1, 10, "an always-service to restart")
    assert nulld.service("clean_on_failure")["restarts"] == 0


def test_ready_timeout_kills_and_restarts(nulld: NulldProcess) -> None:
    silent = nulld.program("silent", "import time; time.sleep(100000)\n")
    nulld.write_config(f"""
        [service.silent]
        binary = "{PYTHON}"
        args = ["{silent}"]
        ready = "notify"
        ready_timeout = 0.5
        restart = "on-failure"
    """)
    nulld.start()
    nulld.wait_for(lambda: (nulld.service("silent")["last_exit"] or {}).get("signal") == "SIGKILL", 10, "a kill")
    state = nulld.service("silent")
    assert state["last_exit"]["reason"] == "not ready within 0.5s"
    assert state["state"] in ("backoff", "starting")


def test_operator_stop_start_restart_and_logs(nulld: NulldProcess) -> None:
    sleeper = nulld.program("sleeper", SLEEPER)
    nulld.write_config(f"""
        [service.base]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        [service.top]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
        depends_on = ["base"]
    """)
    nulld.start()
    nulld.wait_state("top", "ready")
    # ready = "spawn": wait until the program has installed its SIGTERM handler (it prints once it has)
    nulld.wait_for(lambda: len(nulld.call("logs", service="base")["lines"]) == 1, 10, "base to print")
    assert stat.S_IMODE(nulld.socket.stat().st_mode) == 0o600
    first_pid = nulld.service("base")["pid"]
    stopped = nulld.call("stop", service="base")["service"]
    assert stopped["state"] == "stopped" and stopped["last_exit"] == {"code": 0, "at_ns": stopped["last_exit"]["at_ns"]}
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)
    assert nulld.service("top")["state"] == "ready"  # a running dependent is left running
    assert nulld.call("start", service="base")["service"]["state"] == "ready"
    nulld.wait_for(lambda: len(nulld.call("logs", service="base")["lines"]) == 2, 10, "base to print again")
    restarted = nulld.call("restart", service="base")["service"]
    assert restarted["state"] == "ready" and restarted["pid"] not in (None, first_pid)
    logs = nulld.call("logs", service="base", lines=2)["lines"]
    assert [(entry["stream"], entry["line"]) for entry in logs] == [("stdout", "started"), ("stdout", "started")]

    with nulld.client() as client:
        cases: list[tuple[str, dict[str, Any], ErrorCode]] = [
            ("stop", {"service": "ghost"}, ErrorCode.NOT_FOUND),
            ("stop", {}, ErrorCode.INVALID_REQUEST),
            ("logs", {"service": "base", "lines": -1}, ErrorCode.INVALID_REQUEST),
            ("logs", {"service": "base", "follow": "yes"}, ErrorCode.INVALID_REQUEST),
            ("frobnicate", {}, ErrorCode.INVALID_REQUEST),
            ("test_fault", {"where": "main"}, ErrorCode.INVALID_REQUEST),  # test hooks are off by default
        ]
        for op, params, code in cases:
            with pytest.raises(WireError) as exc:
                client.call(op, **params)
            assert exc.value.code == code, op
        assert client.call("status")["nulld"]["degraded"] is None


def test_logs_follow_streams_new_lines(nulld: NulldProcess) -> None:
    ticker = nulld.program(
        "ticker", "import time\nfor i in range(1000):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)\n"
    )
    nulld.write_config(f"""
        [service.ticker]
        binary = "{PYTHON}"
        args = ["{ticker}"]
    """)
    nulld.start()
    nulld.wait_for(lambda: len(nulld.call("logs", service="ticker")["lines"]) >= 2, 10, "two ticks")
    seen: list[dict[str, Any]] = []
    with nulld.client() as client:
        stream = client.stream("logs", service="ticker", lines=1, follow=True)
        for _ in range(4):
            seen.append(next(stream))
    numbers = [int(entry["line"].split()[1]) for entry in seen]
    assert numbers == list(range(numbers[0], numbers[0] + 4))  # the backlog line, then live lines in order


def test_sigterm_stops_dependents_first(nulld: NulldProcess) -> None:
    sleeper = nulld.program("sleeper", SLEEPER)
    order = nulld.root / "order.log"
    nulld.write_config(f"""
        [service.a]
        binary = "{PYTHON}"
        args = ["{sleeper}", "{order}", "a"]
        [service.b]
        binary = "{PYTHON}"
        args = ["{sleeper}", "{order}", "b"]
        depends_on = ["a"]
        [service.c]
        binary = "{PYTHON}"
        args = ["{sleeper}", "{order}", "c"]
        depends_on = ["b"]
        [service.stubborn]
        binary = "{PYTHON}"
        args = ["-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(100000)"]
        stop_timeout = 3
    """)
    nulld.start()
    nulld.wait_state("c", "ready")
    nulld.wait_for(lambda: all(nulld.call("logs", service=n)["lines"] for n in "abc"), 10, "handlers to be installed")
    time.sleep(0.3)  # stubborn installs SIG_IGN at start-up; give it that moment (it prints nothing)
    stubborn = nulld.service("stubborn")["pid"]
    assert nulld.terminate() == 0
    lines = order.read_text().split()
    assert lines[0::3] == ["stop"] * 3 and lines[1::3] == ["c", "b", "a"]
    stamps = [float(t) for t in lines[2::3]]
    # The chain does not wait for the unrelated service's 3 s stop timeout: each service stops as soon as its
    # dependents have, not a whole layer later.
    assert stamps[2] - stamps[0] < 2.5
    with pytest.raises(ProcessLookupError):
        os.kill(stubborn, 0)
    assert "stubborn did not stop within 3s; killing it" in nulld.log.read_text()
    assert not nulld.socket.exists()


def test_orphans_are_reaped_as_subreaper(nulld: NulldProcess) -> None:
    orphan_maker = nulld.program(
        "orphans",
        """
        import os, time
        for _ in range(50):
            if os.fork() == 0:
                if os.fork() == 0:
                    time.sleep(0.3)
                    os._exit(0)
                os._exit(0)
        time.sleep(100000)
        """,
    )
    nulld.write_config(f"""
        [service.orphans]
        binary = "{PYTHON}"
        args = ["{orphan_maker}"]
    """)
    nulld.start()
    nulld.wait_state("orphans", "ready")
    assert nulld.proc is not None
    nulld_pid = nulld.proc.pid

    def zombies_and_children() -> tuple[int, int]:
        children = Path(f"/proc/{nulld_pid}/task/{nulld_pid}/children").read_text().split()
        zombies = 0
        for child in children:
            try:
                if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    zombies += 1
            except FileNotFoundError:
                pass
        return zombies, len(children)

    nulld.wait_for(lambda: zombies_and_children() == (0, 1), 10, "orphans to be reaped")


def test_broken_config_is_one_clear_error_in_development(nulld: NulldProcess) -> None:
    nulld.write_config("""
        [service.a]
        binary = "/bin/true"
        restart = "sometimes"
    """)
    result = subprocess.run(
        [PYTHON, "-m", "nulld", "--config", str(nulld.config), "--socket", str(nulld.socket)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "service.a.restart: must be one of always, on-failure, never (got 'sometimes')" in result.stderr
    assert "Traceback" not in result.stderr
    check = subprocess.run(
        [PYTHON, "-m", "nulld", "--check", "--config", str(nulld.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 2 and "service.a.restart" in check.stderr


def test_output_is_kept_when_nobody_reads_it(nulld: NulldProcess) -> None:
    chatty = nulld.program(
        "chatty",
        "import sys, time\nfor i in range(3000):\n    print(f'line {i}')\nsys.stdout.flush()\ntime.sleep(100000)\n",
    )
    nulld.write_config(f"""
        [service.chatty]
        binary = "{PYTHON}"
        args = ["{chatty}"]
    """)
    nulld.start()
    nulld.wait_for(
        lambda: (nulld.call("logs", service="chatty", lines=1)["lines"] or [{}])[0].get("line") == "line 2999",
        10,
        "all output",
    )
    lines = nulld.call("logs", service="chatty", lines=1000)["lines"]
    assert [entry["line"] for entry in lines] == [f"line {i}" for i in range(2000, 3000)]  # the newest 1000 kept


def test_signals_in_a_burst_do_not_disturb_supervision(nulld: NulldProcess) -> None:
    sleeper = nulld.program("sleeper", SLEEPER)
    nulld.write_config(f"""
        [service.s]
        binary = "{PYTHON}"
        args = ["{sleeper}"]
    """)
    nulld.start()
    nulld.wait_state("s", "ready")
    assert nulld.proc is not None
    stop = threading.Event()

    def chld_storm() -> None:
        assert nulld.proc is not None
        while not stop.is_set():
            os.kill(nulld.proc.pid, signal.SIGCHLD)
            time.sleep(0.001)

    storm = threading.Thread(target=chld_storm)
    storm.start()
    try:
        for _ in range(20):
            assert nulld.service("s")["state"] == "ready"
    finally:
        stop.set()
        storm.join()


def test_notify_counts_only_the_services_own_processes(nulld: NulldProcess) -> None:
    notify = nulld.program("notify", NOTIFY_AFTER)
    silent = nulld.program("silent", "import time; time.sleep(100000)\n")
    nulld.root.chmod(0o755)  # the service running as nobody reads its program from here
    Path(notify).chmod(0o644)
    nulld.write_config(f"""
        [service.wrapped]
        binary = "/bin/sh"
        args = ["-c", "{PYTHON} {notify} 0.1; true"]
        ready = "notify"
        [service.as_nobody]
        binary = "{PYTHON}"
        args = ["{notify}", "0"]
        ready = "notify"
        user = "nobody"
        [service.silent]
        binary = "{PYTHON}"
        args = ["{silent}"]
        ready = "notify"
        ready_timeout = 60
    """)
    nulld.start()
    wrapped = nulld.wait_state("wrapped", "ready")  # READY=1 from a child in the service's process group counts
    assert wrapped["message"] == "up after 0.1"  # what it said with STATUS= stays in status
    nobody = nulld.wait_state("as_nobody", "ready")
    assert Path(f"/proc/{nobody['pid']}/status").read_text().count("\t65534\t") >= 1  # runs as nobody
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as outsider:
        outsider.connect(str(nulld.runtime / "notify.sock"))
        outsider.send(b"READY=1")  # the test process is no service: ignored
    time.sleep(0.3)
    assert nulld.service("silent")["state"] == "starting"


def test_front_door_forwards_ctx_verbs(nulld: NulldProcess) -> None:
    ctx_socket = nulld.root / "ctx.sock"
    nulld.write_config(f"""
        [service.ctxgraph]
        binary = "{PYTHON}"
        args = ["-m", "ctxgraph", "serve", "--db", "{nulld.root / "ctx.db"}", "--socket", "{ctx_socket}",
                "--agents-dir", "{nulld.root / "agents"}"]
        ready = "notify"
    """)
    nulld.extra = ["--route", f"ctx={ctx_socket}"]
    nulld.start()
    nulld.wait_state("ctxgraph", "ready")
    watcher = nulld.client()
    events = watcher.stream("ctx.watch", prefix="door/")
    assert next(events)["type"] == "subscribed"
    with nulld.client() as client:
        put = client.call("ctx.put", key="door/1", value={"via": "nulld"})
        assert put["created"] is True
        assert next(events)["entry"]["hash"] == put["hash"]  # the stream is relayed live
        watcher.close()
        assert client.call("ctx.get", hash=put["hash"])["entry"]["value"] == {"via": "nulld"}
        assert client.call("ctx.stats")["entries"] == 1
        for op, params, fragment in [
            ("ctx.put", {"key": "", "value": 1}, "'key'"),  # ctxgraph's own error comes back as is
            ("ctx.", {}, "names no verb"),
            ("nope.put", {}, "unknown op"),
        ]:
            with pytest.raises(WireError) as exc:
                client.call(op, **params)
            assert exc.value.code == ErrorCode.INVALID_REQUEST and fragment in exc.value.message, op
        client.call("stop", service="ctxgraph")
        with pytest.raises(WireError) as exc:
            client.call("ctx.stats")
        assert exc.value.code == ErrorCode.UNAVAILABLE and "ctxgraph is not running" in exc.value.message


def test_front_door_routes_name_each_owner_and_its_verb() -> None:
    cage = Path("/run/nullbox/cage.sock")
    assert frontdoor.route("agent.start") == (cage, "start")
    assert frontdoor.route("secret.set") == (cage, "secret_set")  # cage's vault ops carry a prefix
    assert frontdoor.route("egress.status") == (Path("/run/nullbox/egress.sock"), "status")
    assert frontdoor.route("status") is None  # nulld's own
    assert frontdoor.route("other.verb") is None
    follow = Request(id=1, op="agent.logs", params={"agent": "a", "follow": True})
    once = Request(id=2, op="agent.logs", params={"agent": "a"})
    assert frontdoor.streams(follow) and not frontdoor.streams(once)
    assert frontdoor.streams(Request(id=3, op="ctx.watch", params={}))
