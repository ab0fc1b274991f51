"""``nullctl``: the operator's CLI.  For now its ``ctx`` commands, talking straight to ctxgraph.

Exit codes: 0 ok, 1 the operation failed, 2 usage error, 3 cannot connect.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from ctxgraph.client import DEFAULT_ADDRESS, CtxClient
from nullbox.wire import Address, JSONObject, WireError, decode_json

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONNECT: Final = 3

EXAMPLES: Final = """examples:
  nullctl ctx put notes/today '{"text": "hello"}'
  echo '[1, 2, 3]' | nullctl ctx put numbers -
  nullctl ctx put greeting --string 'hello world'
  nullctl ctx query notes/ --limit 20
  nullctl ctx watch notes/
  nullctl --json ctx get 3f2a...
"""


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nullctl",
        description="Operate a NullBox appliance.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--connect",
        default=DEFAULT_ADDRESS,
        metavar="ADDR",
        help=f"unix:PATH, serial:PATH (a VM's control port) or vsock:CID:PORT (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON objects, one per line")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    ctx = groups.add_parser("ctx", help="read and write ctxgraph, the agents' shared memory")
    sub = ctx.add_subparsers(dest="command", required=True, metavar="CTX_COMMAND")

    put = sub.add_parser("put", help="store a value under a key (VALUE is JSON, or - for stdin)")
    put.add_argument("key")
    put.add_argument("value", help="a JSON value, or - to read JSON from stdin")
    put.add_argument("--string", action="store_true", help="take VALUE literally as a string")
    put.add_argument("--agent", help="record the entry as written by this agent")

    get = sub.add_parser("get", help="show the entry with this hash")
    get.add_argument("hash")

    query = sub.add_parser("query", help="entries whose key starts with PREFIX, newest first")
    query.add_argument("prefix", nargs="?", default="")
    query.add_argument("--limit", type=int, default=20)
    query.add_argument("--after", help="the 'next' cursor of a previous page")

    history = sub.add_parser("history", help="every entry of one key, newest first")
    history.add_argument("key")
    history.add_argument("--limit", type=int, default=20)

    by_agent = sub.add_parser("by-agent", help="entries written by one agent, newest first")
    by_agent.add_argument("agent")
    by_agent.add_argument("--limit", type=int, default=20)

    watch = sub.add_parser("watch", help="print new entries under PREFIX as they are written (Ctrl-C to stop)")
    watch.add_argument("prefix", nargs="?", default="")

    sub.add_parser("stats", help="counts and sizes")
    return parser


def _age(created_ns: int) -> str:
    seconds = max(0.0, time.time() - created_ns / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _entries_table(entries: Iterable[JSONObject]) -> str:
    rows = []
    for e in entries:
        value = json.dumps(e["value"], ensure_ascii=False, separators=(",", ":"))
        rows.append(
            [e["hash"][:12], e["agent"], e["key"], _age(e["created_ns"]), value[:60] + ("…" if len(value) > 60 else "")]
        )
    return _table(rows, ["hash", "agent", "key", "age", "value"])


def _value(args: argparse.Namespace) -> Any:
    text = sys.stdin.read() if args.value == "-" else args.value
    if args.string:
        return text
    try:
        return decode_json(text)
    except WireError:
        raise UsageError(f"VALUE is not JSON: {text[:40]!r}; quote it as JSON or pass --string") from None


def _run(args: argparse.Namespace, address: Address, out: Callable[[str], None]) -> None:
    client = CtxClient(address, timeout=None if args.command == "watch" else 30.0)
    with client:
        if args.command == "put":
            result = client.put(args.key, _value(args), agent=args.agent)
            out(
                json.dumps(result)
                if args.json
                else f"{result['hash']}{'' if result['created'] else ' (already stored)'}"
            )
        elif args.command == "get":
            entry = client.get(args.hash)
            out(json.dumps(entry, ensure_ascii=False) if args.json else json.dumps(entry, indent=2, ensure_ascii=False))
        elif args.command in ("query", "history", "by-agent"):
            if args.command == "query":
                page = client.query(args.prefix, limit=args.limit, after=args.after)
            elif args.command == "history":
                page = client.history(args.key, limit=args.limit)
            else:
                page = client.by_agent(args.agent, limit=args.limit)
            if args.json:
                out(json.dumps(page, ensure_ascii=False))
            else:
                out(_entries_table(page["entries"]))
                if page["next"]:
                    out(f"(more: --after {page['next']})")
        elif args.command == "watch":
            for event in client.watch(args.prefix):
                if args.json:
                    out(json.dumps(event, ensure_ascii=False))
                elif event.get("type") == "entry":
                    out(_entries_table([event["entry"]]).splitlines()[1])
        elif args.command == "stats":
            stats = client.stats()
            out(json.dumps(stats) if args.json else _table([[k, str(v)] for k, v in stats.items()], ["stat", "value"]))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        address = Address.parse(args.connect)
    except ValueError as exc:
        print(f"nullctl: --connect: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _run(args, address, lambda line: print(line, flush=True))
    except UsageError as exc:
        print(f"nullctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WireError as exc:
        print(f"nullctl: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(
            f"nullctl: cannot connect to {args.connect}: {exc.strerror or exc}; is the service running?",
            file=sys.stderr,
        )
        return EXIT_CONNECT
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
