"""The installed-agent store: install, atomic update, remove, list, show, and what it refuses."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from cage import agents
from cage.agents import (
    INSTALL_RECORD,
    AgentNotFound,
    AgentStore,
    InstalledAgent,
    InvalidAgentName,
    InvalidSource,
    StoreFailure,
    check_name,
)
from cage.terms import ManifestError, digest

MANIFEST = """[agent]
name = "{name}"
version = "{version}"
command = ["/agent/bin/{name}"]
rootfs = "{rootfs}"

[capabilities]
network.allow = ["api.openai.com"]
"""


def manifest(name: str = "researcher", version: str = "1.0.0", rootfs: str = "rootfs") -> str:
    return MANIFEST.format(name=name, version=version, rootfs=rootfs)


def make_source(base: Path, name: str = "researcher", version: str = "1.0.0", marker: str = "v1") -> Path:
    """An agent directory: AGENT.toml plus a small directory rootfs with links and a nested tree."""
    src = base / f"src-{name}-{version}"
    root = src / "rootfs"
    (root / "agent" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr" / "lib").mkdir(parents=True)
    program = root / "agent" / "bin" / name
    program.write_text(f"#!/bin/sh\necho {marker}\n")
    program.chmod(0o755)
    (root / "etc" / "version").write_text(marker)
    (root / f"only-in-{marker}").write_text(marker)
    (root / "bin").symlink_to("usr/bin")  # relative, inside
    (root / "usr" / "lib" / "sh").symlink_to("/bin/busybox")  # absolute: resolved inside the guest
    (root / "usr" / "lib" / "up").symlink_to("../../etc/version")  # climbs, but stays inside
    (root / "empty").mkdir()
    (src / "AGENT.toml").write_text(manifest(name, version))
    return src


@pytest.fixture
def store(tmp_path: Path) -> AgentStore:
    return AgentStore(tmp_path / "agents")


def leftovers(store: AgentStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith((".stage-", ".old-")))


# ---------------------------------------------------------------------------------------------- install


def test_apply_new_agent(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    result = store.apply(src)
    assert result.created and result.previous_sha256 is None and result.manifest_changed
    agent = result.agent
    assert agent.ok and agent.name == "researcher" and agent.path == store.root / "researcher"
    assert agent.manifest is not None and agent.manifest.agent.version == "1.0.0"
    assert agent.manifest_sha256 == digest((src / "AGENT.toml").read_bytes())
    assert agent.rootfs_kind == "dir" and agent.rootfs_path == store.root / "researcher" / "rootfs"
    assert agent.installed_ns is not None and agent.installed_at is not None and agent.installed_at.endswith("+00:00")
    installed = store.root / "researcher"
    assert (installed / "AGENT.toml").read_bytes() == (src / "AGENT.toml").read_bytes()
    rootfs = installed / "rootfs"
    assert (rootfs / "agent" / "bin" / "researcher").read_text() == "#!/bin/sh\necho v1\n"
    assert stat.S_IMODE((rootfs / "agent" / "bin" / "researcher").stat().st_mode) == 0o755
    assert os.readlink(rootfs / "usr" / "lib" / "sh") == "/bin/busybox"
    assert os.readlink(rootfs / "bin") == "usr/bin" and (rootfs / "empty").is_dir()
    record = json.loads((installed / INSTALL_RECORD).read_text())
    assert record["manifest_sha256"] == agent.manifest_sha256 and record["rootfs_kind"] == "dir"
    assert leftovers(store) == []
    assert store.show("researcher") == agent
    json.dumps(agent.to_json())


def test_apply_from_manifest_file_and_from_bytes(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    assert store.apply(src / "AGENT.toml").agent.ok
    raw = manifest("other").encode()
    result = store.apply(raw, src / "rootfs")
    assert result.created and result.agent.name == "other" and result.agent.manifest_sha256 == digest(raw)


def test_apply_squashfs_image(store: AgentStore, tmp_path: Path) -> None:
    src = tmp_path / "sq"
    src.mkdir()
    (src / "AGENT.toml").write_text(manifest(rootfs="rootfs.squashfs"))
    (src / "rootfs.squashfs").write_bytes(b"hsqs" + bytes(4092))
    agent = store.apply(src).agent
    assert agent.ok and agent.rootfs_kind == "squashfs"
    assert (store.root / "researcher" / "rootfs.squashfs").read_bytes()[:4] == b"hsqs"
    (src / "rootfs.squashfs").write_bytes(b"\x7fELF not an image")
    with pytest.raises(InvalidSource, match="lacks the 'hsqs' magic"):
        store.apply(src)


def test_install_strips_set_id_bits(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    program = src / "rootfs" / "agent" / "bin" / "researcher"
    program.chmod(0o4755)
    store.apply(src)
    assert stat.S_IMODE((store.root / "researcher" / "rootfs" / "agent" / "bin" / "researcher").stat().st_mode) == 0o755


def test_read_only_trees_install_and_remove(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    (src / "rootfs" / "etc").chmod(0o555)
    store.apply(src)
    assert stat.S_IMODE((store.root / "researcher" / "rootfs" / "etc").stat().st_mode) == 0o555
    store.remove("researcher")
    assert store.list() == []


# ---------------------------------------------------------------------------------------------- update


def test_apply_update_replaces_the_agent(store: AgentStore, tmp_path: Path) -> None:
    first = store.apply(make_source(tmp_path, version="1.0.0", marker="v1")).agent
    result = store.apply(make_source(tmp_path, version="2.0.0", marker="v2"))
    assert not result.created and result.previous_sha256 == first.manifest_sha256 and result.manifest_changed
    agent = store.show("researcher")
    assert agent.manifest is not None and agent.manifest.agent.version == "2.0.0"
    rootfs = store.root / "researcher" / "rootfs"
    assert (rootfs / "etc" / "version").read_text() == "v2"
    assert not (rootfs / "only-in-v1").exists() and (rootfs / "only-in-v2").exists()
    assert leftovers(store) == []


def test_reapplying_the_same_manifest_keeps_the_approval(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    store.apply(src)
    assert not store.apply(src).manifest_changed


def test_manifest_only_update_keeps_the_rootfs(store: AgentStore, tmp_path: Path) -> None:
    store.apply(make_source(tmp_path))
    program = store.root / "researcher" / "rootfs" / "agent" / "bin" / "researcher"
    inode = program.stat().st_ino
    result = store.apply(manifest(version="1.0.1").encode())
    assert result.agent.ok and result.agent.manifest is not None and result.agent.manifest.agent.version == "1.0.1"
    assert program.read_text() == "#!/bin/sh\necho v1\n" and program.stat().st_ino == inode  # hard-linked
    assert os.readlink(store.root / "researcher" / "rootfs" / "usr" / "lib" / "sh") == "/bin/busybox"
    with pytest.raises(InvalidSource, match="no rootfs given"):
        store.apply(manifest("newcomer").encode())


def test_failure_mid_copy_leaves_the_old_agent_intact(
    store: AgentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.apply(make_source(tmp_path, version="1.0.0", marker="v1")).agent
    real_copy = agents._copy_file
    calls = {"n": 0}

    def failing_copy(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(agents, "_copy_file", failing_copy)
    with pytest.raises(StoreFailure, match=r"nothing was changed: .*No space left") as caught:
        store.apply(make_source(tmp_path, version="2.0.0", marker="v2"))
    assert caught.value.code == "internal" and calls["n"] == 3
    after = store.show("researcher")
    assert after == before
    rootfs = store.root / "researcher" / "rootfs"
    assert (rootfs / "etc" / "version").read_text() == "v1" and (rootfs / "only-in-v1").exists()
    assert leftovers(store) == []


def test_failure_at_the_swap_leaves_the_old_agent_intact(
    store: AgentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.apply(make_source(tmp_path, version="1.0.0")).agent

    def broken_exchange(a: Path, b: Path) -> bool:
        raise OSError(errno.EIO, "Input/output error", str(b))

    monkeypatch.setattr(agents, "_exchange", broken_exchange)
    with pytest.raises(StoreFailure):
        store.apply(make_source(tmp_path, version="2.0.0"))
    assert store.show("researcher") == before and leftovers(store) == []


def test_invalid_update_leaves_the_old_agent_intact(store: AgentStore, tmp_path: Path) -> None:
    before = store.apply(make_source(tmp_path)).agent
    src = make_source(tmp_path, version="2.0.0")
    os.mkfifo(src / "rootfs" / "etc" / "pipe")
    with pytest.raises(InvalidSource, match=r"rootfs rootfs/etc/pipe: is a FIFO"):
        store.apply(src)
    assert store.show("researcher") == before and leftovers(store) == []


def test_update_without_rename_exchange(store: AgentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.apply(make_source(tmp_path, version="1.0.0"))
    monkeypatch.setattr(agents, "_exchange", lambda a, b: False)
    store.apply(make_source(tmp_path, version="2.0.0", marker="v2"))
    agent = store.show("researcher")
    assert agent.ok and agent.manifest is not None and agent.manifest.agent.version == "2.0.0"
    assert leftovers(store) == []


def test_recover_after_a_crash_between_the_two_renames(store: AgentStore, tmp_path: Path) -> None:
    before = store.apply(make_source(tmp_path)).agent
    aside = store.root / ".old-researcher-k2j4"
    aside.mkdir()
    (store.root / "researcher").rename(aside / "researcher")  # the old version moved aside ...
    stage = store.root / ".stage-researcher-x1y2"
    stage.mkdir()  # ... and the new one never made it
    repairs = store.recover()
    assert any("restored researcher" in r for r in repairs)
    assert store.show("researcher") == before and leftovers(store) == []


def test_concurrent_applies_are_serialised(store: AgentStore, tmp_path: Path) -> None:
    sources = [make_source(tmp_path, version=f"1.0.{i}", marker=f"m{i}") for i in range(6)]
    errors: list[BaseException] = []

    def run(src: Path) -> None:
        try:
            store.apply(src)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(src,)) for src in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    agent = store.show("researcher")
    assert agent.ok and agent.manifest is not None
    marker = (store.root / "researcher" / "rootfs" / "etc" / "version").read_text()
    assert agent.manifest.agent.version == f"1.0.{marker[1:]}"  # manifest and rootfs from the same apply
    assert leftovers(store) == []


# ---------------------------------------------------------------------------------------------- remove, list, show


def test_remove(store: AgentStore, tmp_path: Path) -> None:
    store.apply(make_source(tmp_path))
    removed = store.remove("researcher")
    assert removed.name == "researcher" and removed.ok
    assert not (store.root / "researcher").exists() and leftovers(store) == []
    with pytest.raises(AgentNotFound) as caught:
        store.show("researcher")
    assert caught.value.code == "not_found"
    with pytest.raises(AgentNotFound):
        store.remove("researcher")


def test_list(store: AgentStore, tmp_path: Path) -> None:
    assert store.list() == []
    for name in ("zeta", "alpha", "mid"):
        store.apply(make_source(tmp_path, name=name))
    (store.root / "lost+found").mkdir()
    (store.root / ".stray").mkdir()
    listed = store.list()
    assert [a.name for a in listed] == ["alpha", "mid", "zeta"] and all(a.ok for a in listed)


def test_broken_agents_are_listed_not_hidden(store: AgentStore, tmp_path: Path) -> None:
    store.apply(make_source(tmp_path))
    store.apply(make_source(tmp_path, name="other"))
    (store.root / "other" / "AGENT.toml").write_text(manifest("other") + "\n[capabilities.extra]\n")
    listed = {a.name: a for a in store.list()}
    broken = listed["other"]
    assert listed["researcher"].ok and not broken.ok and broken.manifest is None
    assert any(p.startswith("other/AGENT.toml: ") for p in broken.problems)
    with pytest.raises(ManifestError):
        broken.require()
    assert broken.to_json()["ok"] is False


def test_tampered_manifest_is_reported(store: AgentStore, tmp_path: Path) -> None:
    store.apply(make_source(tmp_path))
    path = store.root / "researcher" / "AGENT.toml"
    path.write_text(path.read_text().replace("1.0.0", "6.6.6"))
    agent = store.show("researcher")
    assert agent.manifest is not None and not agent.ok
    assert agent.manifest_sha256 == digest(path.read_bytes())
    assert any("changed after it was installed" in p for p in agent.problems)


def test_name_mismatch(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    with pytest.raises(ManifestError, match=r"agent.name: is 'researcher', but the request is for 'writer'"):
        store.apply(src, expect_name="writer")
    assert store.list() == []
    store.apply(src, expect_name="researcher")
    (store.root / "researcher").rename(store.root / "writer")
    agent = store.show("writer")
    assert not agent.ok and any("installed as 'writer'" in p for p in agent.problems)


def test_missing_rootfs_is_reported(store: AgentStore, tmp_path: Path) -> None:
    store.apply(make_source(tmp_path))
    agents._rmtree(store.root / "researcher" / "rootfs")
    agent = store.show("researcher")
    assert not agent.ok and agent.rootfs_kind is None
    assert any("the rootfs is missing" in p for p in agent.problems)


# ---------------------------------------------------------------------------------------------- hostile input

HOSTILE_NAMES = ["", ".", "..", "../etc", "a/b", "/etc", ".stage-x", ".lock", "a\x00b", " a", "a\n", "x" * 65, "é"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused(store: AgentStore, tmp_path: Path, name: str) -> None:
    store.apply(make_source(tmp_path))
    for call in (store.show, store.remove, store.path, check_name):
        with pytest.raises(InvalidAgentName, match="must be 1-64 characters"):
            call(name)
    with pytest.raises(InvalidAgentName):
        check_name(5)
    assert [a.name for a in store.list()] == ["researcher"]


def test_hostile_manifest_name_is_refused(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    (src / "AGENT.toml").write_text(manifest().replace('name = "researcher"', 'name = "../../etc"'))
    with pytest.raises(ManifestError, match=r"agent.name: must be 1-64"):
        store.apply(src)
    assert not store.root.exists() or store.list() == []


def test_escaping_symlinks_are_refused(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    (src / "rootfs" / "usr" / "lib" / "evil").symlink_to("../../../../etc/shadow")
    with pytest.raises(InvalidSource, match=r"rootfs/usr/lib/evil: symlink target '../../../../etc/shadow' leaves"):
        store.apply(src)
    assert leftovers(store) == []


def test_rootfs_must_not_be_a_symlink(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    real = tmp_path / "elsewhere"
    (src / "rootfs").rename(real)
    (src / "rootfs").symlink_to(real)
    with pytest.raises(InvalidSource, match="not a symlink"):
        store.apply(src)


def test_manifest_must_not_be_a_symlink(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    (tmp_path / "real.toml").write_text(manifest())
    (src / "AGENT.toml").unlink()
    (src / "AGENT.toml").symlink_to(tmp_path / "real.toml")
    with pytest.raises(InvalidSource, match="is a symlink"):
        store.apply(src)


def test_special_files_are_refused(store: AgentStore, tmp_path: Path) -> None:
    src = make_source(tmp_path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "rootfs" / "sock"))
        with pytest.raises(InvalidSource, match="is a socket"):
            store.apply(src)
    (src / "rootfs" / "sock").unlink()
    if os.geteuid() == 0:
        os.mknod(src / "rootfs" / "mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))
        with pytest.raises(InvalidSource, match=r"rootfs/mem: is a character device"):
            store.apply(src)
    assert not (store.root / "researcher").exists() and leftovers(store) == []


def test_missing_source(store: AgentStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidSource, match="No such file"):
        store.apply(tmp_path / "nothing")
    src = make_source(tmp_path)
    agents._rmtree(src / "rootfs")
    with pytest.raises(InvalidSource, match=r"rootfs .*No such file"):
        store.apply(src)


def test_installed_agent_json_shape(store: AgentStore, tmp_path: Path) -> None:
    agent: InstalledAgent = store.apply(make_source(tmp_path)).agent
    data = agent.to_json()
    assert set(data) == {
        "name", "version", "manifest_sha256", "installed_at", "installed_ns", "rootfs", "rootfs_kind", "ok",
        "problems", "manifest",
    }  # fmt: skip
    assert data["manifest"]["agent"]["name"] == "researcher" and data["rootfs"] == "rootfs"
