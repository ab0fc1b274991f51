"""The credential vault: secrets sealed at rest on the data disk, granted to agents by name.

Layout under ``root`` (default ``/var/lib/nullbox/vault``, mode 0700)::

    key              32 random bytes, AES-256-GCM key, 0400; created once, never replaced
    secrets/<NAME>   one sealed secret per file, 0600 (the file name is the secret's name)
    grants.json      {"NAME": ["agent", ...]}: which agents may receive which secret (names sorted)
    approvals.json   operator approvals of risky manifests (cage.policy, not this module)
    .lock            flock(2) held around every change, so threads and processes are serialised

A sealed file is ``version (1) | created_ns (8) | updated_ns (8) | nonce (12) | ciphertext + tag (16)``. The
associated data binds the header *and the secret's name* to the ciphertext, so renaming or swapping files, or
editing the times, makes opening fail instead of handing one secret out under another name.

An agent receives a secret only when its manifest lists it in ``credential_refs`` **and** an operator granted it
(:meth:`Vault.env_for`). Values never appear in logs, reprs, exception messages or status output: APIs that
return one wrap it in :class:`Secret`, and :class:`Credentials` keeps its environment out of ``repr``.
docs/vault.md has the threat model (in short: the key sits on the same disk, so this protects a copied blob, not a
copied disk).
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import hmac
import json
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NoReturn

from cage.terms import ENV_NAME_RE, NAME_RE, RESERVED_ENV_PREFIXES
from nullbox import durable
from nullbox.wire import ErrorCode, WireError

if TYPE_CHECKING:  # cryptography is imported when a secret is first sealed or opened, not at cage's start-up
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("cage.vault")

DEFAULT_ROOT: Final = Path("/var/lib/nullbox/vault")
KEY_NAME: Final = "key"
SECRETS_DIR: Final = "secrets"
GRANTS_NAME: Final = "grants.json"
LOCK_NAME: Final = ".lock"
TEMP_PREFIX: Final = ".vault-tmp-"  # distinct from cage.policy's temp files in the same directory

KEY_BYTES: Final = 32
KEY_MODE: Final = 0o400
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
FORMAT_VERSION: Final = 1
_HEADER: Final = struct.Struct(">BQQ")  # version, created_ns, updated_ns
HEADER_BYTES: Final = _HEADER.size + NONCE_BYTES
_AAD_PREFIX: Final = b"nullbox-vault\x00"

MAX_VALUE_BYTES: Final = 64 * 1024
MAX_BLOB_BYTES: Final = HEADER_BYTES + MAX_VALUE_BYTES + TAG_BYTES
MAX_GRANTS_BYTES: Final = 4 * 1024 * 1024
SECRET_NAME_RE: Final = ENV_NAME_RE  # names become environment variables in the guest

# How messages tell an operator to fix things; the CLI verbs live in nullctl, keep these in step with it.
SET_HINT: Final = "nullctl secret set {name}"
GRANT_HINT: Final = "nullctl secret grant {name} {agent}"


# --- errors: WireErrors, so the daemon can pass them to the caller as they are -------------------------------------


class VaultError(WireError):
    """A refused or failed vault operation; the message names secrets and agents, never a value."""

    default_code: ErrorCode = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(code or self.default_code, message)


class InvalidSecret(VaultError):
    """A bad secret name, value or agent name in a request."""


class SecretNotFound(VaultError):
    default_code = ErrorCode.NOT_FOUND


class SecretUnreadable(VaultError):
    """A sealed file that does not open: modified, renamed, truncated, or sealed under another key."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        super().__init__(f"vault secret {name} cannot be opened: {reason}")


class VaultUnavailable(VaultError):
    """The vault as a whole cannot be used (key refused, storage unusable) until an operator looks at it."""

    default_code = ErrorCode.UNAVAILABLE


class CredentialsRefused(VaultError):
    """An agent's manifest lists credentials it cannot have; raised by :meth:`Credentials.require`."""

    default_code = ErrorCode.FORBIDDEN


# --- values --------------------------------------------------------------------------------------------------------


class Secret:
    """A secret value that does not show itself: ``repr``/``str``/``format`` print a placeholder.

    Call :meth:`reveal` at the one place that needs the text (building the VM's environment). Equality is
    constant-time; pickling is refused so a value cannot leak into a queue or a crash dump by accident.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise InvalidSecret(f"a secret value must be a string, got {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    def __str__(self) -> str:
        return "<redacted>"

    def __format__(self, spec: str) -> str:
        return "<redacted>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogatepass"), other._value.encode("utf-8", "surrogatepass")
        )

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True)
class SecretInfo:
    """What :meth:`Vault.list` shows about a secret: everything except its value."""

    name: str
    created_ns: int
    updated_ns: int
    agents: tuple[str, ...]
    problem: str | None = None
    """Set when the file's header cannot be read (the secret cannot be opened either)."""

    @property
    def created_at(self) -> str:
        return _iso(self.created_ns)

    @property
    def updated_at(self) -> str:
        return _iso(self.updated_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": self.created_at,
            "created_ns": self.created_ns,
            "updated_at": self.updated_at,
            "updated_ns": self.updated_ns,
            "agents": list(self.agents),
            "ok": self.problem is None,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Credentials:
    """The credentials one agent gets, and the listed ones it does not (names only).

    ``env`` holds values; it is excluded from ``repr`` — hand it to the VM spec (which keeps it out of its repr
    too), never to a log. ``missing`` are listed but not in the vault, ``ungranted`` are in the vault but not
    granted to this agent; cage refuses to start the agent unless both are empty (:meth:`require`).
    """

    agent: str
    env: Mapping[str, str] = field(repr=False)
    missing: tuple[str, ...] = ()
    ungranted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))

    @property
    def ok(self) -> bool:
        return not self.missing and not self.ungranted

    def problems(self) -> list[str]:
        """One line per credential the agent cannot have, with the command that fixes it."""
        lines = [
            f"credential {name} is not in the vault (add it: {SET_HINT.format(name=name)})" for name in self.missing
        ]
        lines += [
            f"credential {name} is not granted to {self.agent} "
            f"(grant it: {GRANT_HINT.format(name=name, agent=self.agent)})"
            for name in self.ungranted
        ]
        return lines

    def require(self) -> Mapping[str, str]:
        """``env`` when every listed credential is available; otherwise :class:`CredentialsRefused` naming them."""
        if self.ok:
            return self.env
        code = ErrorCode.FORBIDDEN if self.ungranted else ErrorCode.NOT_FOUND
        raise CredentialsRefused(f"agent {self.agent} cannot start: " + "; ".join(self.problems()), code)


# --- the vault -----------------------------------------------------------------------------------------------------


class Vault:
    """Secrets and grants under ``root``; safe to use from several threads and processes at once."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root
        self.secrets_dir = root / SECRETS_DIR
        self.key_path = root / KEY_NAME
        self.grants_path = root / GRANTS_NAME
        self._aead: AESGCM | None = None
        self._key_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Vault({str(self.root)!r})"

    # --- operations ---------------------------------------------------------------------------------------------

    def set(self, name: str, value: str | Secret) -> SecretInfo:
        """Create or replace a secret. A new secret starts with no grants."""
        check_secret_name(name)
        text = value.reveal() if isinstance(value, Secret) else value
        _check_value(text)
        with self._locked(create=True):
            aead = self._key(create=True)
            path = self.secrets_dir / name
            now = time.time_ns()
            created = now
            existed = _exists(path)
            if existed:
                with suppress(VaultError):
                    created = _read_header(path, name)[1]
            else:
                # grants of an earlier secret of this name (a crash during remove) must not carry over
                grants = self._read_grants()
                if grants.pop(name, None) is not None:
                    self._write_grants(grants)
            durable.write_atomically(
                path, _seal(aead, name, text, created, now), mode=FILE_MODE, temp_prefix=TEMP_PREFIX
            )
            log.info("vault: %s secret %s", "replaced" if existed else "created", name)
            return SecretInfo(name, created, now, tuple(self._read_grants().get(name, ())))

    def get(self, name: str) -> Secret:
        """A secret's value, wrapped (for tests and tools; agents get theirs through :meth:`env_for`)."""
        check_secret_name(name)
        with self._locked(shared=True):
            path = self.secrets_dir / name
            if not _exists(path):
                raise SecretNotFound(f"no vault secret named {name}")
            return Secret(self._open(path, name))

    def list(self) -> builtins.list[SecretInfo]:
        """Every secret with its times and grantees, sorted by name; never values (no key is needed)."""
        if not self.secrets_dir.is_dir():
            return []
        with self._locked(shared=True):
            grants = self._read_grants()
            infos: builtins.list[SecretInfo] = []
            for name in self._names():
                agents = tuple(grants.get(name, ()))
                try:
                    _, created, updated = _read_header(self.secrets_dir / name, name)
                except VaultError as exc:
                    infos.append(SecretInfo(name, 0, 0, agents, problem=exc.message))
                    continue
                infos.append(SecretInfo(name, created, updated, agents))
            return infos

    def grant(self, name: str, agent: str) -> bool:
        """Allow ``agent`` to receive secret ``name`` (if its manifest lists it); False when it already could."""
        check_secret_name(name)
        check_agent_name(agent)
        with self._locked(create=True):
            if not _exists(self.secrets_dir / name):
                raise SecretNotFound(f"no vault secret named {name}; add it first: {SET_HINT.format(name=name)}")
            grants = self._read_grants()
            agents = grants.setdefault(name, [])
            if agent in agents:
                return False
            agents.append(agent)
            self._write_grants(grants)
            log.info("vault: granted %s to agent %s", name, agent)
            return True

    def revoke(self, name: str, agent: str) -> bool:
        """Stop ``agent`` receiving secret ``name`` (from its next start); False when it was not granted."""
        check_secret_name(name)
        check_agent_name(agent)
        with self._locked(create=True):
            grants = self._read_grants()
            agents = grants.get(name, [])
            if agent not in agents:
                if not _exists(self.secrets_dir / name):
                    raise SecretNotFound(f"no vault secret named {name}")
                return False
            agents.remove(agent)
            if not agents:
                del grants[name]
            self._write_grants(grants)
            log.info("vault: revoked %s from agent %s", name, agent)
            return True

    def forget_agent(self, agent: str) -> builtins.list[str]:
        """Drop every grant of ``agent`` (call when it is removed, so a later agent of that name starts clean)."""
        check_agent_name(agent)
        if not self.root.is_dir():
            return []
        with self._locked(create=True):
            grants = self._read_grants()
            dropped = sorted(name for name, agents in grants.items() if agent in agents)
            if dropped:
                for name in dropped:
                    grants[name].remove(agent)
                    if not grants[name]:
                        del grants[name]
                self._write_grants(grants)
                log.info("vault: dropped the grants of agent %s: %s", agent, ", ".join(dropped))
            return dropped

    def remove(self, name: str) -> None:
        """Delete a secret and its grants (grants first: a crash in between leaves an ungranted secret)."""
        check_secret_name(name)
        with self._locked(create=True):
            path = self.secrets_dir / name
            if not _exists(path):
                raise SecretNotFound(f"no vault secret named {name}")
            grants = self._read_grants()
            if grants.pop(name, None) is not None:
                self._write_grants(grants)
            path.unlink()
            durable.fsync_dir(self.secrets_dir)
            log.info("vault: removed secret %s", name)

    def env_for(self, agent: str, credential_refs: Iterable[str]) -> Credentials:
        """The environment ``agent`` gets: each listed credential that exists and is granted to it.

        Listed-but-missing and listed-but-ungranted names are reported in the result, not raised, so cage can
        name all of them at once (:meth:`Credentials.require`). A sealed file that fails to open raises
        :class:`SecretUnreadable` naming the secret.
        """
        check_agent_name(agent)
        refs = list(dict.fromkeys(credential_refs))
        for ref in refs:
            check_secret_name(ref)
        if not refs:
            return Credentials(agent, {})
        if not self.secrets_dir.is_dir():
            return Credentials(agent, {}, missing=tuple(refs))
        env: dict[str, str] = {}
        missing: builtins.list[str] = []
        ungranted: builtins.list[str] = []
        with self._locked(shared=True):
            grants = self._read_grants()
            for ref in refs:
                path = self.secrets_dir / ref
                if not _exists(path):
                    missing.append(ref)
                elif agent not in grants.get(ref, ()):
                    ungranted.append(ref)
                else:
                    env[ref] = self._open(path, ref)
        return Credentials(agent, env, tuple(missing), tuple(ungranted))

    # --- internals ----------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, *, create: bool = False, shared: bool = False) -> Iterator[None]:
        if create:
            self._prepare_dirs()
        elif not self.root.is_dir():
            yield
            return
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise VaultUnavailable(f"cannot open the vault lock {self.root / LOCK_NAME}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            if not shared:
                durable.remove_temp_files(self.root, TEMP_PREFIX)
                durable.remove_temp_files(self.secrets_dir, TEMP_PREFIX)
            yield
        except OSError as exc:
            # a failing disk: name the file (a secret's name at most), never what was being written
            where = f" ({exc.filename})" if exc.filename else ""
            raise VaultUnavailable(f"vault storage failed{where}: {exc.strerror or type(exc).__name__}") from None
        finally:
            os.close(fd)

    def _prepare_dirs(self) -> None:
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            for directory in (self.root, self.secrets_dir):
                with suppress(FileExistsError):
                    directory.mkdir(mode=DIR_MODE)
                _check_dir(directory)
        except OSError as exc:
            raise VaultUnavailable(f"cannot prepare the vault directory {self.root}: {exc.strerror}") from None

    def _names(self) -> builtins.list[str]:
        if not self.secrets_dir.is_dir():
            return []
        return sorted(e.name for e in os.scandir(self.secrets_dir) if SECRET_NAME_RE.fullmatch(e.name))

    def _key(self, *, create: bool) -> AESGCM:
        with self._key_lock:
            if self._aead is None:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415 (see above)

                self._aead = AESGCM(self._load_key(create=create))
            return self._aead

    def _load_key(self, *, create: bool) -> bytes:
        """The key, checked; made (exclusively, all or nothing) only while no sealed secret exists."""
        path = self.key_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            sealed = self._names()
            if sealed:
                raise VaultUnavailable(
                    f"the vault key {path} is missing but {len(sealed)} sealed secret(s) exist "
                    f"({', '.join(sealed[:5])}{', ...' if len(sealed) > 5 else ''}); they cannot be opened without "
                    "it. Restore the key file, or remove those secrets before adding new ones"
                ) from None
            if not create:
                raise VaultUnavailable(f"the vault key {path} does not exist yet") from None
            return _create_key(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise VaultUnavailable(f"the vault key {path} is a symlink; refusing to use it") from None
            raise VaultUnavailable(f"cannot read the vault key {path}: {exc.strerror}") from None
        try:
            return _read_key(fd, path)
        finally:
            os.close(fd)

    def _open(self, path: Path, name: str) -> str:
        blob = _read_blob(path, name)
        return _unseal(self._key(create=False), name, blob)

    def _read_grants(self) -> dict[str, builtins.list[str]]:
        path = self.grants_path
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_GRANTS_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise VaultUnavailable(f"cannot read {path}: {exc.strerror}") from None
        try:
            if len(raw) > MAX_GRANTS_BYTES:
                raise ValueError("too large")  # noqa: TRY301 - one message for every malformed file
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")  # noqa: TRY301
            grants: dict[str, builtins.list[str]] = {}
            for name, agents in data.items():
                if not SECRET_NAME_RE.fullmatch(name) or not isinstance(agents, list):
                    raise ValueError("bad entry")  # noqa: TRY301
                if not all(isinstance(a, str) and NAME_RE.fullmatch(a) for a in agents):
                    raise ValueError("bad agent")  # noqa: TRY301
                grants[name] = sorted(set(agents))
        except (ValueError, TypeError):
            raise VaultUnavailable(
                f"{path} is not a valid grants file (a JSON object of secret name to a list of agent names)"
            ) from None
        return grants

    def _write_grants(self, grants: Mapping[str, Iterable[str]]) -> None:
        data = {name: sorted(set(agents)) for name, agents in sorted(grants.items()) if agents}
        durable.write_atomically(
            self.grants_path,
            (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
            mode=FILE_MODE,
            temp_prefix=TEMP_PREFIX,
        )


# --- names and values ----------------------------------------------------------------------------------------------


def check_secret_name(name: object) -> str:
    """A secret name from a request; the name itself is not echoed (it may be a value typed in the wrong place)."""
    if not isinstance(name, str) or SECRET_NAME_RE.fullmatch(name) is None:
        raise InvalidSecret(
            "secret names are environment variable names: 1-128 characters of A-Z a-z 0-9 _, not starting with a digit"
        )
    for prefix in RESERVED_ENV_PREFIXES:
        if name.startswith(prefix):
            raise InvalidSecret(f"secret names may not start with {prefix}: cage sets those variables itself")
    return name


def check_agent_name(agent: object) -> str:
    if not isinstance(agent, str) or NAME_RE.fullmatch(agent) is None:
        raise InvalidSecret("agent names are 1-64 characters of A-Z a-z 0-9 _ -")
    return agent


def _check_value(value: object) -> None:
    """Refuse a value that cannot be an environment variable; messages describe it, never quote it."""
    if not isinstance(value, str):
        raise InvalidSecret(f"a secret value must be a string, got {type(value).__name__}")
    problem: str | None = None
    if "\x00" in value:
        problem = "a secret value must not contain NUL characters"
    elif any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        problem = "a secret value must be valid Unicode text (it contains a lone surrogate)"
    elif len(value.encode()) > MAX_VALUE_BYTES:
        problem = f"a secret value may be at most {MAX_VALUE_BYTES} bytes (UTF-8); this one is larger"
    if problem is not None:
        raise InvalidSecret(problem)


# --- sealing -------------------------------------------------------------------------------------------------------


def _aad(header: bytes, name: str) -> bytes:
    return _AAD_PREFIX + header + name.encode()


def _seal(aead: AESGCM, name: str, value: str, created_ns: int, updated_ns: int) -> bytes:
    """Encrypt ``value`` under a fresh random nonce, bound to ``name`` and the header."""
    header = _HEADER.pack(FORMAT_VERSION, created_ns, updated_ns) + os.urandom(NONCE_BYTES)
    nonce = header[_HEADER.size :]
    return header + aead.encrypt(nonce, value.encode(), _aad(header[: _HEADER.size], name))


def _unseal(aead: AESGCM, name: str, blob: bytes) -> str:
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415 (loaded with AESGCM, see the imports)

    _parse_header(blob, name)
    nonce = blob[_HEADER.size : HEADER_BYTES]
    try:
        plain = aead.decrypt(nonce, blob[HEADER_BYTES:], _aad(blob[: _HEADER.size], name))
    except InvalidTag:
        raise SecretUnreadable(
            name,
            "authentication failed (the file was modified, renamed from another secret, or sealed with another key)",
        ) from None
    try:
        return plain.decode()
    except UnicodeDecodeError:
        raise SecretUnreadable(name, "the decrypted value is not UTF-8") from None


def _parse_header(blob: bytes, name: str) -> tuple[int, int, int]:
    if len(blob) < HEADER_BYTES + TAG_BYTES:
        raise SecretUnreadable(name, f"the file is truncated ({len(blob)} bytes)")
    if len(blob) > MAX_BLOB_BYTES:
        raise SecretUnreadable(name, f"the file is larger than any sealed secret ({len(blob)} bytes)")
    version, created, updated = _HEADER.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise SecretUnreadable(name, f"unknown format version {version} (this cage reads {FORMAT_VERSION})")
    return version, created, updated


def _read_blob(path: Path, name: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretNotFound(f"no vault secret named {name}") from None
    except OSError as exc:
        raise SecretUnreadable(name, f"cannot read {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SecretUnreadable(name, f"{path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(MAX_BLOB_BYTES + 1)
    finally:
        os.close(fd)


def _read_header(path: Path, name: str) -> tuple[int, int, int]:
    return _parse_header(_read_blob(path, name), name)


# --- the key -------------------------------------------------------------------------------------------------------


def _read_key(fd: int, path: Path) -> bytes:
    st = os.fstat(fd)
    problems: list[str] = []
    if not stat.S_ISREG(st.st_mode):
        problems.append("is not a regular file")
    if st.st_uid != os.geteuid():
        problems.append(f"is owned by uid {st.st_uid}, not {os.geteuid()}")
    if stat.S_IMODE(st.st_mode) != KEY_MODE:
        problems.append(f"has mode {stat.S_IMODE(st.st_mode):04o}, not {KEY_MODE:04o}")
    if st.st_size != KEY_BYTES:
        problems.append(f"is {st.st_size} bytes, not {KEY_BYTES}")
    if problems:
        raise VaultUnavailable(
            f"the vault key {path} {' and '.join(problems)}; refusing to use it (it may have been exposed or "
            "damaged). It is not replaced automatically: a new key would make every sealed secret unreadable"
        )
    key = b""
    while len(key) < KEY_BYTES:
        chunk = os.read(fd, KEY_BYTES - len(key))
        if not chunk:
            raise VaultUnavailable(f"the vault key {path} ended early")
        key += chunk
    return key


def _create_key(path: Path) -> bytes:
    """Write a new key under a temporary name, fsync it, then link it into place (fails if one appeared)."""
    key = os.urandom(KEY_BYTES)
    directory = path.parent
    tmp = directory / f"{TEMP_PREFIX}key-{os.urandom(8).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, KEY_MODE)
    try:
        try:
            os.fchmod(fd, KEY_MODE)  # regardless of the umask
            durable.write_all(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.info("vault: another process created the key first; using it")
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return _read_key(fd, path)
            finally:
                os.close(fd)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()
        durable.fsync_dir(directory)
    log.info("vault: created a new key at %s", path)
    return key


# --- files ---------------------------------------------------------------------------------------------------------


def _check_dir(path: Path) -> None:
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise VaultUnavailable(f"{path} is not a directory (a symlink or file is not accepted)")
    if st.st_uid != os.geteuid():
        raise VaultUnavailable(f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}; refusing to use it")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        log.warning("vault: %s had mode %04o; setting %04o", path, stat.S_IMODE(st.st_mode), DIR_MODE)
        path.chmod(DIR_MODE)


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")
