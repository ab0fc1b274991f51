"""``nullctl ctx --direct ...``: a real nullctl process talking straight to a real ctxgraph daemon's socket.

Through nulld's front door (the default) is tests/nullctl/test_ctx_frontdoor_cli.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ctxgraph.process import ServerProcess


def nullctl(server: ServerProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    if "ctx" in args:  # straight to ctxgraph's socket, not through nulld
        at = args.index("ctx") + 1
        args = (*args[:at], "--direct", *args[at:])
    argv = [sys.executable, "-m", "nullctl", "--connect", server.address, *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_put_get_query_history(server: ServerProcess) -> None:
    put = nullctl(server, "--json", "ctx", "put", "notes/a", '{"text": "hello"}')
    assert put.returncode == 0, put.stderr
    digest = json.loads(put.stdout)["hash"]
    again = nullctl(server, "ctx", "put", "notes/a", '{"text":"hello"}')
    assert again.stdout.strip() == f"{digest} (already stored)"
    assert nullctl(server, "ctx", "put", "notes/b", "-", stdin="[1, 2]").returncode == 0
    assert nullctl(server, "ctx", "put", "notes/c", "--string", "plain words").returncode == 0

    got = nullctl(server, "--json", "ctx", "get", digest)
    assert json.loads(got.stdout)["value"] == {"text": "hello"}

    table = nullctl(server, "ctx", "query", "notes/", "--limit", "2")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["HASH", "AGENT", "KEY", "AGE", "VALUE"]
    assert [line.split()[2] for line in lines[1:3]] == ["notes/c", "notes/b"]
    assert lines[3].startswith("(more: --after ")
    rest = nullctl(server, "--json", "ctx", "query", "notes/", "--after", lines[3].split()[-1].rstrip(")"))
    assert [e["key"] for e in json.loads(rest.stdout)["entries"]] == ["notes/a"]

    history = nullctl(server, "--json", "ctx", "history", "notes/c")
    assert json.loads(history.stdout)["entries"][0]["value"] == "plain words"
    stats = nullctl(server, "--json", "ctx", "stats")
    assert json.loads(stats.stdout)["entries"] == 3


def test_watch_prints_new_entries(server: ServerProcess) -> None:
    argv = [sys.executable, "-m", "nullctl", "--connect", server.address, "--json", "ctx", "--direct", "watch", "live/"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as watcher:
        assert watcher.stdout is not None
        assert json.loads(watcher.stdout.readline())["type"] == "subscribed"
        nullctl(server, "ctx", "put", "live/1", "1")
        event = json.loads(watcher.stdout.readline())
        watcher.terminate()
    assert event["type"] == "entry" and event["entry"]["key"] == "live/1"


def test_exit_codes_and_messages(server: ServerProcess, tmp_path: Path) -> None:
    failed = nullctl(server, "ctx", "put", "bad\u0001key", "1")
    assert failed.returncode == 1
    assert "control character" in failed.stderr and "invalid_request" in failed.stderr
    not_json = nullctl(server, "ctx", "put", "k", "hello world")
    assert not_json.returncode == 2 and "--string" in not_json.stderr
    usage = nullctl(server, "ctx", "frobnicate")
    assert usage.returncode == 2
    bad_address = nullctl(server, "--connect", "tcp:1:2", "ctx", "stats")
    assert bad_address.returncode == 2 and "bad address" in bad_address.stderr
    down = subprocess.run(
        [sys.executable, "-m", "nullctl", "--connect", f"unix:{tmp_path / 'none.sock'}", "ctx", "--direct", "stats"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 3 and "cannot connect" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
    # Without --direct nullctl speaks nulld's front door (ctx.stats), which ctxgraph's own socket does not know.
    undirected = subprocess.run(
        [sys.executable, "-m", "nullctl", "--connect", server.address, "ctx", "stats"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert undirected.returncode == 1 and "ctx --direct" in undirected.stderr
