"""``egress status [AGENT]``: the network policy as egress enforces it (``egress.status`` via the front door)."""

from __future__ import annotations

import argparse
from typing import Any

from nullctl.cli import Parser, Session, command, describe, group
from nullctl.output import Cell, ago, size, text


def build(name: str, egress: Parser, summary: str) -> None:
    describe(egress, summary)
    verbs = group(egress, "command")
    status = command(
        verbs,
        "status",
        "every agent's allow list and counters, or one agent's detail",
        handler=egress_status,
        description="Without AGENT: the nftables table, the uplink, the DNS TTL bounds and per agent its interface, "
        "allow list and packet counters. With AGENT: also the addresses its DNS answers admitted (and until when), "
        "the destinations of dropped packets in the last 10 minutes and the names its DNS proxy refused.",
        examples=["nullctl egress status", "nullctl egress status researcher", "nullctl --json egress status"],
    )
    status.add_argument("agent", metavar="AGENT", nargs="?", help="one agent")


def _counter(agent: dict[str, Any], which: str) -> str:
    counter = (agent.get("counters") or {}).get(which) or {}
    return f"{counter.get('packets', 0)} pkts / {size(counter.get('bytes'))}"


def egress_status(args: argparse.Namespace, s: Session) -> int:
    params = {"agent": args.agent} if args.agent else {}
    reply = s.api().call("egress.status", **params)
    out = s.out
    if out.json:
        out.obj(reply)
        return 0
    if args.agent:
        agent = reply["agent"]
        out.fields(
            [
                ("agent", agent["agent"]),
                ("interface", f"{agent.get('interface')} (gateway {agent.get('gateway')})"),
                ("allow", text(agent.get("allow")) if agent.get("allow") else "nothing (every destination dropped)"),
                ("accepted", _counter(agent, "accepted")),
                ("dropped", _counter(agent, "dropped")),
            ]
        )
        out.line()
        out.line("admitted addresses:")
        rows: list[list[Cell]] = [
            [a["address"], str(a["port"]), f"{a.get('expires_s')} s", text(a.get("names"))]
            for a in agent.get("addresses") or []
        ]
        if rows:
            out.table(["address", "port", "expires in", "names"], rows, indent="  ")
        else:
            out.line("  none")
        out.line("dropped destinations (last 10 min):")
        denied: list[list[Cell]] = [
            [d["address"], str(d["port"]), f"{d.get('expires_s')} s"] for d in agent.get("denied") or []
        ]
        if denied:
            out.table(["address", "port", "forgotten in"], denied, indent="  ")
        else:
            out.line("  none")
        import time  # noqa: PLC0415

        names = agent.get("denied_names") or []
        out.line("refused DNS names:" + ("" if names else " none"))
        for n in names:
            out.line(f"  {n['name']}  ({ago(time.time() - float(n['at']))})")
        return 0
    ttl = reply.get("ttl") or {}
    out.fields(
        [
            ("table", text(reply.get("table"))),
            ("uplink", text(reply.get("uplink"))),
            ("dns ttl", f"{ttl.get('min')}-{ttl.get('max')} s"),
        ]
    )
    out.line()
    if not reply.get("agents"):
        out.line("no agents registered (cage registers each agent while it runs)")
        return 0
    out.table(
        ["agent", "interface", "gateway", "accepted", "dropped", "allow"],
        [
            [
                a["agent"],
                text(a.get("interface")),
                text(a.get("gateway")),
                _counter(a, "accepted"),
                (
                    _counter(a, "dropped"),
                    "yellow" if ((a.get("counters") or {}).get("dropped") or {}).get("packets") else None,
                ),
                text(a.get("allow")),
            ]
            for a in reply["agents"]
        ],
    )
    return 0
