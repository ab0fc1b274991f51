"""AGENT.toml: what an agent is, what it may do, and how cage runs it — a strict pydantic model.

A superset of NullBox's manifest (``[agent]`` name/version, ``[capabilities]`` with shell, credential_refs,
accelerator, max_cpu_percent, max_memory_mb, max_api_calls_per_hour, network.allow, filesystem.read/write, and
``[tools]`` with a risk level), extended with what a microVM needs: ``agent.command``, ``agent.rootfs``,
``agent.env``, ``agent.restart``, ``agent.autostart``, ``agent.runtime`` and ``capabilities.health_check``.
docs/agent-toml.md is the user-facing reference.

Rules that hold everywhere:

- Unknown keys are errors (``extra="forbid"`` on every table) and values are never coerced: ``"50"`` is not a
  number and ``1`` is not ``true``.
- Every problem becomes one line ``<file>: <field path>: <what is wrong and what is allowed>``, and all of them are
  reported together (:class:`ManifestError`); pydantic's own wording and links never reach the user.
- Models are frozen; tables inside them (``agent.env``, ``tools``) are read-only mappings.
- ``capabilities.network.allow`` is checked by egress's own parser (:class:`egress.names.AllowEntry`), so the
  manifest accepts exactly what egress enforces; entries are stored in egress's canonical spelling.
- ``capabilities.filesystem`` paths are paths *inside the VM* under ``/data``, the mount point of the agent's
  data directory on the appliance; :func:`data_path` maps one to the host and can never leave that directory.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Final, NoReturn, Self, TypeVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from cage.terms import (  # the daemon's pydantic-free terms (cage.terms); use them from there
    ENV_NAME_RE,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    NAME_RE,
    RESERVED_ENV_PREFIXES,
    ManifestError,
    Restart,
    Risk,
)
from egress.names import MAX_ALLOW_ENTRIES, AllowEntry, AllowList, InvalidName

SCHEMA_ID: Final = "urn:nullbox:schema:agent-toml:1"

DATA_MOUNT: Final = "/data"
"""Where the agent's data directory appears inside its VM; every ``capabilities.filesystem`` path is under it."""

DEFAULT_EXEC_DIR: Final = "/agent/bin"
"""NullBox's convention: without ``agent.command`` the VM runs ``/agent/bin/<name>``."""


MAX_COMMAND_ARGS: Final = 256
MAX_ARG_CHARS: Final = 4096
MAX_ENV_ENTRIES: Final = 128
MAX_ENV_VALUE_CHARS: Final = 4096
MAX_EXEC_BYTES: Final = 32 * 1024
"""argv + env together: libkrun passes both on the guest kernel command line (64 KiB on x86_64), cage adds more."""
MAX_CREDENTIALS: Final = 64
MAX_FS_PATHS: Final = 64
MAX_PATH_CHARS: Final = 1024
MAX_TOOLS: Final = 256

VERSION_RE: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
RUNTIME_RE: Final = re.compile(r"[a-z][a-z0-9.+_-]{0,31}")
TOOL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ROOTFS_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
PATH_PART_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
HTTP_PATH_RE: Final = re.compile(r"/[\x21-\x7e]{0,1023}")
# libkrun carries argv and env on the guest kernel command line, each value in double quotes (see cage.vmspec).
_UNSAFE_RE: Final = re.compile(r'["\x00-\x1f\x7f]')

_T = TypeVar("_T")


def shown(value: object) -> str:
    """A value quoted for a message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class FrozenDict(dict[str, _T]):
    """A read-only, hashable ``dict``, so that a frozen model's tables cannot be changed behind its back either."""

    def _refuse(self, *_args: object, **_kwargs: object) -> NoReturn:
        raise TypeError("manifest tables are read-only")

    __setitem__ = _refuse
    __delitem__ = _refuse
    __ior__ = _refuse
    clear = _refuse
    pop = _refuse
    popitem = _refuse
    setdefault = _refuse
    update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def __reduce__(self) -> tuple[type[FrozenDict[_T]], tuple[dict[str, _T]]]:
        return (type(self), (dict(self),))


def _frozen(value: dict[str, _T]) -> FrozenDict[_T]:
    return FrozenDict(value)


class _Problems(ValueError):
    """Several problems found by one cross-field check, each with a path relative to the model that found it."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" if path else message for path, message in problems))


# --- field validators: each raises ValueError with the whole user-facing message --------------------------------


def _between(low: int, high: int, unit: str = "") -> AfterValidator:
    suffix = f" {unit}" if unit else ""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be {low}-{high}{suffix}, got {value}")
        return value

    return AfterValidator(check)


def _int_schema(low: int, high: int) -> WithJsonSchema:
    return WithJsonSchema({"type": "integer", "minimum": low, "maximum": high})


def _matches(regex: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if regex.fullmatch(value) is None:
            raise ValueError(f"must be {what}, got {shown(value)}")
        return value

    return AfterValidator(check)


def _str_schema(regex: re.Pattern[str], **extra: object) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": f"^{regex.pattern}$", **extra})


def _check_env_name(value: str) -> str:
    if ENV_NAME_RE.fullmatch(value) is None:
        raise ValueError(
            f"{shown(value)} is not an environment variable name: 1-128 characters of A-Z a-z 0-9 _, "
            "not starting with a digit"
        )
    for prefix in RESERVED_ENV_PREFIXES:
        if value.startswith(prefix):
            raise ValueError(f"{shown(value)} is reserved: names starting with {prefix} are set by cage")
    return value


def _check_env_value(value: str) -> str:
    if len(value) > MAX_ENV_VALUE_CHARS:
        raise ValueError(f"is {len(value)} characters; at most {MAX_ENV_VALUE_CHARS} are accepted")
    if _UNSAFE_RE.search(value):
        raise ValueError(f"must not contain '\"', NUL, tabs, newlines or other control characters, got {shown(value)}")
    return value


def _check_arg(value: str) -> str:
    if len(value) > MAX_ARG_CHARS:
        raise ValueError(f"is {len(value)} characters; at most {MAX_ARG_CHARS} are accepted")
    if _UNSAFE_RE.search(value):
        raise ValueError(f"must not contain '\"', NUL, tabs, newlines or other control characters, got {shown(value)}")
    return value


def _check_command(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("must name a program: a list like ['/usr/bin/agent', '--serve']")
    if len(value) > MAX_COMMAND_ARGS:
        raise ValueError(f"has {len(value)} items; at most {MAX_COMMAND_ARGS} are accepted")
    program = value[0]
    if not program.startswith("/") or _normalised(program) != program:
        raise ValueError(
            f"must start with an absolute, normalised path of the program inside the VM, got {shown(program)}"
        )
    return value


def _normalised(path: str) -> str:
    """``path`` without empty, ``.`` and ``..`` parts — only equal to ``path`` when it already was normalised."""
    return "/" + "/".join(part for part in path.split("/") if part not in ("", ".", ".."))


def _check_data_path(value: str) -> str:
    if len(value) > MAX_PATH_CHARS:
        raise ValueError(f"is {len(value)} characters; at most {MAX_PATH_CHARS} are accepted")
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path under {DATA_MOUNT} inside the VM, got {shown(value)}")
    parts = value.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"must be a normalised path, without '.', '..', '//' or a trailing '/', got {shown(value)}")
    if parts[0] != DATA_MOUNT.lstrip("/"):
        raise ValueError(
            f"must be {DATA_MOUNT} or a path under it (the agent's data directory), got {shown(value)}; "
            "host paths are never shared with an agent"
        )
    for part in parts[1:]:
        if PATH_PART_RE.fullmatch(part) is None:
            raise ValueError(
                f"has the component {shown(part)}; components are 1-255 characters of A-Z a-z 0-9 . _ -, "
                "not starting with '.' or '-'"
            )
    return value


def _check_allow(value: str) -> str:
    try:
        return str(AllowEntry.parse(value))
    except InvalidName as exc:
        raise ValueError(str(exc)) from None


def _unique(what: str) -> AfterValidator:
    def check(values: tuple[str, ...]) -> tuple[str, ...]:
        first: dict[str, int] = {}
        problems: list[tuple[str, str]] = []
        for index, value in enumerate(values):
            if value in first:
                problems.append((f"[{index}]", f"repeats {what} {shown(value)} of [{first[value]}]"))
            else:
                first[value] = index
        if problems:
            raise _Problems(problems)
        return values

    return AfterValidator(check)


def _max_items(limit: int) -> AfterValidator:
    def check(values: Any) -> Any:
        if len(values) > limit:
            raise ValueError(f"has {len(values)} entries; at most {limit} are accepted")
        return values

    return AfterValidator(check)


def _not_the_manifest(value: str) -> str:
    if value == MANIFEST_NAME:
        raise ValueError(f"must name the rootfs, not the manifest itself ({MANIFEST_NAME})")
    return value


def _check_http_path(value: str) -> str:
    if HTTP_PATH_RE.fullmatch(value) is None:
        raise ValueError(f"must be an HTTP path like '/healthz' (printable ASCII, no spaces), got {shown(value)}")
    return value


# --- types ------------------------------------------------------------------------------------------------------

AgentName = Annotated[StrictStr, _matches(NAME_RE, "1-64 characters of A-Z a-z 0-9 _ -"), _str_schema(NAME_RE)]
Version = Annotated[
    StrictStr,
    _matches(VERSION_RE, "1-64 characters of A-Z a-z 0-9 . + _ -, starting with a letter or digit (e.g. '1.2.0')"),
    _str_schema(VERSION_RE),
]
Runtime = Annotated[
    StrictStr,
    _matches(RUNTIME_RE, "a label of 1-32 characters of a-z 0-9 . + _ - like 'python3.12', 'node22' or 'native'"),
    _str_schema(RUNTIME_RE),
]
RootfsName = Annotated[
    StrictStr,
    _matches(
        ROOTFS_RE,
        "the name of a directory or SquashFS image next to AGENT.toml: 1-128 characters of A-Z a-z 0-9 . _ -, "
        "not starting with '.' or '-'",
    ),
    AfterValidator(_not_the_manifest),
    _str_schema(ROOTFS_RE, **{"not": {"const": MANIFEST_NAME}}),
]
ToolName = Annotated[
    StrictStr,
    _matches(TOOL_RE, "1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"),
    _str_schema(TOOL_RE),
]
HttpPath = Annotated[StrictStr, AfterValidator(_check_http_path), _str_schema(HTTP_PATH_RE)]
CpuPercent = Annotated[StrictInt, _between(1, 100), _int_schema(1, 100)]
MemoryMiB = Annotated[StrictInt, _between(64, 65536, "MiB"), _int_schema(64, 65536)]
CallsPerHour = Annotated[StrictInt, _between(0, 1_000_000), _int_schema(0, 1_000_000)]
Port = Annotated[StrictInt, _between(1, 65535), _int_schema(1, 65535)]
IntervalS = Annotated[StrictInt, _between(1, 3600, "seconds"), _int_schema(1, 3600)]
TimeoutS = Annotated[StrictInt, _between(1, 300, "seconds"), _int_schema(1, 300)]
StartPeriodS = Annotated[StrictInt, _between(0, 3600, "seconds"), _int_schema(0, 3600)]
Retries = Annotated[StrictInt, _between(1, 100), _int_schema(1, 100)]
EnvName = Annotated[
    StrictStr,
    AfterValidator(_check_env_name),
    WithJsonSchema({"type": "string", "pattern": f"^{ENV_NAME_RE.pattern}$", "not": {"pattern": "^(NULLBOX_|KRUN_)"}}),
]
EnvValue = Annotated[
    StrictStr, AfterValidator(_check_env_value), WithJsonSchema({"type": "string", "maxLength": MAX_ENV_VALUE_CHARS})
]
Arg = Annotated[StrictStr, AfterValidator(_check_arg), WithJsonSchema({"type": "string", "maxLength": MAX_ARG_CHARS})]
DataPath = Annotated[
    StrictStr,
    AfterValidator(_check_data_path),
    WithJsonSchema(
        {"type": "string", "pattern": r"^/data(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$", "maxLength": MAX_PATH_CHARS}
    ),
]
AllowText = Annotated[
    StrictStr,
    AfterValidator(_check_allow),
    WithJsonSchema(
        {
            "type": "string",
            "description": "'host', 'host:port', '*.suffix' or '*.suffix:port' (port defaults to 443)",
            "examples": ["api.openai.com", "*.github.com:443"],
        }
    ),
]
Command = Annotated[
    tuple[Arg, ...],
    AfterValidator(_check_command),
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "string", "maxLength": MAX_ARG_CHARS},
            "minItems": 1,
            "maxItems": MAX_COMMAND_ARGS,
            "prefixItems": [{"type": "string", "pattern": "^/"}],
        }
    ),
]


class Accelerator(StrEnum):
    """NullBox's GPU/NPU pinning; this cage passes no devices through, so ``none`` is the only value."""

    NONE = "none"


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(_Table):
    """``[agent]``: identity and how the VM runs the agent."""

    name: AgentName = Field(description="1-64 characters of A-Z a-z 0-9 _ -; the installed directory's name")
    version: Version = Field(default="0.0.0", description="the agent's own version, e.g. '1.2.0'")
    runtime: Runtime | None = Field(
        default=None,
        description="the language runtime the rootfs provides ('python3.12', 'node22', 'native'); informational",
    )
    command: Command | None = Field(
        default=None,
        description=f"argv run inside the VM; argv[0] absolute. Default: ['{DEFAULT_EXEC_DIR}/<name>'] (NullBox)",
    )
    rootfs: RootfsName = Field(
        default="rootfs", description="a directory or SquashFS image next to AGENT.toml, the VM's root filesystem"
    )
    env: Annotated[
        dict[EnvName, EnvValue],
        _max_items(MAX_ENV_ENTRIES),
        AfterValidator(_frozen),
        WithJsonSchema(
            {
                "type": "object",
                "propertyNames": {"pattern": f"^{ENV_NAME_RE.pattern}$", "not": {"pattern": "^(NULLBOX_|KRUN_)"}},
                "additionalProperties": {"type": "string", "maxLength": MAX_ENV_VALUE_CHARS},
                "maxProperties": MAX_ENV_ENTRIES,
            }
        ),
    ] = Field(default_factory=FrozenDict, description="environment variables set inside the VM")
    restart: Restart = Field(default=Restart.ON_FAILURE, description="always | on-failure | never")
    autostart: StrictBool = Field(default=False, description="start the agent whenever cage starts")

    @property
    def argv(self) -> tuple[str, ...]:
        """The command the VM runs: ``command``, or NullBox's ``/agent/bin/<name>``."""
        return self.command if self.command is not None else (f"{DEFAULT_EXEC_DIR}/{self.name}",)

    @model_validator(mode="after")
    def _fits_the_kernel_command_line(self) -> Self:
        size = sum(len(a.encode()) + 1 for a in self.argv)
        size += sum(len(k.encode()) + len(v.encode()) + 2 for k, v in self.env.items())
        if size > MAX_EXEC_BYTES:
            raise _Problems(
                [("", f"command and env together take {size} bytes; at most {MAX_EXEC_BYTES} are accepted")]
            )
        return self


class NetworkCaps(_Table):
    """``[capabilities.network]``: where the agent may connect; everything else is dropped."""

    allow: Annotated[
        tuple[AllowText, ...],
        _max_items(MAX_ALLOW_ENTRIES),
        _unique("the entry"),
        WithJsonSchema(
            {
                "type": "array",
                "items": {"type": "string", "examples": ["api.openai.com", "*.github.com:443"]},
                "maxItems": MAX_ALLOW_ENTRIES,
                "uniqueItems": True,
                "description": "'host', 'host:port', '*.suffix' or '*.suffix:port' (port defaults to 443)",
            }
        ),
    ] = ()

    @property
    def allow_list(self) -> AllowList:
        """The entries as egress parses them (sorted, one per host/port/wildcard)."""
        return AllowList.parse(list(self.allow))


_DataPaths = Annotated[tuple[DataPath, ...], _max_items(MAX_FS_PATHS), _unique("the path")]


class FilesystemCaps(_Table):
    """``[capabilities.filesystem]``: parts of the agent's data directory mounted into the VM (at ``/data/...``)."""

    read: _DataPaths = Field(default=(), description="mounted read-only")
    write: _DataPaths = Field(default=(), description="mounted read-write")

    @model_validator(mode="after")
    def _read_and_write_are_disjoint(self) -> Self:
        both = set(self.read) & set(self.write)
        if both:
            raise _Problems(
                [
                    (f"write[{i}]", f"{shown(p)} is also listed in read; list a path once (write implies read)")
                    for i, p in enumerate(self.write)
                    if p in both
                ]
            )
        return self


class HealthCheck(_Table):
    """``[capabilities.health_check]``: a probe cage runs from the appliance to the agent over its private link.

    Every ``interval_s`` (after ``start_period_s``), cage connects to the VM's ``port`` over TCP — and, when
    ``http_path`` is set, sends ``GET http_path`` and expects a 2xx status — within ``timeout_s``. After ``retries``
    consecutive failures the agent is unhealthy: cage stops its VM and treats that as a failure for ``restart``.
    A probe from the appliance needs nothing inside the VM beyond the agent listening, and no egress rule.
    """

    port: Port = Field(description="TCP port the agent listens on inside its VM")
    http_path: HttpPath | None = Field(
        default=None, description="when set, GET this path and expect a 2xx answer; otherwise a TCP connect is enough"
    )
    interval_s: IntervalS = 30
    timeout_s: TimeoutS = 5
    retries: Retries = 3
    start_period_s: StartPeriodS = 0

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> Self:
        if self.timeout_s > self.interval_s:
            raise _Problems([("timeout_s", f"must not exceed interval_s ({self.interval_s}), got {self.timeout_s}")])
        return self


class Capabilities(_Table):
    """``[capabilities]``: everything the agent may use; nothing undeclared is available in the VM."""

    shell: StrictBool = Field(default=False, description="whether the agent may spawn a shell (NullBox)")
    credential_refs: Annotated[tuple[EnvName, ...], _max_items(MAX_CREDENTIALS), _unique("the credential")] = Field(
        default=(), description="vault secrets injected as environment variables of the same name"
    )
    accelerator: Accelerator = Field(default=Accelerator.NONE, description="only 'none': no device passthrough")
    max_cpu_percent: CpuPercent = Field(default=25, description="CPU share, 1-100")
    max_memory_mb: MemoryMiB = Field(default=256, description="VM memory in MiB, 64-65536")
    max_api_calls_per_hour: CallsPerHour = Field(default=0, description="0 means no limit")
    network: NetworkCaps = Field(default_factory=NetworkCaps)
    filesystem: FilesystemCaps = Field(default_factory=FilesystemCaps)
    health_check: HealthCheck | None = None


class ToolDef(_Table):
    """One entry of ``[tools]``: a tool the agent calls and how risky a call is."""

    risk: Risk = Field(description="low | medium | high | critical")


class Manifest(_Table):
    """A whole AGENT.toml."""

    model_config = ConfigDict(
        title="AGENT.toml",
        json_schema_extra={"$id": SCHEMA_ID, "$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    agent: AgentSection
    capabilities: Capabilities = Field(default_factory=Capabilities)
    tools: Annotated[
        dict[ToolName, ToolDef],
        _max_items(MAX_TOOLS),
        AfterValidator(_frozen),
    ] = Field(default_factory=FrozenDict)

    @property
    def name(self) -> str:
        return self.agent.name

    @model_validator(mode="after")
    def _env_and_credentials_are_disjoint(self) -> Self:
        refs = set(self.capabilities.credential_refs)
        clashes = [name for name in self.agent.env if name in refs]
        if clashes:
            raise _Problems(
                [
                    (
                        f"agent.env.{name}",
                        "is also in capabilities.credential_refs; the credential is injected under that name",
                    )
                    for name in clashes
                ]
            )
        return self


# --- errors -----------------------------------------------------------------------------------------------------


def _loc_text(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            text += f".{part}" if text else part
        else:
            text += f"[{shown(part)}]"
    return text


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if origin is not None and origin not in (dict, tuple, list) and len(args) == 1:
            annotation = args[0]  # X | None
            continue
        return annotation


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class validating the table at ``loc`` (to list its keys), or None when loc is not a table."""
    current: Any = Manifest
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = _unwrap(field.annotation)
        elif get_origin(current) is dict:
            current = _unwrap(get_args(current)[1])
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_TYPE_WORDS: Final = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


def _problem_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if part != "[key]")
        kind = error["type"]
        ctx = error.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, _Problems):
            for sub, message in cause.problems:
                path = _loc_text(loc)
                if path and sub:
                    path += sub if sub.startswith("[") else f".{sub}"
                else:
                    path = path or sub or "(top level)"
                lines.append(f"{path}: {message}")
            continue
        where = _loc_text(loc) or "(top level)"
        if kind == "value_error" and cause is not None:
            message = str(cause)
        elif kind == "extra_forbidden":
            model = _model_at(loc[:-1])
            allowed = ", ".join(model.model_fields) if model is not None else ""
            message = f"unknown key; allowed here: {allowed}" if allowed else "unknown key"
        elif kind == "missing":
            message = "is required"
        elif kind in _TYPE_WORDS:
            message = f"{_TYPE_WORDS[kind]}, got {shown(error['input'])}"
        elif kind == "enum":
            message = f"must be {ctx.get('expected', 'one of the listed values')}, got {shown(error['input'])}"
        else:
            message = error["msg"]
        lines.append(f"{where}: {message}")
    return lines


# --- entry points -----------------------------------------------------------------------------------------------

_TOO_BIG: Final = f"is larger than {MAX_MANIFEST_BYTES} bytes, the limit for a manifest"
_TOML_WHERE: Final = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)$")


def source_name(path: Path) -> str:
    """How messages name a manifest file: its directory and name (``researcher/AGENT.toml``)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def parse_text(text: str, source: str = MANIFEST_NAME) -> Manifest:
    """Validate manifest text; raises :class:`ManifestError` naming ``source`` on every line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, [_TOO_BIG])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_WHERE.search(message)
        where = match.group(1) if match else "somewhere"
        if where in ("end of document", "somewhere"):
            where = f"line {text.count(chr(10)) + 1}, at the end of the file"
        detail = message[: match.start()] if match else message
        raise ManifestError(source, [f"{where}: invalid TOML: {detail}"]) from None
    return parse_data(data, source)


def parse_bytes(raw: bytes, source: str = MANIFEST_NAME) -> Manifest:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, [_TOO_BIG])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(source, [f"line {line}: is not valid UTF-8 (byte {exc.start})"]) from None
    return parse_text(text, source)


def parse_data(data: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
    """Validate an already decoded manifest (a TOML or JSON document)."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(source, _problem_lines(exc)) from None


def load(path: Path) -> Manifest:
    """Read and validate an AGENT.toml file (or an agent directory containing one)."""
    if path.is_dir():
        path = path / MANIFEST_NAME
    source = source_name(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(source, [f"cannot be read: {exc.strerror or exc}"]) from None
    return parse_bytes(raw, source)


def data_path(data_dir: Path, guest_path: str) -> Path:
    """The host directory behind a ``capabilities.filesystem`` path: ``/data/x/y`` → ``data_dir/x/y``.

    Only validated paths are accepted (absolute, normalised, under ``/data``), so the result is always
    ``data_dir`` or below it; anything else raises ValueError rather than yielding a host path.
    """
    _check_data_path(guest_path)
    relative = PurePosixPath(guest_path).relative_to(DATA_MOUNT)
    result = data_dir.joinpath(*relative.parts)
    if result != data_dir and data_dir not in result.parents:
        raise ValueError(f"{guest_path!r} leaves the data directory")
    return result


def manifest_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of AGENT.toml for editors and ``nullctl``; a guide, the model is the judge."""
    return Manifest.model_json_schema(mode="validation")
