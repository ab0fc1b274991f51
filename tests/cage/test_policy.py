"""Tool-risk policy: levels, the [policy] table of cage.toml, and approvals bound to a manifest's exact bytes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cage.manifest import parse_text
from cage.policy import (
    DEFAULT_MAX_TOOL_RISK,
    RISK_ORDER,
    ApprovalRequired,
    Policy,
    PolicyConfig,
    PolicyConfigError,
    exceeds,
    load_config,
    parse_config,
    parse_risk,
    rank,
)
from cage.terms import Risk, digest
from nullbox.wire import ErrorCode, WireError

SHA_A = "a" * 64
SHA_B = "b" * 64
TOOLS = {"search": Risk.LOW, "fetch": "medium", "write_file": Risk.HIGH, "shell": Risk.CRITICAL}


@pytest.fixture
def approvals(tmp_path: Path) -> Path:
    return tmp_path / "vault" / "approvals.json"


@pytest.fixture
def policy(approvals: Path) -> Policy:
    return Policy(approvals=approvals)


# --- levels -----------------------------------------------------------------------------------------------------


def test_levels_are_ordered() -> None:
    assert RISK_ORDER == (Risk.LOW, Risk.MEDIUM, Risk.HIGH, Risk.CRITICAL)
    assert [rank(r) for r in RISK_ORDER] == [0, 1, 2, 3]
    assert sorted([Risk.CRITICAL, Risk.LOW, Risk.HIGH, Risk.MEDIUM], key=rank) == list(RISK_ORDER)
    assert rank("high") == rank(Risk.HIGH)
    assert exceeds(Risk.CRITICAL, Risk.HIGH)
    assert not exceeds(Risk.HIGH, Risk.HIGH)
    assert not exceeds("low", "medium")
    assert exceeds("medium", "low")


def test_parse_risk_refuses_unknown_levels() -> None:
    assert parse_risk("critical") is Risk.CRITICAL
    for bad in ("HIGH", "severe", "", 3, None):
        with pytest.raises(ValueError, match="low, medium, high, critical"):
            parse_risk(bad)


# --- cage.toml --------------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cage.toml"
    path.write_text(text)
    return path


def test_missing_file_or_table_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml").max_tool_risk is DEFAULT_MAX_TOOL_RISK is Risk.HIGH
    assert load_config(write(tmp_path, "[network]\nmtu = 1500\n")) == PolicyConfig(source=str(tmp_path / "cage.toml"))


def test_policy_table_is_read_and_other_tables_ignored(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[policy]\nmax_tool_risk = "medium"\n\n[vm]\nwhatever = true\n[vm.defaults]\nmemory = 512\n',
    )
    config = load_config(path)
    assert config.max_tool_risk is Risk.MEDIUM
    assert config.source == str(path)
    assert Policy.load(path, tmp_path / "approvals.json").max_tool_risk is Risk.MEDIUM


def test_unknown_policy_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\nmax_tool_risk = "low"\nmax_tool_rsik = "low"\nallow_all = true\n')
    with pytest.raises(PolicyConfigError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: policy.allow_all: unknown key; allowed: max_tool_risk",
        f"{path}: policy.max_tool_rsik: unknown key; allowed: max_tool_risk",
    ]
    assert info.value.code == "invalid_request"


def test_bad_level_and_bad_table(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match=r"policy\.max_tool_risk: must be one of low, medium, high, critical"):
        load_config(write(tmp_path, '[policy]\nmax_tool_risk = "extreme"\n'))
    with pytest.raises(PolicyConfigError, match="got 2"):
        load_config(write(tmp_path, "[policy]\nmax_tool_risk = 2\n"))
    with pytest.raises(PolicyConfigError, match="policy: must be a table"):
        parse_config({"policy": "high"}, "cage.toml")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy\nmax_tool_risk = \n")
    with pytest.raises(PolicyConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")
    path.write_bytes(b'[policy]\nmax_tool_risk = "\xff"\n')
    with pytest.raises(PolicyConfigError, match="UTF-8"):
        load_config(path)


# --- approvals --------------------------------------------------------------------------------------------------


def test_tools_within_the_limit_need_no_approval(policy: Policy) -> None:
    policy.check("bot", {"search": Risk.LOW, "write_file": Risk.HIGH}, SHA_A)
    policy.check("bot", {}, SHA_A)
    assert policy.above_limit({"write_file": "high"}) == ()


def test_tool_above_the_limit_is_refused_with_how_to_approve(policy: Policy) -> None:
    with pytest.raises(ApprovalRequired) as info:
        policy.check("researcher", TOOLS, SHA_A)
    error = info.value
    assert isinstance(error, WireError)
    assert error.code == ErrorCode.FORBIDDEN
    assert "shell (critical)" in error.message
    assert "write_file" not in error.message and "search (" not in error.message
    assert "max_tool_risk (high)" in error.message
    assert "nullctl agent approve researcher" in error.message
    assert error.tools == (("shell", Risk.CRITICAL),)
    assert error.approved_sha256 is None


def test_lower_limit_names_every_tool_above_it(approvals: Path) -> None:
    policy = Policy("low", approvals)
    assert policy.above_limit(TOOLS) == (
        ("fetch", Risk.MEDIUM),
        ("shell", Risk.CRITICAL),
        ("write_file", Risk.HIGH),
    )
    with pytest.raises(ApprovalRequired, match=r"fetch \(medium\), shell \(critical\), write_file \(high\)"):
        policy.check("bot", TOOLS, SHA_A)
    Policy("critical", approvals).check("bot", TOOLS, SHA_A)


def test_approving_the_exact_manifest_allows_it_and_a_change_needs_approval_again(
    policy: Policy, approvals: Path
) -> None:
    approval = policy.approve("researcher", SHA_A)
    assert approval.manifest_sha256 == SHA_A and approval.agent == "researcher"
    policy.check("researcher", TOOLS, SHA_A)
    Policy(approvals=approvals).check("researcher", TOOLS, SHA_A)  # persisted
    with pytest.raises(ApprovalRequired) as info:
        policy.check("researcher", TOOLS, SHA_B)
    assert "changed since it was approved" in info.value.message
    assert info.value.approved_sha256 == SHA_A
    assert "nullctl agent approve researcher" in info.value.message
    with pytest.raises(ApprovalRequired):
        policy.check("someone-else", TOOLS, SHA_A)  # approvals are per agent
    policy.approve("researcher", SHA_B)
    policy.check("researcher", TOOLS, SHA_B)
    with pytest.raises(ApprovalRequired):
        policy.check("researcher", TOOLS, SHA_A)


def test_revoke_approval(policy: Policy, approvals: Path) -> None:
    assert policy.revoke_approval("researcher") is False
    policy.approve("researcher", SHA_A)
    policy.approve("writer", SHA_B)
    assert policy.revoke_approval("researcher") is True
    assert policy.revoke_approval("researcher") is False
    with pytest.raises(ApprovalRequired):
        policy.check("researcher", TOOLS, SHA_A)
    assert [a.agent for a in policy.approvals()] == ["writer"]
    assert policy.approval("researcher") is None


def test_works_with_a_parsed_manifest(policy: Policy) -> None:
    raw = b'[agent]\nname = "researcher"\n\n[tools]\nweb_search = { risk = "low" }\nexec = { risk = "critical" }\n'
    manifest = parse_text(raw.decode())
    with pytest.raises(ApprovalRequired, match=r"exec \(critical\)"):
        policy.check(manifest.name, manifest.tools, digest(raw))
    policy.approve(manifest.name, digest(raw))
    policy.check(manifest.name, manifest.tools, digest(raw))
    changed = raw + b'shell = { risk = "critical" }\n'
    with pytest.raises(ApprovalRequired):
        policy.check(manifest.name, parse_text(changed.decode()).tools, digest(changed))


def test_approvals_file_is_written_atomically(policy: Policy, approvals: Path) -> None:
    policy.approve("researcher", SHA_A)
    policy.approve("writer", SHA_B)
    data = json.loads(approvals.read_text())
    assert set(data) == {"researcher", "writer"}
    assert data["researcher"]["manifest_sha256"] == SHA_A
    assert isinstance(data["researcher"]["approved_ns"], int)
    assert stat.S_IMODE(approvals.stat().st_mode) == 0o600
    assert stat.S_IMODE(approvals.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in approvals.parent.iterdir()) == [".approvals.json.lock", "approvals.json"]
    stale = approvals.parent / ".tmp-approvals.json-crashed"
    stale.write_text("{")
    policy.revoke_approval("writer")
    assert not stale.exists()
    assert policy.approvals()[0].to_json()["approved_at"].endswith("+00:00")


def test_bad_requests_are_invalid(policy: Policy) -> None:
    for agent, sha in (("../x", SHA_A), ("bot", "A" * 64), ("bot", "abc"), ("bot", "g" * 64)):
        with pytest.raises(WireError) as info:
            policy.approve(agent, sha)
        assert info.value.code == ErrorCode.INVALID_REQUEST
    with pytest.raises(WireError, match="tool 'x': risk must be one of"):
        policy.check("bot", {"x": "extreme"}, SHA_A)


def test_corrupt_approvals_file_is_reported(policy: Policy, approvals: Path) -> None:
    approvals.parent.mkdir(parents=True)
    approvals.write_text('{"bot": {"manifest_sha256": "nope", "approved_ns": 1}}')
    with pytest.raises(WireError) as info:
        policy.check("bot", TOOLS, SHA_A)
    assert info.value.code == ErrorCode.UNAVAILABLE
    assert str(approvals) in info.value.message
    # a manifest that needs no approval still starts
    policy.check("bot", {"search": Risk.LOW}, SHA_A)
