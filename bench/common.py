"""What every benchmark here shares: the printed table, verdicts, progress lines, /proc readings."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    measurement: str
    value: str
    unit: str
    versus: str = ""
    verdict: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, measurement: str, value: str, unit: str, versus: str = "", verdict: str = "") -> None:
        self.rows.append(Row(measurement, value, unit, versus, verdict))

    def section(self, title: str) -> None:
        self.rows.append(Row(title, "", ""))

    def render(self) -> str:
        header = Row("measurement", "value", "unit", "ratio/baseline or target", "verdict")
        table = [header, *self.rows]
        measured = [r for r in table if r.value or r.unit]  # section titles span the whole line
        widths = [max(len(getattr(r, f)) for r in measured) for f in ("measurement", "value", "unit", "versus")]
        lines: list[str] = []
        for index, row in enumerate(table):
            if index > 0 and not row.value and not row.unit:
                lines.append(f"-- {row.measurement}")
                continue
            lines.append(
                f"{row.measurement:<{widths[0]}}  {row.value:>{widths[1]}}  {row.unit:<{widths[2]}}  "
                f"{row.versus:<{widths[3]}}  {row.verdict}".rstrip()
            )
            if index == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)

    def show(self, title: str, info: list[str], closing: str) -> None:
        """Print the whole report: title, machine info, the table, its notes, and a closing line."""
        print(title)
        for line in info:
            print(f"  {line}")
        print()
        print(self.render())
        print()
        for note in self.notes:
            print(f"  {note}")
        print(f"  {closing}")


def verdict(ok: bool) -> str:
    return "meets" if ok else "misses"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_fields(path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def status_kib(pid: int, field_name: str) -> int:
    value = status_fields(Path(f"/proc/{pid}/status")).get(field_name)
    if value is None:
        raise RuntimeError(f"/proc/{pid}/status has no {field_name}")
    return int(value.split()[0])


def first_line(argv: list[str]) -> str:
    """The first line a command prints (stdout, else stderr), or "?": for the machine-info lines of a report."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def repository_state(repo: Path) -> str:
    """The commit measured, and whether the working tree differs from it."""
    commit = first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    if dirty:
        commit += f" + {len(dirty)} uncommitted changes in the working tree (measured as they are)"
    return commit
