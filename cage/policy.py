"""Tool-risk policy: an agent whose manifest declares a tool above the appliance's limit needs an operator's approval.

The limit is ``max_tool_risk`` in the ``[policy]`` table of ``/etc/nullbox/cage.toml`` (default ``high``, so only
``critical`` tools need approval out of the box). An approval names an agent *and the SHA-256 of the exact manifest
bytes* an operator looked at (:func:`cage.manifest.digest`): changing the manifest in any way — a new tool, a new
network rule — makes the approval stale, and the agent does not start until it is approved again.

Approvals live in ``/var/lib/nullbox/vault/approvals.json`` (``{"agent": {"manifest_sha256": ..., "approved_ns":
...}}``), written atomically under an flock, next to the vault because both are operator decisions that must
survive reboots and updates of the image.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from cage.terms import NAME_RE, Risk
from nullbox import durable
from nullbox.wire import ErrorCode, WireError

if TYPE_CHECKING:
    from cage.manifest import ToolDef

log = logging.getLogger("cage.policy")

DEFAULT_CONFIG: Final = Path("/etc/nullbox/cage.toml")
DEFAULT_APPROVALS: Final = Path("/var/lib/nullbox/vault/approvals.json")
DEFAULT_MAX_TOOL_RISK: Final = Risk.HIGH
POLICY_TABLE: Final = "policy"
POLICY_KEYS: Final = frozenset({"max_tool_risk"})
MAX_CONFIG_BYTES: Final = 1024 * 1024
MAX_APPROVALS_BYTES: Final = 4 * 1024 * 1024
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
TEMP_PREFIX: Final = ".tmp-"
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600

APPROVE_HINT: Final = "nullctl agent approve {agent}"

RISK_ORDER: Final = (Risk.LOW, Risk.MEDIUM, Risk.HIGH, Risk.CRITICAL)
"""Risk levels from least to most dangerous; :func:`rank` is a level's index here."""

ToolRisk: TypeAlias = "Risk | str | ToolDef"  # a string: ToolDef (pydantic) is imported for type checking only
"""What :meth:`Policy.check` accepts per tool: a level, its name, or a manifest ``[tools]`` entry."""


# --- risk levels ---------------------------------------------------------------------------------------------------


def parse_risk(value: object) -> Risk:
    """A risk level from text; ValueError (listing the levels) for anything else."""
    if isinstance(value, Risk):
        return value
    if isinstance(value, str):
        with suppress(ValueError):
            return Risk(value)
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValueError(f"must be one of {', '.join(RISK_ORDER)}, got {shown}")


def rank(risk: Risk | str) -> int:
    """A level's place in ``low < medium < high < critical`` (0-3), for comparing levels."""
    return RISK_ORDER.index(parse_risk(risk))


def exceeds(risk: Risk | str, limit: Risk | str) -> bool:
    """Whether ``risk`` is strictly above ``limit`` (a tool *at* the limit is allowed)."""
    return rank(risk) > rank(limit)


def _tool_risk(tool: str, value: ToolRisk) -> Risk:
    if not isinstance(value, str):  # a manifest's ToolDef (its risk is already a Risk)
        return value.risk
    try:
        return parse_risk(value)
    except ValueError as exc:
        raise WireError(ErrorCode.INVALID_REQUEST, f"tool {tool!r}: risk {exc}") from None


# --- /etc/nullbox/cage.toml [policy] -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyConfig:
    """The ``[policy]`` table; other tables of cage.toml belong to other parts of cage and are not read here."""

    max_tool_risk: Risk = DEFAULT_MAX_TOOL_RISK
    source: str = "<built-in>"


class PolicyConfigError(ValueError):
    """A cage.toml whose ``[policy]`` is refused; one ``<file>: <key>: <problem>`` line per problem."""

    code: Final = "invalid_request"

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        self.lines = [f"{source}: {e}" for e in errors]
        super().__init__("\n".join(self.lines))


def load_config(path: Path = DEFAULT_CONFIG) -> PolicyConfig:
    """Read ``[policy]`` from ``path``; a missing file or table means the defaults."""
    source = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return PolicyConfig()
    except OSError as exc:
        raise PolicyConfigError(source, [f"cannot be read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise PolicyConfigError(source, [f"is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyConfigError(source, [f"is not valid UTF-8 (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyConfigError(source, [f"invalid TOML: {exc}"]) from None
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: str = str(DEFAULT_CONFIG)) -> PolicyConfig:
    """The ``[policy]`` table of an already decoded cage.toml; every problem is reported at once."""
    table = data.get(POLICY_TABLE)
    if table is None:
        return PolicyConfig(source=source)
    if not isinstance(table, dict):
        raise PolicyConfigError(source, [f"{POLICY_TABLE}: must be a table"])
    errors = [
        f"{POLICY_TABLE}.{key}: unknown key; allowed: {', '.join(sorted(POLICY_KEYS))}"
        for key in sorted(set(table) - POLICY_KEYS)
    ]
    limit = DEFAULT_MAX_TOOL_RISK
    if "max_tool_risk" in table:
        try:
            limit = parse_risk(table["max_tool_risk"])
        except ValueError as exc:
            errors.append(f"{POLICY_TABLE}.max_tool_risk: {exc}")
    if errors:
        raise PolicyConfigError(source, errors)
    return PolicyConfig(max_tool_risk=limit, source=source)


# --- approvals -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approval:
    """An operator's approval of one agent's manifest, identified by the SHA-256 of its bytes."""

    agent: str
    manifest_sha256: str
    approved_ns: int

    @property
    def approved_at(self) -> str:
        return datetime.fromtimestamp(self.approved_ns / 1e9, UTC).isoformat(timespec="seconds")

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "manifest_sha256": self.manifest_sha256,
            "approved_at": self.approved_at,
            "approved_ns": self.approved_ns,
        }


class ApprovalRequired(WireError):
    """An agent may not start: it declares tools above the limit and this manifest is not approved."""

    def __init__(
        self, agent: str, tools: tuple[tuple[str, Risk], ...], limit: Risk, manifest_sha256: str, approved: str | None
    ) -> None:
        self.agent = agent
        self.tools = tools
        self.limit = limit
        self.manifest_sha256 = manifest_sha256
        self.approved_sha256 = approved
        listed = ", ".join(f"{name} ({risk})" for name, risk in tools)
        message = f"agent {agent} declares tools above this appliance's max_tool_risk ({limit}): {listed}; "
        if approved is None:
            message += f"an operator must approve this exact manifest (sha256 {manifest_sha256[:12]}...)"
        else:
            message += (
                f"its manifest changed since it was approved (approved sha256 {approved[:12]}..., "
                f"now {manifest_sha256[:12]}...), so it must be approved again"
            )
        message += f": {APPROVE_HINT.format(agent=agent)}"
        super().__init__(ErrorCode.FORBIDDEN, message)


class Policy:
    """The appliance's tool-risk limit and the approvals that lift it for exact manifests."""

    def __init__(self, max_tool_risk: Risk | str = DEFAULT_MAX_TOOL_RISK, approvals: Path = DEFAULT_APPROVALS) -> None:
        self.max_tool_risk = parse_risk(max_tool_risk)
        self.approvals_path = approvals

    @classmethod
    def load(cls, config: Path = DEFAULT_CONFIG, approvals: Path = DEFAULT_APPROVALS) -> Policy:
        """The policy from cage.toml (raises :class:`PolicyConfigError`); approvals are read when needed."""
        return cls(load_config(config).max_tool_risk, approvals)

    def __repr__(self) -> str:
        return f"Policy(max_tool_risk={self.max_tool_risk!s}, approvals={str(self.approvals_path)!r})"

    def above_limit(self, tools: Mapping[str, ToolRisk]) -> tuple[tuple[str, Risk], ...]:
        """The tools (name, level) above ``max_tool_risk``, sorted by name; empty when no approval is needed."""
        levels = {name: _tool_risk(name, value) for name, value in tools.items()}
        return tuple((name, levels[name]) for name in sorted(levels) if exceeds(levels[name], self.max_tool_risk))

    def check(self, agent: str, tools: Mapping[str, ToolRisk], manifest_sha256: str) -> None:
        """Return when the agent may start; raise :class:`ApprovalRequired` (forbidden) naming the risky tools."""
        _check_agent(agent)
        _check_sha256(manifest_sha256)
        risky = self.above_limit(tools)
        if not risky:
            return
        approval = self.approval(agent)
        if approval is not None and approval.manifest_sha256 == manifest_sha256:
            return
        raise ApprovalRequired(
            agent, risky, self.max_tool_risk, manifest_sha256, approval.manifest_sha256 if approval else None
        )

    def approve(self, agent: str, manifest_sha256: str) -> Approval:
        """Record that an operator approved exactly this manifest of ``agent`` (replacing an earlier approval)."""
        _check_agent(agent)
        _check_sha256(manifest_sha256)
        with self._locked():
            approvals = self._read()
            approval = Approval(agent, manifest_sha256, time.time_ns())
            approvals[agent] = approval
            self._write(approvals)
        log.info("policy: approved manifest %s of agent %s", manifest_sha256, agent)
        return approval

    def revoke_approval(self, agent: str) -> bool:
        """Forget ``agent``'s approval; False when it had none."""
        _check_agent(agent)
        if not self.approvals_path.parent.is_dir():
            return False
        with self._locked():
            approvals = self._read()
            if approvals.pop(agent, None) is None:
                return False
            self._write(approvals)
        log.info("policy: revoked the approval of agent %s", agent)
        return True

    def approval(self, agent: str) -> Approval | None:
        _check_agent(agent)
        return self._read().get(agent)

    def approvals(self) -> list[Approval]:
        """Every approval, sorted by agent."""
        return [approval for _, approval in sorted(self._read().items())]

    # --- internals ----------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        directory = self.approvals_path.parent
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            with suppress(FileExistsError):
                directory.mkdir(mode=DIR_MODE)
            fd = os.open(
                directory / f".{self.approvals_path.name}.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                FILE_MODE,
            )
        except OSError as exc:
            raise WireError(ErrorCode.UNAVAILABLE, f"cannot lock {self.approvals_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Approval]:
        path = self.approvals_path
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_APPROVALS_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise WireError(ErrorCode.UNAVAILABLE, f"cannot read {path}: {exc.strerror}") from None
        approvals: dict[str, Approval] = {}
        try:
            if len(raw) > MAX_APPROVALS_BYTES:
                raise ValueError("too large")  # noqa: TRY301 - one message for every malformed file
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")  # noqa: TRY301
            for agent, entry in data.items():
                sha = entry.get("manifest_sha256") if isinstance(entry, dict) else None
                when = entry.get("approved_ns") if isinstance(entry, dict) else None
                if (
                    not NAME_RE.fullmatch(agent)
                    or not isinstance(sha, str)
                    or not SHA256_RE.fullmatch(sha)
                    or not isinstance(when, int)
                    or isinstance(when, bool)
                ):
                    raise ValueError("bad entry")  # noqa: TRY301
                approvals[agent] = Approval(agent, sha, when)
        except (ValueError, TypeError):
            raise WireError(
                ErrorCode.UNAVAILABLE,
                f"{path} is not a valid approvals file; no agent that needs an approval can start until it is fixed",
            ) from None
        return approvals

    def _write(self, approvals: Mapping[str, Approval]) -> None:
        data = {
            agent: {"manifest_sha256": a.manifest_sha256, "approved_ns": a.approved_ns}
            for agent, a in sorted(approvals.items())
        }
        durable.remove_temp_files(self.approvals_path.parent, f"{TEMP_PREFIX}{self.approvals_path.name}-")
        durable.write_atomically(
            self.approvals_path,
            (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
            mode=FILE_MODE,
            temp_prefix=f"{TEMP_PREFIX}{self.approvals_path.name}-",
        )


def _check_agent(agent: object) -> None:
    if not isinstance(agent, str) or NAME_RE.fullmatch(agent) is None:
        raise WireError(ErrorCode.INVALID_REQUEST, "agent names are 1-64 characters of A-Z a-z 0-9 _ -")


def _check_sha256(value: object) -> None:
    if not isinstance(value, str) or SHA256_RE.fullmatch(value) is None:
        raise WireError(ErrorCode.INVALID_REQUEST, "a manifest digest is 64 lowercase hex digits (SHA-256)")
