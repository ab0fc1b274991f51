"""/etc/nullbox/cage.toml: which hypervisor backend, the guest kernel, the agents' address pool, restart backoff.

```toml
[backend]
kind = "auto"                                   # auto | qemu | libkrun (auto: libkrun when usable, else QEMU)
kernel = "/usr/lib/nullbox/guest/vmlinux"       # QEMU backend: guest kernel and initramfs, cage.guestimage's
initramfs = "/usr/lib/nullbox/guest/initrd.img" # guest_files() (the NullBox guest kernel when it is built)
exec_helper = "/usr/lib/nullbox/guest/nb-exec"  # QEMU backend: starts QEMU as the agent (cage/nb-exec.c); when the
                                                # file is missing, cage's own Python drops the privileges instead
libkrun = "/usr/lib/x86_64-linux-gnu/libkrun.so.1"   # optional: where libkrun is (default: the loader's search)
stop_timeout_s = 5                              # each step of a stop: power-down request, SIGTERM (then SIGKILL)
vmm_overhead_mb = 128                           # added to max_memory_mb for the cgroup's memory.max

[network]
pool = "10.201.0.0/16"                          # one /30 per agent

[restart]
backoff_initial_s = 1                           # nullbox.backoff: doubling from here ...
backoff_max_s = 30                              # ... up to here
reset_after_s = 300                             # a run this long resets the backoff

[policy]                                        # cage.policy's table (max_tool_risk), checked by cage.policy
```

A missing file means every default.  Unknown tables and keys are errors, and every problem is reported at once, one
line each, naming the file and the key: ``/etc/nullbox/cage.toml: backend.kind: must be one of auto, qemu, libkrun``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Final

from cage import defaults
from cage.policy import PolicyConfig, PolicyConfigError, parse_config
from nullbox.backoff import BackoffPolicy

BACKENDS: Final = ("auto", "qemu", "libkrun")
MAX_BYTES: Final = 64 * 1024


class ConfigError(ValueError):
    """A refused cage.toml; ``lines`` holds one ``<file>: <key>: <problem>`` line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.lines = [f"{source}: {p}" for p in problems]
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True)
class CageConfig:
    backend: str = "auto"
    kernel: Path = defaults.GUEST_KERNEL
    initramfs: Path = defaults.GUEST_INITRAMFS
    exec_helper: Path = defaults.EXEC_HELPER
    libkrun: str | None = None
    stop_timeout_s: float = defaults.STOP_TIMEOUT_S
    vmm_overhead_mb: int = defaults.VMM_OVERHEAD_MIB
    pool: IPv4Network = defaults.POOL
    backoff: BackoffPolicy = field(
        default_factory=lambda: BackoffPolicy(
            initial=defaults.BACKOFF_INITIAL_S, cap=defaults.BACKOFF_MAX_S, reset_after=defaults.BACKOFF_RESET_S
        )
    )
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # the [policy] table, parsed by cage.policy

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "kernel": str(self.kernel),
            "initramfs": str(self.initramfs),
            "exec_helper": str(self.exec_helper),
            "libkrun": self.libkrun,
            "stop_timeout_s": self.stop_timeout_s,
            "vmm_overhead_mb": self.vmm_overhead_mb,
            "pool": str(self.pool),
            "max_tool_risk": str(self.policy.max_tool_risk),
            "backoff": {
                "initial_s": self.backoff.initial,
                "max_s": self.backoff.cap,
                "reset_after_s": self.backoff.reset_after,
            },
        }


def load(path: Path = defaults.CONFIG) -> CageConfig:
    """The configuration in ``path``; every default when the file does not exist."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return CageConfig()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot be read: {exc.strerror}"]) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(str(path), [f"is larger than {MAX_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["is not valid UTF-8"]) from None
    return parse_text(text, str(path))


def parse_text(text: str, source: str = str(defaults.CONFIG)) -> CageConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None
    return _Parser(source).parse(data)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def parse(self, data: Mapping[str, Any]) -> CageConfig:
        base = CageConfig()
        values: dict[str, Any] = {}
        tables: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "backend": lambda t: self._backend(t, values),
            "network": lambda t: self._network(t, values),
            "restart": lambda t: self._restart(t, values, base.backoff),
            "policy": lambda t: self._policy(t, values),
        }
        for name, table in data.items():
            if name not in tables:
                self.problem(name, f"unknown table or key (known: {', '.join(tables)})")
            elif not isinstance(table, dict):
                self.problem(name, "must be a table")
            else:
                tables[name](table)
        if self.problems:
            raise ConfigError(self.source, self.problems)
        return CageConfig(**values)

    def _policy(self, table: Mapping[str, Any], out: dict[str, Any]) -> None:
        try:
            out["policy"] = parse_config({"policy": table}, self.source)
        except PolicyConfigError as exc:
            self.problems.extend(exc.errors)

    def _unknown(self, table: str, data: Mapping[str, Any], known: tuple[str, ...]) -> None:
        for key in data:
            if key not in known:
                self.problem(f"{table}.{key}", f"unknown key (known: {', '.join(known)})")

    def _backend(self, table: Mapping[str, Any], out: dict[str, Any]) -> None:
        known = ("kind", "kernel", "initramfs", "exec_helper", "libkrun", "stop_timeout_s", "vmm_overhead_mb")
        self._unknown("backend", table, known)
        if "kind" in table:
            kind = table["kind"]
            if kind not in BACKENDS:
                self.problem("backend.kind", f"must be one of {', '.join(BACKENDS)}, got {kind!r}")
            else:
                out["backend"] = kind
        for key in ("kernel", "initramfs", "exec_helper"):
            if key in table:
                value = table[key]
                if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
                    self.problem(f"backend.{key}", f"must be an absolute path, got {value!r}")
                else:
                    out[key] = Path(value)
        if "libkrun" in table:
            value = table["libkrun"]
            if not isinstance(value, str) or not value or "\0" in value:
                self.problem("backend.libkrun", "must be a library name or path")
            else:
                out["libkrun"] = value
        if "stop_timeout_s" in table:
            seconds = self._seconds("backend.stop_timeout_s", table["stop_timeout_s"], 0.1, 600)
            if seconds is not None:
                out["stop_timeout_s"] = seconds
        if "vmm_overhead_mb" in table:
            value = table["vmm_overhead_mb"]
            if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 65536:
                self.problem("backend.vmm_overhead_mb", f"must be an integer from 16 to 65536, got {value!r}")
            else:
                out["vmm_overhead_mb"] = value

    def _network(self, table: Mapping[str, Any], out: dict[str, Any]) -> None:
        self._unknown("network", table, ("pool",))
        if "pool" not in table:
            return
        value = table["pool"]
        try:
            pool = IPv4Network(value if isinstance(value, str) else "not a string")
        except ValueError:
            self.problem("network.pool", f"must be an IPv4 network like '10.201.0.0/16', got {value!r}")
            return
        if pool.prefixlen > 30:
            self.problem("network.pool", f"must hold at least one /30 (prefix 30 or shorter), got /{pool.prefixlen}")
        elif not pool.is_private:
            self.problem("network.pool", f"must be a private range (e.g. in 10.0.0.0/8), got {pool}")
        else:
            out["pool"] = pool

    def _restart(self, table: Mapping[str, Any], out: dict[str, Any], base: BackoffPolicy) -> None:
        known = ("backoff_initial_s", "backoff_max_s", "reset_after_s")
        self._unknown("restart", table, known)
        got = {k: self._seconds(f"restart.{k}", table[k], 0.01, 86400) for k in known if k in table}
        initial = got.get("backoff_initial_s") or base.initial
        cap = got.get("backoff_max_s") or base.cap
        reset = got.get("reset_after_s") or base.reset_after
        if None in got.values():
            return
        if cap < initial:
            self.problem("restart.backoff_max_s", f"must be at least backoff_initial_s ({initial:g}), got {cap:g}")
            return
        out["backoff"] = BackoffPolicy(initial=initial, factor=base.factor, cap=cap, reset_after=reset)

    def _seconds(self, key: str, value: object, low: float, high: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.problem(key, f"must be a number of seconds, got {value!r}")
            return None
        if not low <= value <= high:
            self.problem(key, f"must be from {low:g} to {high:g} seconds, got {value:g}")
            return None
        return float(value)
