"""``python -m nulld``: PID 1 on the appliance, or a child subreaper for development and tests."""

from __future__ import annotations

import sys
import time

STARTED = time.monotonic()  # before the heavy imports: boot timings count nulld's start-up too

from nullbox import lean_imports  # noqa: E402

lean_imports.without_ssl()  # PID 1 stays small: no libssl/libcrypto

import argparse  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from nullbox import log as nullbox_log  # noqa: E402
from nulld import config, frontdoor  # noqa: E402
from nulld.init import DEFAULT_RUNTIME_DIR, DEFAULT_SOCKET, VSOCK_PORT, Options, run_forever  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    imported = time.monotonic()
    parser = argparse.ArgumentParser(prog="nulld", description="NullBox's init and service supervisor.")
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH, help=f"default {config.DEFAULT_PATH}")
    parser.add_argument(
        "--socket", type=Path, default=DEFAULT_SOCKET, help=f"control socket (default {DEFAULT_SOCKET})"
    )
    parser.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR, help="notify sockets and state")
    parser.add_argument(
        "--no-mounts",
        action="store_true",
        help="as PID 1 in a container or test namespace: leave the mount table and kernel settings alone",
    )
    parser.add_argument("--fallback", type=Path, help="service set to boot when --config is broken (PID 1 only)")
    parser.add_argument(
        "--vsock-port",
        type=int,
        metavar="PORT",
        help=f"also serve the control API on this vsock port, to the host only (default {VSOCK_PORT} as PID 1, none "
        "otherwise; 0: none)",
    )
    parser.add_argument("--check", action="store_true", help="validate --config, print the start order, and exit")
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="NAME=SOCKET",
        help="forward NAME.<verb> requests to this socket (default: ctx=/run/nullbox/ctxgraph.sock)",
    )
    args = parser.parse_args(argv)
    if args.check:
        try:
            checked = config.load(args.config)
        except config.ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(" -> ".join(checked.order) or "(no services)")
        return 0
    routes = dict(frontdoor.ROUTES)
    for item in args.route:
        name, sep, path = item.partition("=")
        if not sep or not name or not path.startswith("/"):
            parser.error(f"--route {item!r}: expected NAME=/absolute/socket/path")
        routes[name] = Path(path)
    pid1 = os.getpid() == 1
    nullbox_log.setup("nulld", kmsg=pid1)
    os.umask(0o022)
    options = Options(
        config=args.config,
        socket=args.socket,
        runtime_dir=args.runtime_dir,
        pid1=pid1,
        mounts=not args.no_mounts,
        fallback=args.fallback,
        routes=routes,
        vsock_port=(VSOCK_PORT if pid1 else None) if args.vsock_port is None else (args.vsock_port or None),
        started=STARTED,
        imported=imported,
    )
    return run_forever(options)


if __name__ == "__main__":
    sys.exit(main())
