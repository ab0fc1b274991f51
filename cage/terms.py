"""The words of AGENT.toml the cage daemon needs without parsing one: names, limits, enums, the error type.

Why a module of its own: cage.manifest builds its pydantic models when imported (~1-2 s of the appliance's boot
under TCG), and cage's start-up, its store, vault and policy need none of that until an agent is applied or
started.  cage.manifest re-exports everything here, so either import works.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Final

from egress.names import AGENT_RE

MANIFEST_NAME: Final = "AGENT.toml"
MAX_MANIFEST_BYTES: Final = 64 * 1024

NAME_RE: Final = AGENT_RE
ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

RESERVED_ENV_PREFIXES: Final = ("NULLBOX_", "KRUN_")
"""Environment names cage (``NULLBOX_*``) and libkrun's guest init (``KRUN_*``) set; a manifest may not."""


class Risk(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Restart(StrEnum):
    """When cage starts an agent's VM again after it ended (the same words as nulld.toml's ``restart``)."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class ManifestError(ValueError):
    """An AGENT.toml that is refused; ``lines`` holds one ``<source>: <field>: <message>`` line per problem."""

    code: Final = "invalid_request"

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        self.lines = [f"{source}: {p}" for p in problems]
        super().__init__("\n".join(self.lines))


def digest(raw: bytes) -> str:
    """SHA-256 (lowercase hex) of a manifest's exact bytes — what an operator's approval refers to."""
    return hashlib.sha256(raw).hexdigest()
