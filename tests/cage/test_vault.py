"""The credential vault: the key, sealing, grants, env_for, and that values never leak."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import stat
import threading
from pathlib import Path

import pytest

from cage import vault as vault_module
from cage.vault import (
    HEADER_BYTES,
    KEY_BYTES,
    MAX_VALUE_BYTES,
    CredentialsRefused,
    InvalidSecret,
    Secret,
    SecretNotFound,
    SecretUnreadable,
    Vault,
    VaultUnavailable,
)
from nullbox.wire import ErrorCode

VALUE = "sk-live-9f8e7d6c5b4a-do-not-leak"
OTHER = "ghp_another-secret-value-0123456789"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "vault"


@pytest.fixture
def vault(root: Path) -> Vault:
    return Vault(root)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def leftovers(root: Path) -> list[str]:
    found = []
    for directory in (root, root / "secrets"):
        found += [p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    return found


def assert_no_value(text: str, *values: str) -> None:
    for value in values or (VALUE, OTHER):
        assert value not in text


# --- the key ----------------------------------------------------------------------------------------------------


def test_first_set_creates_key_and_directories_with_tight_modes(vault: Vault, root: Path) -> None:
    assert not root.exists()
    vault.set("OPENAI_API_KEY", VALUE)
    key = root / "key"
    assert mode(root) == 0o700
    assert mode(root / "secrets") == 0o700
    assert mode(key) == 0o400
    assert key.stat().st_size == KEY_BYTES
    assert key.stat().st_uid == os.geteuid()
    assert mode(root / "secrets" / "OPENAI_API_KEY") == 0o600
    assert leftovers(root) == []


def test_key_is_created_once_and_reused(vault: Vault, root: Path) -> None:
    vault.set("A", VALUE)
    key = (root / "key").read_bytes()
    inode = (root / "key").stat().st_ino
    again = Vault(root)
    again.set("B", OTHER)
    assert (root / "key").read_bytes() == key
    assert (root / "key").stat().st_ino == inode
    assert again.get("A").reveal() == VALUE
    assert Vault(root).get("B").reveal() == OTHER


def test_key_with_loose_mode_is_refused_not_replaced(vault: Vault, root: Path) -> None:
    vault.set("A", VALUE)
    key = root / "key"
    before = key.read_bytes()
    key.chmod(0o644)
    fresh = Vault(root)
    with pytest.raises(VaultUnavailable) as info:
        fresh.get("A")
    assert info.value.code == ErrorCode.UNAVAILABLE
    assert "mode 0644" in info.value.message and str(key) in info.value.message
    with pytest.raises(VaultUnavailable):
        fresh.set("B", OTHER)
    assert key.read_bytes() == before
    assert mode(key) == 0o644


def test_key_with_wrong_size_is_refused(vault: Vault, root: Path) -> None:
    vault.set("A", VALUE)
    key = root / "key"
    key.chmod(0o600)
    key.write_bytes(b"x" * 31)
    key.chmod(0o400)
    with pytest.raises(VaultUnavailable, match="31 bytes, not 32"):
        Vault(root).get("A")
    assert key.read_bytes() == b"x" * 31


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_key_with_wrong_owner_is_refused(vault: Vault, root: Path) -> None:
    vault.set("A", VALUE)
    os.chown(root / "key", 65534, 65534)
    with pytest.raises(VaultUnavailable, match="owned by uid 65534"):
        Vault(root).get("A")


def test_key_that_is_a_symlink_is_refused(vault: Vault, root: Path, tmp_path: Path) -> None:
    vault.set("A", VALUE)
    real = tmp_path / "elsewhere"
    (root / "key").rename(real)
    (root / "key").symlink_to(real)
    with pytest.raises(VaultUnavailable, match="symlink"):
        Vault(root).get("A")


def test_missing_key_with_sealed_secrets_is_refused_not_regenerated(vault: Vault, root: Path) -> None:
    vault.set("A", VALUE)
    (root / "key").unlink()
    fresh = Vault(root)
    with pytest.raises(VaultUnavailable, match="missing") as info:
        fresh.set("B", OTHER)
    assert "A" in info.value.message
    assert not (root / "key").exists()
    fresh.grant("A", "bot")
    with pytest.raises(VaultUnavailable):
        fresh.env_for("bot", ["A"])
    # removing the unreadable secrets lets the vault start over with a new key
    fresh.remove("A")
    fresh.set("B", OTHER)
    assert fresh.get("B").reveal() == OTHER


# --- sealing ----------------------------------------------------------------------------------------------------


def test_round_trip_and_replace(vault: Vault, root: Path) -> None:
    for value in (VALUE, "", "ünïcødé ✓ \n\t multi-line", "x" * MAX_VALUE_BYTES):
        info = vault.set("TOKEN", value)
        assert vault.get("TOKEN").reveal() == value
        assert Vault(root).get("TOKEN").reveal() == value
        assert info.name == "TOKEN"
    first = vault.list()[0]
    replaced = vault.set("TOKEN", OTHER)
    assert replaced.created_ns == first.created_ns
    assert replaced.updated_ns >= first.updated_ns
    assert vault.get("TOKEN").reveal() == OTHER
    assert vault.set("TOKEN", Secret(VALUE)).name == "TOKEN"
    assert vault.get("TOKEN") == Secret(VALUE)


def test_blob_is_not_plaintext(vault: Vault, root: Path) -> None:
    vault.set("TOKEN", VALUE)
    blob = (root / "secrets" / "TOKEN").read_bytes()
    assert VALUE.encode() not in blob
    assert blob[0] == vault_module.FORMAT_VERSION
    assert len(blob) == HEADER_BYTES + len(VALUE) + vault_module.TAG_BYTES


def test_name_is_bound_renamed_blob_does_not_open(vault: Vault, root: Path) -> None:
    vault.set("A", VALUE)
    vault.set("B", OTHER)
    secrets = root / "secrets"
    (secrets / "A").replace(secrets / "B")  # an attacker swaps A's blob in as B
    with pytest.raises(SecretUnreadable) as info:
        vault.get("B")
    assert info.value.name == "B"
    assert "B" in info.value.message and "authentication failed" in info.value.message
    assert info.value.code == ErrorCode.INTERNAL
    assert_no_value(str(info.value))
    vault.grant("B", "bot")
    with pytest.raises(SecretUnreadable):
        vault.env_for("bot", ["B"])


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(-1, id="tag"),
        pytest.param(HEADER_BYTES, id="ciphertext"),
        pytest.param(HEADER_BYTES - 1, id="nonce"),
        pytest.param(5, id="created-time"),
        pytest.param(13, id="updated-time"),
    ],
)
def test_tampered_blob_is_detected(vault: Vault, root: Path, offset: int) -> None:
    vault.set("TOKEN", VALUE)
    path = root / "secrets" / "TOKEN"
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(SecretUnreadable, match="TOKEN") as info:
        vault.get("TOKEN")
    assert_no_value(str(info.value))


def test_truncated_or_unknown_version_blob_is_reported(vault: Vault, root: Path) -> None:
    vault.set("TOKEN", VALUE)
    path = root / "secrets" / "TOKEN"
    blob = path.read_bytes()
    path.write_bytes(bytes([9]) + blob[1:])
    with pytest.raises(SecretUnreadable, match="unknown format version 9"):
        vault.get("TOKEN")
    path.write_bytes(blob[:20])
    with pytest.raises(SecretUnreadable, match="truncated"):
        vault.get("TOKEN")
    [info] = vault.list()
    assert info.problem is not None and "truncated" in info.problem
    assert info.to_json()["ok"] is False


def test_nonces_are_fresh_for_every_seal(vault: Vault, root: Path) -> None:
    nonces = set()
    blobs = set()
    for _ in range(200):
        vault.set("TOKEN", VALUE)
        blob = (root / "secrets" / "TOKEN").read_bytes()
        nonces.add(blob[HEADER_BYTES - 12 : HEADER_BYTES])
        blobs.add(blob[HEADER_BYTES:])
    vault.set("OTHER_NAME", VALUE)
    nonces.add((root / "secrets" / "OTHER_NAME").read_bytes()[HEADER_BYTES - 12 : HEADER_BYTES])
    assert len(nonces) == 201
    assert len(blobs) == 200


# --- names and values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "1ABC", "A-B", "A.B", "../key", "a/b", ".lock", "x" * 129, "NULLBOX_TOKEN", "KRUN_X", "ÄB"]
)
def test_bad_secret_names_are_refused(vault: Vault, name: str) -> None:
    with pytest.raises(InvalidSecret) as info:
        vault.set(name, VALUE)
    assert info.value.code == ErrorCode.INVALID_REQUEST


def test_name_error_does_not_echo_what_may_be_a_value(vault: Vault) -> None:
    with pytest.raises(InvalidSecret) as info:
        vault.set(VALUE, "OPENAI_API_KEY")  # arguments swapped by mistake
    assert_no_value(str(info.value))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (VALUE + "\x00", "NUL"),
        ("x" * (MAX_VALUE_BYTES + 1), "at most"),
        ("é" * (MAX_VALUE_BYTES // 2 + 1), "at most"),
        (VALUE + "\udc80", "surrogate"),
    ],
)
def test_bad_values_are_refused_without_quoting_them(vault: Vault, value: str, words: str) -> None:
    with pytest.raises(InvalidSecret, match=words) as info:
        vault.set("TOKEN", value)
    assert_no_value(str(info.value))
    assert info.value.__cause__ is None


def test_non_string_value_is_refused(vault: Vault) -> None:
    with pytest.raises(InvalidSecret, match="must be a string"):
        vault.set("TOKEN", b"bytes")  # type: ignore[arg-type]


def test_secret_wrapper_redacts_itself() -> None:
    secret = Secret(VALUE)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % secret, repr([secret])):  # noqa: UP031
        assert_no_value(text)
    assert secret.reveal() == VALUE
    assert secret == Secret(VALUE)
    assert secret != Secret(OTHER)
    assert len(secret) == len(VALUE)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(AttributeError):
        secret._value = OTHER
    with pytest.raises(TypeError):
        hash(secret)


# --- list and grants --------------------------------------------------------------------------------------------


def test_list_shows_names_times_and_grants_never_values(vault: Vault) -> None:
    assert vault.list() == []
    vault.set("B_TOKEN", OTHER)
    vault.set("A_TOKEN", VALUE)
    vault.grant("A_TOKEN", "writer")
    vault.grant("A_TOKEN", "researcher")
    infos = vault.list()
    assert [i.name for i in infos] == ["A_TOKEN", "B_TOKEN"]
    assert infos[0].agents == ("researcher", "writer")
    assert infos[1].agents == ()
    assert infos[0].created_ns > 0 and infos[0].created_at.endswith("+00:00")
    dumped = json.dumps([i.to_json() for i in infos]) + repr(infos) + str(infos)
    assert_no_value(dumped)
    assert set(infos[0].to_json()) == {
        "name",
        "created_at",
        "created_ns",
        "updated_at",
        "updated_ns",
        "agents",
        "ok",
        "problem",
    }


def test_grant_and_revoke(vault: Vault, root: Path) -> None:
    with pytest.raises(SecretNotFound) as info:
        vault.grant("TOKEN", "bot")
    assert info.value.code == ErrorCode.NOT_FOUND
    vault.set("TOKEN", VALUE)
    assert vault.grant("TOKEN", "zeta") is True
    assert vault.grant("TOKEN", "alpha") is True
    assert vault.grant("TOKEN", "alpha") is False
    assert json.loads((root / "grants.json").read_text()) == {"TOKEN": ["alpha", "zeta"]}
    assert mode(root / "grants.json") == 0o600
    assert vault.revoke("TOKEN", "zeta") is True
    assert vault.revoke("TOKEN", "zeta") is False
    assert vault.revoke("TOKEN", "alpha") is True
    assert json.loads((root / "grants.json").read_text()) == {}
    with pytest.raises(SecretNotFound):
        vault.revoke("NOPE", "alpha")
    with pytest.raises(InvalidSecret):
        vault.grant("TOKEN", "../etc")


def test_remove_drops_grants_and_a_new_secret_starts_ungranted(vault: Vault, root: Path) -> None:
    vault.set("TOKEN", VALUE)
    vault.grant("TOKEN", "bot")
    vault.remove("TOKEN")
    assert not (root / "secrets" / "TOKEN").exists()
    assert json.loads((root / "grants.json").read_text()) == {}
    with pytest.raises(SecretNotFound):
        vault.remove("TOKEN")
    with pytest.raises(SecretNotFound):
        vault.get("TOKEN")
    vault.set("TOKEN", OTHER)
    assert vault.list()[0].agents == ()


def test_stale_grants_do_not_carry_over_to_a_new_secret(vault: Vault, root: Path) -> None:
    vault.set("OTHER_TOKEN", VALUE)
    (root / "grants.json").write_text(json.dumps({"TOKEN": ["bot"], "OTHER_TOKEN": ["bot"]}))
    vault.set("TOKEN", OTHER)
    assert json.loads((root / "grants.json").read_text()) == {"OTHER_TOKEN": ["bot"]}


def test_forget_agent_drops_all_its_grants(vault: Vault) -> None:
    vault.set("A", VALUE)
    vault.set("B", OTHER)
    vault.grant("A", "bot")
    vault.grant("B", "bot")
    vault.grant("B", "other")
    assert vault.forget_agent("bot") == ["A", "B"]
    assert [i.agents for i in vault.list()] == [(), ("other",)]
    assert vault.forget_agent("bot") == []


def test_corrupt_grants_file_is_reported(vault: Vault, root: Path) -> None:
    vault.set("A", VALUE)
    (root / "grants.json").write_text('{"A": "bot"}')
    with pytest.raises(VaultUnavailable, match=r"grants\.json"):
        vault.list()


# --- env_for ----------------------------------------------------------------------------------------------------


def test_env_for_gives_only_listed_and_granted(vault: Vault) -> None:
    vault.set("LISTED_GRANTED", VALUE)
    vault.set("LISTED_UNGRANTED", OTHER)
    vault.set("GRANTED_ELSEWHERE", OTHER)
    vault.set("GRANTED_UNLISTED", OTHER)
    vault.grant("LISTED_GRANTED", "bot")
    vault.grant("GRANTED_ELSEWHERE", "someone-else")
    vault.grant("GRANTED_UNLISTED", "bot")
    creds = vault.env_for("bot", ["LISTED_GRANTED", "LISTED_UNGRANTED", "MISSING", "GRANTED_ELSEWHERE"])
    assert dict(creds.env) == {"LISTED_GRANTED": VALUE}
    assert creds.missing == ("MISSING",)
    assert creds.ungranted == ("LISTED_UNGRANTED", "GRANTED_ELSEWHERE")
    assert not creds.ok
    assert_no_value(repr(creds))
    with pytest.raises(CredentialsRefused) as info:
        creds.require()
    assert info.value.code == ErrorCode.FORBIDDEN
    message = info.value.message
    for name in ("MISSING", "LISTED_UNGRANTED", "GRANTED_ELSEWHERE", "bot"):
        assert name in message
    assert "LISTED_GRANTED" not in message and "GRANTED_UNLISTED" not in message
    assert_no_value(message)
    with pytest.raises(TypeError):
        creds.env["X"] = "y"  # type: ignore[index]


def test_env_for_all_present(vault: Vault) -> None:
    vault.set("A", VALUE)
    vault.set("B", OTHER)
    vault.grant("A", "bot")
    vault.grant("B", "bot")
    creds = vault.env_for("bot", ["B", "A", "B"])
    assert creds.ok
    assert dict(creds.require()) == {"A": VALUE, "B": OTHER}
    assert dict(vault.env_for("bot", []).require()) == {}


def test_env_for_only_missing_is_not_found(vault: Vault) -> None:
    creds = vault.env_for("bot", ["NOT_THERE"])  # nothing exists yet, not even the directory
    assert creds.missing == ("NOT_THERE",)
    with pytest.raises(CredentialsRefused) as info:
        creds.require()
    assert info.value.code == ErrorCode.NOT_FOUND
    assert "nullctl secret set NOT_THERE" in info.value.message


# --- nothing leaks into logs ------------------------------------------------------------------------------------


def test_values_never_reach_logs(vault: Vault, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    vault.set("A", VALUE)
    vault.set("A", OTHER)
    vault.set("B", VALUE)
    vault.grant("A", "bot")
    vault.grant("B", "bot")
    vault.env_for("bot", ["A", "B", "C"])
    vault.list()
    vault.revoke("B", "bot")
    vault.forget_agent("bot")
    vault.remove("B")
    (root / "secrets" / "A").write_bytes(b"\x01" + b"\x00" * 60)
    with pytest.raises(SecretUnreadable) as info:
        vault.get("A")
    logging.getLogger("test").exception("what a daemon might log", exc_info=info.value)
    assert caplog.records, "the vault logs its changes"
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert_no_value(text)
    assert "A" in caplog.text


# --- concurrency and atomicity ----------------------------------------------------------------------------------


def _hammer(root: str, worker: int, rounds: int) -> None:
    v = Vault(Path(root))
    for i in range(rounds):
        v.set("SHARED", f"value-{worker}-{i}")
        v.set(f"OWN_{worker}", f"own-{worker}-{i}")
        v.grant("SHARED", f"agent-{worker}-{i}")


def test_concurrent_set_from_processes_does_not_corrupt(root: Path) -> None:
    context = multiprocessing.get_context("fork")
    rounds = 40
    workers = [context.Process(target=_hammer, args=(str(root), w, rounds)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    vault = Vault(root)
    assert vault.get("SHARED").reveal().startswith("value-")
    for w in range(3):
        assert vault.get(f"OWN_{w}").reveal() == f"own-{w}-{rounds - 1}"
    [shared] = [i for i in vault.list() if i.name == "SHARED"]
    assert len(shared.agents) == 3 * rounds  # no read-modify-write of grants.json was lost
    assert leftovers(root) == []


def test_concurrent_threads_share_one_vault(root: Path) -> None:
    vault = Vault(root)
    vault.set("T", VALUE)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                vault.grant("T", f"agent-{n}-{i}")
                assert vault.get("T").reveal() == VALUE
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(vault.list()[0].agents) == 80


def test_failed_write_leaves_old_value_and_no_temp_file(
    vault: Vault, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.set("TOKEN", VALUE)
    real_fsync = os.fsync

    def broken_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(VaultUnavailable, match="Input/output") as info:
        vault.set("TOKEN", OTHER)
    assert_no_value(str(info.value))
    monkeypatch.undo()
    assert vault.get("TOKEN").reveal() == VALUE
    assert leftovers(root) == []


def test_stale_temp_files_are_cleaned_up(vault: Vault, root: Path) -> None:
    vault.set("TOKEN", VALUE)
    stale = root / "secrets" / f"{vault_module.TEMP_PREFIX}crashed"
    stale.write_bytes(b"half a blob")
    (root / f"{vault_module.TEMP_PREFIX}key-crashed").write_bytes(b"half a key")
    policy_temp = root / ".tmp-approvals.json-x"  # cage.policy's, under its own lock: not ours to delete
    policy_temp.write_bytes(b"{}")
    vault.set("OTHER", OTHER)
    assert leftovers(root) == [policy_temp.name]
    assert [i.name for i in vault.list()] == ["OTHER", "TOKEN"]


def test_loose_directory_mode_is_tightened(root: Path) -> None:
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    Vault(root).set("TOKEN", VALUE)
    assert mode(root) == 0o700
