"""``python -m ctxgraph serve|demo``: run the daemon, or show it working end to end."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nullbox import lean_imports

lean_imports.without_ssl()  # unix sockets and vsock only; keeps the service's start-up (on the boot path) short

import asyncio  # noqa: E402

from ctxgraph import defaults  # noqa: E402
from ctxgraph.server import CtxGraphServer, ServerConfig  # noqa: E402
from ctxgraph.store import StoreError  # noqa: E402
from nullbox import log as nullbox_log  # noqa: E402
from nullbox.wire import SocketInUse  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxgraph", description="NullBox's content-addressed shared memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the ctxgraph daemon")
    serve.add_argument("--db", type=Path, default=defaults.DB, help=f"SQLite database (default {defaults.DB})")
    serve.add_argument("--socket", type=Path, default=defaults.SOCKET, help=f"admin socket (default {defaults.SOCKET})")
    serve.add_argument(
        "--agents-dir",
        type=Path,
        default=defaults.AGENTS_DIR,
        help=f"agent sockets (default {defaults.AGENTS_DIR})",
    )
    serve.add_argument("--vsock-port", type=int, default=None, help="also listen on this AF_VSOCK port")
    sub.add_parser("demo", help="start a throw-away server and walk through what it does")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ctxgraph.demo import run_demo  # noqa: PLC0415 (serving does not need the demo and its client)

        return run_demo()
    log = nullbox_log.setup("ctxgraph")
    os.umask(0o077)  # the database, its WAL and every socket are private to the service
    config = ServerConfig(db=args.db, socket=args.socket, agents_dir=args.agents_dir, vsock_port=args.vsock_port)
    try:
        asyncio.run(CtxGraphServer(config).run())
    except (StoreError, SocketInUse) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
