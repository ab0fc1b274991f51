"""nulld.toml: the services nulld supervises, validated strictly.

A superset of NullBox's ``[service.<name>]`` format (ARCHITECTURE.md).  Every mistake becomes one message that
names the file and the field, and all of them are reported together, so one edit fixes one run of errors.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from nulld.graph import CycleError, start_order

DEFAULT_PATH: Final = Path("/etc/nullbox/nulld.toml")
SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOSTNAME: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class Restart(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class ReadyKind(StrEnum):
    SPAWN = "spawn"
    NOTIFY = "notify"
    SOCKET = "socket"


@dataclass(frozen=True)
class Service:
    name: str
    binary: str
    args: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    restart: Restart = Restart.ON_FAILURE
    ready: ReadyKind = ReadyKind.SPAWN
    ready_socket: str | None = None
    ready_timeout: float = 30.0
    stop_timeout: float = 5.0
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = "/"
    user: str | int | None = None
    preload: bool = False  # fork from nulld instead of exec: `python3 -m MODULE` services only (nulld/preload.py)

    @property
    def argv(self) -> list[str]:
        return [self.binary, *self.args]


@dataclass(frozen=True)
class Config:
    services: dict[str, Service]
    order: tuple[str, ...]
    hostname: str = "nullbox"
    source: str = "<built-in>"
    errors: tuple[str, ...] = field(default=())
    """Errors of the file this config replaced (the built-in set boots when the file is unusable)."""


class ConfigError(Exception):
    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {e}" for e in errors))


_SERVICE_KEYS: Final = {
    "binary",
    "args",
    "depends_on",
    "restart",
    "ready",
    "ready_timeout",
    "stop_timeout",
    "env",
    "working_dir",
    "user",
    "preload",
}
_SYSTEM_KEYS: Final = {"hostname"}


class _Collector:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")


def _string_list(value: Any, where: str, errors: _Collector) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.add(where, f"must be a list of strings (got {_show(value)})")
        return None
    return tuple(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _timeout(value: Any, where: str, errors: _Collector) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        errors.add(where, f"must be a number of seconds, more than 0 and at most 3600 (got {_show(value)})")
        return None
    return float(value)


def _absolute(value: Any, where: str, errors: _Collector) -> str | None:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        errors.add(where, f"must be an absolute path (got {_show(value)})")
        return None
    if value != "/" and any(part in ("", ".", "..") for part in value.split("/")[1:]):
        errors.add(where, f"must be a normalised path, without '.', '..', '//' or a trailing '/' (got {_show(value)})")
        return None
    return value


def _service(name: str, table: Any, errors: _Collector) -> Service | None:
    where = f"service.{name}"
    if not SERVICE_NAME.fullmatch(name):
        errors.add(where, "service names are 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit")
        return None
    if not isinstance(table, dict):
        errors.add(where, f"must be a table (got {_show(table)})")
        return None
    count = len(errors.errors)
    for key in sorted(set(table) - _SERVICE_KEYS):
        errors.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(_SERVICE_KEYS))}")
    if "binary" not in table:
        errors.add(f"{where}.binary", "is required")
    binary = _absolute(table.get("binary", "/"), f"{where}.binary", errors)
    args = _string_list(table.get("args", []), f"{where}.args", errors)
    depends = _string_list(table.get("depends_on", []), f"{where}.depends_on", errors)
    restart = table.get("restart", Restart.ON_FAILURE.value)
    if restart not in Restart._value2member_map_:
        errors.add(f"{where}.restart", f"must be one of always, on-failure, never (got {_show(restart)})")
    ready_value = table.get("ready", ReadyKind.SPAWN.value)
    ready_socket: str | None = None
    if ready_value in (ReadyKind.SPAWN.value, ReadyKind.NOTIFY.value):
        ready = ReadyKind(ready_value)
    else:
        ready = ReadyKind.SOCKET
        if not isinstance(ready_value, str) or not ready_value.startswith("/"):
            errors.add(
                f"{where}.ready", f"must be 'spawn', 'notify' or an absolute socket path (got {_show(ready_value)})"
            )
        else:
            ready_socket = _absolute(ready_value, f"{where}.ready", errors)
    ready_timeout = _timeout(table.get("ready_timeout", 30), f"{where}.ready_timeout", errors)
    stop_timeout = _timeout(table.get("stop_timeout", 5), f"{where}.stop_timeout", errors)
    env_table = table.get("env", {})
    env: list[tuple[str, str]] = []
    if not isinstance(env_table, dict):
        errors.add(f"{where}.env", f"must be a table of strings (got {_show(env_table)})")
    else:
        for key, value in env_table.items():
            if not ENV_NAME.fullmatch(key):
                errors.add(f"{where}.env.{key}", "is not a valid environment variable name")
            elif not isinstance(value, str) or "\0" in value:
                errors.add(f"{where}.env.{key}", f"must be a string (got {_show(value)})")
            else:
                env.append((key, value))
    working_dir = _absolute(table.get("working_dir", "/"), f"{where}.working_dir", errors)
    user = table.get("user")
    if user is not None and not (
        (isinstance(user, int) and not isinstance(user, bool) and 0 <= user < 2**32 - 1)
        or (isinstance(user, str) and re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user))
    ):
        errors.add(f"{where}.user", f"must be a user name or a numeric uid (got {_show(user)})")
    preload = table.get("preload", False)
    if not isinstance(preload, bool):
        errors.add(f"{where}.preload", f"must be true or false (got {_show(preload)})")
    elif preload and (
        args is None or len(args) < 2 or args[0] != "-m" or not Path(binary or "/").name.startswith("python")
    ):
        errors.add(
            f"{where}.preload", "needs a service run as `python3 -m MODULE ...` (binary python3, args starting with -m)"
        )
    if len(errors.errors) > count:
        return None
    assert binary is not None and args is not None and depends is not None and working_dir is not None
    assert ready_timeout is not None and stop_timeout is not None
    return Service(
        name=name,
        binary=binary,
        args=args,
        depends_on=depends,
        restart=Restart(restart),
        ready=ready,
        ready_socket=ready_socket,
        ready_timeout=ready_timeout,
        stop_timeout=stop_timeout,
        env=tuple(env),
        working_dir=working_dir,
        user=user,
        preload=preload is True,
    )


def parse(text: str, source: str) -> Config:
    """Parse and validate nulld.toml text; raises ConfigError listing every problem."""
    errors = _Collector()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    for key in sorted(set(document) - {"service", "system"}):
        errors.add(key, "unknown top-level table; allowed: service, system")
    system = document.get("system", {})
    hostname = "nullbox"
    if not isinstance(system, dict):
        errors.add("system", "must be a table")
    else:
        for key in sorted(set(system) - _SYSTEM_KEYS):
            errors.add(f"system.{key}", f"unknown key; allowed: {', '.join(sorted(_SYSTEM_KEYS))}")
        hostname = system.get("hostname", hostname)
        if not isinstance(hostname, str) or not HOSTNAME.fullmatch(hostname):
            errors.add(
                "system.hostname", f"must be a hostname label of 1-63 letters, digits and '-' (got {_show(hostname)})"
            )
    tables = document.get("service", {})
    services: dict[str, Service] = {}
    if not isinstance(tables, dict):
        errors.add("service", "must be a table of [service.<name>] tables")
        tables = {}
    for name, table in tables.items():
        service = _service(name, table, errors)
        if service is not None:
            services[name] = service
    for service in services.values():
        for dep in service.depends_on:
            if dep == service.name:
                errors.add(f"service.{service.name}.depends_on", "a service cannot depend on itself")
            elif dep not in tables:
                errors.add(f"service.{service.name}.depends_on", f"unknown service {dep!r}")
    order: tuple[str, ...] = ()
    if not errors.errors:
        try:
            order = tuple(start_order({n: s.depends_on for n, s in services.items()}))
        except CycleError as exc:
            errors.add("service", str(exc))
    if errors.errors:
        raise ConfigError(source, errors.errors)
    return Config(services=services, order=order, hostname=hostname, source=source)


def load(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    return parse(text, str(path))


BUILTIN: Final = """
# The services an appliance boots when /etc/nullbox/nulld.toml is missing or broken.
[service.ctxgraph]
binary = "/usr/bin/python3"
args = ["-m", "ctxgraph", "serve"]
restart = "always"
ready = "notify"
"""


def builtin(errors: list[str] | None = None) -> Config:
    config = parse(BUILTIN, "<built-in>")
    return Config(config.services, config.order, config.hostname, config.source, tuple(errors or ()))
