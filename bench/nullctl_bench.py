"""nullctl benchmark: round trips through nulld's front door (unix socket, virtio-serial port) and cold start.

    .venv/bin/python -m bench.nullctl_bench            # full run: boots the appliance ISO under TCG (~1-2 min)
    .venv/bin/python -m bench.nullctl_bench --quick    # fewer samples
    .venv/bin/python -m bench.nullctl_bench --no-boot  # (1) and (3) only: no image, no QEMU

Phases:
  (1) ``status`` round trips on one open connection (nullbox.wire.Client, what nullctl uses) to a local nulld (a
      child subreaper with 3 services, as in bench.nulld_bench) over its unix socket.  Baseline, same run, calls
      alternating one by one: a raw unix-socket echo of a request line of the same size, on one open connection, to
      an echo server in its own process (asyncio, reads a line, writes it back).
  (2) the same ``status`` round trips over the appliance's virtio-serial control port: build/nullbox.iso booted under
      TCG with a fresh data disk (bench.image_bench.Guest, QEMU's ``-chardev socket`` host side = what
      ``nullctl --connect serial:PATH`` opens), once every service is ready.  Baseline: the local echo, alternating.
      Also the whole ``nullctl status --connect serial:PATH`` process, human output.
  (3) cold start, the way the appliance runs it: ``/usr/bin/python3 -m nullctl --help`` (system interpreter, the
      repository on PYTHONPATH: no venv, no editable-install finder) vs ``/usr/bin/python3 -c pass``; target <= 3x.
      Diagnostics: ``nullctl status`` against the local nulld of (1) (connect, call, render) and the development
      venv's console script vs its own ``python -c pass``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.common import Report, log, verdict
from bench.image_bench import BUILD, Guest
from bench.nulld_bench import NOTIFY_ARGV, Janitor, Nulld, load_average, service_table, signals_unwind
from nullbox.wire import Client
from nulld.syscalls import set_child_subreaper

REPO: Final = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON: Final = "/usr/bin/python3"
VENV_PYTHON: Final = sys.executable
VENV_NULLCTL: Final = Path(sys.executable).with_name("nullctl")
TARGET_COLD_RATIO: Final = 3.0
ECHO_PROGRAM: Final = """
import asyncio, os, sys
async def echo(reader, writer):
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_unix_server(echo, sys.argv[1])
    os.chmod(sys.argv[1], 0o600)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""
# What a status request looks like on the wire (Client adds the id); the echo baseline sends a line this long.
STATUS_LINE: Final = b'{"id": 1, "op": "status"}\n'


@dataclass(frozen=True)
class Settings:
    round_trips: int
    serial_round_trips: int
    starts: int
    boot: bool


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench.nullctl_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--no-boot", action="store_true", help="skip (2): no image, no QEMU")
    args = parser.parse_args(argv)
    if args.quick:
        return Settings(round_trips=200, serial_round_trips=50, starts=10, boot=not args.no_boot)
    return Settings(round_trips=2000, serial_round_trips=300, starts=30, boot=not args.no_boot)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


class Echo:
    """The raw-socket baseline: a line echo server in its own process, and one open connection to it."""

    def __init__(self, janitor: Janitor, path: Path) -> None:
        self.proc = janitor.spawn([VENV_PYTHON, "-c", ECHO_PROGRAM, str(path)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the echo server did not start")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def round_trip(self) -> float:
        started = time.perf_counter()
        self.sock.sendall(STATUS_LINE)
        reply = self.file.readline()
        took = time.perf_counter() - started
        if reply != STATUS_LINE:
            raise RuntimeError(f"the echo server answered {reply!r}")
        return took

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def status_round_trip(client: Client) -> float:
    started = time.perf_counter()
    reply = client.call("status")
    took = time.perf_counter() - started
    if "services" not in reply or "nulld" not in reply:
        raise RuntimeError(f"status answered {sorted(reply)}")
    return took


def alternate(client: Client, echo: Echo, count: int) -> tuple[list[float], list[float]]:
    """``count`` status calls and ``count`` echoes, one by one, after 20 untimed of each."""
    for _ in range(20):
        status_round_trip(client)
        echo.round_trip()
    calls: list[float] = []
    echoes: list[float] = []
    for _ in range(count):
        calls.append(status_round_trip(client))
        echoes.append(echo.round_trip())
    return calls, echoes


def process_time(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    """Wall time of whole processes (spawn to exit), after one untimed run; each must exit 0."""
    times: list[float] = []
    for index in range(runs + 1):
        started = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")
        if index:
            times.append(took)
    return times


def appliance_env() -> dict[str, str]:
    """The system interpreter seeing the repository as the image's dist-packages would: no venv, no .pth finder."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONPATH": str(REPO),
    }


def rt_rows(report: Report, label: str, calls: list[float], echoes: list[float]) -> None:
    base50, base99 = percentile(echoes, 50), percentile(echoes, 99)
    p50, p99 = percentile(calls, 50), percentile(calls, 99)
    report.add(f"{label} status p50", ms(p50), "ms", f"{p50 / base50:.1f} x raw echo p50 ({ms(base50)} ms)")
    report.add(f"{label} status p99", ms(p99), "ms", f"{p99 / base99:.1f} x raw echo p99 ({ms(base99)} ms)")


@dataclass(frozen=True)
class Local:
    calls: list[float]
    echoes: list[float]
    bare: list[float]
    helped: list[float]
    status_cli: list[float]
    venv_bare: list[float]
    venv_help: list[float]


@dataclass(frozen=True)
class Serial:
    calls: list[float]
    echoes: list[float]
    whole: list[float]


def bench_local(janitor: Janitor, work: Path, echo: Echo, settings: Settings) -> Local:
    """(1) and (3): a local nulld over its unix socket, and cold starts."""
    config = service_table("sleep-a", ("/bin/sleep", "100000"), "spawn") + service_table(
        "notify-b", NOTIFY_ARGV, "notify"
    )
    nulld = Nulld(janitor, work / "nulld", config)
    nulld.start()
    with nulld.client() as client:
        nulld.wait_all_ready(client, 2)
        log(f"(1) {settings.round_trips} status round trips over the unix socket, alternating with echoes")
        calls, echoes = alternate(client, echo, settings.round_trips)
    log(f"(3) cold starts, {settings.starts} runs per arm")
    env = appliance_env()
    status_argv = [SYSTEM_PYTHON, "-m", "nullctl", "--connect", f"unix:{nulld.socket}", "status"]
    local = Local(
        calls=calls,
        echoes=echoes,
        bare=process_time([SYSTEM_PYTHON, "-c", "pass"], settings.starts, env),
        helped=process_time([SYSTEM_PYTHON, "-m", "nullctl", "--help"], settings.starts, env),
        status_cli=process_time(status_argv, settings.starts, env),
        venv_bare=process_time([VENV_PYTHON, "-c", "pass"], settings.starts),
        venv_help=process_time([str(VENV_NULLCTL), "--help"], settings.starts),
    )
    nulld.stop()
    return local


def bench_serial(janitor: Janitor, work: Path, echo: Echo, settings: Settings) -> Serial:
    """(2): the appliance booted under TCG, through its virtio-serial control port."""
    if not (BUILD / "nullbox.iso").is_file():
        raise SystemExit("build/nullbox.iso is missing: run `make image` first (or pass --no-boot)")
    guest = Guest(janitor, work / "vm")
    try:
        log("(2) booting build/nullbox.iso under TCG")
        guest.start()
        guest.wait_answer()
        guest.wait_all_ready()
        address = f"serial:{guest.opts.ctl_socket}"
        log(f"(2) {settings.serial_round_trips} status round trips over {address}")
        with Client(address, timeout=60) as client:
            calls, echoes = alternate(client, echo, settings.serial_round_trips)
        status_argv = [SYSTEM_PYTHON, "-m", "nullctl", "--connect", address, "status"]
        whole = process_time(status_argv, min(settings.starts, 10), appliance_env())
        guest.poweroff()
    finally:
        guest.close()
    return Serial(calls, echoes, whole)


def report_rows(report: Report, local: Local, serial: Serial | None) -> None:
    report.section("(1) status over nulld's unix socket, one open connection, alternating with a raw echo")
    rt_rows(report, "(1)", local.calls, local.echoes)
    if serial is not None:
        report.section("(2) status over the appliance's virtio-serial port (ISO under TCG), alternating with the echo")
        rt_rows(report, "(2)", serial.calls, serial.echoes)
        report.add(
            "(2) whole `nullctl status` process",
            f"{statistics.median(serial.whole) * 1000:.1f}",
            "ms",
            f"median of {len(serial.whole)}: start, connect, call, render",
        )
    report.section("(3) cold start (spawn to exit), medians")
    base = statistics.median(local.bare)
    ratio = statistics.median(local.helped) / base
    report.add("(3) python3 -c pass (baseline)", f"{base * 1000:.1f}", "ms", "1.00 (baseline)")
    report.add(
        "(3) python3 -m nullctl --help",
        f"{statistics.median(local.helped) * 1000:.1f}",
        "ms",
        f"{ratio:.2f} x baseline; target <= {TARGET_COLD_RATIO:g} x",
        verdict(ratio <= TARGET_COLD_RATIO),
    )
    report.add(
        "(3) nullctl status (local nulld)",
        f"{statistics.median(local.status_cli) * 1000:.1f}",
        "ms",
        f"{statistics.median(local.status_cli) / base:.2f} x baseline",
    )
    venv_base = statistics.median(local.venv_bare)
    report.add(
        "(3) venv: nullctl --help",
        f"{statistics.median(local.venv_help) * 1000:.1f}",
        "ms",
        f"{statistics.median(local.venv_help) / venv_base:.2f} x the venv's python -c pass ({venv_base * 1000:.1f} ms)",
    )
    report.notes.append(
        f"(1) {len(local.calls)} and (2) {len(serial.calls) if serial else 0} round trips per arm; the echo request "
        f"is {len(STATUS_LINE)} bytes, like a status request; status replies are larger (services, agents, uptime)"
    )
    report.notes.append(
        "(3) /usr/bin/python3 with PYTHONPATH=<repo>: how the appliance runs nullctl (its dist-packages hold the "
        "same modules); the venv's interpreter pays for the editable-install finder on every start"
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    begun = time.perf_counter()
    info = [f"nproc {os.cpu_count()}, python {sys.version.split()[0]}, load average {load_average()} at the start"]
    set_child_subreaper()
    janitor = Janitor()
    serial: Serial | None = None
    with signals_unwind(), tempfile.TemporaryDirectory(prefix="nullctl-bench-") as tmp:
        work = Path(tmp)
        try:
            echo = Echo(janitor, work / "echo.sock")
            local = bench_local(janitor, work, echo, settings)
            if settings.boot:
                serial = bench_serial(janitor, work, echo, settings)
            echo.close()
        finally:
            janitor.cleanup()
    report = Report()
    report_rows(report, local, serial)
    elapsed = time.perf_counter() - begun
    report.show("nullctl benchmark", info, f"total run time {elapsed:.0f} s; load average {load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
