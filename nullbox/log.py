"""The one logging setup every NullBox process uses.

Daemons log to stderr; under nulld that stream is captured per service (and forwarded to the kernel log), so a
daemon never writes log files of its own.  Set ``NULLBOX_LOG_LEVEL`` (DEBUG, INFO, ...) to change verbosity.
Never log secrets or stored values: log what happened and to what, not the payload.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final

ENV_LEVEL: Final = "NULLBOX_LOG_LEVEL"
FORMAT: Final = "%(asctime)s %(component)s[%(process)d] %(levelname)s %(name)s: %(message)s"


class _ComponentFilter(logging.Filter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        return True


def setup(component: str, level: str | int | None = None) -> logging.Logger:
    """Configure the root logger once for this process and return the component's logger."""
    chosen = level if level is not None else os.environ.get(ENV_LEVEL, "INFO")
    if isinstance(chosen, str):
        resolved = logging.getLevelName(chosen.upper())
        chosen = resolved if isinstance(resolved, int) else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ComponentFilter(component))
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(chosen)
    return logging.getLogger(component)
