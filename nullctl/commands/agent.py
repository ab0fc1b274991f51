"""``agent ...``: install, inspect and run agents (cage, through nulld's front door as ``agent.<verb>``).

``agent schema`` and ``agent init`` work locally, without a connection; ``agent apply`` validates a manifest
locally (cage.manifest, the same model cage uses) before sending it, so a mistake is reported with file and field
before anything is sent.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Final

from nullctl.cli import Parser, Session, command, describe, group, int_range
from nullctl.commands import follow
from nullctl.errors import Failed, UsageError
from nullctl.output import Cell, Output, ago_iso, ago_ns, duration, get, text

if TYPE_CHECKING:
    from pathlib import Path

MANIFEST_NAME: Final = "AGENT.toml"
MAX_MANIFEST_BYTES: Final = 64 * 1024  # cage.manifest.MAX_MANIFEST_BYTES (checked again there)
NAME_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"  # cage.manifest.NAME_RE, without importing pydantic
NO_ROOTFS: Final = "no rootfs given and no installed agent"

TEMPLATE: Final = """\
# AGENT.toml of {name}: what the agent is, what its VM runs, and everything it may use.
# Nothing that is not declared here is available to it. Reference: docs/agent-toml.md;
# JSON Schema for editors: nullctl agent schema > agent-toml.schema.json
# Check and install:  nullctl agent apply {name}/        Then:  nullctl agent start {name}

[agent]
name = "{name}"                    # the installed agent's name (1-64 of A-Z a-z 0-9 _ -)
version = "0.1.0"
# runtime = "python3.12"            # informational: the language runtime the rootfs provides
# argv run inside the VM; argv[0] is an absolute path inside the rootfs (default: /agent/bin/{name})
command = ["/agent/bin/{name}"]
rootfs = "rootfs"                   # a directory or SquashFS image next to this file: the VM's root filesystem
# env = {{ LOG_LEVEL = "info" }}      # environment inside the VM (NULLBOX_* and KRUN_* are reserved)
restart = "on-failure"              # always | on-failure | never
autostart = false                   # start it whenever cage starts

[capabilities]
max_cpu_percent = 25                # share of one CPU, 1-100
max_memory_mb = 256                 # VM memory in MiB, 64-65536
shell = false                       # whether the agent may spawn a shell
# Vault secrets it receives as environment variables of the same name:
#   nullctl secret set OPENAI_API_KEY && nullctl secret grant OPENAI_API_KEY {name}
credential_refs = []
# max_api_calls_per_hour = 200      # 0 = no limit

[capabilities.network]
# Where it may connect (TCP 443 unless a port is given); everything else is dropped.
# e.g. allow = ["api.openai.com", "*.github.com:443", "example.org:8443"]
allow = []

[capabilities.filesystem]
# Paths inside the VM under /data, the agent's own data directory on the appliance.
read = []                           # e.g. ["/data/corpus"], mounted read-only
write = []                          # e.g. ["/data/out"], mounted read-write

# [capabilities.health_check]       # cage probes the VM over its private link; unhealthy = stopped, restarted
# port = 8080
# http_path = "/healthz"

[tools]
# Each tool the agent calls and its risk: low | medium | high | critical. A tool above the appliance's
# max_tool_risk needs an operator's approval of this exact manifest: nullctl agent approve {name}
# web_search = {{ risk = "low" }}
"""


def _name_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the agent (see `nullctl agent list`)")


def build(name: str, agent: Parser, summary: str) -> None:
    describe(agent, summary)
    agents = group(agent, "command")

    apply = command(
        agents,
        "apply",
        "install or update an agent from its AGENT.toml",
        handler=apply_agent,
        description="Validate FILE|DIR (an AGENT.toml, or a directory holding one) locally, then send it to cage, "
        "which installs the agent or updates the installed one (a running agent is stopped, updated and started "
        "again). The manifest travels inside the request (at most 64 KiB); its rootfs does not: a new agent's "
        "rootfs must already be on the appliance. On the appliance itself, --path installs from a directory "
        "there (AGENT.toml and the rootfs next to it), copying the rootfs.",
        examples=[
            "nullctl agent apply researcher/AGENT.toml          # update an installed agent's manifest",
            "nullctl agent apply researcher/ --rootfs /var/lib/nullbox/incoming/researcher.sqfs",
            "nullctl agent apply --path /var/lib/nullbox/incoming/researcher   # on the appliance",
        ],
    )
    apply.add_argument("source", metavar="FILE|DIR", help="an AGENT.toml, or the agent directory holding it")
    apply.add_argument(
        "--path",
        action="store_true",
        help="send FILE|DIR as a path on the appliance (absolute) instead of sending the manifest's text",
    )
    apply.add_argument("--rootfs", metavar="PATH", help="the rootfs to install, an absolute path on the appliance")

    command(
        agents,
        "list",
        "installed agents, their versions and states",
        handler=list_agents,
        examples=["nullctl agent list", "nullctl --json agent list"],
    )
    show = command(
        agents,
        "show",
        "one agent: installed manifest, policy, approval, status",
        handler=show_agent,
        examples=["nullctl agent show researcher", "nullctl --json agent show researcher | jq .agent.manifest"],
    )
    _name_arg(show)
    agent_status = command(
        agents,
        "status",
        "the running state of every agent (cage's overview) or of one",
        handler=status_agent,
        examples=["nullctl agent status", "nullctl agent status researcher"],
    )
    agent_status.add_argument("name", metavar="NAME", nargs="?", help="one agent (default: every agent)")
    for verb, what, extra in (
        ("start", "start an agent's VM", "Checks first: policy (see approve), credentials granted (see secret)."),
        ("stop", "stop an agent's VM", "A power-down request, then SIGTERM, then SIGKILL; undoes its network."),
        ("pause", "freeze an agent's VM (cgroup freezer)", ""),
        ("resume", "thaw a paused agent", ""),
        ("remove", "stop and uninstall an agent", "Also drops its vault grants and its approval."),
    ):
        verb_parser = command(
            agents,
            verb,
            what,
            handler=agent_action,
            description=f"{what[:1].upper()}{what[1:]}. {extra}".strip(),
            examples=[f"nullctl agent {verb} researcher"],
        )
        verb_parser.set_defaults(op=verb)
        _name_arg(verb_parser)
    logs = command(
        agents,
        "logs",
        "an agent's console (its last lines; -f keeps following)",
        handler=agent_logs,
        description="The agent's VM console: the guest's and the agent's output, and cage's own "
        "'nullbox-cage:' lines. With -f, new lines are printed as they come until Ctrl-C.",
        examples=["nullctl agent logs researcher", "nullctl agent logs researcher -n 20 -f"],
    )
    _name_arg(logs)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C to stop)")
    logs.add_argument(
        "-n", "--lines", type=int_range(0, 10000), default=100, metavar="LINES", help="how many (default 100)"
    )
    command(
        agents,
        "schema",
        "print the JSON Schema of AGENT.toml (for editors; no connection needed)",
        handler=schema,
        examples=["nullctl agent schema > agent-toml.schema.json"],
    )
    init = command(
        agents,
        "init",
        "write a commented starter ./NAME/AGENT.toml (no connection needed)",
        handler=init_agent,
        description="Create the directory NAME (if needed) and a commented AGENT.toml in it with the defaults "
        "spelled out; an existing AGENT.toml is never overwritten. Put the agent's root filesystem in "
        "NAME/rootfs (a directory or a SquashFS image).",
        examples=["nullctl agent init researcher && $EDITOR researcher/AGENT.toml"],
    )
    init.add_argument("name", metavar="NAME", help="the agent's name (1-64 of A-Z a-z 0-9 _ -)")
    approve = command(
        agents,
        "approve",
        "approve an agent's installed manifest (tools above the appliance's max_tool_risk)",
        handler=approve_agent,
        description="Record that an operator approved exactly the agent's installed manifest (by its SHA-256), "
        "which lets it start although it declares tools above the appliance's max_tool_risk. Any change to the "
        "manifest needs a new approval. nullctl shows what it approves and sends the digest it showed, so a "
        "manifest replaced in between is refused.",
        examples=["nullctl agent show researcher   # read it first", "nullctl agent approve researcher"],
    )
    _name_arg(approve)
    approve.add_argument(
        "--sha256", metavar="HEX", help="approve only if the installed manifest has this digest (from agent show)"
    )


# ------------------------------------------------------------------------------------------------------ apply


def _read_manifest(source: Path) -> tuple[bytes, str]:
    """The manifest's bytes and how messages name it (``researcher/AGENT.toml``)."""
    path = source / MANIFEST_NAME if source.is_dir() else source
    label = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise Failed(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return raw, label


def _validate(raw: bytes, label: str) -> Any:
    from cage.manifest import parse_bytes  # noqa: PLC0415 (pydantic: only when needed)
    from cage.terms import ManifestError  # noqa: PLC0415

    try:
        return parse_bytes(raw, label)
    except ManifestError as exc:
        lines = list(exc.lines)
        raise Failed(f"{label} is not a valid manifest; nothing was sent:", "invalid_request", lines) from None


def apply_agent(args: argparse.Namespace, s: Session) -> int:
    from pathlib import Path  # noqa: PLC0415 (lazy: startup time)

    params: dict[str, Any] = {}
    if args.rootfs is not None:
        if not args.rootfs.startswith("/"):
            raise UsageError("--rootfs takes an absolute path on the appliance")
        params["rootfs"] = args.rootfs
    source = Path(args.source)
    if args.path:
        if not args.source.startswith("/"):
            raise UsageError("--path sends a path on the appliance: give it as an absolute path")
        if source.exists():  # nullctl runs on the appliance: check the manifest here first
            _validate(*_read_manifest(source))
        params["path"] = args.source
    else:
        raw, label = _read_manifest(source)
        _validate(raw, label)
        params["manifest"] = raw.decode("utf-8")
    api = s.api()
    try:
        reply = api.call("agent.apply", **params)
    except Failed as exc:
        if NO_ROOTFS in exc.message:
            exc.message += (
                "; a new agent's rootfs must be on the appliance: pass --rootfs PATH there, or copy the agent "
                "directory to the appliance and run `nullctl agent apply --path DIR` there"
            )
        raise
    if s.out.json:
        s.out.obj(reply)
    else:
        agent = reply["agent"]
        if reply.get("created"):
            what = "installed"
        elif reply.get("manifest_changed"):
            what = "updated"
        else:
            what = "re-applied (manifest unchanged)"
        digest = (agent.get("manifest_sha256") or "")[:12]
        s.out.line(f"{agent['name']} {agent.get('version') or ''} {what} (manifest sha256 {digest}...)")
        if reply.get("restarted"):
            s.out.line(f"{agent['name']} was running: restarted with the new manifest")
    if reply.get("start_error"):
        raise Failed(f"{reply['agent']['name']} was updated, but starting it again failed: {reply['start_error']}")
    return 0


# ------------------------------------------------------------------------------------------------ inspection


def list_agents(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call("agent.list")
    if s.out.json:
        s.out.obj(reply)
        return 0
    if not reply["agents"]:
        s.out.line("no agents installed (nullctl agent init NAME; nullctl agent apply DIR)")
        return 0
    rows: list[list[Cell]] = []
    for a in reply["agents"]:
        rows.append(
            [
                a["name"],
                text(a.get("version")),
                s.out.state(a["state"]),
                ("ok", "green") if a.get("ok") else ("broken", "red"),
                ago_iso(a.get("installed_at")),
                (a.get("manifest_sha256") or "-")[:12],
            ]
        )
    s.out.table(["agent", "version", "state", "manifest", "installed", "sha256"], rows)
    return 0


def _approved_ago(approval: dict[str, object]) -> str:
    """When the approval was made: from its nanoseconds when cage sends them (``approved_at`` is cut to whole
    seconds, which would make an approval made a moment ago read "1 s ago")."""
    approved_ns = approval.get("approved_ns")
    if isinstance(approved_ns, int) and not isinstance(approved_ns, bool):
        return ago_ns(approved_ns)
    stamp = approval.get("approved_at")
    return ago_iso(stamp if isinstance(stamp, str) else None)


def _status_fields(out: Output, status: dict[str, Any]) -> list[tuple[str, Cell]]:
    pairs: list[tuple[str, Cell]] = [("state", out.state(status["state"]))]
    if status.get("error"):
        pairs.append(("error", (str(status["error"]), "red")))
    if status.get("restart_in_s") is not None:
        pairs.append(("restart in", duration(status["restart_in_s"])))
    pairs.append(("restarts", str(status.get("restarts", 0))))
    if status.get("pid") is not None:
        pairs.append(("backend", f"{status.get('backend')} (pid {status['pid']}, uid {status.get('uid')})"))
    if status.get("uptime_s") is not None:
        pairs.append(("uptime", f"{duration(status['uptime_s'])} (since {status.get('started_at')})"))
    health = status.get("health")
    if isinstance(health, dict):
        pairs.append(("health", _health(health)))
    network = status.get("network")
    if isinstance(network, dict):
        pairs.append(("network", f"{network.get('address')} via {network.get('gateway')} on {network.get('tap')}"))
    cgroup = status.get("cgroup")
    if isinstance(cgroup, dict):
        usage = f"cpu {int(cgroup.get('cpu_usec') or 0) / 1e6:.1f} s, memory {_mib(cgroup.get('memory_bytes'))}"
        pairs.append(("cgroup", f"{usage}, {cgroup.get('pids')} pids" + (", frozen" if cgroup.get("frozen") else "")))
    last = status.get("last_exit")
    if isinstance(last, dict):
        parts = [f"at {last.get('at')}"]
        if last.get("agent_status") is not None:
            parts.append(f"agent status {last['agent_status']}")
        if last.get("guest_failure"):
            parts.append(f"guest failed: {last['guest_failure']}")
        if last.get("unhealthy"):
            parts.append(f"unhealthy: {last['unhealthy']}")
        if last.get("stopped"):
            parts.append("stopped")
        pairs.append(("last exit", ", ".join(parts)))
    return pairs


HEALTH_STYLES: Final = {"healthy": "green", "starting": "yellow", "paused": "cyan", "unhealthy": "red"}


def _health(health: dict[str, Any]) -> Cell:
    """``healthy, last HTTP 200 at ...`` or ``starting, 2 failures in a row, last connection refused at ...``."""
    state = str(health.get("state"))
    parts = [state]
    if health.get("failures"):
        parts.append(f"{health['failures']} failures in a row")
    if health.get("last"):
        parts.append(f"last {health['last']} at {health.get('checked_at')}")
    return (", ".join(parts), HEALTH_STYLES.get(state))


def _mib(count: Any) -> str:
    return "-" if count is None else f"{int(count) / (1 << 20):.0f} MiB"


def show_agent(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call("agent.show", agent=args.name)
    if s.out.json:
        s.out.obj(reply)
        return 0
    out = s.out
    agent = reply["agent"]
    manifest = agent.get("manifest") or {}
    pairs: list[tuple[str, Cell]] = [
        ("agent", f"{agent['name']} {text(agent.get('version'))}"),
        ("installed", f"{ago_iso(agent.get('installed_at'))} ({agent.get('installed_at')})"),
        ("manifest", f"sha256 {agent.get('manifest_sha256')}"),
        ("rootfs", f"{text(agent.get('rootfs'))} ({text(agent.get('rootfs_kind'))})"),
    ]
    if not agent.get("ok"):
        pairs += [("problem", (str(p), "red")) for p in agent.get("problems") or ["the manifest cannot be read"]]
    if manifest:
        caps = manifest.get("capabilities") or {}
        command_line = get(manifest, "agent", "command") or [f"/agent/bin/{agent['name']}"]
        pairs += [
            ("command", " ".join(command_line)),
            ("restart", f"{get(manifest, 'agent', 'restart')}, autostart {text(get(manifest, 'agent', 'autostart'))}"),
            ("limits", f"{caps.get('max_cpu_percent')}% cpu, {caps.get('max_memory_mb')} MiB memory"),
            ("network", text(get(caps, "network", "allow")) if get(caps, "network", "allow") else "nothing allowed"),
            ("credentials", text(caps.get("credential_refs"))),
            (
                "filesystem",
                f"read {text(get(caps, 'filesystem', 'read'))}; write {text(get(caps, 'filesystem', 'write'))}",
            ),
            ("tools", ", ".join(f"{n} ({t.get('risk')})" for n, t in (manifest.get("tools") or {}).items()) or "-"),
        ]
    policy = agent.get("policy")
    if isinstance(policy, dict):
        above = policy.get("tools_above_limit") or []
        approval = policy.get("approval")
        if above:
            listed = ", ".join(f"{t['tool']} ({t['risk']})" for t in above)
            pairs.append(("above limit", (f"{listed}; max_tool_risk is {policy.get('max_tool_risk')}", "yellow")))
            approved = isinstance(approval, dict) and approval.get("manifest_sha256") == agent.get("manifest_sha256")
            pairs.append(
                (
                    "approval",
                    (f"approved {_approved_ago(approval)}", "green")  # type: ignore[arg-type]
                    if approved
                    else (f"needed: nullctl agent approve {agent['name']}", "yellow"),
                )
            )
    out.fields(pairs)
    out.line()
    out.fields(_status_fields(out, reply["status"]))
    return 0


def status_agent(args: argparse.Namespace, s: Session) -> int:
    from nullctl.commands.system import agents_table  # noqa: PLC0415

    params = {"agent": args.name} if args.name else {}
    reply = s.api().call("agent.status", **params)
    if s.out.json:
        s.out.obj(reply)
        return 0
    if args.name:
        s.out.fields([("agent", reply["agent"]["agent"]), *_status_fields(s.out, reply["agent"])])
        return 0
    if reply["agents"]:
        agents_table(s.out, reply["agents"])
    else:
        s.out.line("no agents installed")
    backend = reply.get("backend") or {}
    s.out.line(f"backend: {backend.get('kind')}" + (f" ({backend['reason']})" if backend.get("reason") else ""))
    cgroup = reply.get("cgroup") or {}
    if cgroup.get("error"):
        s.out.line(s.out.paint(f"cgroup: {cgroup['error']}", "red"))
    elif cgroup.get("missing_controllers"):
        s.out.line(f"cgroup: controllers missing (limits not enforced): {text(cgroup['missing_controllers'])}")
    return 0


# --------------------------------------------------------------------------------------------------- lifecycle


def agent_action(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call(f"agent.{args.op}", agent=args.name)
    if s.out.json:
        s.out.obj(reply)
        return 0
    if args.op == "remove":
        grants = reply.get("grants_dropped")
        count = len(grants) if isinstance(grants, list) else grants
        s.out.line(f"{args.name} removed" + (f" ({count} vault grants dropped)" if count else ""))
        return 0
    status = reply["agent"]
    pid = f" (pid {status['pid']})" if status.get("pid") else ""
    s.out.line(f"{args.name}: {s.out.paint(status['state'], s.out.state(status['state'])[1])}{pid}")
    return 0


def _console_line(out: Output, event: dict[str, Any]) -> None:
    if out.json:
        out.obj(event)
    else:
        out.line(str(event.get("line", "")))


def agent_logs(args: argparse.Namespace, s: Session) -> int:
    api = s.api()
    if args.follow:
        events = api.stream("agent.logs", agent=args.name, lines=args.lines, follow=True)
        return follow(events, lambda e: _console_line(s.out, e))
    reply = api.call("agent.logs", agent=args.name, lines=args.lines)
    if s.out.json:
        s.out.obj(reply)
        return 0
    for line in reply["lines"]:
        s.out.line(str(line))
    return 0


def approve_agent(args: argparse.Namespace, s: Session) -> int:
    api = s.api()
    expected = args.sha256
    if expected is None:
        shown = api.call("agent.show", agent=args.name)["agent"]
        expected = shown.get("manifest_sha256")
        if not expected:
            raise Failed(f"{args.name}'s installed manifest cannot be read; nothing to approve")
        above = get(shown, "policy", "tools_above_limit") or []
        if not s.out.json:
            listed = ", ".join(f"{t['tool']} ({t['risk']})" for t in above) or "none"
            s.out.line(f"approving {args.name}'s manifest sha256 {expected}; tools above the limit: {listed}")
    reply = api.call("agent.approve", agent=args.name, manifest_sha256=expected)
    if s.out.json:
        s.out.obj(reply)
    else:
        s.out.line(f"approved: {args.name} may start with this manifest")
    return 0


# -------------------------------------------------------------------------------------------------- local ones


def schema(args: argparse.Namespace, s: Session) -> int:
    import json  # noqa: PLC0415

    from cage.manifest import manifest_schema  # noqa: PLC0415

    document = manifest_schema()
    s.out.line(json.dumps(document, ensure_ascii=False) if s.out.json else json.dumps(document, indent=2))
    return 0


def init_agent(args: argparse.Namespace, s: Session) -> int:
    import re  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    name = args.name
    if re.fullmatch(NAME_PATTERN, name) is None:
        raise UsageError(f"{name!r} is not an agent name: use 1-64 of A-Z a-z 0-9 _ -")
    content = TEMPLATE.format(name=name)
    directory = Path(name)
    target = directory / MANIFEST_NAME
    try:
        directory.mkdir(exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise Failed(f"{target} already exists; nullctl never overwrites it (edit it, or remove it first)") from None
    except OSError as exc:
        raise Failed(f"cannot create {target}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
    if s.out.json:
        s.out.obj({"agent": name, "manifest": str(target)})
    else:
        s.out.line(f"wrote {target}")
        s.out.line(f"next: edit it, put the agent's root filesystem in {directory / 'rootfs'}, then")
        s.out.line(f"      nullctl agent apply {directory}/")
    return 0
