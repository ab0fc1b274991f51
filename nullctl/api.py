"""The connection to the appliance: nulld's control API and its front door, with errors a person can act on.

``nullbox.wire`` (asyncio, threading, ...) is imported on first use only, so commands that need no connection
(``--help``, ``agent schema``, ``completion``) never pay for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from nullctl.errors import CannotConnect, Failed, UsageError

if TYPE_CHECKING:
    from nullbox.wire import Client, WireError

NULLD_SOCKET: Final = "/run/nulld.sock"
DEFAULT_ADDRESS: Final = f"unix:{NULLD_SOCKET}"
CTXGRAPH_ADDRESS: Final = "unix:/run/nullbox/ctxgraph.sock"
CONNECT_ENV: Final = "NULLCTL_CONNECT"

#: Which service answers a front-door prefix (nulld's "agent is not running" means cage is not).
OWNERS: Final = {"ctx": "ctxgraph", "egress": "egress", "agent": "cage", "secret": "cage"}

#: Ops that may take long on the appliance (stopping a VM, copying a rootfs): waited for at least this long.
SLOW_OPS: Final = frozenset(
    {
        "stop",
        "restart",
        "agent.apply",
        "agent.start",
        "agent.stop",
        "agent.remove",
        "agent.pause",
        "agent.resume",
        "apply",
        "remove",
    }
)
SLOW_TIMEOUT: Final = 600.0

#: What to run to see the names an op's ``not_found`` is about.
LISTS: Final = {
    "agent": "nullctl agent list",
    "secret": "nullctl secret list",
    "egress": "nullctl egress status",
    "start": "nullctl service list",
    "stop": "nullctl service list",
    "restart": "nullctl service list",
    "logs": "nullctl service list",
}

_NOT_RUNNING: Final = re.compile(r"^(\w+) is not running(?: \((.*)\))?$")


def resolve_address(given: str | None, *, direct_ctx: bool = False) -> str:
    """``--connect``, else $NULLCTL_CONNECT, else nulld's socket (ctxgraph's own for ``ctx --direct``)."""
    if given:
        return given
    if direct_ctx:
        return CTXGRAPH_ADDRESS
    return os.environ.get(CONNECT_ENV) or DEFAULT_ADDRESS


class Api:
    """Blocking calls and streams to one endpoint; every failure becomes a :class:`nullctl.errors.CliError`."""

    def __init__(self, address: str, *, timeout: float | None = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._clients: dict[float | None, Client] = {}

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def _timeout_for(self, op: str) -> float | None:
        if self.timeout is None or op not in SLOW_OPS:
            return self.timeout
        return max(self.timeout, SLOW_TIMEOUT)

    def _client(self, timeout: float | None) -> Client:
        client = self._clients.get(timeout)
        if client is None:
            client = self._clients[timeout] = self.connect(timeout)
        return client

    def connect(self, timeout: float | None) -> Client:
        from nullbox.wire import Address, Client  # noqa: PLC0415 (lazy: see the module docstring)

        try:
            address = Address.parse(self.address)
        except ValueError as exc:
            raise UsageError(f"--connect: {exc}") from None
        try:
            return Client(address, timeout=timeout)
        except TimeoutError:
            raise CannotConnect(f"cannot connect to {self.address}: no answer; {self._where()}") from None
        except OSError as exc:
            raise CannotConnect(f"cannot connect to {self.address}: {_reason(exc)}; {self._where(exc)}") from None

    def _where(self, exc: OSError | None = None) -> str:
        if isinstance(exc, PermissionError):
            return "nulld's socket is root's only: run nullctl as root (or with sudo)"
        if self.address.startswith("serial:"):
            return "is the VM running? (qemu/run prints the control port's path)"
        if self.address.startswith("vsock:"):
            return "is the VM running, with vhost-vsock, and is the CID right?"
        if self.address == CTXGRAPH_ADDRESS:
            return "is ctxgraph running? (nullctl service list)"
        return "is nulld running there? (--connect or $NULLCTL_CONNECT chooses another endpoint)"

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        """One request and its reply (without ``id`` and ``ok``)."""
        from nullbox.wire import WireError  # noqa: PLC0415

        timeout = self._timeout_for(op)
        client = self._client(timeout)
        try:
            return client.call(op, **params)
        except WireError as exc:
            raise translate(op, exc) from None
        except TimeoutError:
            self.close()
            busy = (
                "is another nullctl holding the VM's control port? It serves one connection at a time (a running "
                "`-f` or `ctx watch` keeps it); "
                if self.address.startswith("serial:")
                else ""
            )
            raise CannotConnect(
                f"no reply from {self.address} to {op!r} within {timeout:.0f} s; "
                f"{busy}is the appliance busy or hung? (--timeout SECONDS waits longer)"
            ) from None
        except OSError as exc:
            self.close()
            raise CannotConnect(f"lost the connection to {self.address}: {_reason(exc)}") from None

    def stream(self, op: str, **params: Any) -> Iterator[dict[str, Any]]:
        """A streaming verb's events until the caller stops (or the server ends the stream with an error)."""
        from nullbox.wire import WireError  # noqa: PLC0415

        client = self.connect(None)
        events = client.stream(op, **params)
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration:
                    return
                except WireError as exc:
                    raise translate(op, exc) from None
                except OSError as exc:
                    raise CannotConnect(f"lost the connection to {self.address}: {_reason(exc)}") from None
                yield event
        finally:
            client.close()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def translate(op: str, exc: WireError) -> Failed:
    """The appliance's error as one line that says what to do about it."""
    code = str(exc.code)
    message = exc.message
    group = op.partition(".")[0] if "." in op else op
    match = _NOT_RUNNING.match(message) if code == "unavailable" else None
    if match is not None and (match.group(1) in OWNERS or match.group(1) in OWNERS.values()):
        owner = OWNERS.get(match.group(1), match.group(1))  # nulld names the owner; older ones named the prefix
        why = f" ({match.group(2)})" if match.group(2) else ""
        return Failed(
            f"{owner} is not running{why}; see `nullctl service list` and `nullctl service logs {owner}`", code
        )
    if code == "unavailable" and message.startswith("the connection was closed"):
        return Failed(f"{message} (is the appliance shutting down?)", code)
    hint = ""
    if code == "invalid_request" and message.startswith(f"unknown op {op!r}") and "." in op:
        hint = (
            f"; the endpoint does not relay {group}.* (is --connect a service's own socket? "
            "`ctx --direct` speaks to ctxgraph's)"
        )
    elif code == "not_found" and group in LISTS:
        hint = f"; see `{LISTS[group]}`"
    elif code == "internal":
        hint = "; the appliance's log has the details (nullctl service logs NAME)"
    return Failed(f"{message} ({code}){hint}", code)
