"""``nullctl status | service ... | timings | poweroff`` and the exit statuses, against a real nulld."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.nullctl.conftest import Appliance, run_nullctl


def test_status_human_and_json(appliance: Appliance) -> None:
    appliance.nulld.wait_for(lambda: "line 2" in appliance.ok("service", "logs", "chatty"), what="chatty's output")
    lines = appliance.ok("status").splitlines()
    assert lines[0].startswith("nulld:") and "(subreaper)" in lines[0] and "up " in lines[0]
    header = lines.index(next(line for line in lines if line.startswith("SERVICE")))
    assert lines[header].split() == ["SERVICE", "STATE", "PID", "RESTARTS", "SINCE", "NOTE"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1 :] if line and not line.startswith("agents")}
    assert rows["ctxgraph"][1] == "ready" and rows["chatty"][1] == "ready"
    assert "\x1b[" not in "\n".join(lines)  # no colour when stdout is not a terminal
    # cage is not running: one line says so, and status still succeeds
    assert lines[-1] == "agents: unknown, cage is not running"

    data = json.loads(appliance.ok("--json", "status"))
    assert data["nulld"]["mode"] == "subreaper"
    assert {s["name"]: s["state"] for s in data["services"]} == {"ctxgraph": "ready", "chatty": "ready"}
    assert data["cage"]["error"]["code"] == "unavailable"
    assert json.loads(appliance.ok("status", "--json")).keys() == data.keys()  # --json after the command too


def test_service_list_start_stop_restart(appliance: Appliance) -> None:
    table = appliance.ok("service", "list").splitlines()
    assert table[0].split() == ["SERVICE", "STATE", "PID", "RESTARTS", "SINCE", "NOTE"]
    assert sorted(line.split()[0] for line in table[1:]) == ["chatty", "ctxgraph"]

    stopped = appliance.ok("service", "stop", "chatty")
    assert stopped.startswith("chatty: stopped")
    listed = json.loads(appliance.ok("--json", "service", "list"))["services"]
    assert {s["name"]: s["state"] for s in listed}["chatty"] == "stopped"
    started = json.loads(appliance.ok("--json", "service", "start", "chatty"))["service"]
    assert started["name"] == "chatty" and started["state"] in ("starting", "ready") and started["pid"]
    old_pid = appliance.nulld.service("ctxgraph")["pid"]
    restarted = appliance.ok("service", "restart", "ctxgraph")
    assert restarted.startswith("ctxgraph: ") and f"(pid {old_pid})" not in restarted

    missing = appliance.run("service", "start", "nope")
    assert missing.returncode == 1
    assert missing.stderr == "nullctl: no service named 'nope' (not_found); see `nullctl service list`\n"


def test_service_logs_and_follow(appliance: Appliance) -> None:
    appliance.nulld.wait_for(lambda: "line 2" in appliance.ok("service", "logs", "chatty"), what="chatty's output")
    lines = appliance.ok("service", "logs", "chatty").splitlines()
    shown = [line.split(" ", 2)[1:] for line in lines]
    # stdout and stderr are separate pipes: each keeps its order, their interleaving is the scheduler's
    assert [text for stream, text in shown if stream == "out"] == ["hello from chatty", "line 0", "line 1", "line 2"]
    assert [text for stream, text in shown if stream == "err"] == ["a warning from chatty"]
    assert all(len(line.split(" ")[0]) == 8 for line in lines)  # HH:MM:SS
    last = json.loads(appliance.ok("--json", "service", "logs", "chatty", "-n", "2"))
    assert (
        len(last["lines"]) == 2
        and last["lines"] == json.loads(appliance.ok("--json", "service", "logs", "chatty"))["lines"][-2:]
    )
    newest = next(entry for entry in last["lines"] if entry["line"] == "line 2")  # the last stdout line is there
    assert newest["stream"] == "stdout" and isinstance(newest["time_ns"], int)

    with subprocess.Popen(
        appliance.argv("--json", "service", "logs", "ctxgraph", "-n", "0", "-f"), stdout=subprocess.PIPE, text=True
    ) as follower:
        assert follower.stdout is not None
        time.sleep(0.5)  # subscribed
        appliance.ok("service", "restart", "ctxgraph")  # ctxgraph logs as it stops and starts
        event = json.loads(follower.stdout.readline())
        follower.terminate()
    assert set(event) == {"time_ns", "stream", "line"}


def test_timings(appliance: Appliance) -> None:
    table = appliance.ok("timings").splitlines()
    assert table[0].split() == ["SECONDS", "EVENT", "SERVICE", "TOOK"]
    events = [line.split() for line in table[1:]]
    assert [e[1] for e in events if e[1] == "control_ready"] == ["control_ready"]
    ready = next(e for e in events if e[1:3] == ["ready", "ctxgraph"])
    assert ready[-3:] == ["s", "after", "spawn"]  # how long ctxgraph took from spawn to ready
    data = json.loads(appliance.ok("--json", "timings"))
    assert {"event", "service", "monotonic_s", "since_nulld_s"} <= set(data["events"][0])


def test_poweroff(appliance: Appliance) -> None:
    assert appliance.ok("poweroff") == "poweroff accepted: nulld is stopping every service\n"
    assert appliance.nulld.proc is not None
    assert appliance.nulld.proc.wait(30) == 0  # as a subreaper, nulld stops its services and exits 0


def test_exit_statuses_and_one_line_errors(appliance: Appliance, tmp_path: Path) -> None:
    for argv, fragment in [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["service"], "required: COMMAND"),
        (["service", "logs"], "required: NAME"),
        (["service", "logs", "chatty", "-n", "5000"], "must be 0-1000"),
        (["--timeout", "-1", "status"], "--timeout"),
        (["secret", "set", "A_KEY", "the-value"], "no value on the command line"),  # never from argv
        (["--connect", "tcp:1:2", "status"], "bad address"),
    ]:
        result = appliance.run(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and fragment in result.stderr, (argv, result.stderr)
        assert result.stdout == ""
    down = run_nullctl("--connect", f"unix:{tmp_path / 'none.sock'}", "status")
    assert down.returncode == 3
    assert down.stderr.startswith(f"nullctl: cannot connect to unix:{tmp_path / 'none.sock'}: No such file")
    assert len(down.stderr.splitlines()) == 1
    via_env = run_nullctl("service", "list", env={"NULLCTL_CONNECT": appliance.address})
    assert via_env.returncode == 0 and "ctxgraph" in via_env.stdout
    assert run_nullctl("--help").returncode == 0
    assert "examples:" in run_nullctl("agent", "apply", "--help").stdout


def test_egress_not_running(appliance: Appliance) -> None:
    result = appliance.run("egress", "status")
    assert result.returncode == 1
    assert result.stderr.startswith("nullctl: egress is not running (")
    assert "nullctl service list" in result.stderr and len(result.stderr.splitlines()) == 1


_WITHOUT_ASYNCIO = """
import runpy, sys
sys.argv = ["nullctl", *sys.argv[1:]]
try:
    runpy.run_module("nullctl", run_name="__main__")
except SystemExit as exc:
    code = exc.code
loaded = type(sys.modules.get("asyncio")).__name__
sys.stderr.write(f"exit {code}; asyncio {loaded}; ssl {'ssl' in sys.modules}\\n")
"""


def test_a_command_runs_without_importing_asyncio(appliance: Appliance) -> None:
    """nullbox.wire's servers need asyncio; nullctl's blocking client does not, and asyncio + ssl are most of a
    command's start-up (bench/nullctl_bench.py (3)): it stays a stand-in that was never used."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ASYNCIO, "--connect", appliance.address, "--json", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(done.stdout)["nulld"]["mode"] == "subreaper"
    assert done.stderr.splitlines()[-1] == "exit 0; asyncio _Deferred; ssl False"
