"""``status``, ``service ...``, ``timings``, ``poweroff``, ``reboot``: nulld's own verbs."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from nullctl.cli import Parser, Session, command, describe, group, int_range
from nullctl.commands import follow
from nullctl.errors import Failed
from nullctl.output import Cell, Output, ago, duration, shorten, text

if TYPE_CHECKING:
    from nullctl.api import Api


def build(name: str, parser: Parser, summary: str) -> None:
    if name == "status":
        describe(
            parser,
            summary,
            handler=status,
            description="nulld (mode, uptime, config problems), every service's state, and every agent's state when "
            "cage answers (when it does not, one line says so and the command still succeeds).",
            examples=["nullctl status", "nullctl --connect serial:build/run/ctl.sock status", "nullctl --json status"],
        )
    elif name == "service":
        _build_service(describe(parser, summary))
    elif name == "timings":
        describe(
            parser,
            summary,
            handler=timings,
            description="When each boot event happened, in seconds since nulld started; for each service the time "
            "from spawn to ready.",
            examples=["nullctl timings", "nullctl --json timings"],
        )
    elif name in ("poweroff", "reboot"):
        describe(parser, summary, handler=power, examples=[f"nullctl {name}"]).set_defaults(op=name)


def _build_service(service: Parser) -> None:
    services = group(service, "command")
    command(
        services,
        "list",
        "every service nulld supervises, with its state",
        handler=service_list,
        examples=["nullctl service list", "nullctl --json service list"],
    )
    for verb, what in (("start", "start"), ("stop", "stop"), ("restart", "stop and start again")):
        action = command(
            services,
            verb,
            f"{what} a service",
            handler=service_action,
            description=f"{what[:1].upper()}{what[1:]} the service NAME and print its state afterwards."
            + (" Services that depend on it are not stopped." if verb == "stop" else ""),
            examples=[f"nullctl service {verb} ctxgraph"],
        )
        action.add_argument("name", metavar="NAME", help="the service (see `nullctl service list`)")
    logs = command(
        services,
        "logs",
        "a service's output (its last lines; -f keeps following)",
        handler=service_logs,
        description="The last lines a service wrote to stdout and stderr (nulld keeps its last 1000), with the time "
        "each was written; stderr lines are marked 'err'. With -f, new lines are printed as they come until Ctrl-C.",
        examples=["nullctl service logs ctxgraph", "nullctl service logs ctxgraph -n 20 -f"],
    )
    logs.add_argument("name", metavar="NAME", help="the service")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C to stop)")
    logs.add_argument(
        "-n", "--lines", type=int_range(0, 1000), default=100, metavar="LINES", help="how many (0-1000, default 100)"
    )


# ----------------------------------------------------------------------------------------------------- status


def _service_note(service: dict[str, Any]) -> str:
    if service.get("blocked_by"):
        return f"blocked by {service['blocked_by']}"
    if service.get("message"):
        return str(service["message"])
    last = service.get("last_exit")
    if isinstance(last, dict) and service.get("state") in ("exited", "failed", "backoff"):
        if "reason" in last:
            return str(last["reason"])
        if "signal" in last:
            return f"killed by {last['signal']}"
        if "code" in last:
            return f"exit code {last['code']}"
        if "error" in last:
            return str(last["error"])
    return ""


def _services_table(out: Output, services: list[dict[str, Any]]) -> None:
    rows: list[list[Cell]] = []
    for s in services:
        rows.append(
            [
                s["name"],
                out.state(s["state"]),
                text(s.get("pid")),
                str(s.get("restarts", 0)),
                ago(s.get("since_s")),
                _service_note(s),
            ]
        )
    out.table(["service", "state", "pid", "restarts", "since", "note"], rows)


def _agent_note(agent: dict[str, Any]) -> str:
    if agent.get("error"):
        return str(agent["error"])
    if agent.get("restart_in_s") is not None:
        return f"restarting in {duration(agent['restart_in_s'])}"
    last = agent.get("last_exit")
    if isinstance(last, dict) and agent.get("state") in ("exited", "failed", "stopped"):
        if last.get("guest_failure"):
            return f"guest failed: {last['guest_failure']}"
        if last.get("agent_status") is not None:
            return f"agent exit status {last['agent_status']}"
    return ""


def agents_table(out: Output, agents: list[dict[str, Any]]) -> None:
    rows: list[list[Cell]] = []
    for a in agents:
        uptime = a.get("uptime_s")
        rows.append(
            [
                a["agent"],
                out.state(a["state"]),
                str(a.get("restarts", 0)),
                duration(uptime) if uptime is not None else "-",
                shorten(_agent_note(a), 80),
            ]
        )
    out.table(["agent", "state", "restarts", "uptime", "note"], rows)


def _cage_overview(api: Api) -> dict[str, Any] | Failed:
    """cage's overview, or why there is none (cage not running is an answer, not a failure of ``status``)."""
    try:
        return api.call("agent.status")
    except Failed as exc:
        return exc


def status(args: argparse.Namespace, s: Session) -> int:
    api = s.api()
    nulld = api.call("status")
    cage = _cage_overview(api)
    out = s.out
    if out.json:
        if isinstance(cage, Failed):
            out.obj({**nulld, "cage": {"error": {"code": cage.code, "message": cage.message}}})
        else:
            out.obj({**nulld, "cage": cage})
        return 0
    info = nulld["nulld"]
    summary = f"pid {info['pid']} ({info['mode']}), up {duration(info['uptime_s'])}, config {info.get('config') or '-'}"
    pairs: list[tuple[str, Cell]] = [("nulld", summary)]
    if info.get("root_readonly"):
        pairs.append(("root", "read-only"))
    if info.get("degraded"):
        pairs.append(("DEGRADED", (str(info["degraded"]), "red")))
    for error in info.get("config_errors") or []:
        pairs.append(("config error", (str(error), "red")))
    for note in info.get("boot") or []:
        if str(note).startswith("warning"):
            pairs.append(("boot", (str(note), "yellow")))
    if info.get("shutting_down"):
        pairs.append(("state", ("shutting down", "yellow")))
    out.fields(pairs)
    out.line()
    _services_table(out, nulld["services"])
    out.line()
    if isinstance(cage, Failed):
        not_running = cage.code == "unavailable" and "is not running" in cage.message
        out.line("agents: unknown, cage is not running" if not_running else f"agents: unknown, {cage.message}")
        return 0
    if cage["agents"]:
        agents_table(out, cage["agents"])
    else:
        out.line("agents: none installed (nullctl agent init NAME; nullctl agent apply DIR)")
    backend = cage.get("backend") or {}
    if backend.get("kind"):
        out.line(f"cage backend: {backend['kind']}" + (f" ({backend['reason']})" if backend.get("reason") else ""))
    if (cage.get("cgroup") or {}).get("error"):
        out.line(out.paint(f"cgroup: {cage['cgroup']['error']}", "red"))
    return 0


# ---------------------------------------------------------------------------------------------------- service


def service_list(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call("status")
    if s.out.json:
        s.out.obj({"services": reply["services"]})
    else:
        _services_table(s.out, reply["services"])
    return 0


def service_action(args: argparse.Namespace, s: Session) -> int:
    verb = args.command
    service = s.api().call(verb, service=args.name)["service"]
    if s.out.json:
        s.out.obj({"service": service})
        return 0
    pid = f" (pid {service['pid']})" if service.get("pid") else ""
    note = _service_note(service)
    s.out.line(
        f"{service['name']}: {s.out.paint(service['state'], s.out.state(service['state'])[1])}{pid}"
        + (f", {note}" if note else "")
    )
    return 0


def _log_line(out: Output, event: dict[str, Any]) -> None:
    if out.json:
        out.obj(event)
        return
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time_ns", 0) / 1e9))
    err = event.get("stream") == "stderr"
    out.line(f"{out.paint(stamp, 'dim')} {out.paint('err', 'red') if err else 'out'} {event.get('line', '')}")


def service_logs(args: argparse.Namespace, s: Session) -> int:
    api = s.api()
    if args.follow:
        return follow(
            api.stream("logs", service=args.name, lines=args.lines, follow=True), lambda e: _log_line(s.out, e)
        )
    reply = api.call("logs", service=args.name, lines=args.lines)
    if s.out.json:
        s.out.obj(reply)
        return 0
    for event in reply["lines"]:
        _log_line(s.out, event)
    return 0


# ---------------------------------------------------------------------------------------------- timings, power


def timings(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call("timings")
    if s.out.json:
        s.out.obj(reply)
        return 0
    spawned: dict[str, float] = {}
    rows: list[list[Cell]] = []
    for event in reply["events"]:
        at = float(event["since_nulld_s"])
        name = event.get("service")
        took = ""
        if name and event["event"] == "spawned":
            spawned[name] = at
        elif name and event["event"] in ("ready", "exited") and name in spawned:
            took = f"{at - spawned[name]:.3f} s after spawn"
        rows.append([f"{at:8.3f}", event["event"], name or "", took])
    s.out.table(["seconds", "event", "service", "took"], rows)
    return 0


def power(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call(args.op)
    if s.out.json:
        s.out.obj(reply)
    else:
        s.out.line(f"{reply.get('accepted', args.op)} accepted: nulld is stopping every service")
    return 0
