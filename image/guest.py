"""Build step guest: what agent microVMs need, put into the root tree (after rootfs, before squashfs).

    /usr/lib/nullbox/guest/vmlinux      the guest kernel QEMU boots (cage.defaults.GUEST_KERNEL): the NullBox guest
                                        kernel's PVH vmlinux when it is built (make kernel), else Debian's; an ELF
                                        one stripped of its symbols.  ``--kernel debian|nullbox`` (the appliance's
                                        kernel) picks the agents' too: a Debian-kernel appliance runs its agents
                                        on Debian's kernel, as it would without the NullBox kernels
    /usr/lib/nullbox/guest/initrd.img   cage's guest initramfs for that kernel (cage/guest/init.c compiled
                                        static; modules only with Debian's kernel)
    /usr/lib/nullbox/guest/nb-exec      cage/nb-exec.c compiled static: cage starts each QEMU as its agent through it
    /usr/share/nullbox/examples/demo/   the user guide's demo agent, ready to install on the appliance:
        AGENT.toml                      examples/agents/demo/AGENT.toml
        rootfs                          a SquashFS image: examples/agents/demo/rootfs/ plus static busybox and its
                                        applets and nb-vsock (ctxgraph over vsock for a shell agent); the appliance
                                        cannot pack one: it has no mksquashfs

Both come from cage.guestimage (``guest_files``, ``static_busybox``, ``pack_rootfs``), the same code the host's tests
boot agents with.  The step's identity is which guest kernel that is and the SHA-256 of its image, so building the
NullBox guest kernel rebuilds this step and everything after it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Final

from cage import defaults, guestimage
from image.context import Context
from image.kernel import sha256_file

INPUTS: Final[list[str]] = [
    "cage/guestimage.py",
    "cage/guest",
    "cage/nb-exec.c",
    "image/initrd.py",
    "examples/agents/demo",
]
GUEST_DIR: Final = str(defaults.GUEST_KERNEL.parent).lstrip("/")
EXAMPLES_DIR: Final = str(defaults.EXAMPLES_DIR).lstrip("/")
DEMO: Final = "demo"
ELF_MAGIC: Final = b"\x7fELF"


def kernel_kind(ctx: Context) -> guestimage.KernelKind:
    """The agents' kernel: the same family as the appliance's when one is asked for, else NullBox's when built."""
    if ctx.kernel == "auto":
        return guestimage.choose_kernel(ctx.out)
    return guestimage.KernelKind(ctx.kernel)


def identity(ctx: Context) -> str:
    """Which guest kernel the VMs get (NullBox's when built, else Debian's), and which build of it."""
    kind = kernel_kind(ctx)
    kernel = guestimage.GuestKernel.from_build(ctx.out, kind)
    image = kernel.vmlinuz if kernel.vmlinuz.is_file() else None
    return json.dumps({"kind": str(kind), "release": kernel.version, "sha256": image and sha256_file(image)})


def demo_rootfs(ctx: Context, target: Path) -> Path:
    """examples/agents/demo/rootfs with static busybox (every applet a symlink to it), packed as SquashFS."""
    source = ctx.repo / "examples" / "agents" / DEMO / "rootfs"
    busybox, applets = guestimage.static_busybox()
    with tempfile.TemporaryDirectory(dir=ctx.out, prefix=".demo-rootfs-") as scratch:
        tree = Path(scratch) / "rootfs"
        shutil.copytree(source, tree, symlinks=True)
        (tree / "bin").mkdir(exist_ok=True)
        (tree / "bin" / "busybox").write_bytes(busybox)
        (tree / "bin" / "busybox").chmod(0o755)
        (tree / "bin" / "nb-vsock").write_bytes(guestimage.vsock_relay())
        (tree / "bin" / "nb-vsock").chmod(0o755)
        for applet in sorted({a.strip("/") for a in applets} - {"", "bin/busybox"}):
            link = tree / applet
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/bin/busybox")
        for name in ("proc", "sys", "dev", "tmp", "run", "etc", "data"):
            (tree / name).mkdir(exist_ok=True)
        return guestimage.pack_rootfs(tree, target, epoch=ctx.source_date_epoch)


def build(ctx: Context) -> None:
    tree = ctx.out / "rootfs"
    if not tree.is_dir():
        raise RuntimeError(f"guest: {tree} is missing (build the rootfs step first)")
    kernel, initramfs = guestimage.guest_files(ctx.out, kernel_kind(ctx), epoch=ctx.source_date_epoch)
    guest = tree / GUEST_DIR
    if guest.exists():
        shutil.rmtree(guest)
    guest.mkdir(parents=True)
    if kernel.read_bytes()[:4] == ELF_MAGIC:
        # symbols only a debugger reads: ~1.3 MiB; the PVH note QEMU boots it by is an allocated section and stays
        ctx.run(["strip", "--strip-all", "-o", str(guest / "vmlinux"), str(kernel)])
        if not guestimage.has_pvh_entry((guest / "vmlinux").read_bytes()):
            raise RuntimeError(f"guest: the stripped {kernel.name} lost its PVH entry note")
    else:
        shutil.copyfile(kernel, guest / "vmlinux")
    shutil.copyfile(initramfs, guest / "initrd.img")
    for file in guest.iterdir():
        file.chmod(0o644)
    guestimage.install_exec_helper(guest / defaults.EXEC_HELPER.name)
    demo = tree / EXAMPLES_DIR / DEMO
    if demo.exists():
        shutil.rmtree(demo)
    demo.mkdir(parents=True)
    shutil.copyfile(ctx.repo / "examples" / "agents" / DEMO / "AGENT.toml", demo / "AGENT.toml")
    demo_rootfs(ctx, demo / "rootfs")
    for file in demo.iterdir():
        file.chmod(0o644)
    demo_kib = (demo / "rootfs").stat().st_size // 1024
    ctx.log(
        f"guest: {GUEST_DIR}/vmlinux {kernel.stat().st_size / 2**20:.1f} MiB ({kernel.name}), initrd.img "
        f"{initramfs.stat().st_size // 1024} KiB; {EXAMPLES_DIR}/{DEMO}/rootfs {demo_kib} KiB"
    )
