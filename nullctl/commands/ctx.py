"""``ctx ...``: ctxgraph, the agents' shared memory, through nulld's front door (``ctx.<verb>``).

``ctx --direct`` speaks to a ctxgraph socket itself (default its admin socket, /run/nullbox/ctxgraph.sock; or an
agent's socket with --connect, to act as that agent): for debugging, or when nulld is not the way in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from nullctl.cli import Parser, Session, command, describe, group, int_range
from nullctl.commands import follow
from nullctl.errors import UsageError
from nullctl.output import Output, ago_ns, shorten


def build(name: str, ctx: Parser, summary: str) -> None:
    describe(
        ctx,
        summary,
        description="Entries are {hash, agent, key, value, created_ns}; they never change. Requests go through "
        "nulld's front door (ctx.put, ...) unless --direct.",
        examples=[
            'nullctl ctx put notes/today \'{"text": "hello"}\'',
            "echo '[1, 2, 3]' | nullctl ctx put numbers -",
            "nullctl ctx query notes/ --limit 20",
            "nullctl --connect unix:/run/nullbox/ctxgraph.sock ctx --direct stats",
        ],
    )
    ctx.add_argument(
        "--direct",
        action="store_true",
        help="talk to a ctxgraph socket itself, not through nulld (--connect then names it; default "
        "unix:/run/nullbox/ctxgraph.sock)",
    )
    verbs = group(ctx, "command")

    put = command(
        verbs,
        "put",
        "store a value under a key (VALUE is JSON, or - for stdin)",
        handler=run,
        description="Store VALUE under KEY and print the entry's hash. Storing the same (agent, key, value) "
        "again stores nothing and prints the same hash with '(already stored)'.",
        examples=[
            'nullctl ctx put notes/today \'{"text": "hello"}\'',
            "nullctl ctx put greeting --string 'hello world'",
            "curl -s https://example.org/data.json | nullctl ctx put feeds/example -",
        ],
    )
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE", help="a JSON value, or - to read it from stdin")
    put.add_argument("--string", action="store_true", help="take VALUE literally, as a string")
    put.add_argument("--agent", help="record the entry as written by this agent (default: operator)")

    get = command(verbs, "get", "show the entry with this hash", handler=run, examples=["nullctl ctx get 3f2a9c..."])
    get.add_argument("hash", metavar="HASH")

    limit = {"type": int_range(1, 1000), "default": 20, "help": "entries per page (1-1000, default 20)"}
    query = command(
        verbs,
        "query",
        "entries whose key starts with PREFIX, newest first",
        handler=run,
        examples=["nullctl ctx query notes/", "nullctl ctx query notes/ --limit 50 --after 1234"],
    )
    query.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="(default: every key)")
    query.add_argument("--limit", **limit)  # type: ignore[arg-type]
    query.add_argument("--after", metavar="CURSOR", help="continue after this page (the '--after' it printed)")

    history = command(
        verbs, "history", "every entry of one key, newest first", handler=run, examples=["nullctl ctx history notes/a"]
    )
    history.add_argument("key", metavar="KEY")
    history.add_argument("--limit", **limit)  # type: ignore[arg-type]
    history.add_argument("--after", metavar="CURSOR", help="continue after this page")

    by_agent = command(
        verbs,
        "by-agent",
        "entries written by one agent, newest first",
        handler=run,
        examples=["nullctl ctx by-agent researcher"],
    )
    by_agent.add_argument("agent", metavar="AGENT")
    by_agent.add_argument("--limit", **limit)  # type: ignore[arg-type]
    by_agent.add_argument("--after", metavar="CURSOR", help="continue after this page")

    watch = command(
        verbs,
        "watch",
        "print new entries under PREFIX as they are written (Ctrl-C to stop)",
        handler=run,
        examples=["nullctl ctx watch notes/", "nullctl --json ctx watch | jq .entry.key"],
    )
    watch.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="(default: every key)")

    command(verbs, "stats", "counts and sizes", handler=run, examples=["nullctl ctx stats"])


def _entries_table(out: Output, entries: Iterable[dict[str, Any]], *, header: bool = True) -> None:
    import json  # noqa: PLC0415

    rows = []
    for e in entries:
        value = json.dumps(e["value"], ensure_ascii=False, separators=(",", ":"))
        rows.append([e["hash"][:12], e["agent"], e["key"], ago_ns(e["created_ns"]), shorten(value)])
    lines = out.table_lines(["hash", "agent", "key", "age", "value"], rows)
    for line in lines if header else lines[1:]:
        out.line(line)


def _value(args: argparse.Namespace) -> Any:
    from nullbox.wire import WireError, decode_json  # noqa: PLC0415

    source = sys.stdin.read() if args.value == "-" else args.value
    if args.string:
        return source
    try:
        return decode_json(source)
    except WireError:
        raise UsageError(f"VALUE is not JSON: {source[:40]!r}; quote it as JSON or pass --string") from None


def run(args: argparse.Namespace, s: Session) -> int:
    api = s.api(direct_ctx=args.direct)
    prefix = "" if args.direct else "ctx."
    out = s.out
    verb = args.command
    if verb == "put":
        value = _value(args)
        params = {"key": args.key, "value": value} | ({"agent": args.agent} if args.agent else {})
        result = api.call(prefix + "put", **params)
        if out.json:
            out.obj(result)
        else:
            out.line(f"{result['hash']}{'' if result['created'] else ' (already stored)'}")
    elif verb == "get":
        entry = api.call(prefix + "get", hash=args.hash)["entry"]
        if out.json:
            out.obj(entry)
        else:
            import json  # noqa: PLC0415

            out.line(json.dumps(entry, indent=2, ensure_ascii=False))
    elif verb in ("query", "history", "by-agent"):
        page_params: dict[str, Any] = {"limit": args.limit}
        if args.after:
            page_params["after"] = args.after
        if verb == "query":
            page = api.call(prefix + "query", prefix=args.prefix, **page_params)
        elif verb == "history":
            page = api.call(prefix + "history", key=args.key, **page_params)
        else:
            page = api.call(prefix + "by_agent", agent=args.agent, **page_params)
        if out.json:
            out.obj(page)
        else:
            _entries_table(out, page["entries"])
            if page["next"]:
                out.line(f"(more: --after {page['next']})")
    elif verb == "watch":

        def show(event: dict[str, Any]) -> None:
            if out.json:
                out.obj(event)
            elif event.get("type") == "entry":
                _entries_table(out, [event["entry"]], header=False)

        return follow(api.stream(prefix + "watch", prefix=args.prefix), show)
    elif verb == "stats":
        stats = api.call(prefix + "stats")
        if out.json:
            out.obj(stats)
        else:
            out.table(["stat", "value"], [[k, str(v)] for k, v in stats.items()])
    return 0
