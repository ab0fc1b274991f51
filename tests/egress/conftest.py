"""Shared fixtures for egress: fresh network namespaces and a live controller daemon running inside one.

Everything runs against the real kernel nftables of a namespace the test created, never the host's.  The traffic
tests reuse :class:`EgressProcess` / the ``egress_factory`` fixture with their own topology's appliance namespace.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from egress import defaults
from nullbox.daemon import DaemonProcess
from nullbox.wire import Client, WireError

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]

if shutil.which("ip") is None or shutil.which("nft") is None:  # pragma: no cover - the dev host has both
    pytest.skip("egress tests need ip(8) and nft(8)", allow_module_level=True)


def _run(argv: list[str], *, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)


class Netns:
    """A named network namespace (``ip netns add``), deleted by :meth:`delete` with everything in it."""

    def __init__(self, prefix: str = "egt") -> None:
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        result = _run(["ip", "netns", "add", self.name])
        assert result.returncode == 0, result.stderr
        self.ip("link", "set", "lo", "up")

    def delete(self) -> None:
        _run(["ip", "netns", "del", self.name])

    def ip(self, *args: str) -> None:
        result = _run(["ip", "-n", self.name, *args])
        assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"

    def run(
        self, argv: list[str], *, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", self.name, *argv], stdin=stdin, timeout=timeout)

    def python(self, snippet: str, *args: str, stdin: str | None = None) -> Any:
        """Run a Python snippet in this namespace (repo on the path); it prints one JSON value, returned here."""
        result = self.run([PYTHON, "-c", snippet, *args], stdin=stdin)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def nft(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """nft(8) itself: the tests read what the kernel holds with a tool independent of the code under test."""
        return self.run(["nft", *args], stdin=stdin)

    def table(self) -> list[dict[str, Any]] | None:
        """``nft -j list table inet nullbox`` without metainfo; None when the table does not exist."""
        result = self.nft("-j", "list", "table", "inet", defaults.TABLE)
        if result.returncode != 0:
            assert "No such file or directory" in result.stderr, result.stderr
            return None
        items: list[dict[str, Any]] = json.loads(result.stdout)["nftables"]
        return [item for item in items if "metainfo" not in item]

    def ruleset(self) -> str:
        """The namespace's whole ruleset as nft text, for byte-for-byte comparisons.

        Stateless (``-s``): without counter values and element expiry countdowns, which change on their own.
        """
        result = self.nft("-s", "list", "ruleset")
        assert result.returncode == 0, result.stderr
        return result.stdout

    def veth(self, ifname: str, peer: Netns, peer_ifname: str = "eth0", address: str | None = None) -> None:
        """A veth pair: ``ifname`` here (with ``address`` as CIDR, up), ``peer_ifname`` in ``peer`` (up)."""
        self.ip("link", "add", ifname, "type", "veth", "peer", "name", peer_ifname, "netns", peer.name)
        if address is not None:
            self.ip("addr", "add", address, "dev", ifname)
        self.ip("link", "set", ifname, "up")
        peer.ip("link", "set", peer_ifname, "up")


@pytest.fixture
def netns() -> Iterator[Callable[[], Netns]]:
    """A factory of fresh network namespaces, all deleted after the test."""
    made: list[Netns] = []

    def make() -> Netns:
        made.append(Netns())
        return made[-1]

    yield make
    for ns in reversed(made):
        ns.delete()


class EgressProcess(DaemonProcess):
    """``python -m egress serve`` inside a network namespace, with its socket and state under ``root``."""

    name = "egress"

    def __init__(
        self,
        root: Path,
        netns: str,
        *,
        uplink: str = defaults.UPLINK,
        resolv_conf: Path | None = None,
        state_dir: Path | None = None,
        min_ttl: int = defaults.MIN_TTL,
        max_ttl: int = defaults.MAX_TTL,
        hooks: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(root, env={**({defaults.TEST_HOOKS_ENV: "1"} if hooks else {}), **(env or {})})
        self.netns = netns
        self.uplink = uplink
        self.resolv_conf = resolv_conf if resolv_conf is not None else root / "resolv.conf"
        self.state_dir = state_dir if state_dir is not None else root / "state"
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.socket = root / "egress.sock"

    def argv(self) -> list[str]:
        return [
            *("ip", "netns", "exec", self.netns, PYTHON, "-m", "egress", "serve"),
            *("--socket", str(self.socket), "--uplink", self.uplink, "--resolv-conf", str(self.resolv_conf)),
            *("--state-dir", str(self.state_dir), "--min-ttl", str(self.min_ttl), "--max-ttl", str(self.max_ttl)),
        ]

    def start(self, timeout: float = 30.0) -> EgressProcess:
        try:
            super().start(timeout)
        except RuntimeError:
            raise RuntimeError(f"egress did not become ready; log:\n{self.log_text()}") from None
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, timeout: float = 30) -> Client:
        return Client(f"unix:{self.socket}", timeout=timeout)

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        with self.client() as client:
            return client.call(op, **params)

    def error(self, op: str, **params: Any) -> WireError:
        """The error ``op`` must fail with."""
        with self.client() as client:
            try:
                reply = client.call(op, **params)
            except WireError as exc:
                return exc
        raise AssertionError(f"{op} {params} should have failed but answered {reply}")


EgressFactory = Callable[..., EgressProcess]


@pytest.fixture
def egress_factory() -> Iterator[EgressFactory]:
    """``start(netns, uplink=..., resolv_conf=..., min_ttl=..., max_ttl=..., state_dir=...)`` -> a ready daemon.

    Every daemon started is stopped after the test.  ``root`` defaults to a fresh short directory (unix socket
    paths are limited to 108 bytes); pass the same ``state_dir`` to a second daemon to test a restart.
    """
    started: list[EgressProcess] = []
    roots: list[Path] = []

    def start(netns: str, *, root: Path | None = None, timeout: float = 30.0, **options: Any) -> EgressProcess:
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="eg-"))
            roots.append(root)
        proc = EgressProcess(root, netns, **options)
        started.append(proc)
        return proc.start(timeout)

    yield start
    for proc in started:
        proc.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
