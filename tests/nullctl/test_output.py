"""nullctl's human output: relative times, aligned tables, colour only when wanted."""

from __future__ import annotations

import io

import pytest

from nullctl.output import Output, ago, ago_iso, ago_ns, colour_wanted, duration


def test_durations_and_relative_times() -> None:
    assert [duration(s) for s in (0, 0.25, 5, 59.9, 60, 185, 3600, 3720, 86400, 3 * 86400)] == [
        "0 s", "250 ms", "5 s", "59 s", "1 min", "3 min", "1 h", "1 h 2 min", "1 day", "3 days",
    ]  # fmt: skip
    assert ago(None) == "-" and ago(0.5) == "just now" and ago(180) == "3 min ago"
    assert ago_ns(int((1000.0 - 7200) * 1e9), now=1000.0) == "2 h ago"
    assert ago_iso("2025-01-01T00:00:00+00:00", now=1735689600.0 + 90) == "1 min ago"
    assert ago_iso("not a time") == "not a time" and ago_iso(None) == "-"


def test_tables_align_and_colour_only_when_asked() -> None:
    plain = Output(json_mode=False, stream=io.StringIO(), colour=False)
    lines = plain.table_lines(["name", "state", "note"], [["ctxgraph", plain.state("ready"), ""], ["a", "failed", "x"]])
    assert lines == ["NAME      STATE   NOTE", "ctxgraph  ready", "a         failed  x"]
    coloured = Output(json_mode=False, stream=io.StringIO(), colour=True)
    row = coloured.table_lines(["name", "state"], [["ctxgraph", coloured.state("ready")]])[1]
    assert row == "ctxgraph  \x1b[32mready\x1b[0m"


@pytest.mark.parametrize(("env", "expected"), [({}, False), ({"NO_COLOR": "1"}, False)])
def test_no_colour_off_a_terminal(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: bool) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert colour_wanted(io.StringIO()) is expected


def test_json_mode_prints_one_object_per_line() -> None:
    stream = io.StringIO()
    Output(json_mode=True, stream=stream).obj({"a": [1, "é"]})
    assert stream.getvalue() == '{"a":[1,"é"]}\n'
