"""Fixtures shared by every component's tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctxgraph.process import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ctxgraph daemon process rooted in the test's temporary directory."""
    with ServerProcess(tmp_path / "ctxgraph") as proc:
        yield proc


@pytest.fixture(scope="session")
def image() -> Path:
    """The appliance image, built once per test run (image.build skips every step whose inputs are unchanged), with
    the NullBox appliance kernel built first (kernel.build: cached; a compile from scratch takes ~9 min on 2 cores),
    so that the image boots the kernel it ships with and not Debian's fallback."""
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "kernel.build", "appliance"], cwd=repo, check=False, timeout=3600)
    assert result.returncode == 0, "the NullBox kernel build failed (its output is above)"
    result = subprocess.run([sys.executable, "-m", "image.build"], cwd=repo, check=False, timeout=3600)
    assert result.returncode == 0, "the image build failed (its output is above)"
    return repo / "build"
