"""``nullctl completion bash|zsh``: the scripts parse, and bash's completes commands, subcommands and options."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.nullctl.conftest import run_nullctl


def script(shell: str, tmp_path: Path) -> Path:
    result = run_nullctl("completion", shell)
    assert result.returncode == 0, result.stderr
    path = tmp_path / f"nullctl.{shell}"
    path.write_text(result.stdout)
    return path


def complete_bash(path: Path, line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end), by calling the completion function as bash would."""
    words = line.split(" ")
    program = f"""
        source {path}
        COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
        COMP_CWORD={len(words) - 1}
        _nullctl
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30, check=True)
    return [w for w in result.stdout.splitlines() if w]


def test_bash(tmp_path: Path) -> None:
    path = script("bash", tmp_path)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    assert "complete -o default -F _nullctl nullctl" in path.read_text()
    top = complete_bash(path, "nullctl ")
    assert {"status", "service", "agent", "ctx", "egress", "secret", "timings", "completion"} <= set(top)
    assert complete_bash(path, "nullctl ag") == ["agent"]
    assert complete_bash(path, "nullctl agent a") == ["apply", "approve"]
    assert complete_bash(path, "nullctl --connect /tmp/x.sock --json agent a") == ["apply", "approve"]
    assert set(complete_bash(path, "nullctl service logs chatty -")) >= {"-f", "--follow", "-n", "--lines", "--json"}
    assert complete_bash(path, "nullctl --connect ") == []  # an option's value: the shell's own (file) completion
    assert complete_bash(path, "nullctl agent apply ") == []  # FILE|DIR: file completion
    assert complete_bash(path, "nullctl completion ") == ["bash", "zsh"]
    assert "--direct" in complete_bash(path, "nullctl ctx --")


def test_zsh(tmp_path: Path) -> None:
    path = script("zsh", tmp_path)
    text = path.read_text()
    assert text.startswith("#compdef nullctl\n")
    assert "'apply:install or update an agent from its AGENT.toml'" in text
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed: only the script's content was checked")
    subprocess.run(["zsh", "-n", str(path)], check=True, timeout=30)
    top = complete_zsh(path, "nullctl ")  # (the stub prints every candidate; zsh's _describe filters by prefix)
    assert "agent:install, inspect, start and stop agents (each in its own microVM)" in top
    assert [w.split(":")[0] for w in complete_zsh(path, "nullctl --json agent a")] == [
        "apply",
        "list",
        "show",
        "status",
        "start",
        "stop",
        "pause",
        "resume",
        "remove",
        "logs",
        "schema",
        "init",
        "approve",
    ]
    assert "--follow:keep printing new lines (Ctrl-C to stop)" in complete_zsh(path, "nullctl agent logs x -")
    assert complete_zsh(path, "nullctl --connect ") == ["FILES"]
    assert complete_zsh(path, "nullctl agent apply ") == ["FILES"]


def complete_zsh(path: Path, line: str) -> list[str]:
    """What the zsh function offers for ``line``, with _describe and _files stubbed to print their candidates."""
    words = line.split(" ")
    probe = f"""
        compdef() {{ : }}
        _describe() {{ print -l -- ${{(P)@[-1]}} }}
        _files() {{ print FILES }}
        source {path}
        words=({" ".join(f"'{w}'" for w in words)})
        CURRENT={len(words)}
        _nullctl
    """
    result = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True, timeout=30, check=True)
    return [w for w in result.stdout.splitlines() if w]
