"""capabilities.filesystem shares: the data directory's layout and ownership (cage.shares), the guest kernels' 9P,
real boots under TCG where an agent running as its own uid reads a read share, is refused writing it, and writes
its write shares (directly with cage.qemu.Vm, and through the cage daemon), and the libkrun backend's virtio-fs
calls for the same manifest."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from cage import guestimage, launcher, network, qemu, shares
from cage.agents import InstalledAgent
from cage.config import CageConfig
from cage.guestimage import KernelKind
from cage.manifest import FilesystemCaps, data_path, parse_bytes
from cage.qemu import QemuVM, Vm
from cage.runtime import Cage, Paths, Run
from cage.vmspec import VmSpec
from image.initrd import ModuleTree
from kernel import build as kernel_build
from nullbox import kvm
from tests.cage.agent_rootfs import build_agent_rootfs
from tests.cage.test_daemon import Appliance, appliance  # noqa: F401 (the fixture)
from tests.cage.test_libkrun import Recorder, launch, recorder  # noqa: F401 (fixture)
from tests.cage.test_qemu import process_ids

REPO = Path(__file__).resolve().parent.parent.parent
AGENT_UID = 70124
OTHER_UID = 70999
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="ownership changes and uid switches need root")

SHARE_AGENT = """#!/bin/sh
# Read the read share, try to write into it, write both write shares (one sits inside the read share).
echo "agent: the read share holds: $(cat /data/in/hello.txt)"
if (echo nope >/data/in/nope.txt) 2>/dev/null; then
	echo "agent: wrote into a read share"
	exit 7
fi
echo "agent: writing into the read share failed"
echo "from $NULLBOX_AGENT" >/data/in/out/result.txt || exit 8
mkdir -p /data/w/sub && echo deep >/data/w/sub/f.txt || exit 9
echo "agent: wrote both write shares"
"""
CAPS = FilesystemCaps(read=("/data/in",), write=("/data/w", "/data/in/out"))


def share_rootfs(root: Path) -> Path:
    build_agent_rootfs(root)
    (root / "bin" / "mkdir").symlink_to("busybox")
    script = root / "agent" / "shares"
    script.write_text(SHARE_AGENT)
    script.chmod(0o755)
    return root


def owner(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


# ----------------------------------------------------------------------------------------- plan and prepare


def test_plan_orders_parents_first_with_short_tags(tmp_path: Path) -> None:
    planned = shares.plan(tmp_path / "data", CAPS)
    assert [(s.tag, s.guest_path, s.read_only) for s in planned] == [
        ("data0", "/data/in", True),
        ("data1", "/data/in/out", False),
        ("data2", "/data/w", False),
    ]
    assert [s.host_path for s in planned] == [tmp_path / "data/in", tmp_path / "data/in/out", tmp_path / "data/w"]
    assert shares.data_dir(Path("/var/lib/nullbox/cage"), "bob") == Path("/var/lib/nullbox/cage/data/bob")
    with pytest.raises(ValueError, match="normalised"):  # the manifest's rule, enforced again where paths are made
        data_path(tmp_path / "data", "/data/../../etc")


@needs_root
def test_prepare_creates_and_owns_the_share_directories(tmp_path: Path) -> None:
    data = tmp_path / "state" / "data" / "alpha"
    planned = shares.plan(data, CAPS)
    shares.prepare(data, planned, AGENT_UID, AGENT_UID)
    assert owner(data.parent) == (0, 0, 0o711) and owner(data) == (0, 0, 0o711)
    assert owner(data / "in") == (0, 0, 0o755)
    assert owner(data / "in" / "out") == (AGENT_UID, AGENT_UID, 0o700)
    assert owner(data / "w") == (AGENT_UID, AGENT_UID, 0o700)
    # an existing read share stays as it is; again is a no-op
    (data / "in").chmod(0o750)
    shares.prepare(data, planned, AGENT_UID, AGENT_UID)
    assert owner(data / "in") == (0, 0, 0o750)


@needs_root
def test_prepare_hands_a_write_share_over_without_following_symlinks(tmp_path: Path) -> None:
    """The agent's uid changed (removed, installed again, another slot): its write share's tree becomes its own."""
    data = tmp_path / "data"
    outside = tmp_path / "outside.txt"
    outside.write_text("root's\n")
    (data / "w" / "sub").mkdir(parents=True)
    (data / "w" / "sub" / "f.txt").write_text("x")
    (data / "w" / "link").symlink_to(outside)
    for path in (data / "w", data / "w" / "sub", data / "w" / "sub" / "f.txt", data / "w" / "link"):
        os.lchown(path, OTHER_UID, OTHER_UID)
    shares.prepare(data, shares.plan(data, FilesystemCaps(write=("/data/w",))), AGENT_UID, AGENT_UID)
    for path in (data / "w", data / "w" / "sub", data / "w" / "sub" / "f.txt", data / "w" / "link"):
        assert owner(path)[:2] == (AGENT_UID, AGENT_UID), path
    assert owner(outside)[:2] == (0, 0)


@needs_root
def test_prepare_refuses_a_symlink_on_the_way(tmp_path: Path) -> None:
    """A symlink an earlier run left in a write share (say /data/w/r -> /etc) never becomes a share's directory."""
    data = tmp_path / "data"
    target = tmp_path / "etc"
    target.mkdir()
    (data / "w").mkdir(parents=True)
    (data / "w" / "r").symlink_to(target)
    caps = FilesystemCaps(read=("/data/w/r",), write=("/data/w",))
    with pytest.raises(shares.ShareError, match="not a directory"):
        shares.prepare(data, shares.plan(data, caps), AGENT_UID, AGENT_UID)
    (data / "w" / "r").unlink()
    (data / "w" / "r").symlink_to(target)
    with pytest.raises(shares.ShareError):
        shares.prepare(data, shares.plan(data, FilesystemCaps(read=("/data/w/r/x",))), AGENT_UID, AGENT_UID)
    assert list(target.iterdir()) == [] and owner(target)[:2] == (0, 0)


# -------------------------------------------------------------------------------------------- guest kernels


def test_the_guest_kernels_have_9p() -> None:
    """The NullBox guest kernel builds 9P in; Debian's gets its modules in the initramfs (SHARE_MODULES)."""
    wanted = kernel_build.fragment("guest")
    for option in ("CONFIG_NET_9P", "CONFIG_NET_9P_VIRTIO", "CONFIG_9P_FS", "CONFIG_NETWORK_FILESYSTEMS"):
        assert wanted[option] == "y", option
    assert wanted["CONFIG_MODULES"] == "n"
    modules = REPO / "build" / "kernel" / "modules"
    if not (modules / "kernel" / "fs" / "9p" / "9p.ko").exists():
        pytest.skip("Debian's kernel is not unpacked (python -m image.build kernel)")
    entries = guestimage.initramfs_entries(b"\x7fELF", "6.1.0-test", ModuleTree.scan(modules))
    by_path = {e.path: e for e in entries}
    listed = [line.split()[1] for line in by_path["lib/modules/6.1.0-test/nullbox.load-9p"].data.decode().splitlines()]
    names = [Path(p).name for p in listed]
    assert names.index("9pnet.ko") < names.index("9pnet_virtio.ko") < names.index("9p.ko")
    assert "netfs.ko" in names and all(f"lib/modules/6.1.0-test/{p}" in by_path for p in listed)


# ------------------------------------------------------------------------------------------------ real boots


@pytest.fixture(scope="module", params=list(KernelKind), ids=str)
def boot_kernel(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(kernel, initramfs) of each guest kernel (both builds are cached)."""
    if shutil.which(kvm.QEMU) is None or shutil.which("mksquashfs") is None:
        pytest.skip(f"{kvm.QEMU} or mksquashfs is not installed")
    kind = KernelKind(request.param)
    build = ["kernel.build", "guest"] if kind is KernelKind.NULLBOX else ["image.build", "kernel"]
    subprocess.run([sys.executable, "-m", *build], cwd=REPO, check=True, timeout=3600)
    return guestimage.guest_files(kernel=kind)


@pytest.fixture(scope="module")
def share_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("shares")
    return guestimage.pack_rootfs(share_rootfs(tmp / "root"), tmp / "root.sqfs")


def populated_data(data: Path) -> list[qemu.GuestShare]:
    planned = shares.plan(data, CAPS)
    (data / "in").mkdir(parents=True)
    (data / "in" / "hello.txt").write_text("hello from the host\n")
    shares.prepare(data, planned, AGENT_UID, AGENT_UID)
    return planned


def share_vm(tmp_path: Path, boot: tuple[Path, Path], image: Path, planned: list[qemu.GuestShare]) -> QemuVM:
    return QemuVM(
        agent="sharer",
        kernel=boot[0],
        initramfs=boot[1],
        rootfs=image,
        config=qemu.write_config(tmp_path / "sharer.cfg", ["/agent/shares"], {}, "/", planned),
        console_log=tmp_path / "sharer.console",
        qmp_socket=tmp_path / "sharer.qmp",
        ctxgraph_socket=None,
        shares=tuple(planned),
        uid=AGENT_UID,
    )


def check_shares_used(data: Path, console: str) -> None:
    assert "agent: the read share holds: hello from the host" in console
    assert "agent: writing into the read share failed" in console
    assert not (data / "in" / "nope.txt").exists()
    result = data / "in" / "out" / "result.txt"
    assert result.read_text() == "from sharer\n"
    assert owner(result)[:2] == (AGENT_UID, AGENT_UID)  # security_model=none, QEMU as the agent's uid
    assert owner(data / "w" / "sub" / "f.txt")[:2] == (AGENT_UID, AGENT_UID)
    assert (data / "w" / "sub" / "f.txt").read_text() == "deep\n"


@needs_root
def test_an_agent_uses_its_shares(tmp_path: Path, boot_kernel: tuple[Path, Path], share_image: Path) -> None:
    data = tmp_path / "data"
    vm = share_vm(tmp_path, boot_kernel, share_image, populated_data(data))
    with Vm(vm) as running:
        running.start()
        outcome = running.wait(60)
    print(f"--- console:\n{outcome.console}", file=sys.stderr)
    assert outcome.guest_failure is None and outcome.agent_status == 0, outcome.console
    assert "nullbox-guest: share data1 mounted at /data/in/out (rw)" in outcome.console
    check_shares_used(data, outcome.console)


@needs_root
def test_a_share_that_cannot_be_mounted_fails_the_guest(
    tmp_path: Path, boot_kernel: tuple[Path, Path], share_image: Path
) -> None:
    """The config names a tag QEMU does not provide: the guest says so and never runs the agent."""
    data = tmp_path / "data"
    planned = populated_data(data)
    vm = share_vm(tmp_path, boot_kernel, share_image, planned[:1])
    qemu.write_config(vm.config, ["/agent/shares"], {}, "/", planned)
    with Vm(vm) as running:
        running.start()
        outcome = running.wait(60)
    assert outcome.agent_status is None
    assert (
        outcome.guest_failure is not None and "cannot mount share data1 (rw) at /data/in/out" in outcome.guest_failure
    )
    assert "NULLBOX-AGENT-START" not in outcome.console


# ------------------------------------------------------------------------------------------ through the daemon


def share_manifest(name: str) -> str:
    return textwrap.dedent(
        f"""\
        [agent]
        name = "{name}"
        command = ["/agent/shares"]

        [capabilities]
        max_memory_mb = 128
        filesystem.read = ["/data/in"]
        filesystem.write = ["/data/w", "/data/in/out"]
        """
    )


@needs_root
def test_the_daemon_runs_qemu_as_the_agent_with_its_shares(appliance: Appliance) -> None:  # noqa: F811
    cage, name = appliance.cage, "sharer"
    rootfs = appliance.agent_dir / "rootfs"
    if not (rootfs / "agent" / "shares").exists():
        (rootfs / "bin" / "mkdir").symlink_to("busybox")
        (rootfs / "agent" / "shares").write_text(SHARE_AGENT + "sleep 30\n")  # still running when it is stopped
        (rootfs / "agent" / "shares").chmod(0o755)
    data = shares.data_dir(cage.root / "state", name)
    (data / "in").mkdir(parents=True)
    (data / "in" / "hello.txt").write_text("hello from the host\n")
    appliance.apply(name, share_manifest(name))
    started = cage.call("start", agent=name)["agent"]
    try:
        uid = started["uid"]
        ids = process_ids(started["pid"])
        assert ids == {"Uid": [uid] * 4, "Gid": [uid] * 4, "Groups": [], "Umask": [0o077]}, ids
        deadline = time.monotonic() + 60
        while not any("agent: wrote both write shares" in line for line in appliance.log_lines(name)):
            lines = appliance.log_lines(name)
            ended = any(x.startswith(("NULLBOX-GUEST-FAIL", "NULLBOX-AGENT-EXIT")) for x in lines)
            assert time.monotonic() < deadline and not ended, lines
            time.sleep(0.2)
        console = "\n".join(appliance.log_lines(name))
        assert "agent: the read share holds: hello from the host" in console
        assert "agent: writing into the read share failed" in console
        assert owner(data / "in" / "out" / "result.txt")[:2] == (uid, uid)
        assert owner(data / "w")[:3] == (uid, uid, 0o700)
        assert not (cage.root / "run" / name / "config.cpio").exists()  # the secrets' file: gone before QEMU starts
    finally:
        cage.call("stop", agent=name)
        cage.call("remove", agent=name)


# ---------------------------------------------------------------------------------------------------- libkrun


@needs_root
def test_libkrun_gets_the_same_shares(
    tmp_path: Path,
    recorder: Recorder,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """runtime._start_libkrun puts the manifest's shares in the VM spec; the launcher turns them into virtio-fs."""
    specs: list[VmSpec] = []

    def record(self: launcher.LibkrunBackend, spec: VmSpec) -> subprocess.Popen[bytes]:
        specs.append(spec)
        return subprocess.Popen(["true"])

    monkeypatch.setattr(launcher.LibkrunBackend, "start", record)
    paths = Paths(
        socket=tmp_path / "cage.sock",
        agents=tmp_path / "agents",
        vault=tmp_path / "vault",
        state=tmp_path / "state",
        run=tmp_path / "run",
        logs=tmp_path / "logs",
    )
    cage = Cage(CageConfig(backend="libkrun", libkrun=str(recorder.full)), paths)
    manifest = parse_bytes(share_manifest("krun").encode())
    rootfs = build_agent_rootfs(tmp_path / "rootfs")
    installed = InstalledAgent(
        name="krun",
        path=tmp_path,
        manifest=manifest,
        manifest_sha256="0" * 64,
        installed_ns=1,
        rootfs_path=rootfs,
        rootfs_kind="dir",
    )
    link = network.link_for("krun", cage.pool, 0)
    run = Run(agent="krun", slot=0, uid=AGENT_UID, link=link, directory=tmp_path / "run" / "krun")
    run.ctx_socket = Path("/run/nullbox/ctxgraph/agents/krun.sock")
    proc = cage._start_libkrun(run, installed, manifest, {}, tmp_path / "console")
    proc.wait()
    (spec,) = specs
    data = shares.data_dir(paths.state, "krun")
    assert [(s.tag, s.host_path, s.read_only) for s in spec.shares] == [
        ("data0", data / "in", True),
        ("data1", data / "in" / "out", False),
        ("data2", data / "w", False),
    ]
    assert owner(data / "w") == (AGENT_UID, AGENT_UID, 0o700)
    calls = launch(spec, recorder.full, tmp_path).calls
    made: list[tuple[str, Any, Any]] = [
        (c.name, c.value("c_tag"), c.value("c_path")) for c in calls if c.name.startswith("krun_add_virtiofs")
    ]
    assert made == [
        ("krun_add_virtiofs3", "data0", str(data / "in")),
        ("krun_add_virtiofs", "data1", str(data / "in" / "out")),
        ("krun_add_virtiofs", "data2", str(data / "w")),
    ]
