"""``nullctl ctx ...`` through nulld's front door (the default): a real nullctl, a real nulld, a real ctxgraph."""

from __future__ import annotations

import json
import subprocess

from tests.nullctl.conftest import Appliance


def test_put_get_query_history_stats(appliance: Appliance) -> None:
    put = json.loads(appliance.ok("--json", "ctx", "put", "door/a", '{"via": "nulld"}'))
    digest = put["hash"]
    assert put["created"] is True
    assert appliance.ok("ctx", "put", "door/a", '{"via":"nulld"}') == f"{digest} (already stored)\n"
    assert appliance.ok("ctx", "put", "door/b", "-", stdin="[1, 2]\n").strip() != digest
    appliance.ok("ctx", "put", "door/c", "--string", "plain words", "--agent", "bot")

    entry = json.loads(appliance.ok("--json", "ctx", "get", digest))
    assert entry["value"] == {"via": "nulld"} and entry["agent"] == "operator"
    assert json.loads(appliance.ok("ctx", "get", digest))["key"] == "door/a"  # human form: indented JSON

    lines = appliance.ok("ctx", "query", "door/", "--limit", "2").splitlines()
    assert lines[0].split() == ["HASH", "AGENT", "KEY", "AGE", "VALUE"]
    assert [line.split()[1:3] for line in lines[1:3]] == [["bot", "door/c"], ["operator", "door/b"]]
    assert "just now" in lines[1]
    assert lines[3].startswith("(more: --after ")
    rest = json.loads(appliance.ok("--json", "ctx", "query", "door/", "--after", lines[3].split()[-1].rstrip(")")))
    assert [e["key"] for e in rest["entries"]] == ["door/a"] and rest["next"] is None

    history = json.loads(appliance.ok("--json", "ctx", "history", "door/c"))
    assert history["entries"][0]["value"] == "plain words"
    by_agent = json.loads(appliance.ok("--json", "ctx", "by-agent", "bot"))
    assert [e["key"] for e in by_agent["entries"]] == ["door/c"]
    assert json.loads(appliance.ok("--json", "ctx", "stats"))["entries"] == 3
    stats = appliance.ok("ctx", "stats").splitlines()
    assert stats[0].split() == ["STAT", "VALUE"] and ["entries", "3"] in [line.split() for line in stats]


def test_watch_streams_through_the_front_door(appliance: Appliance) -> None:
    with subprocess.Popen(appliance.argv("--json", "ctx", "watch", "live/"), stdout=subprocess.PIPE, text=True) as w:
        assert w.stdout is not None
        assert json.loads(w.stdout.readline())["type"] == "subscribed"
        appliance.ok("ctx", "put", "live/1", "1")
        event = json.loads(w.stdout.readline())
        w.terminate()
    assert event["type"] == "entry" and event["entry"]["key"] == "live/1"

    with subprocess.Popen(appliance.argv("ctx", "watch", "live/"), stdout=subprocess.PIPE, text=True) as human:
        assert human.stdout is not None
        appliance.nulld.wait_for(lambda: appliance.nulld.call("ctx.stats")["watchers"] == 1, what="the watcher")
        appliance.ok("ctx", "put", "live/2", '"two"')
        row = human.stdout.readline().split()
        human.terminate()
    assert row[1:3] == ["operator", "live/2"] and row[-1] == '"two"'


def test_errors(appliance: Appliance) -> None:
    failed = appliance.run("ctx", "put", "bad\u0001key", "1")
    assert failed.returncode == 1
    assert "control character" in failed.stderr and "(invalid_request)" in failed.stderr
    not_json = appliance.run("ctx", "put", "k", "hello world")
    assert not_json.returncode == 2 and "--string" in not_json.stderr
    appliance.ok("service", "stop", "ctxgraph")
    down = appliance.run("ctx", "stats")
    assert down.returncode == 1
    assert down.stderr.startswith("nullctl: ctxgraph is not running (")
    assert "nullctl service logs ctxgraph" in down.stderr and len(down.stderr.splitlines()) == 1
