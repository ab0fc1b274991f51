"""``nullctl secret ...`` against a real cage: values come from stdin or a hidden prompt, never from argv."""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time

from cage.vault import Vault
from tests.nullctl.conftest import Appliance

VALUE = "sk-test-1234567890"


def _read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_secret_set_list_grant_revoke_remove(appliance_with_cage: Appliance) -> None:
    cage = appliance_with_cage
    vault = Vault(cage.root / "vault")
    assert cage.ok("secret", "list") == "no secrets (nullctl secret set NAME)\n"

    stored = cage.ok("secret", "set", "OPENAI_API_KEY", stdin=VALUE + "\n")
    assert stored == "OPENAI_API_KEY stored; grant it: nullctl secret grant OPENAI_API_KEY AGENT\n"
    assert vault.get("OPENAI_API_KEY").reveal() == VALUE  # one trailing newline dropped, nothing else
    assert VALUE not in stored
    data = json.loads(cage.ok("--json", "secret", "set", "RAW", stdin="  spaced\n\n"))
    assert data["secret"]["name"] == "RAW" and VALUE not in json.dumps(data)
    assert vault.get("RAW").reveal() == "  spaced\n"

    empty = cage.run("secret", "set", "EMPTY", stdin="")
    assert empty.returncode == 2 and "empty" in empty.stderr
    in_argv = cage.run("secret", "set", "LEAKY", VALUE)
    assert in_argv.returncode == 2 and VALUE not in in_argv.stderr  # refused, and not repeated back
    assert "takes no value on the command line" in in_argv.stderr
    bad_name = cage.run("secret", "set", "not a name", stdin=VALUE)
    assert bad_name.returncode == 1 and VALUE not in bad_name.stderr and "(invalid_request)" in bad_name.stderr

    assert cage.ok("secret", "grant", "OPENAI_API_KEY", "researcher") == "OPENAI_API_KEY granted to researcher\n"
    assert cage.ok("secret", "grant", "OPENAI_API_KEY", "researcher").endswith("(already was)\n")
    table = cage.ok("secret", "list").splitlines()
    assert table[0].split() == ["SECRET", "GRANTED", "TO", "UPDATED", "STATE"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "researcher" in rows["OPENAI_API_KEY"] and rows["OPENAI_API_KEY"].endswith("ok")
    listed = json.loads(cage.ok("--json", "secret", "list"))["secrets"]
    assert {s["name"]: s["agents"] for s in listed} == {"OPENAI_API_KEY": ["researcher"], "RAW": []}
    assert VALUE not in json.dumps(listed)

    assert cage.ok("secret", "revoke", "OPENAI_API_KEY", "researcher") == "OPENAI_API_KEY revoked from researcher\n"
    assert json.loads(cage.ok("--json", "secret", "revoke", "OPENAI_API_KEY", "researcher"))["revoked"] is False
    assert cage.ok("secret", "remove", "RAW") == "RAW removed\n"
    gone = cage.run("secret", "remove", "RAW")
    assert gone.returncode == 1 and "(not_found); see `nullctl secret list`" in gone.stderr


def test_secret_set_prompts_without_echo_on_a_terminal(appliance_with_cage: Appliance) -> None:
    cage = appliance_with_cage
    pid, fd = pty.fork()
    if pid == 0:  # the child: nullctl with a terminal as stdin, stdout and controlling tty
        os.execv(sys.executable, [sys.executable, "-m", "nullctl", *cage.argv("secret", "set", "TYPED")[3:]])
    try:
        prompt = _read_until(fd, b"(not echoed): ")
        assert b"value of TYPED" in prompt
        os.write(fd, b"typed-value\n")
        rest = _read_until(fd, b"stored")
        rest += _read_until(fd, b"\n", timeout=5)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, rest
    assert b"typed-value" not in prompt + rest  # not echoed
    assert b"TYPED stored" in rest
    assert Vault(cage.root / "vault").get("TYPED").reveal() == "typed-value"
