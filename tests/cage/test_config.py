"""cage.toml: defaults, every key, and one error line per problem naming the file and the key."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from cage import config, defaults
from cage.terms import Risk


def test_a_missing_file_means_every_default(tmp_path: Path) -> None:
    loaded = config.load(tmp_path / "cage.toml")
    assert loaded == config.CageConfig()
    assert loaded.backend == "auto"
    assert loaded.pool == IPv4Network("10.201.0.0/16")
    assert loaded.kernel == defaults.GUEST_KERNEL and loaded.initramfs == defaults.GUEST_INITRAMFS
    assert loaded.backoff.initial == defaults.BACKOFF_INITIAL_S and loaded.backoff.cap == defaults.BACKOFF_MAX_S
    assert loaded.policy.max_tool_risk == Risk.HIGH


def test_every_key(tmp_path: Path) -> None:
    path = tmp_path / "cage.toml"
    path.write_text(
        """
        [backend]
        kind = "qemu"
        kernel = "/opt/guest/vmlinux"
        initramfs = "/opt/guest/initrd.img"
        exec_helper = "/opt/guest/nb-exec"
        libkrun = "/opt/lib/libkrun.so.1"
        stop_timeout_s = 1.5
        vmm_overhead_mb = 64

        [network]
        pool = "10.99.0.0/24"

        [restart]
        backoff_initial_s = 0.5
        backoff_max_s = 4
        reset_after_s = 60

        [policy]
        max_tool_risk = "medium"
        """
    )
    loaded = config.load(path)
    assert loaded.backend == "qemu"
    assert loaded.kernel == Path("/opt/guest/vmlinux") and loaded.initramfs == Path("/opt/guest/initrd.img")
    assert loaded.libkrun == "/opt/lib/libkrun.so.1" and loaded.exec_helper == Path("/opt/guest/nb-exec")
    assert loaded.stop_timeout_s == 1.5 and loaded.vmm_overhead_mb == 64
    assert loaded.pool == IPv4Network("10.99.0.0/24")
    assert (loaded.backoff.initial, loaded.backoff.cap, loaded.backoff.reset_after) == (0.5, 4.0, 60.0)
    assert loaded.policy.max_tool_risk == Risk.MEDIUM
    assert loaded.to_json()["pool"] == "10.99.0.0/24"


def test_every_problem_is_reported_at_once_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "cage.toml"
    path.write_text(
        """
        colour = "blue"
        [backend]
        kind = "firecracker"
        kernel = "relative/vmlinux"
        stop_timeout_s = true
        vmm_overhead_mb = 1
        typo = 1
        [network]
        pool = "10.201.0.0/31"
        [restart]
        backoff_initial_s = 10
        backoff_max_s = 2
        [policy]
        max_tool_risk = "extreme"
        shout = true
        """
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    lines = caught.value.lines
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    text = "\n".join(lines)
    for expected in (
        "colour: unknown table or key",
        "backend.kind: must be one of auto, qemu, libkrun, got 'firecracker'",
        "backend.kernel: must be an absolute path",
        "backend.stop_timeout_s: must be a number of seconds",
        "backend.vmm_overhead_mb: must be an integer from 16 to 65536",
        "backend.typo: unknown key",
        "network.pool: must hold at least one /30",
        "restart.backoff_max_s: must be at least backoff_initial_s",
        "policy.max_tool_risk: must be one of low, medium, high, critical",
        "policy.shout: unknown key",
    ):
        assert expected in text, text
    assert len(lines) == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[network]\npool = '8.8.8.0/24'\n", "network.pool: must be a private range"),
        ("[network]\npool = 'not a network'\n", "network.pool: must be an IPv4 network"),
        ("[network]\npool = 10\n", "network.pool: must be an IPv4 network"),
        ("backend = 'qemu'\n", "backend: must be a table"),
        ("[backend\n", "invalid TOML"),
        ("[restart]\nreset_after_s = 0\n", "restart.reset_after_s: must be from 0.01 to 86400 seconds"),
        ("[backend]\nlibkrun = ''\n", "backend.libkrun: must be a library name or path"),
        ("[backend]\nexec_helper = 'nb-exec'\n", "backend.exec_helper: must be an absolute path"),
    ],
)
def test_bad_values(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message) as caught:
        config.parse_text(text, "/etc/nullbox/cage.toml")
    assert caught.value.lines[0].startswith("/etc/nullbox/cage.toml: ")


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    path = tmp_path / "cage.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(config.ConfigError, match="not valid UTF-8"):
        config.load(path)
    path.write_text("#" * (config.MAX_BYTES + 1))
    with pytest.raises(config.ConfigError, match="larger than"):
        config.load(path)
    with pytest.raises(config.ConfigError, match="cannot be read"):
        config.load(tmp_path)  # a directory


def test_the_daemon_starts_without_pydantic_or_cryptography() -> None:
    """cage serve's modules import neither: their import is 1-2 s of the appliance's boot under TCG, and nothing
    before the first apply/start or secret needs them (cage.terms holds what the daemon uses of the manifest)."""
    probe = (
        "import sys, cage.__main__, cage.runtime, cage.server, cage.agents, cage.policy, cage.vault, cage.health\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('pydantic', 'cryptography'))}))\n"
        "print('cage.manifest' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "False"], done.stdout
