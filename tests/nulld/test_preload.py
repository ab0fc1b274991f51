"""Services forked from nulld (``preload = true``): they must start as if freshly exec'd, and be supervised the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ctxgraph.client import CtxClient
from tests.nulld.conftest import PYTHON, NulldProcess

REPO = Path(__file__).resolve().parent.parent.parent


def _lines(nulld: NulldProcess, service: str) -> list[str]:
    return [entry["line"] for entry in nulld.call("logs", service=service, lines=200)["lines"]]


def test_a_forked_service_starts_clean(nulld: NulldProcess) -> None:
    nulld.env = {"PYTHONPATH": str(REPO), "NULLD_ONLY_MARKER": "nulld's own environment"}
    work = nulld.root / "work"
    work.mkdir()
    nulld.write_config(f"""
        [service.probe]
        binary = "{PYTHON}"
        args = ["-m", "tests.nulld.preload_probe", "one", "two words"]
        preload = true
        restart = "never"
        working_dir = "{work}"
        env = {{ PROBE_EXIT = "3", ONLY_THIS = "x" }}
    """)
    nulld.start()
    service = nulld.wait_state("probe", "failed")  # exit status 3, restart = "never"
    assert service["last_exit"]["code"] == 3, service
    (line,) = [line for line in _lines(nulld, "probe") if line.startswith("{")]
    seen = json.loads(line)
    assert seen["argv"] == ["one", "two words"] and seen["name"] == "__main__"
    assert "NULLD_ONLY_MARKER" not in seen["env"] and {"ONLY_THIS", "PROBE_EXIT", "PATH"} <= set(seen["env"])
    assert seen["cwd"] == str(work)
    assert seen["fds"][:3] == [0, 1, 2] and len(seen["fds"]) <= 4  # stdio (+ the fd listdir itself opened)
    assert seen["sid_is_pid"] and seen["mask"] == [] and seen["sigterm_default"]
    assert seen["ssl"] is True  # nulld blocks ssl for itself; the service gets it back
    assert seen["running_loop"] is False
    assert "forked from nulld" in nulld.log.read_text()


def test_a_forked_ctxgraph_serves_and_stops(nulld: NulldProcess) -> None:
    sock = nulld.root / "ctx.sock"
    nulld.write_config(f"""
        [service.ctxgraph]
        binary = "{PYTHON}"
        args = ["-m", "ctxgraph", "serve", "--db", "{nulld.root / "ctx.db"}", "--socket", "{sock}",
                "--agents-dir", "{nulld.root / "agents"}"]
        preload = true
        ready = "notify"
    """)
    nulld.start()
    service = nulld.wait_state("ctxgraph", "ready")
    pid = service["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"PPid:\t{nulld.pid}" in status  # a child of nulld itself, supervised like any other
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{nulld.pid}/cmdline").read_bytes()  # no exec
    nulld_sockets = {os.readlink(f"/proc/{nulld.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{nulld.pid}/fd")}
    # Its own stdout/stderr are nulld's output pipes (same inodes) by design; nothing else may be shared.
    child_fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2}
    shared = {fd for fd in child_fds & nulld_sockets if fd.startswith(("socket:", "pipe:"))}  # unique inodes
    assert shared == set(), f"nulld's descriptors leaked into the service: {shared}"
    with CtxClient(f"unix:{sock}") as client:
        put = client.put("preload/works", {"forked": True})
    assert put["created"] is True
    nulld.call("stop", service="ctxgraph")
    assert nulld.wait_state("ctxgraph", "stopped")["pid"] is None


def test_a_forked_service_that_cannot_import_fails_like_any_other(nulld: NulldProcess) -> None:
    nulld.write_config(f"""
        [service.broken]
        binary = "{PYTHON}"
        args = ["-m", "no_such_module_for_nulld"]
        preload = true
        restart = "never"
    """)
    nulld.start()
    service = nulld.wait_state("broken", "failed")
    assert service["last_exit"]["code"] == 1
    assert any("No module named no_such_module_for_nulld" in line for line in _lines(nulld, "broken"))
    assert nulld.call("status")["nulld"]["degraded"] is None  # nulld itself is untouched
