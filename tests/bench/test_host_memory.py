"""bench.host_memory: finding the host's free page reporting and pausing it, on a sysfs/procfs tree the test writes
(pausing the real one would change this host under the other tests); the real /proc/buddyinfo is parsed too."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import host_memory

BUDDYINFO = """\
Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32      1      3      4      2      5      4      3      4      5      3    751
Node 0, zone   Normal   5686   4716   2681   2369   1784    934    305    348    271    206    488
"""
REPORTING_FEATURES = "0110010" + "0" * 57  # STATS_VQ, DEFLATE_ON_OOM, REPORTING
HINTING_FEATURES = "0110100" + "0" * 57  # STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT: no reporting


def host_tree(root: Path, devices: dict[str, tuple[str, str]], order: str | None = "9") -> tuple[Path, Path]:
    """A /sys and a /proc with the given virtio devices (name -> (device id, features)) and reporting order."""
    sys_root, proc_root = root / "sys", root / "proc"
    for name, (ident, features) in devices.items():
        device = sys_root / "bus/virtio/devices" / name
        device.mkdir(parents=True)
        (device / "device").write_text(ident + "\n")
        (device / "features").write_text(features + "\n")
    if order is not None:
        parameter = sys_root / host_memory.ORDER_PARAMETER
        parameter.parent.mkdir(parents=True)
        parameter.write_text(order + "\n")
    proc_root.mkdir()
    (proc_root / "buddyinfo").write_text(BUDDYINFO)
    return sys_root, proc_root


def test_the_reporting_balloon_is_found_by_its_id_and_feature_bit(tmp_path: Path) -> None:
    sys_root, proc_root = host_tree(
        tmp_path, {"virtio0": ("0x0002", REPORTING_FEATURES), "virtio3": ("0x0005", REPORTING_FEATURES)}
    )
    reporting = host_memory.free_page_reporting(sys_root, proc_root)
    assert reporting is not None and reporting.active
    assert (reporting.device, reporting.order, reporting.max_order, reporting.paused_order) == ("virtio3", 9, 10, 11)
    assert reporting.describe().startswith("free page reporting: on (virtio3, ")
    assert "page_reporting_order 9" in reporting.describe()


@pytest.mark.parametrize(
    ("devices", "order"),
    [
        ({"virtio0": ("0x0005", HINTING_FEATURES)}, "9"),  # a balloon that does not report free pages
        ({"virtio0": ("0x0002", REPORTING_FEATURES)}, "9"),  # the bit set on a block device means nothing
        ({}, "9"),  # no virtio at all (bare metal)
        ({"virtio0": ("0x0005", REPORTING_FEATURES)}, None),  # no page_reporting module parameter
    ],
)
def test_no_reporting_without_a_reporting_balloon_and_the_parameter(
    tmp_path: Path, devices: dict[str, tuple[str, str]], order: str | None
) -> None:
    assert host_memory.free_page_reporting(*host_tree(tmp_path, devices, order)) is None


def test_largest_order_counts_the_columns() -> None:
    assert host_memory.largest_order(BUDDYINFO) == 10
    with pytest.raises(ValueError, match="buddyinfo"):
        host_memory.largest_order("")


def test_this_hosts_buddyinfo_parses() -> None:
    assert 1 <= host_memory.largest_order(Path("/proc/buddyinfo").read_text()) <= 64


def test_a_pause_raises_the_order_and_restores_it_even_on_error(tmp_path: Path) -> None:
    reporting = host_memory.free_page_reporting(*host_tree(tmp_path, {"virtio0": ("0x0005", REPORTING_FEATURES)}))
    assert reporting is not None
    with host_memory.reporting_paused(reporting) as paused:
        assert paused
        assert reporting.parameter.read_text() == "11\n"
    assert reporting.parameter.read_text() == "9\n"
    with pytest.raises(RuntimeError), host_memory.reporting_paused(reporting) as paused:
        assert reporting.parameter.read_text() == "11\n"
        raise RuntimeError("a boot failed")
    assert reporting.parameter.read_text() == "9\n"


def test_nothing_to_pause_or_a_refused_order_means_not_paused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with host_memory.reporting_paused(None) as paused:
        assert not paused
    sys_root, proc_root = host_tree(tmp_path, {"virtio0": ("0x0005", REPORTING_FEATURES)})
    reporting = host_memory.free_page_reporting(sys_root, proc_root)
    assert reporting is not None
    reporting.parameter.unlink()
    reporting.parameter.mkdir()  # writing to it fails, as a kernel refusing the value does
    with host_memory.reporting_paused(reporting) as paused:
        assert not paused
    assert "reporting stays on" in capsys.readouterr().err


def test_reporting_already_off_is_said_and_not_paused_again(tmp_path: Path) -> None:
    """An order above the largest (a pause a killed run never restored): said so, not paused again, left as it was."""
    sys_root, proc_root = host_tree(tmp_path, {"virtio0": ("0x0005", REPORTING_FEATURES)}, order="11")
    reporting = host_memory.free_page_reporting(sys_root, proc_root)
    assert reporting is not None and not reporting.active
    assert "free page reporting: off" in reporting.describe() and "page_reporting_order 11" in reporting.describe()
    with host_memory.reporting_paused(reporting) as paused:
        assert not paused
    assert reporting.parameter.read_text() == "11\n"
