"""``nullctl agent ...``: local commands (schema, init, apply's validation), cage absent, and a real cage."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from cage.manifest import SCHEMA_ID, load, manifest_schema
from tests.nullctl.conftest import Appliance, run_nullctl

NOWHERE = "unix:/nonexistent/nulld.sock"  # commands that must not connect at all get this

MANIFEST = """\
[agent]
name = "demo"
version = "{version}"
restart = "never"

[capabilities]
max_memory_mb = 64

[tools]
shell_exec = {{ risk = "critical" }}
"""


def agent_dir(root: Path, version: str = "1.0.0") -> Path:
    directory = root / "demo"
    (directory / "rootfs" / "agent" / "bin").mkdir(parents=True, exist_ok=True)
    (directory / "rootfs" / "agent" / "bin" / "demo").write_text("#!/bin/sh\necho hi\n")
    (directory / "AGENT.toml").write_text(MANIFEST.format(version=version))
    return directory


def test_schema_and_init_need_no_connection(tmp_path: Path) -> None:
    schema = run_nullctl("--connect", NOWHERE, "agent", "schema")
    assert schema.returncode == 0, schema.stderr
    assert json.loads(schema.stdout) == manifest_schema() and json.loads(schema.stdout)["$id"] == SCHEMA_ID
    assert "\n  " in schema.stdout  # indented for people; --json gives one line
    assert len(run_nullctl("--json", "agent", "schema").stdout.splitlines()) == 1

    init = run_nullctl("--connect", NOWHERE, "agent", "init", "researcher", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    written = tmp_path / "researcher" / "AGENT.toml"
    assert f"wrote {Path('researcher') / 'AGENT.toml'}" in init.stdout
    manifest = load(written)  # the starter manifest is valid as written
    assert manifest.agent.name == "researcher" and manifest.agent.argv == ("/agent/bin/researcher",)
    assert manifest.capabilities.network.allow == () and not manifest.tools
    text = written.read_text()
    assert text.count("\n#") >= 5 and "nullctl agent approve researcher" in text  # commented

    again = run_nullctl("agent", "init", "researcher", cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert load(written) == manifest  # untouched
    bad = run_nullctl("agent", "init", "no/slashes", cwd=tmp_path)
    assert bad.returncode == 2 and "not an agent name" in bad.stderr
    assert not (tmp_path / "no").exists()


def test_apply_validates_the_manifest_before_sending_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "AGENT.toml").write_text(
        textwrap.dedent("""\
            [agent]
            name = "bad"
            colour = "blue"

            [capabilities]
            max_cpu_percent = 150
        """)
    )
    # An unreachable endpoint: a validation failure is reported (exit 1) before any connection is tried (3).
    result = run_nullctl("--connect", NOWHERE, "agent", "apply", str(bad))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "nullctl: bad/AGENT.toml is not a valid manifest; nothing was sent:"
    assert any(line.startswith("nullctl: bad/AGENT.toml: agent.colour: unknown key") for line in lines[1:])
    assert "nullctl: bad/AGENT.toml: capabilities.max_cpu_percent: must be 1-100, got 150" in lines[1:]

    syntax = tmp_path / "syntax.toml"
    syntax.write_text('[agent]\nname = "x\n')
    result = run_nullctl("--connect", NOWHERE, "agent", "apply", str(syntax))
    assert result.returncode == 1 and "syntax.toml: line 2" in result.stderr and "invalid TOML" in result.stderr

    big = tmp_path / "big.toml"
    big.write_text('[agent]\nname = "big"\n' + "#" * 70_000 + "\n")
    result = run_nullctl("--connect", NOWHERE, "agent", "apply", str(big))
    assert result.returncode == 1 and "larger than 65536 bytes" in result.stderr

    missing = run_nullctl("--connect", NOWHERE, "agent", "apply", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and f"{tmp_path / 'nothing'}: cannot be read: No such" in missing.stderr
    relative = run_nullctl("--connect", NOWHERE, "agent", "apply", "--path", "demo/")
    assert relative.returncode == 2 and "absolute path" in relative.stderr


def test_cage_not_running(appliance: Appliance, tmp_path: Path) -> None:
    directory = agent_dir(tmp_path)
    for argv in [
        ["agent", "list"],
        ["agent", "show", "demo"],
        ["agent", "start", "demo"],
        ["agent", "logs", "demo", "-f"],
        ["agent", "apply", str(directory)],
        ["agent", "approve", "demo"],
        ["secret", "list"],
        ["secret", "grant", "KEY", "demo"],
    ]:
        result = appliance.run(*argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert result.stderr.startswith("nullctl: cage is not running ("), (argv, result.stderr)
        assert "`nullctl service list`" in result.stderr and len(result.stderr.splitlines()) == 1


def test_agents_with_a_real_cage(appliance_with_cage: Appliance, tmp_path: Path) -> None:
    cage = appliance_with_cage
    directory = agent_dir(tmp_path)
    assert cage.ok("agent", "list") == "no agents installed (nullctl agent init NAME; nullctl agent apply DIR)\n"

    # A new agent from the manifest's text alone has no rootfs: the error says how to give it one.
    textual = cage.run("agent", "apply", str(directory))
    assert textual.returncode == 1 and "--path" in textual.stderr and "--rootfs" in textual.stderr

    installed = cage.ok("agent", "apply", "--path", str(directory))
    assert installed.startswith("demo 1.0.0 installed (manifest sha256 ")
    listed = cage.ok("agent", "list").splitlines()
    assert listed[0].split() == ["AGENT", "VERSION", "STATE", "MANIFEST", "INSTALLED", "SHA256"]
    assert listed[1].split()[:4] == ["demo", "1.0.0", "stopped", "ok"]
    (entry,) = json.loads(cage.ok("--json", "agent", "list"))["agents"]
    assert entry["name"] == "demo" and entry["state"] == "stopped"

    shown = cage.ok("agent", "show", "demo")
    assert f"sha256 {entry['manifest_sha256']}" in shown
    assert "shell_exec (critical)" in shown and "needed: nullctl agent approve demo" in shown
    refused = cage.run("agent", "start", "demo")
    assert refused.returncode == 1 and "(forbidden)" in refused.stderr and "approve" in refused.stderr

    approved = cage.ok("agent", "approve", "demo").splitlines()
    assert approved == [
        f"approving demo's manifest sha256 {entry['manifest_sha256']}; tools above the limit: shell_exec (critical)",
        "approved: demo may start with this manifest",
    ]
    # from the approval's nanoseconds: a moment ago, however the seconds fall (a loaded host may take a second)
    assert re.search(r"approved (just now|[1-3] s ago)", cage.ok("agent", "show", "demo"))
    stale = cage.run("agent", "approve", "demo", "--sha256", "0" * 64)
    assert stale.returncode == 1 and "(conflict)" in stale.stderr

    # No egress here (nor a cgroup v2 hierarchy): cage cannot start the VM, and says which step failed.
    failed = cage.run("agent", "start", "demo")
    assert failed.returncode == 1 and failed.stderr.startswith("nullctl: egress refused agent demo: ")
    assert failed.stderr.endswith("(unavailable)\n") and len(failed.stderr.splitlines()) == 1
    status = json.loads(cage.ok("--json", "agent", "status", "demo"))["agent"]
    assert status["agent"] == "demo" and status["state"] in ("stopped", "failed")
    assert cage.ok("agent", "status", "demo").startswith("agent:")
    overview = cage.ok("agent", "status").splitlines()
    assert overview[0].split() == ["AGENT", "STATE", "RESTARTS", "UPTIME", "NOTE"] and overview[1].startswith("demo")
    assert cage.run("agent", "logs", "demo").returncode == 0
    assert "demo" in cage.ok("status").split("\n\n")[-1]  # status shows the agents now

    # An update from the manifest's text keeps the installed rootfs; the same text again changes nothing.
    (directory / "AGENT.toml").write_text(MANIFEST.format(version="1.1.0"))
    assert cage.ok("agent", "apply", str(directory / "AGENT.toml")).startswith("demo 1.1.0 updated (manifest ")
    again = json.loads(cage.ok("--json", "agent", "apply", str(directory)))
    assert again["created"] is False and again["manifest_changed"] is False
    assert "re-applied (manifest unchanged)" in cage.ok("agent", "apply", str(directory))

    assert cage.ok("agent", "remove", "demo").startswith("demo removed")
    missing = cage.run("agent", "show", "demo")
    assert missing.returncode == 1 and "(not_found); see `nullctl agent list`" in missing.stderr
