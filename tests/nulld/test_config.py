"""nulld.toml validation, the dependency graph and the restart backoff: pure logic, table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest

from nullbox.backoff import Backoff, BackoffPolicy
from nulld.config import BUILTIN, ConfigError, ReadyKind, Restart, builtin, load, parse
from nulld.graph import CycleError, dependents, find_cycle, start_order

GOOD = """
[system]
hostname = "box-1"

[service.egress]
binary = "/usr/bin/python3"
args = ["-m", "egress"]
ready = "notify"
restart = "always"

[service.ctxgraph]
binary = "/usr/bin/python3"
args = ["-m", "ctxgraph", "serve"]
depends_on = ["egress"]
ready = "/run/nullbox/ctxgraph.sock"
ready_timeout = 10
stop_timeout = 2.5
env = { NULLBOX_LOG_LEVEL = "DEBUG" }
working_dir = "/var/lib/nullbox"
user = "nobody"

[service.cage]
binary = "/usr/bin/python3"
depends_on = ["ctxgraph", "egress"]
restart = "on-failure"
user = 0
"""


def test_good_config() -> None:
    config = parse(GOOD, "nulld.toml")
    assert config.order == ("egress", "ctxgraph", "cage")
    assert config.hostname == "box-1"
    ctx = config.services["ctxgraph"]
    assert ctx.ready == ReadyKind.SOCKET and ctx.ready_socket == "/run/nullbox/ctxgraph.sock"
    assert ctx.ready_timeout == 10.0 and ctx.stop_timeout == 2.5
    assert ctx.env == (("NULLBOX_LOG_LEVEL", "DEBUG"),)
    assert ctx.argv == ["/usr/bin/python3", "-m", "ctxgraph", "serve"]
    assert config.services["egress"].restart == Restart.ALWAYS
    cage = config.services["cage"]
    assert (cage.restart, cage.ready, cage.user, cage.stop_timeout) == (Restart.ON_FAILURE, ReadyKind.SPAWN, 0, 5.0)


def test_builtin_set_is_valid() -> None:
    config = builtin(["x: broken"])
    assert config.order == ("ctxgraph",) and config.errors == ("x: broken",)
    assert parse(BUILTIN, "b").services["ctxgraph"].ready == ReadyKind.NOTIFY


def _svc(body: str, name: str = "a") -> str:
    return f'[service.{name}]\nbinary = "/bin/true"\n{body}\n'


BAD: list[tuple[str, str]] = [
    ("this is = not toml [", "not valid TOML"),
    ('[services.a]\nbinary = "/bin/true"', "services: unknown top-level table"),
    ('[service.a]\nargs = ["x"]', "service.a.binary: is required"),
    ('[service.a]\nbinary = "bin/true"', "service.a.binary: must be an absolute path"),
    ('[service.a]\nbinary = "/usr/../bin/true"', "service.a.binary: must be a normalised path"),
    ('[service.a]\nbinary = "/usr//bin/true"', "service.a.binary: must be a normalised path"),
    ("[service.a]\nbinary = 5", "service.a.binary: must be an absolute path (got 5)"),
    (_svc("colour = 'red'"), "service.a.colour: unknown key"),
    (_svc("args = 'x'"), "service.a.args: must be a list of strings"),
    (_svc("args = [1, 2]"), "service.a.args: must be a list of strings"),
    (_svc("depends_on = ['ghost']"), "service.a.depends_on: unknown service 'ghost'"),
    (_svc("depends_on = ['a']"), "service.a.depends_on: a service cannot depend on itself"),
    (_svc("restart = 'sometimes'"), "service.a.restart: must be one of always, on-failure, never (got 'sometimes')"),
    (_svc("ready = 'eventually'"), "service.a.ready: must be 'spawn', 'notify' or an absolute socket path"),
    (_svc("ready = '/run/../x.sock'"), "service.a.ready: must be a normalised path"),
    (_svc("ready_timeout = 0"), "service.a.ready_timeout: must be a number of seconds, more than 0"),
    (_svc("ready_timeout = -1"), "service.a.ready_timeout"),
    (_svc("stop_timeout = 'soon'"), "service.a.stop_timeout: must be a number of seconds"),
    (_svc("stop_timeout = 99999"), "at most 3600"),
    (_svc("stop_timeout = true"), "service.a.stop_timeout"),
    (_svc("env = ['A=1']"), "service.a.env: must be a table of strings"),
    (_svc("env = { 1BAD = 'x' }"), "service.a.env.1BAD: is not a valid environment variable name"),
    (_svc("env = { GOOD = 1 }"), "service.a.env.GOOD: must be a string (got 1)"),
    (_svc("working_dir = 'relative'"), "service.a.working_dir: must be an absolute path"),
    (_svc("user = 'Root User'"), "service.a.user: must be a user name or a numeric uid"),
    (_svc("user = -1"), "service.a.user"),
    (_svc("preload = 'yes'"), "service.a.preload: must be true or false (got 'yes')"),
    (_svc("preload = true"), "service.a.preload: needs a service run as `python3 -m MODULE ...`"),
    (
        '[service.a]\nbinary = "/usr/bin/python3"\nargs = ["/srv/a.py"]\npreload = true',
        "service.a.preload: needs a service run as",
    ),
    ('[service."bad name"]\nbinary = "/bin/true"', "service.bad name: service names are 1-64 characters"),
    ("[service]\na = 1", "service.a: must be a table (got 1)"),
    ("service = 3", "service: must be a table of [service.<name>] tables"),
    ("[system]\nhostname = 'not_valid!'", "system.hostname: must be a hostname label"),
    ("[system]\ntimezone = 'UTC'", "system.timezone: unknown key; allowed: hostname"),
    (
        _svc("depends_on = ['b']", "a") + _svc("depends_on = ['c']", "b") + _svc("depends_on = ['a']", "c"),
        "service: dependency cycle: a -> b -> c -> a",
    ),
]


def test_preload_is_accepted_for_python_modules() -> None:
    text = '[service.a]\nbinary = "/usr/bin/python3"\nargs = ["-m", "ctxgraph", "serve"]\npreload = true'
    assert parse(text, "x").services["a"].preload is True
    assert parse(_svc(""), "x").services["a"].preload is False


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_configs_name_the_culprit(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text, "/etc/nullbox/nulld.toml")
    assert message in str(exc.value)
    assert all(line.startswith("/etc/nullbox/nulld.toml: ") for line in str(exc.value).splitlines())


def test_every_error_is_reported_at_once() -> None:
    text = _svc("restart = 'x'\nstop_timeout = 0\ncolour = 1", "a") + _svc("depends_on = ['nope']", "b")
    with pytest.raises(ConfigError) as exc:
        parse(text, "f")
    assert len(exc.value.errors) == 4
    assert {e.split(":")[0] for e in exc.value.errors} == {
        "service.a.restart",
        "service.a.stop_timeout",
        "service.a.colour",
        "service.b.depends_on",
    }


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml: file not found"):
        load(tmp_path / "nowhere.toml")


def test_start_order_is_deterministic() -> None:
    graph = {"z": [], "a": [], "m": ["z", "a"], "b": ["m"], "c": ["a"]}
    assert start_order(graph) == ["a", "z", "c", "m", "b"]
    assert start_order(dict(reversed(list(graph.items())))) == ["a", "z", "c", "m", "b"]


def test_cycles_are_reported_as_paths() -> None:
    assert find_cycle({"a": ["b"], "b": ["a"]}) == ["a", "b", "a"]
    assert find_cycle({"x": ["y"], "y": ["z"], "z": ["y"]}) == ["y", "z", "y"]
    assert find_cycle({"a": ["b"], "b": []}) is None
    with pytest.raises(CycleError, match="a -> a"):
        start_order({"a": ["a"]})


def test_dependents_are_transitive() -> None:
    graph = {"a": [], "b": ["a"], "c": ["b"], "d": []}
    assert dependents(graph, "a") == {"b", "c"}
    assert dependents(graph, "d") == set()


def test_backoff_doubles_to_the_cap_and_resets_after_healthy_uptime() -> None:
    backoff = Backoff(BackoffPolicy())
    assert [backoff.next_delay(uptime=0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.next_delay(uptime=300) == 1  # a run of 300 s counts as healthy
    assert backoff.next_delay(uptime=299.9) == 2
    backoff.reset()
    assert backoff.next_delay(uptime=0) == 1
    assert BackoffPolicy(initial=0.5, factor=3, cap=10).delay(3) == 4.5
    assert BackoffPolicy().delay(0) == 0
