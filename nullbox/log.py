"""The one logging setup every NullBox process uses.

Daemons log to stderr; under nulld that stream is captured per service (and forwarded to the kernel log), so a
daemon never writes log files of its own.  Set ``NULLBOX_LOG_LEVEL`` (DEBUG, INFO, ...) to change verbosity.
Never log secrets or stored values: log what happened and to what, not the payload.
"""

from __future__ import annotations

import contextlib
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


class KmsgHandler(logging.Handler):
    """Writes to the kernel log with a syslog ``<priority>`` prefix, so early boot messages reach the console."""

    MAX_BYTES: Final = 1000
    PRIORITIES: Final = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def __init__(self, component: str, path: str = "/dev/kmsg") -> None:
        super().__init__()
        self.component = component
        self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)

    def emit(self, record: logging.LogRecord) -> None:
        priority = self.PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        try:
            text = self.format(record).replace("\n", " ")
            # One write per record: the kernel turns each write into one log record, and refuses (EINVAL) a write
            # over 1024 bytes.  Cut in bytes, then drop a character the cut may have split.
            data = f"<{priority}>{self.component}: {text}".encode("utf-8", "replace")[: self.MAX_BYTES]
            os.write(self._fd, data.decode("utf-8", "ignore").encode() + b"\n")
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()


def setup(component: str, level: str | int | None = None, *, kmsg: bool = False) -> logging.Logger:
    """Configure the root logger once for this process and return the component's logger.

    With ``kmsg`` (PID 1), records go to /dev/kmsg, falling back to stderr where it cannot be opened.
    """
    chosen = level if level is not None else os.environ.get(ENV_LEVEL, "INFO")
    if isinstance(chosen, str):
        resolved = logging.getLevelName(chosen.upper())
        chosen = resolved if isinstance(resolved, int) else logging.INFO
    handler: logging.Handler | None = None
    if kmsg:
        try:
            handler = KmsgHandler(component)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        except OSError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_ComponentFilter(component))
        handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(chosen)
    return logging.getLogger(component)
