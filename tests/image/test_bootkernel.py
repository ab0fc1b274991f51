"""The image's kernel choice (image.bootkernel): the NullBox appliance kernel when kernel.build has an up-to-date
build of it, Debian's otherwise; the choice is part of the build's digests, and the Debian path still builds an
initramfs with modules.  Everything here is synthetic (fake kernels in a temporary build/): nothing is compiled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from image import bootkernel, initrd
from image import build as image_build
from image.context import Context
from kernel import build as kb
from tests.image.test_boot_pieces import _fake_elf

NULLBOX_RELEASE = "6.1.0-test-nullbox"
DEBIAN_RELEASE = "6.1.0-99-amd64"
REPO = Path(__file__).resolve().parents[2]


def _nullbox(build: Path, *, config: str = "CONFIG_RD_ZSTD=y\n# CONFIG_MODULES is not set\n") -> Path:
    """A complete kernel.build output for the appliance variant, with the key kernel.build would write today."""
    out = kb.variant_dir("appliance", build)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bzImage").write_bytes(b"nullbox bzImage")
    (out / ".config").write_text(config)
    (out / "version").write_text(NULLBOX_RELEASE + "\n")
    (out / "build.json").write_text(json.dumps(kb.cache_key("appliance", "6.1.0-test")))
    return out


def _debian(build: Path) -> None:
    """What the kernel step leaves in build/kernel/: Debian's vmlinuz, config and modules."""
    kernel = build / "kernel"
    (kernel / "deb" / "boot").mkdir(parents=True)
    (kernel / "vmlinuz").write_bytes(b"debian vmlinuz")
    (kernel / "version").write_text(DEBIAN_RELEASE + "\n")
    (kernel / "deb" / "boot" / f"config-{DEBIAN_RELEASE}").write_text("CONFIG_MODULES=y\nCONFIG_RD_GZIP=y\n")
    modules = kernel / "modules" / "kernel"
    modules.mkdir(parents=True)
    for name in ("isofs", "squashfs"):
        (modules / f"{name}.ko").write_bytes(_fake_elf({"depends": ""}))
    (kernel / "modules" / "modules.builtin").write_text("")


@pytest.fixture
def build(tmp_path: Path) -> Path:
    path = tmp_path / "build"
    _debian(path)
    return path


def test_nullbox_kernel_when_it_is_built(build: Path) -> None:
    out = _nullbox(build)
    chosen = bootkernel.choose(build)
    assert (chosen.kind, chosen.release, chosen.vmlinuz, chosen.modules) == (
        "nullbox",
        NULLBOX_RELEASE,
        out / "bzImage",
        None,
    )
    assert chosen.record()["modules"] is None


def test_debian_kernel_when_the_nullbox_one_is_not_built(build: Path) -> None:
    chosen = bootkernel.choose(build)
    assert (chosen.kind, chosen.release, chosen.modules) == ("debian", DEBIAN_RELEASE, build / "kernel" / "modules")
    assert "not built" in chosen.why


def test_debian_kernel_when_the_nullbox_build_is_out_of_date(build: Path) -> None:
    out = _nullbox(build)
    key = json.loads((out / "build.json").read_text())
    (out / "build.json").write_text(json.dumps({**key, "fragment": "0" * 64}))  # built from another fragment
    chosen = bootkernel.choose(build)
    assert chosen.kind == "debian"
    assert "out of date" in chosen.why
    _nullbox(build)
    (out / "bzImage").unlink()  # a build.json but a missing output: not a complete build
    assert bootkernel.choose(build).kind == "debian"


def test_asking_for_a_kernel(build: Path) -> None:
    with pytest.raises(RuntimeError, match="asked for"):
        bootkernel.choose(build, "nullbox")
    _nullbox(build)
    assert bootkernel.choose(build, "debian").kind == "debian"
    assert bootkernel.choose(build, "nullbox").kind == "nullbox"
    with pytest.raises(ValueError, match="unknown kernel"):
        bootkernel.choose(build, "custom")


def test_step_stages_the_chosen_kernel(build: Path) -> None:
    ctx = Context(repo=REPO, out=build)
    bootkernel.build(ctx)
    record, modules = bootkernel.staged(build)
    assert (record["kernel"], modules) == ("debian", build / "kernel" / "modules")
    assert (build / "boot" / "vmlinuz").read_bytes() == b"debian vmlinuz"
    assert "CONFIG_MODULES=y" in (build / "boot" / "config").read_text()

    _nullbox(build)
    bootkernel.build(ctx)
    record, modules = bootkernel.staged(build)
    assert (record["kernel"], record["release"], modules) == ("nullbox", NULLBOX_RELEASE, None)
    assert (build / "boot" / "vmlinuz").read_bytes() == b"nullbox bzImage"
    assert (build / "boot" / "version").read_text() == NULLBOX_RELEASE + "\n"
    assert initrd.kernel_compression((build / "boot" / "config").read_text()) == "zstd"


def test_debian_path_still_puts_modules_in_the_initramfs(build: Path) -> None:
    ctx = Context(repo=REPO, out=build)
    bootkernel.build(ctx)
    _, tree = bootkernel.staged(build)
    wanted = [("isofs", True), ("squashfs", True)]
    order = initrd.load_order(initrd.ModuleTree.scan(tree), wanted) if tree is not None else []
    assert [path for path, _ in order] == ["kernel/isofs.ko", "kernel/squashfs.ko"]


def test_switching_kernels_rebuilds_what_follows(
    build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The image build's digest covers the choice and the chosen kernel's bytes: a switch, or another NullBox build,
    reruns the bootkernel step (and so everything after it); an unchanged choice is cached."""
    repo = tmp_path / "repo"
    (repo / "image").mkdir(parents=True)
    shutil.copyfile(REPO / "image" / "bootkernel.py", repo / "image" / "bootkernel.py")
    shutil.copyfile(REPO / "image" / "kernel.py", repo / "image" / "kernel.py")
    steps = (image_build.Step("bootkernel", "image.bootkernel", ("boot/vmlinuz", "boot/kernel.json")),)
    monkeypatch.setattr(image_build, "STEPS", steps)
    ctx = Context(repo=repo, out=build)

    def kind_after_run() -> tuple[str, str]:
        status = image_build.run(ctx, [], force=False)["bootkernel"]
        return status.split()[0], json.loads((build / "boot" / "kernel.json").read_text())["kernel"]

    assert kind_after_run() == ("built", "debian")
    assert kind_after_run() == ("cached", "debian")
    assert "Debian's kernel 6.1.0-99-amd64" in capsys.readouterr().err  # the progress output says which
    out = _nullbox(build)
    assert kind_after_run() == ("built", "nullbox")
    assert "the NullBox appliance kernel 6.1.0-test-nullbox" in capsys.readouterr().err
    assert kind_after_run() == ("cached", "nullbox")
    (out / "bzImage").write_bytes(b"another build")  # rebuilt with another config: same key files, new bytes
    assert kind_after_run() == ("built", "nullbox")
    shutil.rmtree(out)
    assert kind_after_run() == ("built", "debian")
    assert image_build.run(Context(repo=repo, out=build, kernel="debian"), [], force=False)["bootkernel"] == "cached"
