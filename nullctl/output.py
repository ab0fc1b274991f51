"""How nullctl prints: aligned tables, relative times, colour only on a terminal, or the API's JSON objects.

Only the standard library, and nothing heavy at import time: ``nullctl --help`` must start fast.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing costs startup time (mypy treats the name the same)
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from typing import Any, Final, TextIO

#: ANSI SGR codes by style name.
STYLES: Final = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}

#: Colour of a state word (services, agents) in human output.
STATE_STYLES: Final = {
    "ready": "green",
    "running": "green",
    "ok": "green",
    "starting": "yellow",
    "waiting": "yellow",
    "stopping": "yellow",
    "restarting": "yellow",
    "backoff": "yellow",
    "paused": "cyan",
    "stopped": "dim",
    "exited": "red",
    "failed": "red",
    "blocked": "red",
    "broken": "red",
}

Cell = str | tuple[str, str | None]
"""A table cell: its text, or (text, style name) to colour it on a terminal."""


def colour_wanted(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set or TERM is dumb (https://no-color.org)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Output:
    """Where a command's results go.  ``json`` mode prints the API's objects, one per line."""

    def __init__(self, *, json_mode: bool, stream: TextIO | None = None, colour: bool | None = None) -> None:
        self.json = json_mode
        self.stream = stream if stream is not None else sys.stdout
        self.colour = colour_wanted(self.stream) if colour is None else colour

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def obj(self, value: Any) -> None:
        """One JSON object on one line (the ``--json`` form of every result and of every stream event)."""
        import json  # noqa: PLC0415 (lazy: not needed for --help)

        self.line(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def paint(self, text: str, style: str | None) -> str:
        if not self.colour or not style:
            return text
        codes = ";".join(STYLES[s] for s in style.split("+") if s in STYLES)
        return f"\x1b[{codes}m{text}\x1b[0m" if codes else text

    def state(self, state: str) -> Cell:
        return (state, STATE_STYLES.get(state))

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, indent: str = "") -> None:
        for text in self.table_lines(headers, rows, indent=indent):
            self.line(text)

    def table_lines(self, headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, indent: str = "") -> list[str]:
        """Columns padded to their widest cell, two spaces apart, headers in capitals; trailing blanks trimmed."""
        cells = [[c if isinstance(c, tuple) else (c, None) for c in row] for row in rows]
        widths = [len(h) for h in headers]
        for row in cells:
            for i, (text, _) in enumerate(row):
                widths[i] = max(widths[i], len(text))
        last = len(headers) - 1
        out = [indent + "  ".join(self.paint(h.upper().ljust(w), "bold") for h, w in zip(headers, widths, strict=True))]
        for row in cells:
            parts = []
            for i, (text, style) in enumerate(row):
                parts.append(self.paint(text if i == last else text.ljust(widths[i]), style))
            out.append((indent + "  ".join(parts)).rstrip())
        out[0] = out[0].rstrip()
        return out

    def fields(self, pairs: Iterable[tuple[str, Cell]], *, indent: str = "") -> None:
        """``key:  value`` lines with the values aligned (the human form of one object)."""
        items = [(k, v if isinstance(v, tuple) else (v, None)) for k, v in pairs]
        width = max((len(k) for k, _ in items), default=0) + 1
        for key, (text, style) in items:
            self.line(f"{indent}{(key + ':').ljust(width)}  {self.paint(text, style)}".rstrip())


# ------------------------------------------------------------------------------------------------- time and size


def duration(seconds: float) -> str:
    """A span for a person: ``12 s``, ``3 min``, ``2 h 5 min``, ``4 days``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds else "0 s"
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        hours, rest = divmod(int(seconds), 3600)
        minutes = rest // 60
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days = int(seconds // 86400)
    return f"{days} day" if days == 1 else f"{days} days"


def ago(seconds: float | None) -> str:
    """``3 min ago``; ``just now`` under a second; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return "just now"
    return f"{duration(seconds)} ago"


def ago_ns(wall_ns: int | None, now: float | None = None) -> str:
    if wall_ns is None:
        return "-"
    return ago((time.time() if now is None else now) - wall_ns / 1e9)


def ago_iso(stamp: str | None, now: float | None = None) -> str:
    """An ISO 8601 time (as cage reports them) relative to now; the text itself when it cannot be read."""
    if not stamp:
        return "-"
    from datetime import datetime  # noqa: PLC0415 (lazy)

    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if moment.tzinfo is None:
        return stamp
    return ago((time.time() if now is None else now) - moment.timestamp())


def size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover (the loop always returns)


def text(value: Any) -> str:
    """A JSON value as a table cell: ``-`` for null, lists comma-separated, the rest as its JSON text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return ", ".join(text(v) for v in value) or "-"
    import json  # noqa: PLC0415

    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def shorten(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    """``obj[a][b]...`` or None when any step is missing."""
    current: Any = obj
    for key in path:
        if not isinstance(current, dict):
            return None
        current = current.get(key)
    return current
