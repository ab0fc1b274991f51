"""The PID-1 mount table, mounted for real under a scratch root inside a private mount namespace."""

from __future__ import annotations

from pathlib import Path

from nulld.mount import TABLE, MountPoint, mounted, plan
from tests.nulld.conftest import run_in_namespaces

PRIVATE_MOUNTS = ["--mount", "--propagation", "private"]

MOUNTINFO = (
    "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw\n"
    "24 22 0:23 / /mnt/with\\040space rw,relatime - tmpfs tmpfs rw\n"
)


def test_mountinfo_parsing_and_plan() -> None:
    points = mounted(MOUNTINFO)
    assert points[1] == MountPoint("/proc", "proc", "proc", "rw,nosuid,nodev,noexec,relatime")
    assert points[2].target == "/mnt/with space"
    todo = [m.target for m in plan(TABLE, points)]
    assert "/proc" not in todo  # what the initramfs mounted is left alone
    assert todo[0] == "/sys" and "/sys/fs/cgroup" in todo


SCRIPT = """
import json, sys
from nulld.mount import mount_all, enable_cgroup_controllers, mounted
root = sys.argv[1]
done = mount_all(root)
again = mount_all(root)
print(json.dumps({
    "done": done,
    "again": again,
    "controllers": enable_cgroup_controllers(root),
    "mounts": {p.target[len(root):]: [p.fstype, p.options] for p in mounted() if p.target.startswith(root + "/")},
}))
"""


def test_mount_table_with_hardened_flags(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    report = run_in_namespaces(PRIVATE_MOUNTS, SCRIPT, str(root))
    assert report["again"] == []  # mounting twice mounts nothing the second time
    mounts = report["mounts"]
    expected = {
        "/proc": ("proc", {"nosuid", "nodev", "noexec"}),
        "/sys": ("sysfs", {"nosuid", "nodev", "noexec"}),
        "/dev": ("devtmpfs", {"nosuid", "noexec"}),
        "/dev/pts": ("devpts", {"nosuid", "noexec"}),
        "/dev/shm": ("tmpfs", {"nosuid", "nodev", "noexec"}),
        "/run": ("tmpfs", {"nosuid", "nodev", "noexec"}),
        "/tmp": ("tmpfs", {"nosuid", "nodev"}),
        "/sys/fs/cgroup": ("cgroup2", {"nosuid", "nodev", "noexec"}),
    }
    for target, (fstype, flags) in expected.items():
        assert target in mounts, (target, sorted(mounts))
        assert mounts[target][0] == fstype
        assert flags <= set(mounts[target][1].split(",")), (target, mounts[target])
    assert not (root / "proc" / "self").exists()  # the namespace's mounts never leaked to the host


UNMOUNT_SCRIPT = """
import json, os, subprocess, sys
from nulld import syscalls
from nulld.mount import mounted, unmount_all
root = sys.argv[1]
for sub in ("a", "a/b", "busy"):
    os.makedirs(f"{root}/{sub}", exist_ok=True)
    syscalls.mount("tmpfs", f"{root}/{sub}", "tmpfs")
holder = subprocess.Popen(["sleep", "60"], cwd=f"{root}/busy")  # keeps the mount busy
unmount_all(under=root, api=frozenset())
left = {p.target[len(root):]: p.options for p in mounted() if p.target.startswith(root + "/")}
holder.kill()
print(json.dumps(left))
"""


def test_shutdown_unmounts_deepest_first_and_remounts_busy_ones_read_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    left = run_in_namespaces(PRIVATE_MOUNTS, UNMOUNT_SCRIPT, str(root))
    assert list(left) == ["/busy"]  # /a/b went before /a; both are gone
    assert left["/busy"].split(",")[0] == "ro"
