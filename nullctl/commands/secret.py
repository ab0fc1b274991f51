"""``secret ...``: the credential vault (cage's ``secret_<verb>`` via the front door as ``secret.<verb>``).

A secret's value never comes from the command line (argv is visible to every process): ``secret set`` reads it
from stdin, or prompts for it without echo on a terminal.
"""

from __future__ import annotations

import argparse
import sys

from nullctl.cli import Parser, Session, command, describe, group
from nullctl.errors import UsageError
from nullctl.output import Cell, ago_iso, text

MAX_VALUE_BYTES = 64 * 1024  # cage.vault's limit, checked again there


def build(name: str, secret: Parser, summary: str) -> None:
    describe(
        secret,
        summary,
        description="An agent receives a secret as an environment variable of the same name only when its "
        "AGENT.toml lists it in capabilities.credential_refs and it was granted. Values are never shown.",
    )
    verbs = group(secret, "command")
    set_ = command(
        verbs,
        "set",
        "store a secret (the value from stdin, or a hidden prompt)",
        handler=secret_set,
        description="Store (or replace) the secret NAME. The value is read from stdin when stdin is not a "
        "terminal (one trailing newline is dropped), otherwise prompted for without echo. It is never taken "
        "from the command line.",
        examples=[
            "nullctl secret set OPENAI_API_KEY                # prompts",
            'printf %s "$TOKEN" | nullctl secret set GITHUB_TOKEN',
            "nullctl secret set SERVICE_KEY < key.txt",
        ],
    )
    set_.add_argument("name", metavar="NAME", help="an environment variable name, e.g. OPENAI_API_KEY")
    # Caught so that a value pasted on the command line is refused without being repeated in the error.
    set_.add_argument("argv_value", nargs="*", help=argparse.SUPPRESS)
    command(
        verbs, "list", "every secret's name, times and grantees", handler=secret_list, examples=["nullctl secret list"]
    )
    for verb, what in (("grant", "let an agent receive a secret"), ("revoke", "stop giving a secret to an agent")):
        parser = command(
            verbs, verb, what, handler=secret_grant, examples=[f"nullctl secret {verb} OPENAI_API_KEY researcher"]
        )
        parser.set_defaults(op=verb)
        parser.add_argument("name", metavar="NAME", help="the secret")
        parser.add_argument("agent", metavar="AGENT", help="the agent")
    remove = command(
        verbs,
        "remove",
        "delete a secret and its grants",
        handler=secret_remove,
        examples=["nullctl secret remove OPENAI_API_KEY"],
    )
    remove.add_argument("name", metavar="NAME", help="the secret")


def _read_value(name: str) -> str:
    if sys.stdin is None:
        raise UsageError("no stdin to read the secret's value from")
    if sys.stdin.isatty():
        import getpass  # noqa: PLC0415

        try:
            value = getpass.getpass(f"value of {name} (not echoed): ")
        except EOFError:
            value = ""
    else:
        value = sys.stdin.read(MAX_VALUE_BYTES + 2)
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    if not value:
        raise UsageError(f"the value of {name} is empty; pipe it in (printf %s VALUE | ...) or type it at the prompt")
    return value


def secret_set(args: argparse.Namespace, s: Session) -> int:
    if args.argv_value:
        raise UsageError(
            "secret set takes no value on the command line (every process can read argv; it was not sent): "
            f"pipe it in (printf %s VALUE | nullctl secret set {args.name}) or answer the prompt"
        )
    value = _read_value(args.name)
    reply = s.api().call("secret.set", name=args.name, value=value)
    del value
    if s.out.json:
        s.out.obj(reply)
    else:
        agents = reply["secret"].get("agents") or []
        s.out.line(
            f"{args.name} stored; "
            + (f"granted to {text(agents)}" if agents else f"grant it: nullctl secret grant {args.name} AGENT")
        )
    return 0


def secret_list(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call("secret.list")
    if s.out.json:
        s.out.obj(reply)
        return 0
    if not reply["secrets"]:
        s.out.line("no secrets (nullctl secret set NAME)")
        return 0
    rows: list[list[Cell]] = []
    for info in reply["secrets"]:
        rows.append(
            [
                info["name"],
                text(info.get("agents")),
                ago_iso(info.get("updated_at")),
                ("ok", "green") if info.get("ok") else (str(info.get("problem") or "broken"), "red"),
            ]
        )
    s.out.table(["secret", "granted to", "updated", "state"], rows)
    return 0


def secret_grant(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call(f"secret.{args.op}", name=args.name, agent=args.agent)
    if s.out.json:
        s.out.obj(reply)
        return 0
    if args.op == "grant":
        s.out.line(f"{args.name} granted to {args.agent}" + ("" if reply.get("granted") else " (already was)"))
    else:
        s.out.line(f"{args.name} revoked from {args.agent}" + ("" if reply.get("revoked") else " (was not granted)"))
    return 0


def secret_remove(args: argparse.Namespace, s: Session) -> int:
    reply = s.api().call("secret.remove", name=args.name)
    if s.out.json:
        s.out.obj(reply)
    else:
        s.out.line(f"{args.name} removed")
    return 0
