"""``python -m cage serve``: run the cage daemon (agents' microVMs, their TAPs, cgroups, vault and policy)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nullbox import lean_imports

# Not without_ssl(): pyroute2's rtnl marshalling imports ssl.  Skipping pyroute2's __init__ still saves NDB & co.
lean_imports.pyroute2_submodules_only()
# NullBox uses no pydantic plugins; without this, the first model scans every installed distribution's entry points
# (importlib.metadata), a sixth of cage's start-up on the build host and more under TCG.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import asyncio  # noqa: E402

from cage import defaults  # noqa: E402
from cage.config import ConfigError, load  # noqa: E402
from nullbox import log as nullbox_log  # noqa: E402
from nullbox.wire import SocketInUse  # noqa: E402

PATH_OPTIONS = (
    ("--socket", "socket", defaults.SOCKET, "API socket (0600)"),
    ("--agents-dir", "agents", defaults.AGENTS_DIR, "installed agents"),
    ("--vault-dir", "vault", defaults.VAULT_DIR, "the vault (secrets, grants, approvals)"),
    ("--state-dir", "state", defaults.STATE_DIR, "slots (addresses, uids) and packed root images"),
    ("--run-dir", "run", defaults.RUN_DIR, "per running agent: QMP socket, console FIFO"),
    ("--log-dir", "logs", defaults.LOG_DIR, "agents' console logs"),
    ("--egress-socket", "egress", defaults.EGRESS_SOCKET, "egress's API socket"),
    ("--ctxgraph-socket", "ctxgraph", defaults.CTXGRAPH_SOCKET, "ctxgraph's admin socket"),
    ("--cgroup-root", "cgroup_root", defaults.CGROUP_ROOT, "the cgroup v2 hierarchy"),
    ("--cgroup-parent", "cgroup_parent", defaults.CGROUP_PARENT, "agents' groups, relative to --cgroup-root"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cage", description="NullBox's agent runtime: one microVM per agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the cage daemon")
    serve.add_argument("--config", type=Path, default=defaults.CONFIG, help=f"cage.toml (default {defaults.CONFIG})")
    for flag, dest, default, what in PATH_OPTIONS:
        serve.add_argument(flag, dest=dest, type=Path, default=default, help=f"{what} (default {default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = nullbox_log.setup("cage")
    os.umask(0o022)  # the packed root images are read by the VMM; everything secret is created 0600/0700 explicitly
    try:
        config = load(args.config)
    except ConfigError as exc:
        for line in exc.lines:
            log.error("%s", line)
        return 2
    from cage.runtime import Cage, Paths  # noqa: PLC0415 (after logging is set up)
    from cage.server import CageServer  # noqa: PLC0415

    paths = Paths(**{dest: getattr(args, dest) for _, dest, _, _ in PATH_OPTIONS})
    test_hooks = os.environ.get(defaults.TEST_HOOKS_ENV) == "1"
    if test_hooks:
        log.warning("test hooks are enabled (%s=1)", defaults.TEST_HOOKS_ENV)
    try:
        asyncio.run(CageServer(Cage(config, paths, test_hooks=test_hooks)).run())
    except SocketInUse as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
