"""nullctl's command groups; each module's ``register`` adds its part of the argparse tree.

Modules here import only the standard library at the top; the connection and anything heavy (pydantic for
manifests) are imported inside the handlers that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from nullctl.errors import EXIT_OK


def follow(events: Iterator[dict[str, Any]], show: Callable[[dict[str, Any]], None]) -> int:
    """Print a stream's events until it ends or the operator presses Ctrl-C (a normal end: exit status 0)."""
    try:
        for event in events:
            show(event)
    except KeyboardInterrupt:
        pass
    return EXIT_OK
