"""`make run` today: the demo drives a real daemon through its sockets and stops it cleanly."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ctxgraph", "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "the agent tries to write as someone else" in out and "forbidden" in out
    assert '"created": false' in out  # the same value twice is stored once
    assert "a watcher on research/ saw the first new entry live" in out and '"type": "entry"' in out
    assert "ctxgraph stopped cleanly (exit 0) after SIGTERM" in out
