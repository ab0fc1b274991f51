"""A tiny agent root filesystem for boot tests: the host's static busybox and one agent script.

The agent (``/agent/run``) reads the value to store from an environment variable (a stand-in for a granted
secret; it reaches the guest in its config, never on a command line), optionally pings its gateway, says how many
bits the kernel's random pool holds (256: the CRNG is ready), writes one put line to ctxgraph through the
virtio-serial port /dev/virtio-ports/org.nullbox.ctxgraph, reads the reply line and prints it on the console.  It
exits 0 only when ctxgraph answered ``"ok":true`` (5 when it refused).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Final

BUSYBOX: Final = Path("/bin/busybox")
APPLETS: Final = ("sh", "cat", "echo", "printf", "pwd", "ls", "ping", "sleep")
AGENT_PATH: Final = "/agent/run"

AGENT_SCRIPT: Final = """#!/bin/sh
# Write {"key": $KEY, "value": $VALUE_VAR's value} to ctxgraph over the virtio-serial port; print the reply.
port=/dev/virtio-ports/org.nullbox.ctxgraph
eval "value=\\${$NULLBOX_TEST_VALUE_VAR:-}"
[ -n "$value" ] || { echo "agent: \\$$NULLBOX_TEST_VALUE_VAR is not set"; exit 3; }
[ -e "$port" ] || { echo "agent: no $port"; exit 4; }
if [ -n "${NULLBOX_TEST_PING:-}" ]; then
	tries=1
	until ping -c 1 -W 1 "$NULLBOX_TEST_PING" >/dev/null; do
		[ "$tries" -lt 10 ] || { echo "agent: $NULLBOX_TEST_PING does not answer"; exit 6; }
		tries=$((tries + 1))
	done
	echo "agent: the gateway $NULLBOX_TEST_PING answers (ping $tries)"
fi
echo "agent: in $(pwd) as $NULLBOX_AGENT, writing $NULLBOX_TEST_KEY"
echo "agent: the random pool has $(cat /proc/sys/kernel/random/entropy_avail) bits"
as=
[ -z "${NULLBOX_TEST_AS:-}" ] || as=',"agent":"'$NULLBOX_TEST_AS'"'
exec 3<>"$port"
printf '{"id":1,"op":"put","key":"%s","value":"%s"%s}\\n' "$NULLBOX_TEST_KEY" "$value" "$as" >&3
IFS= read -r reply <&3
exec 3>&-
echo "agent: ctxgraph replied $reply"
case "$reply" in
*'"ok":true'*) exit 0 ;;
*) exit 5 ;;
esac
"""


def build_agent_rootfs(root: Path) -> Path:
    """Populate ``root`` (created) with busybox, its applets and the agent script; returns ``root``."""
    (root / "bin").mkdir(parents=True)
    shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for name in ("proc", "sys", "dev", "tmp", "run", "etc", "work"):
        (root / name).mkdir()
    agent = root / AGENT_PATH.lstrip("/")
    agent.parent.mkdir()
    agent.write_text(AGENT_SCRIPT)
    agent.chmod(0o755)
    return root


def agent_env(
    key: str, value_var: str, value: str, *, ping: str | None = None, write_as: str | None = None
) -> dict[str, str]:
    """The environment the test agent expects: the key to write, the variable holding the value, optionally an
    address to ping first and an agent name to put in the request (which ctxgraph must refuse)."""
    if not value.isprintable() or any(c in value for c in '"\\'):
        raise ValueError("the test agent writes the value into a JSON string literal unescaped")
    env = {"NULLBOX_TEST_KEY": key, "NULLBOX_TEST_VALUE_VAR": value_var, value_var: value}
    if ping is not None:
        env["NULLBOX_TEST_PING"] = ping
    if write_as is not None:
        env["NULLBOX_TEST_AS"] = write_as
    return env


def manifest(
    name: str,
    *,
    restart: str = "never",
    credentials: bool = False,
    allow: Sequence[str] = ("api.example.com", "*.github.com:8443"),
    cpu_percent: int = 50,
    memory_mb: int = 128,
    **env: str,
) -> str:
    """An AGENT.toml for the test agent (``/agent/run``; its behaviour is chosen by ``env``, see agent_env)."""
    env_text = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    refs = '"TOKEN"' if credentials else ""
    allowed = ", ".join(f'"{a}"' for a in allow)
    return textwrap.dedent(
        f"""\
        [agent]
        name = "{name}"
        command = ["/agent/run"]
        env = {{ {env_text} }}
        restart = "{restart}"

        [capabilities]
        max_cpu_percent = {cpu_percent}
        max_memory_mb = {memory_mb}
        credential_refs = [{refs}]
        network.allow = [{allowed}]
        """
    )
