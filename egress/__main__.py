"""``python -m egress serve``: run the egress controller (nftables table ``inet nullbox`` and the DNS proxies)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nullbox import lean_imports

# Not without_ssl(): pyroute2's rtnl marshalling imports ssl.  Skipping pyroute2's __init__ still saves its NDB & co.
lean_imports.pyroute2_submodules_only()

import asyncio  # noqa: E402

from egress import defaults  # noqa: E402
from egress.controller import Controller, ControllerConfig  # noqa: E402
from egress.names import InvalidName  # noqa: E402
from egress.nft import NftError  # noqa: E402
from egress.server import EgressServer, ServerConfig  # noqa: E402
from nullbox import log as nullbox_log  # noqa: E402
from nullbox.wire import SocketInUse, WireError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egress", description="NullBox's default-deny network controller.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the egress controller")
    serve.add_argument("--socket", type=Path, default=defaults.SOCKET, help=f"API socket (default {defaults.SOCKET})")
    serve.add_argument(
        "--uplink", default=defaults.UPLINK, help=f"interface agents reach out of (default {defaults.UPLINK})"
    )
    serve.add_argument(
        "--resolv-conf",
        type=Path,
        default=defaults.RESOLV_CONF,
        help=f"upstream resolvers for the DNS proxies (default {defaults.RESOLV_CONF})",
    )
    serve.add_argument(
        "--state-dir", type=Path, default=defaults.STATE_DIR, help=f"agent registry (default {defaults.STATE_DIR})"
    )
    serve.add_argument("--min-ttl", type=int, default=defaults.MIN_TTL, help="shortest allow-set timeout, seconds")
    serve.add_argument("--max-ttl", type=int, default=defaults.MAX_TTL, help="longest allow-set timeout, seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = nullbox_log.setup("egress")
    os.umask(0o077)
    try:
        config = ControllerConfig(
            uplink=args.uplink,
            resolv_conf=args.resolv_conf,
            state_dir=args.state_dir,
            min_ttl=args.min_ttl,
            max_ttl=args.max_ttl,
            test_hooks=os.environ.get(defaults.TEST_HOOKS_ENV) == "1",
        )
    except (InvalidName, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if config.test_hooks:
        log.warning("test hooks are enabled (%s=1)", defaults.TEST_HOOKS_ENV)
    try:
        asyncio.run(EgressServer(ServerConfig(socket=args.socket), Controller(config)).run())
    except SocketInUse as exc:
        log.error("%s", exc)
        return 1
    except (WireError, NftError) as exc:
        log.error("cannot put the ruleset in force: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
