"""Who is asking: identity is bound to the socket a request arrived on, never taken from the request.

The admin socket speaks for the operator (and may write on behalf of any agent); an agent's socket (or its vsock
CID) speaks for that agent only, within the read and write prefixes it was registered with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nullbox.wire import ErrorCode, WireError

if TYPE_CHECKING:
    from ctxgraph.budget import CallBudget

OPERATOR: Final = "operator"
"""The writer recorded for admin-socket puts that name no agent."""


@dataclass(frozen=True)
class Identity:
    agent: str | None  # None: the admin socket
    read: tuple[str, ...] | None = None  # None: unrestricted
    write: tuple[str, ...] | None = None

    @property
    def is_admin(self) -> bool:
        return self.agent is None

    def may_read(self, key_or_prefix: str) -> bool:
        return self.read is None or any(key_or_prefix.startswith(p) for p in self.read)

    def may_write(self, key: str) -> bool:
        return self.write is None or any(key.startswith(p) for p in self.write)

    def writer(self, requested: str | None) -> str:
        """The agent a put is recorded under; naming anyone else from an agent socket is forbidden."""
        if self.agent is None:
            return requested if requested is not None else OPERATOR
        if requested is not None and requested != self.agent:
            raise WireError(
                ErrorCode.FORBIDDEN,
                f"this socket belongs to agent '{self.agent}'; it cannot write as '{requested}'",
            )
        return self.agent

    def check_write(self, key: str) -> None:
        if not self.may_write(key):
            raise WireError(
                ErrorCode.FORBIDDEN,
                f"agent '{self.agent}' may not write key {key!r} (outside its write prefixes)",
            )

    def check_read(self, key_or_prefix: str, what: str) -> None:
        if not self.may_read(key_or_prefix):
            raise WireError(
                ErrorCode.FORBIDDEN,
                f"agent '{self.agent}' may not read {what} {key_or_prefix!r} (outside its read prefixes)",
            )

    def check_admin(self, op: str) -> None:
        if not self.is_admin:
            raise WireError(ErrorCode.FORBIDDEN, f"'{op}' is only available on the admin socket")


ADMIN: Final = Identity(agent=None)


@dataclass
class Binding:
    """A connection's link to its identity; re-registering an agent updates live connections through it."""

    identity: Identity
    budget: CallBudget | None = None  # the agent's calls per hour; None on the admin socket (never limited)
