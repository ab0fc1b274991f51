"""cage's cgroup v2 handling against a real cgroup2 hierarchy.

The build host's cgroups are v1, so each test mounts a fresh cgroup2 hierarchy in a private mount namespace: the
freezer, cgroup.kill and process moves are core v2 features and behave as on the appliance.  The cpu, memory and
pids controllers stay bound to the host's v1 hierarchies, so here they are reported as unavailable (checked below);
the limits themselves are checked in the booted appliance (tests/e2e), where nulld mounts cgroup2 with them.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from cage.cgroup import KERNEL_THREADS, CgroupError, Group, is_kernel_thread
from tests.nulld.conftest import run_in_namespaces

SCENARIO = textwrap.dedent(
    """
    import json, os, select, signal, subprocess, sys, tempfile, time
    from pathlib import Path
    from cage.cgroup import CgroupError, Hierarchy, Limits, cgroup_of

    mnt = Path(tempfile.mkdtemp(prefix="cg2-"))
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], check=True)
    out = {}
    hierarchy = Hierarchy(mnt)
    out["missing"] = hierarchy.prepare()
    group = hierarchy.group("researcher")
    out["skipped"] = group.create(Limits(cpu_percent=50, memory_mib=600))
    # A child that writes a tick every 10 ms: frozen, it must go silent; thawed, it must tick again.
    TICKER = "import sys, time\\nwhile True:\\n    sys.stdout.write('t'); sys.stdout.flush(); time.sleep(0.01)"
    child = subprocess.Popen([sys.executable, "-c", TICKER], stdout=subprocess.PIPE)
    group.add(child.pid)
    out["cgroup_of"] = cgroup_of(child.pid)
    out["groups"] = hierarchy.groups()

    def ticks(window):
        end, got = time.monotonic() + window, 0
        while time.monotonic() < end:
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, end - time.monotonic()))
            if ready:
                got += len(os.read(child.stdout.fileno(), 4096))
        return got

    out["running"] = ticks(0.3)
    group.freeze()
    out["frozen_flag"] = group.frozen()
    ticks(0.1)  # drain what was written before the freeze took effect
    out["frozen"] = ticks(0.4)
    group.thaw()
    out["thawed"] = ticks(0.3)
    usage = group.usage()
    out["usage"] = {"cpu_usec": usage.cpu_usec, "pids": usage.pids, "frozen": usage.frozen}
    group.freeze()
    group.remove()  # kills (even frozen) and removes
    out["exit"] = child.wait(timeout=5)
    out["exists"] = group.exists()
    try:
        hierarchy.group("../escape")
    except CgroupError as exc:
        out["bad_name"] = str(exc)
    subprocess.run(["umount", str(mnt)], check=True)
    print(json.dumps(out))
    """
)


def test_freeze_thaw_kill_and_remove_on_a_real_cgroup2_hierarchy() -> None:
    out = run_in_namespaces(["--mount", "--propagation", "private"], SCENARIO)
    assert out["cgroup_of"] == "/nullbox/agents/researcher"
    assert out["groups"] == ["researcher"]
    assert out["running"] > 5
    assert out["frozen_flag"] is True and out["frozen"] == 0, out
    assert out["thawed"] > 5
    assert out["usage"]["cpu_usec"] > 0 and out["usage"]["pids"] == 1 and out["usage"]["frozen"] is False
    assert out["exit"] == -9  # SIGKILL through cgroup.kill, although it was frozen
    assert out["exists"] is False
    assert "invalid agent name" in out["bad_name"]
    # On this v1 host the controllers are bound elsewhere: each is reported, and each limit it carries is skipped.
    assert set(out["missing"]) <= {"cpu", "memory", "pids"}
    unavailable = {"cpu": ["cpu.max"], "memory": ["memory.max", "memory.swap.max"], "pids": ["pids.max"]}
    assert sorted(out["skipped"]) == sorted(f for c in out["missing"] for f in unavailable[c]), json.dumps(out)


def _fake_group(tmp_path: Path, procs: list[int]) -> Group:
    """A directory standing in for a cgroup (plain files): enough for the bookkeeping around the kernel's freezer."""
    path = tmp_path / "nullbox" / "agents" / "bot"
    path.mkdir(parents=True)
    (path / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in procs))
    (path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return Group(path, kernel_threads=tmp_path / "nullbox" / KERNEL_THREADS)


def test_kernel_threads_are_recognised_by_their_flags() -> None:
    assert is_kernel_thread(2)  # kthreadd
    assert not is_kernel_thread(os.getpid())
    assert not is_kernel_thread(1 << 22)  # no such process


def test_a_freeze_moves_kernel_threads_out_first_and_never_leaves_a_group_half_frozen(tmp_path: Path) -> None:
    """KVM's kvm-nx-lpage-recovery thread joins the VMM's group and would keep it from ever reporting frozen (seen in
    the booted appliance, nested KVM); a freeze that does not complete is undone, not left standing."""
    group = _fake_group(tmp_path, [2, os.getpid()])
    with pytest.raises(CgroupError, match=r"still not frozen after 0\.05s"):
        group.freeze(timeout=0.05)  # these files never say "frozen 1"
    assert (group.path / "cgroup.freeze").read_text() == "0"
    assert (tmp_path / "nullbox" / KERNEL_THREADS / "cgroup.procs").read_text() == "2"
    assert _fake_group(tmp_path / "none", [os.getpid()]).evict_kernel_threads() == []
