"""Fixtures shared by every component's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ctxgraph.process import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ctxgraph daemon process rooted in the test's temporary directory."""
    with ServerProcess(tmp_path / "ctxgraph") as proc:
        yield proc
