"""AGENT.toml: NullBox's manifests and ours parse; every mistake is one clean line naming the file and field."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cage.manifest import (
    SCHEMA_ID,
    Manifest,
    data_path,
    load,
    manifest_schema,
    parse_bytes,
    parse_data,
    parse_text,
)
from cage.terms import MAX_MANIFEST_BYTES, ManifestError, Restart, Risk, digest
from egress.names import AllowList

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NULLBOX_MANIFESTS = sorted((HERE / "manifests").glob("nullbox-*/AGENT.toml"))
EXAMPLES = sorted((REPO / "examples" / "agents").glob("*/AGENT.toml"))
SOURCE = "bad/AGENT.toml"
BOILERPLATE = ("pydantic", "For further information", "Input should", "Value error", "validation error", "[type=")

FULL = """
[agent]
name = "researcher"
version = "1.0.0"
runtime = "python3.12"
command = ["/usr/bin/agent", "--serve"]
rootfs = "rootfs"
env = { LOG_LEVEL = "debug", EMPTY = "" }
restart = "always"
autostart = true

[capabilities]
shell = false
max_cpu_percent = 50
max_memory_mb = 512
max_api_calls_per_hour = 100
credential_refs = ["OPENAI_API_KEY"]
network.allow = ["api.openai.com", "*.github.com:443", "Bücher.example:8443"]
filesystem.read = ["/data/shared"]
filesystem.write = ["/data/out"]
health_check = { port = 8080, http_path = "/healthz", interval_s = 10, timeout_s = 2 }

[tools]
web_search = { risk = "low" }
pay = { risk = "critical" }
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_text(text, SOURCE)
    return caught.value.lines


def agent(extra: str = "", caps: str = "", tools: str = "") -> str:
    """A valid manifest with lines added to [agent], [capabilities] and [tools]."""
    return f'[agent]\nname = "x"\n{extra}\n[capabilities]\n{caps}\n[tools]\n{tools}\n'


# ---------------------------------------------------------------------------------------------- good manifests


def test_full_manifest() -> None:
    m = parse_text(FULL, "researcher/AGENT.toml")
    assert m.name == "researcher" and m.agent.version == "1.0.0" and m.agent.runtime == "python3.12"
    assert m.agent.argv == ("/usr/bin/agent", "--serve")
    assert dict(m.agent.env) == {"LOG_LEVEL": "debug", "EMPTY": ""}
    assert m.agent.restart is Restart.ALWAYS and m.agent.autostart is True
    caps = m.capabilities
    assert (caps.max_cpu_percent, caps.max_memory_mb, caps.max_api_calls_per_hour) == (50, 512, 100)
    assert caps.credential_refs == ("OPENAI_API_KEY",)
    # egress's canonical spelling: default port dropped, IDNA applied
    assert caps.network.allow == ("api.openai.com", "*.github.com", "xn--bcher-kva.example:8443")
    assert caps.network.allow_list == AllowList.parse(["api.openai.com", "*.github.com:443", "Bücher.example:8443"])
    assert caps.network.allow_list.ports_for("api.github.com") == {443}
    assert (caps.filesystem.read, caps.filesystem.write) == (("/data/shared",), ("/data/out",))
    assert caps.health_check is not None
    assert (caps.health_check.port, caps.health_check.http_path, caps.health_check.retries) == (8080, "/healthz", 3)
    assert m.tools["pay"].risk is Risk.CRITICAL


def test_defaults_follow_nullbox() -> None:
    m = parse_text('[agent]\nname = "tiny"\n')
    assert m.agent.version == "0.0.0" and m.agent.rootfs == "rootfs" and m.agent.command is None
    assert m.agent.argv == ("/agent/bin/tiny",)
    assert m.agent.restart is Restart.ON_FAILURE and m.agent.autostart is False
    assert (m.capabilities.max_cpu_percent, m.capabilities.max_memory_mb) == (25, 256)
    assert m.capabilities.shell is False and m.capabilities.accelerator == "none"
    assert m.capabilities.health_check is None and dict(m.tools) == {}


@pytest.mark.parametrize("path", NULLBOX_MANIFESTS, ids=lambda p: p.parent.name)
def test_nullbox_examples_parse(path: Path) -> None:
    assert path.read_text().startswith("# Origin: NullBox")
    load(path)


def test_nullbox_researcher_fields() -> None:
    m = load(HERE / "manifests" / "nullbox-researcher")
    assert (m.name, m.agent.version) == ("researcher", "1.2.0")
    assert m.capabilities.credential_refs == ("OPENAI_KEY", "EXA_KEY")
    assert m.capabilities.max_api_calls_per_hour == 200 and m.capabilities.max_cpu_percent == 40
    assert len(m.capabilities.network.allow) == 3 and len(m.tools) == 5
    assert m.tools["delete_files"].risk is Risk.CRITICAL
    assert m.capabilities.filesystem.write == ("/data/research/output",)
    # the dotted-key spelling in NullBox's cage README is the same manifest
    assert load(HERE / "manifests" / "nullbox-cage-readme") == m


def test_nullbox_minimal_defaults() -> None:
    m = load(HERE / "manifests" / "nullbox-minimal" / "AGENT.toml")
    assert (m.capabilities.max_cpu_percent, m.capabilities.max_memory_mb, m.agent.version) == (25, 256, "0.0.0")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_shipped_examples_parse(path: Path) -> None:
    m = load(path)
    assert m.name == path.parent.name, "an example's directory must be named after its agent"


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2 and len(NULLBOX_MANIFESTS) >= 4


# ---------------------------------------------------------------------------------------------- bad manifests

BAD: list[tuple[str, str, str, str]] = [
    # id, manifest, field path, expected substring of that field's one message
    ("no-agent", "[capabilities]\nshell = false\n", "agent", "is required"),
    ("no-name", '[agent]\nversion = "1"\n', "agent.name", "is required"),
    ("agent-not-table", 'agent = "x"\n', "agent", "must be a table"),
    ("network-not-table", agent(caps='network = "any"'), "capabilities.network", "must be a table, got 'any'"),
    ("version-date", agent("version = 2024-01-01"), "agent.version", "must be a string, got datetime.date"),
    ("name-space", '[agent]\nname = "bad name"\n', "agent.name", "1-64 characters of A-Z a-z 0-9 _ -"),
    ("name-empty", '[agent]\nname = ""\n', "agent.name", "1-64 characters"),
    ("name-long", f'[agent]\nname = "{"a" * 65}"\n', "agent.name", "1-64 characters"),
    ("name-slash", '[agent]\nname = "../etc"\n', "agent.name", "got '../etc'"),
    ("name-int", "[agent]\nname = 5\n", "agent.name", "must be a string, got 5"),
    ("version-empty", agent('version = ""'), "agent.version", "starting with a letter or digit"),
    ("version-space", agent('version = "1 0"'), "agent.version", "got '1 0'"),
    ("runtime-upper", agent('runtime = "Python"'), "agent.runtime", "'python3.12', 'node22' or 'native'"),
    ("command-empty", agent("command = []"), "agent.command", "must name a program"),
    ("command-relative", agent('command = ["agent"]'), "agent.command", "absolute, normalised path"),
    ("command-dotdot", agent('command = ["/usr/../bin/sh"]'), "agent.command", "absolute, normalised path"),
    ("command-string", agent('command = "/usr/bin/agent --serve"'), "agent.command", "must be a list"),
    ("command-nul", agent('command = ["/a", "x\\u0000y"]'), "agent.command[1]", "NUL"),
    ("command-quote", agent('command = ["/a", "say \\"hi\\""]'), "agent.command[1]", "must not contain '\"'"),
    ("command-item-int", agent('command = ["/a", 1]'), "agent.command[1]", "must be a string, got 1"),
    ("rootfs-dotdot", agent('rootfs = "../other"'), "agent.rootfs", "next to AGENT.toml"),
    ("rootfs-absolute", agent('rootfs = "/var/lib/x"'), "agent.rootfs", "got '/var/lib/x'"),
    ("rootfs-hidden", agent('rootfs = ".installed.json"'), "agent.rootfs", "not starting with '.'"),
    ("rootfs-manifest", agent('rootfs = "AGENT.toml"'), "agent.rootfs", "not the manifest itself"),
    ("env-bad-name", agent('env = { "BAD-NAME" = "1" }'), "agent.env.BAD-NAME", "not an environment variable name"),
    ("env-digit", agent('env = { "1X" = "1" }'), "agent.env.1X", "not starting with a digit"),
    ("env-reserved", agent('env = { NULLBOX_AGENT = "x" }'), "agent.env.NULLBOX_AGENT", "reserved"),
    ("env-krun", agent('env = { KRUN_INIT = "/bin/sh" }'), "agent.env.KRUN_INIT", "reserved"),
    ("env-int", agent("env = { PORT = 8080 }"), "agent.env.PORT", "must be a string, got 8080"),
    ("env-nul", agent('env = { A = "x\\u0000" }'), "agent.env.A", "NUL"),
    ("env-newline", agent('env = { A = "x\\ny" }'), "agent.env.A", "newlines"),
    ("env-long", agent(f'env = {{ A = "{"v" * 5000}" }}'), "agent.env.A", "at most 4096"),
    ("env-not-table", agent('env = ["A=1"]'), "agent.env", "must be a table"),
    ("restart", agent('restart = "sometimes"'), "agent.restart", "'always', 'on-failure' or 'never'"),
    ("autostart-string", agent('autostart = "yes"'), "agent.autostart", "must be true or false"),
    ("agent-unknown", agent('description = "x"'), "agent.description", "unknown key; allowed here: name, version"),
    ("top-unknown", agent() + "[extra]\nx = 1\n", "extra", "unknown key; allowed here: agent, capabilities, tools"),
    ("cpu-high", agent(caps="max_cpu_percent = 150"), "capabilities.max_cpu_percent", "must be 1-100, got 150"),
    ("cpu-zero", agent(caps="max_cpu_percent = 0"), "capabilities.max_cpu_percent", "must be 1-100, got 0"),
    ("cpu-string", agent(caps='max_cpu_percent = "50"'), "capabilities.max_cpu_percent", "must be an integer"),
    ("cpu-float", agent(caps="max_cpu_percent = 50.5"), "capabilities.max_cpu_percent", "must be an integer"),
    ("cpu-bool", agent(caps="max_cpu_percent = true"), "capabilities.max_cpu_percent", "must be an integer"),
    ("memory-zero", agent(caps="max_memory_mb = 0"), "capabilities.max_memory_mb", "must be 64-65536 MiB, got 0"),
    ("memory-huge", agent(caps="max_memory_mb = 1048576"), "capabilities.max_memory_mb", "64-65536 MiB"),
    ("calls-negative", agent(caps="max_api_calls_per_hour = -1"), "capabilities.max_api_calls_per_hour", "0-1000000"),
    ("shell-int", agent(caps="shell = 1"), "capabilities.shell", "must be true or false, got 1"),
    ("accelerator", agent(caps='accelerator = "gpu"'), "capabilities.accelerator", "must be 'none', got 'gpu'"),
    ("caps-unknown", agent(caps="max_disk_mb = 5"), "capabilities.max_disk_mb", "allowed here: shell, credential_refs"),
    ("cred-bad", agent(caps='credential_refs = ["OPENAI-KEY"]'), "capabilities.credential_refs[0]", "environment"),
    ("cred-dup", agent(caps='credential_refs = ["A", "B", "A"]'), "capabilities.credential_refs[2]", "repeats"),
    ("cred-reserved", agent(caps='credential_refs = ["NULLBOX_TOKEN"]'), "capabilities.credential_refs[0]", "reserved"),
    ("cred-string", agent(caps='credential_refs = "A"'), "capabilities.credential_refs", "must be a list"),
    (
        "env-is-credential",
        agent('env = { OPENAI_API_KEY = "sk-x" }', caps='credential_refs = ["OPENAI_API_KEY"]'),
        "agent.env.OPENAI_API_KEY",
        "is also in capabilities.credential_refs",
    ),
    ("allow-space", agent(caps='network.allow = ["has space"]'), "capabilities.network.allow[0]", "not a valid domain"),
    ("allow-ip", agent(caps='network.allow = ["1.2.3.4"]'), "capabilities.network.allow[0]", "is an IP address"),
    ("allow-ipv6", agent(caps='network.allow = ["[::1]:443"]'), "capabilities.network.allow[0]", "IPv6"),
    ("allow-port", agent(caps='network.allow = ["a.example:0"]'), "capabilities.network.allow[0]", "ports are 1-65535"),
    ("allow-star", agent(caps='network.allow = ["a*.example.com"]'), "capabilities.network.allow[0]", "'*' is only"),
    ("allow-one-label", agent(caps='network.allow = ["localhost"]'), "capabilities.network.allow[0]", "two labels"),
    ("allow-url", agent(caps='network.allow = ["https://x.com/"]'), "capabilities.network.allow[0]", "allow entry"),
    (
        "allow-dup",
        agent(caps='network.allow = ["api.x.com", "API.x.com:443"]'),
        "capabilities.network.allow[1]",
        "repeats the entry 'api.x.com' of [0]",
    ),
    (
        "allow-many",
        agent(caps=f"network.allow = {[f'h{i}.example.com' for i in range(300)]}"),
        "capabilities.network.allow",
        "at most 256",
    ),
    ("network-unknown", agent(caps="network.deny = []"), "capabilities.network.deny", "allowed here: allow"),
    ("fs-relative", agent(caps='filesystem.read = ["data/x"]'), "capabilities.filesystem.read[0]", "absolute path"),
    ("fs-host", agent(caps='filesystem.read = ["/etc"]'), "capabilities.filesystem.read[0]", "never shared"),
    ("fs-root", agent(caps='filesystem.write = ["/"]'), "capabilities.filesystem.write[0]", "normalised"),
    ("fs-dotdot", agent(caps='filesystem.read = ["/data/../etc"]'), "capabilities.filesystem.read[0]", "'..'"),
    ("fs-trailing", agent(caps='filesystem.write = ["/data/out/"]'), "capabilities.filesystem.write[0]", "trailing"),
    ("fs-double", agent(caps='filesystem.write = ["/data//out"]'), "capabilities.filesystem.write[0]", "'//'"),
    ("fs-comma", agent(caps='filesystem.write = ["/data/a,b"]'), "capabilities.filesystem.write[0]", "component 'a,b'"),
    ("fs-prefix", agent(caps='filesystem.read = ["/database"]'), "capabilities.filesystem.read[0]", "under it"),
    (
        "fs-both",
        agent(caps='filesystem.read = ["/data/a"]\nfilesystem.write = ["/data/a"]'),
        "capabilities.filesystem.write[0]",
        "also listed in read",
    ),
    ("fs-dup", agent(caps='filesystem.read = ["/data/a", "/data/a"]'), "capabilities.filesystem.read[1]", "repeats"),
    ("hc-no-port", agent(caps="health_check = { interval_s = 5 }"), "capabilities.health_check.port", "is required"),
    ("hc-port", agent(caps="health_check = { port = 70000 }"), "capabilities.health_check.port", "1-65535"),
    (
        "hc-timeout",
        agent(caps="health_check = { port = 80, interval_s = 5, timeout_s = 10 }"),
        "capabilities.health_check.timeout_s",
        "must not exceed interval_s (5), got 10",
    ),
    (
        "hc-path",
        agent(caps='health_check = { port = 80, http_path = "healthz" }'),
        "capabilities.health_check.http_path",
        "HTTP path",
    ),
    (
        "hc-unknown",
        agent(caps='health_check = { port = 80, command = ["/x"] }'),
        "capabilities.health_check.command",
        "unknown key",
    ),
    (
        "tool-risk",
        agent(tools='search = { risk = "extreme" }'),
        "tools.search.risk",
        "'low', 'medium', 'high' or 'critical'",
    ),
    ("tool-no-risk", agent(tools="search = {}"), "tools.search.risk", "is required"),
    ("tool-string", agent(tools='search = "low"'), "tools.search", "must be a table, got 'low'"),
    ("tool-name", agent(tools='"web search" = { risk = "low" }'), "tools['web search']", "1-64 characters"),
    ("tool-unknown", agent(tools='search = { risk = "low", cost = 1 }'), "tools.search.cost", "allowed here: risk"),
    (
        "exec-too-big",
        agent("env = { " + ", ".join(f'V{i} = "{"x" * 4000}"' for i in range(10)) + " }"),
        "agent",
        "at most 32768",
    ),
]


@pytest.mark.parametrize(("text", "path", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifest(text: str, path: str, expected: str) -> None:
    lines = problems_of(text)
    prefix = f"{SOURCE}: {path}: "
    mine = [line for line in lines if line.startswith(prefix)]
    assert len(mine) == 1, f"expected exactly one message for {path}, got {lines}"
    assert expected in mine[0], mine[0]
    for line in lines:
        assert "\n" not in line and not any(word in line for word in BOILERPLATE), line


def test_bad_table_is_large_and_distinct() -> None:
    assert len(BAD) >= 30
    assert len({b[0] for b in BAD}) == len(BAD)


def test_all_problems_are_reported_together() -> None:
    text = """
[agent]
name = "bad name"
restart = "sometimes"
[capabilities]
max_cpu_percent = 150
network.allow = ["ok.example.com", "has space"]
filesystem.read = ["/etc"]
[tools]
x = { risk = "extreme" }
"""
    with pytest.raises(ManifestError) as caught:
        parse_text(text, SOURCE)
    error = caught.value
    assert [p.split(":")[0] for p in error.problems] == [
        "agent.name",
        "agent.restart",
        "capabilities.max_cpu_percent",
        "capabilities.network.allow[1]",
        "capabilities.filesystem.read[0]",
        "tools.x.risk",
    ]
    assert str(error) == "\n".join(error.lines) and error.code == "invalid_request"
    assert all(line == f"{SOURCE}: {p}" for line, p in zip(error.lines, error.problems, strict=True))


def test_the_contract_example_message() -> None:
    lines = problems_of(agent(caps="max_cpu_percent = 150"))
    assert lines == [f"{SOURCE}: capabilities.max_cpu_percent: must be 1-100, got 150"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[agent]\nname = "x"\nversion = \n', "line 3, column 11"),
        ('[agent\nname = "x"\n', "line 1, column 7"),
        ('[agent]\nname = "x"\nname = "y"\n', "line 3"),
        ('[agent]\nname = "x', "line 2"),
    ],
)
def test_toml_syntax_errors_name_file_and_line(text: str, where: str) -> None:
    lines = problems_of(text)
    assert len(lines) == 1 and lines[0].startswith(f"{SOURCE}: {where}") and "invalid TOML" in lines[0]


def test_size_and_encoding_limits(tmp_path: Path) -> None:
    big = '[agent]\nname = "x"\n' + "#" * MAX_MANIFEST_BYTES
    assert problems_of(big) == [f"{SOURCE}: is larger than 65536 bytes, the limit for a manifest"]
    with pytest.raises(ManifestError, match=r"^bad/AGENT.toml: is larger than 65536 bytes"):
        parse_bytes(big.encode(), SOURCE)
    with pytest.raises(ManifestError, match=r"^bad/AGENT.toml: line 2: is not valid UTF-8"):
        parse_bytes(b'[agent]\nname = "\xff"\n', SOURCE)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "AGENT.toml").write_bytes(big.encode())
    with pytest.raises(ManifestError, match=r"^x/AGENT.toml: is larger than 65536 bytes"):
        load(tmp_path / "x")  # reads at most one byte past the limit
    with pytest.raises(ManifestError, match=r"^nope/AGENT.toml: cannot be read"):
        load(tmp_path / "nope" / "AGENT.toml")


def test_load_names_the_agent_directory(tmp_path: Path) -> None:
    (tmp_path / "researcher").mkdir()
    (tmp_path / "researcher" / "AGENT.toml").write_text(agent(caps="max_cpu_percent = 150"))
    with pytest.raises(ManifestError) as caught:
        load(tmp_path / "researcher" / "AGENT.toml")
    assert caught.value.lines == ["researcher/AGENT.toml: capabilities.max_cpu_percent: must be 1-100, got 150"]


# ---------------------------------------------------------------------------------------------- property checks

KEYS = [
    ("agent", "name"),
    ("agent", "version"),
    ("agent", "runtime"),
    ("agent", "command"),
    ("agent", "rootfs"),
    ("agent", "env"),
    ("agent", "restart"),
    ("agent", "autostart"),
    ("agent", "bogus"),
    ("capabilities", "shell"),
    ("capabilities", "credential_refs"),
    ("capabilities", "max_cpu_percent"),
    ("capabilities", "max_memory_mb"),
    ("capabilities", "network"),
    ("capabilities", "filesystem"),
    ("capabilities", "health_check"),
    ("capabilities", "accelerator"),
    ("tools", "t"),
    ("tools", "bad tool"),
    ("bogus", "x"),
]
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=80),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=6), st.sampled_from(["a/AGENT.toml", "x.toml"]))
def test_any_document_gives_a_model_or_clean_lines(assignments: dict[tuple[str, str], Any], source: str) -> None:
    data: dict[str, Any] = {"agent": {"name": "ok"}}
    for (table, key), value in assignments.items():
        section = data.setdefault(table, {})
        if isinstance(section, dict):
            section[key] = value
    try:
        parse_data(data, source)
    except ManifestError as exc:
        assert exc.lines and len(exc.lines) == len(exc.problems)
        for line in exc.lines:
            assert line.startswith(f"{source}: "), line
            field = line[len(source) + 2 :].split(": ", 1)
            assert len(field) == 2 and field[0] and field[1], line
            assert "\n" not in line and not any(word in line for word in BOILERPLATE), line


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_data_paths_never_leave_the_data_directory(text: str) -> None:
    base = Path("/var/lib/nullbox/data/x")
    try:
        result = data_path(base, text)
    except ValueError:
        return
    assert result == base or base in result.parents
    assert ".." not in result.parts


def test_data_path_mapping() -> None:
    base = Path("/srv/agent-data")
    assert data_path(base, "/data") == base
    assert data_path(base, "/data/research/output") == base / "research" / "output"
    for hostile in ("/etc", "/data/../etc", "data/x", "/data/./x", "/data/x/"):
        with pytest.raises(ValueError, match="must"):
            data_path(base, hostile)


# ---------------------------------------------------------------------------------------------- model behaviour


def test_models_are_frozen_and_hashable() -> None:
    m = parse_text(FULL)
    with pytest.raises(ValidationError):
        m.agent.name = "other"
    with pytest.raises(TypeError):
        m.agent.env["X"] = "1"
    with pytest.raises(TypeError):
        m.tools.pop("pay")
    assert hash(m) == hash(parse_text(FULL)) and m == parse_text(FULL)
    assert copy.deepcopy(m) == m and m.model_copy(deep=True) == m


def test_round_trip_through_json() -> None:
    m = parse_text(FULL)
    dumped = m.model_dump(mode="json")
    assert parse_data(json.loads(json.dumps(dumped))) == m
    assert dumped["agent"]["command"] == ["/usr/bin/agent", "--serve"]


def test_digest_is_sha256_of_the_bytes() -> None:
    assert digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_direct_validation_still_refuses() -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate({"agent": {"name": "x", "restart": "sometimes"}})


def test_json_schema() -> None:
    schema = manifest_schema()
    assert schema["$id"] == SCHEMA_ID and schema["title"] == "AGENT.toml"
    assert schema["required"] == ["agent"]

    def objects(node: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        if isinstance(node, dict):
            if "properties" in node:
                found.append(node)
            for value in node.values():
                found.extend(objects(value))
        elif isinstance(node, list):
            for value in node:
                found.extend(objects(value))
        return found

    tables = objects(schema)
    assert len(tables) >= 7 and all(t.get("additionalProperties") is False for t in tables)
    text = json.dumps(schema)
    assert "NULLBOX_" in text and '"maximum": 100' in text and "low" in text and "on-failure" in text


def test_json_schema_agrees_with_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import tomllib

    validator = jsonschema.Draft202012Validator(manifest_schema())
    for path in [*EXAMPLES, *NULLBOX_MANIFESTS]:
        assert list(validator.iter_errors(tomllib.loads(path.read_text()))) == [], path
    bad = tomllib.loads(agent('env = { NULLBOX_X = "1" }', caps="max_cpu_percent = 150"))
    assert len(list(validator.iter_errors(bad))) == 2


def test_reserved_prefix_is_case_sensitive_like_the_environment() -> None:
    assert dict(parse_text(agent('env = { nullbox_note = "x" }')).agent.env) == {"nullbox_note": "x"}


def test_messages_quote_hostile_values_safely() -> None:
    lines = problems_of('[agent]\nname = "a\\nb; rm -rf /"\n')
    assert len(lines) == 1 and "\\n" in lines[0] and "\n" not in lines[0]


def test_long_values_are_cut_in_messages() -> None:
    (line,) = problems_of(f'[agent]\nname = "{"z" * 500}"\n')
    assert len(line) < 200 and line.endswith("...")
    assert re.search(r"got 'z+\.\.\.$", line)
