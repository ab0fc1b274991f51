"""What every image build step gets: where things are, the fixed timestamp, and a way to report progress."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

DEFAULT_SOURCE_DATE_EPOCH: Final = 1767225600  # 2026-01-01T00:00:00Z: reproducible builds unless overridden


@dataclass(frozen=True)
class Context:
    repo: Path
    out: Path  # build/
    source_date_epoch: int = DEFAULT_SOURCE_DATE_EPOCH
    started: float = field(default_factory=time.monotonic)
    kernel: str = "auto"  # which kernel the appliance boots: auto, nullbox or debian (image.bootkernel)

    def log(self, message: str) -> None:
        print(f"[image {time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOURCE_DATE_EPOCH": str(self.source_date_epoch), "LC_ALL": "C.UTF-8", "TZ": "UTC"}

    def run(self, argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        """The one subprocess wrapper of the build: argv lists only, output to the build's stderr, fail loudly."""
        self.log("$ " + " ".join(argv))
        subprocess.run(argv, cwd=cwd, env=env or self.env(), check=True)

    def output(self, argv: list[str], *, cwd: Path | None = None) -> str:
        return subprocess.run(argv, cwd=cwd, env=self.env(), check=True, capture_output=True, text=True).stdout


def context_from_env(repo: Path, kernel: str = "auto") -> Context:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH))
    return Context(repo=repo, out=repo / "build", source_date_epoch=epoch, kernel=kernel)
