"""nullctl's command line: the argparse tree (the reference, with examples), dispatch, exit statuses.

Exit statuses: 0 ok, 1 the operation failed, 2 usage error, 3 cannot connect (130 interrupted).  Every error is
one line on stderr starting with ``nullctl:`` (a refused manifest adds one line per problem).
"""

from __future__ import annotations

import argparse
import os
import sys

from nullctl.errors import EXIT_FAILED, EXIT_INTERRUPTED, CliError, UsageError
from nullctl.output import Output

TYPE_CHECKING = False  # not typing's: importing typing costs startup time (mypy treats the name the same)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Final, NoReturn

    from nullctl.api import Api

    Handler = Callable[[argparse.Namespace, "Session"], int | None]

PROG = "nullctl"

DESCRIPTION = """\
Operate a NullBox appliance: its services, agents, shared memory (ctx), egress and secrets.

nullctl talks to nulld's control API, which relays ctx.*, egress.*, agent.* and secret.* to the service that
owns them, so one connection reaches everything: the control socket on the appliance (the default), the VM's
virtio-serial control port from the host (serial:PATH), or vsock (vsock:CID:PORT)."""

EPILOG = """\
examples:
  nullctl status                                   services and agents at a glance
  nullctl --connect serial:build/run/ctl.sock status
  nullctl service logs ctxgraph -f
  nullctl agent init researcher && $EDITOR researcher/AGENT.toml
  nullctl agent apply researcher/                  send researcher/AGENT.toml
  echo "$OPENAI_API_KEY" | nullctl secret set OPENAI_API_KEY
  nullctl secret grant OPENAI_API_KEY researcher
  nullctl agent start researcher && nullctl agent logs researcher -f
  nullctl --json agent list | jq .

environment:
  NULLCTL_CONNECT   the default for --connect (e.g. serial:/path/to/build/run/ctl.sock)
  NO_COLOR          never colour the output (it is only coloured on a terminal anyway)

exit status: 0 ok, 1 the operation failed, 2 usage error, 3 cannot connect.
Each command has its own --help, e.g. nullctl agent apply --help."""


class Parser(argparse.ArgumentParser):
    """A usage error is one line naming the command's --help, and exit status 2 (raised, printed by main)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")


class Formatter(argparse.HelpFormatter):
    """Descriptions are wrapped paragraph by paragraph; indented blocks (examples) are kept exactly as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(110, _columns()))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap  # noqa: PLC0415

        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line[:1].isspace() for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(
                    textwrap.fill(" ".join(lines), width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n\n".join(paragraphs)


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


Subparsers = argparse._SubParsersAction


class Session:
    """What a command handler gets besides its arguments: the output, and the connection (opened on first use)."""

    def __init__(self, args: argparse.Namespace, out: Output, parser: argparse.ArgumentParser) -> None:
        self.args = args
        self.out = out
        self.parser = parser
        self._api: Api | None = None

    def api(self, *, direct_ctx: bool = False) -> Api:
        if self._api is None:
            from nullctl.api import Api, resolve_address  # noqa: PLC0415 (lazy)

            timeout = None if self.args.timeout == 0 else float(self.args.timeout)
            self._api = Api(resolve_address(self.args.connect, direct_ctx=direct_ctx), timeout=timeout)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()


def describe(
    parser: Parser,
    summary: str,
    *,
    handler: Handler | None = None,
    description: str | None = None,
    examples: Sequence[str] = (),
) -> Parser:
    """Fill in a command's --help: ``description`` (default: the summary), then ``examples``."""
    parser.description = description if description is not None else summary[:1].upper() + summary[1:] + "."
    parser.epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def command(
    sub: Subparsers[Parser],
    name: str,
    summary: str,
    *,
    handler: Handler | None = None,
    description: str | None = None,
    examples: Sequence[str] = (),
) -> Parser:
    """One subcommand: ``summary`` is its line in the parent's list, ``examples`` end its --help."""
    parser: Parser = _json_flag(sub.add_parser(name, help=summary, formatter_class=Formatter))
    return describe(parser, summary, handler=handler, description=description, examples=examples)


def group(parser: Parser, dest: str) -> Subparsers[Parser]:
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND", title="commands")


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer within [low, high]."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {low}-{high}, got {number}")
        return number

    return parse


def _json_flag(parser: Parser) -> Parser:
    """``--json`` is accepted after the command too (``nullctl agent list --json``)."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON objects")
    return parser


#: The top-level commands: the module that builds each one's arguments, and its line in ``nullctl --help``.
#: Only the command being run is built (and its module imported), so that nullctl starts fast.
COMMANDS: Final = {
    "status": ("nullctl.commands.system", "services and agents at a glance"),
    "service": ("nullctl.commands.system", "list, start, stop, restart services and read their logs"),
    "timings": ("nullctl.commands.system", "the boot's timeline: imports, mounts, each service spawned and ready"),
    "poweroff": ("nullctl.commands.system", "stop every service and power the appliance off"),
    "reboot": ("nullctl.commands.system", "stop every service and reboot the appliance"),
    "agent": ("nullctl.commands.agent", "install, inspect, start and stop agents (each in its own microVM)"),
    "ctx": ("nullctl.commands.ctx", "read and write ctxgraph, the agents' shared memory"),
    "egress": ("nullctl.commands.egress", "the agents' network policy (default deny): allowed, admitted, dropped"),
    "secret": ("nullctl.commands.secret", "credentials in the vault, and which agents get them"),
    "completion": ("nullctl.completion", "print a shell completion script (bash or zsh)"),
}
#: Global options that take a value (skipped when looking for the command in argv).
VALUED_GLOBALS: Final = frozenset({"--connect", "--timeout"})


def chosen_command(argv: Sequence[str]) -> str | None:
    """The top-level command in ``argv``: its first word that is neither a global option nor an option's value."""
    words = iter(argv)
    for word in words:
        if word in VALUED_GLOBALS:
            next(words, None)
        elif word == "--":
            return next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(only: str | None = None, *, complete: bool = False) -> Parser:
    """The argparse tree; with ``only``, just that command's part of it is built (the rest list their summary)."""
    import importlib  # noqa: PLC0415

    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter, allow_abbrev=False)
    parser.add_argument(
        "--connect",
        metavar="ADDR",
        help="unix:PATH, serial:PATH (a VM's control port, from the host) or vsock:CID:PORT "
        "(default: $NULLCTL_CONNECT, else unix:/run/nulld.sock)",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON objects (one per line for streams)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for a reply (default 30; slow operations wait at least 600; 0 = forever)",
    )
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND", title="commands")
    for name, (module, summary) in COMMANDS.items():
        child = sub.add_parser(name, help=summary, formatter_class=Formatter)
        if complete or name == only:
            importlib.import_module(module).build(name, _json_flag(child), summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    session: Session | None = None
    try:
        arguments = sys.argv[1:] if argv is None else list(argv)
        only = chosen_command(arguments)
        parser = build_parser(only, complete=only == "completion")
        args = parser.parse_args(arguments)
        if args.timeout < 0:
            raise UsageError("--timeout must be 0 (wait forever) or more")
        session = Session(args, Output(json_mode=args.json), parser)
        handler: Handler = args.handler
        return handler(args, session) or 0
    except CliError as exc:
        for line in exc.lines():
            print(f"{PROG}: {line}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (nullctl ... | head): say nothing more, not even at interpreter exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    finally:
        if session is not None:
            session.close()
