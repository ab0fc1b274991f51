"""The NullBox kernel configs: the fragment parser and checker, the build cache, and each variant's real .config
generated from Debian's linux-source-6.1 (tinyconfig + fragment + olddefconfig; no compile).

The generated configs need the source package: it is downloaded with apt and extracted once into build/cache
(~15 s the first time, then about 5 s per variant).  Without it these tests fail; they never skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cage.guestimage import MODULE_LISTS
from image.initrd import BOOT_MODULES, LATE_MODULES, kernel_compression
from image.kernel import sha256_file
from kernel import build as kb

# The built-in option behind every module the Debian-kernel boot paths load today (image/initrd.py for the appliance,
# cage/guestimage.py for agent VMs): a module added to those lists fails here until the configs cover it.
MODULE_OPTIONS = {
    "crc32c_intel": "CONFIG_CRYPTO_CRC32C_INTEL",
    "crc32c_generic": "CONFIG_CRYPTO_CRC32C",
    "virtio_pci": "CONFIG_VIRTIO_PCI",
    "virtio_mmio": "CONFIG_VIRTIO_MMIO",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_scsi": "CONFIG_SCSI_VIRTIO",
    "virtio_net": "CONFIG_VIRTIO_NET",
    "virtio_console": "CONFIG_VIRTIO_CONSOLE",
    "virtio_rng": "CONFIG_HW_RANDOM_VIRTIO",
    "vmw_vsock_virtio_transport": "CONFIG_VIRTIO_VSOCKETS",
    "ahci": "CONFIG_SATA_AHCI",
    "ata_piix": "CONFIG_ATA_PIIX",
    "sr_mod": "CONFIG_BLK_DEV_SR",
    "sd_mod": "CONFIG_BLK_DEV_SD",
    "nvme": "CONFIG_BLK_DEV_NVME",
    "xhci_pci": "CONFIG_USB_XHCI_PCI",
    "ehci_pci": "CONFIG_USB_EHCI_PCI",
    "usb_storage": "CONFIG_USB_STORAGE",
    "uas": "CONFIG_USB_UAS",
    "isofs": "CONFIG_ISO9660_FS",
    "loop": "CONFIG_BLK_DEV_LOOP",
    "dm_verity": "CONFIG_DM_VERITY",
    "squashfs": "CONFIG_SQUASHFS",
    "ext4": "CONFIG_EXT4_FS",
    "overlay": "CONFIG_OVERLAY_FS",
    "nf_tables": "CONFIG_NF_TABLES",
    "nft_ct": "CONFIG_NFT_CT",
    "nft_chain_nat": "CONFIG_NFT_NAT",
    "nft_masq": "CONFIG_NFT_MASQ",
    "nft_objref": "CONFIG_NFT_OBJREF",
    "nft_limit": "CONFIG_NFT_LIMIT",
    "nft_log": "CONFIG_NFT_LOG",
    "nf_log_syslog": "CONFIG_NF_LOG_SYSLOG",
    "tun": "CONFIG_TUN",
    "kvm_intel": "CONFIG_KVM_INTEL",
    "kvm_amd": "CONFIG_KVM_AMD",
    "button": "CONFIG_ACPI_BUTTON",
    "evdev": "CONFIG_INPUT_EVDEV",
}
VARIANT_MODULES = {
    "appliance": [name for name, _ in BOOT_MODULES + LATE_MODULES],
    "guest": [name for modules in MODULE_LISTS.values() for name, _ in modules],
}


# ------------------------------------------------------------------------------------------- parse and check


def test_parse_config_reads_values_and_not_set() -> None:
    text = '# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="-x"\n\nCONFIG_D=0x10\n'
    assert kb.parse_config(text, strict=True) == {
        "CONFIG_A": "y",
        "CONFIG_B": "n",
        "CONFIG_C": '"-x"',
        "CONFIG_D": "0x10",
    }


@pytest.mark.parametrize("text", ["CONFIG_A=y\nCONFIG_A=n\n", "CONFIG_A=y\nA=y\n", "CONFIG_A y\n"])
def test_parse_config_strict_rejects_duplicates_and_junk(text: str) -> None:
    with pytest.raises(ValueError, match=r"line [12]:"):
        kb.parse_config(text, strict=True)


def test_check_config_reports_each_difference() -> None:
    wanted = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y", "CONFIG_D": "n"}
    config = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_MODULES": "y"}  # C absent: not offered; D absent: fine
    problems = kb.check_config(wanted, config)
    assert problems == [
        "CONFIG_B: asked n, got y",
        "CONFIG_C: asked y, got n (not offered)",
        "CONFIG_MODULES is set: the kernel must have no loadable modules",
    ]
    assert kb.check_config({"CONFIG_A": "y"}, {"CONFIG_A": "y"}) == []


@pytest.mark.parametrize("variant", kb.VARIANTS)
def test_fragment_parses_and_forbids_modules(variant: str) -> None:
    wanted = kb.fragment(variant)
    assert wanted["CONFIG_MODULES"] == "n"
    assert wanted["CONFIG_64BIT"] == "y"


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kernel variant"):
        kb.fragment_path("desktop")


def test_modules_of_the_boot_paths_all_have_an_option() -> None:
    for variant, modules in VARIANT_MODULES.items():
        unmapped = sorted(set(modules) - set(MODULE_OPTIONS))
        assert not unmapped, f"{variant}: modules with no CONFIG_ option in MODULE_OPTIONS: {unmapped}"


# ----------------------------------------------------------------------------------------------- build cache


def test_build_with_an_unchanged_key_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = kb.Source("6.1.0-test", tmp_path / "no-such-tree")
    out = tmp_path / "guest"
    out.mkdir()
    for name in kb.outputs("guest"):
        (out / name).write_text("built\n")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an up-to-date build configured or compiled again")

    monkeypatch.setattr(kb, "configure", refuse)
    monkeypatch.setattr(kb, "_compile", refuse)
    (out / "build.json").write_text(json.dumps(kb.cache_key("guest", source)))
    kb.build("guest", source, out, jobs=1)  # nothing happens

    # a different source version, fragment or build module is a different key: the build runs
    (out / "build.json").write_text(json.dumps(kb.cache_key("guest", kb.Source("6.1.1-test", source.tree))))
    with pytest.raises(AssertionError, match="again"):
        kb.build("guest", source, out, jobs=1)


def test_cache_key_names_source_fragment_and_builder() -> None:
    key = kb.cache_key("appliance", kb.Source("6.1.192-2", Path("/nowhere")))
    assert key["source"] == "6.1.192-2"
    assert key["fragment"] == sha256_file(kb.fragment_path("appliance"))
    assert key["builder"] == sha256_file(Path(kb.__file__))


# ------------------------------------------------------------------------------------ the generated .configs


@pytest.fixture(scope="module")
def source() -> kb.Source:
    missing = kb.missing_build_deps()
    assert not missing, f"the kernel config needs Debian packages {missing} (scripts/bootstrap.py installs them)"
    return kb.prepare_source()  # raises (the test fails) when linux-source-6.1 cannot be fetched


@pytest.fixture(scope="module")
def configs(source: kb.Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Each variant's .config, generated in a temporary directory (not build/kernel-nullbox, which a build uses)."""
    root = tmp_path_factory.mktemp("kernel")
    yield {variant: kb.configure(variant, source, root / variant) for variant in kb.VARIANTS}


@pytest.mark.parametrize("variant", kb.VARIANTS)
def test_generated_config_is_what_the_fragment_asks(variant: str, configs: dict[str, Path]) -> None:
    config = kb.parse_config(configs[variant].read_text())
    assert kb.check_config(kb.fragment(variant), config) == []
    assert config.get("CONFIG_MODULES", "n") == "n"
    assert not [name for name, value in config.items() if value == "m"]


@pytest.mark.parametrize("variant", kb.VARIANTS)
def test_generated_config_builds_in_what_the_boot_path_loads_today(variant: str, configs: dict[str, Path]) -> None:
    config = kb.parse_config(configs[variant].read_text())
    missing = [f"{m} ({MODULE_OPTIONS[m]})" for m in VARIANT_MODULES[variant] if config.get(MODULE_OPTIONS[m]) != "y"]
    assert not missing, f"{variant}: not built in: {missing}"
    assert kernel_compression(configs[variant].read_text()) == "zstd"  # the initramfs stays zstd-compressed


def test_guest_config_is_microvm_only(configs: dict[str, Path]) -> None:
    config = kb.parse_config(configs["guest"].read_text())
    assert config.get("CONFIG_PVH") == "y"  # QEMU boots the uncompressed vmlinux through its PVH note
    assert config.get("CONFIG_ACPI") == "y"  # microvm,acpi=on describes the virtio-mmio devices in the DSDT
    # no PCI drivers; CONFIG_PCI itself is on, or 6.1's ACPICA cannot load microvm's tables (see guest.config)
    assert config.get("CONFIG_PCI") == "y"
    for absent in ("CONFIG_VIRTIO_PCI", "CONFIG_SCSI", "CONFIG_ATA", "CONFIG_USB", "CONFIG_NETFILTER", "CONFIG_VT"):
        assert config.get(absent, "n") == "n", absent


def test_appliance_config_has_what_egress_and_cage_use(configs: dict[str, Path]) -> None:
    config = kb.parse_config(configs["appliance"].read_text())
    for option in (
        "CONFIG_NF_TABLES_INET",
        "CONFIG_NFT_NAT",
        "CONFIG_NFT_MASQ",
        "CONFIG_CFS_BANDWIDTH",  # cpu.max
        "CONFIG_MEMCG",
        "CONFIG_SWAP",  # memory.swap.max exists only with swap support
        "CONFIG_CGROUP_PIDS",
        "CONFIG_SECCOMP_FILTER",  # QEMU -sandbox on
        "CONFIG_VHOST_VSOCK",
        "CONFIG_EFI_STUB",
    ):
        assert config.get(option) == "y", option
    for absent in ("CONFIG_DEVMEM", "CONFIG_KEXEC", "CONFIG_KEXEC_FILE", "CONFIG_IO_URING", "CONFIG_AIO"):
        assert config.get(absent, "n") == "n", absent


def test_configure_again_reuses_the_checked_config(source: kb.Source, configs: dict[str, Path]) -> None:
    before = configs["guest"].stat().st_mtime_ns
    assert kb.configure("guest", source, configs["guest"].parent) == configs["guest"]
    assert configs["guest"].stat().st_mtime_ns == before
