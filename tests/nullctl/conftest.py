"""A small real appliance for nullctl: nulld (child subreaper) with ctxgraph, a chatty service and, when asked, a
real cage behind its front door.  nullctl itself always runs as a separate process (``python -m nullctl``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.nulld.conftest import PYTHON, NulldProcess

REPO = Path(__file__).resolve().parents[2]

CHATTY = """
import sys, time
print("hello from chatty", flush=True)
print("a warning from chatty", file=sys.stderr, flush=True)
for i in range(3):
    print(f"line {i}", flush=True)
time.sleep(3600)
"""


def run_nullctl(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("NULLCTL_CONNECT", "NO_COLOR")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "nullctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=environment,
        cwd=cwd,
    )


@dataclass
class Appliance:
    nulld: NulldProcess
    root: Path

    @property
    def address(self) -> str:
        return f"unix:{self.nulld.socket}"

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "nullctl", "--connect", self.address, *args]

    def run(self, *args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_nullctl("--connect", self.address, *args, stdin=stdin, cwd=cwd)

    def ok(self, *args: str, stdin: str = "") -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"nullctl {' '.join(args)}: {result.returncode}\n{result.stderr}"
        assert result.stderr == "", result.stderr
        return result.stdout


def _config(nulld: NulldProcess, *, cage: bool) -> str:
    root = nulld.root
    chatty = nulld.program("chatty", CHATTY)
    text = f"""
        [service.ctxgraph]
        binary = "{PYTHON}"
        args = ["-m", "ctxgraph", "serve", "--db", "{root / "ctx.db"}", "--socket", "{root / "ctx.sock"}",
                "--agents-dir", "{root / "agents"}"]
        ready = "notify"

        [service.chatty]
        binary = "{PYTHON}"
        args = ["{chatty}"]
        restart = "never"
    """
    if cage:
        # A real cage in a network namespace of its own (it removes stale nb-* TAPs); without a cgroup v2
        # hierarchy it serves everything but starting VMs.  Its working directory is the repository (it
        # imports the image package, which is not installed).
        cage_args = ["-m", "cage", "serve", "--config", root / "cage.toml", "--socket", root / "cage.sock"]
        cage_args += ["--agents-dir", root / "installed", "--vault-dir", root / "vault"]
        cage_args += ["--state-dir", root / "state", "--run-dir", root / "cage-run", "--log-dir", root / "logs"]
        cage_args += ["--egress-socket", root / "egress.sock", "--ctxgraph-socket", root / "ctx.sock"]
        cage_args += ["--cgroup-root", root / "no-cgroup"]
        quoted = ", ".join(f'"{a}"' for a in ["--net", PYTHON, *map(str, cage_args)])
        text += f"""
        [service.cage]
        binary = "{shutil.which("unshare")}"
        args = [{quoted}]
        ready = "notify"
        depends_on = ["ctxgraph"]
        working_dir = "{REPO}"
        """
    return text


def _start(*, cage: bool) -> Iterator[Appliance]:
    root = Path(tempfile.mkdtemp(prefix="nc-"))  # short: unix socket paths are limited to 108 bytes
    nulld = NulldProcess(root)
    try:
        (root / "no-cgroup").mkdir()
        nulld.write_config(_config(nulld, cage=cage))
        for name, sock in (
            ("ctx", "ctx.sock"),
            ("agent", "cage.sock"),
            ("secret", "cage.sock"),
            ("egress", "eg/egress.sock"),
        ):
            nulld.extra += ["--route", f"{name}={root / sock}"]
        nulld.start()
        nulld.wait_state("ctxgraph", "ready")
        if cage:
            nulld.wait_state("cage", "ready", timeout=60)
        yield Appliance(nulld, root)
    finally:
        nulld.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def appliance() -> Iterator[Appliance]:
    """nulld with ctxgraph and chatty; the front door's cage and egress sockets lead nowhere."""
    yield from _start(cage=False)


@pytest.fixture
def appliance_with_cage() -> Iterator[Appliance]:
    """As ``appliance``, plus a real cage daemon behind agent.* and secret.*."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("cage needs root and unshare(1) for a network namespace of its own")
    yield from _start(cage=True)
