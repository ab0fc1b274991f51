"""Where cage lives on the appliance and the numbers it runs with; every default in one place."""

from ipaddress import IPv4Network
from pathlib import Path
from typing import Final

CONFIG: Final = Path("/etc/nullbox/cage.toml")
SOCKET: Final = Path("/run/nullbox/cage.sock")
AGENTS_DIR: Final = Path("/var/lib/nullbox/agents")  # cage.agents.AgentStore
VAULT_DIR: Final = Path("/var/lib/nullbox/vault")  # cage.vault.Vault
STATE_DIR: Final = Path("/var/lib/nullbox/cage")  # slots.json, packed root images
RUN_DIR: Final = Path("/run/nullbox/cage")  # per running agent: QMP socket, console FIFO, config (while starting)
LOG_DIR: Final = Path("/var/log/nullbox/agents")  # <agent>.log, guest consoles

EGRESS_SOCKET: Final = Path("/run/nullbox/egress.sock")
CTXGRAPH_SOCKET: Final = Path("/run/nullbox/ctxgraph.sock")  # the admin socket

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
CGROUP_PARENT: Final = Path("nullbox/agents")

# The guest kernel and initramfs for the QEMU backend (cage.toml backend.kernel / backend.initramfs): where the image
# ships what cage.guestimage.guest_files() gives at build time (image/guest.py), i.e. the NullBox guest kernel's PVH
# vmlinux and its module-less initramfs when that kernel is built (kernel.build guest), else Debian's extracted
# vmlinux and an initramfs carrying its modules.
GUEST_KERNEL: Final = Path("/usr/lib/nullbox/guest/vmlinux")
GUEST_INITRAMFS: Final = Path("/usr/lib/nullbox/guest/initrd.img")
# cage/nb-exec.c, built static by the image (image/guest.py): starts QEMU as the agent's uid without the daemon
# forking itself (cage.toml backend.exec_helper; without it cage's Python drops the privileges, more slowly).
EXEC_HELPER: Final = Path("/usr/lib/nullbox/guest/nb-exec")
# Example agents the image ships ready to install (image/guest.py): <dir>/<name>/{AGENT.toml,rootfs}.
EXAMPLES_DIR: Final = Path("/usr/share/nullbox/examples")
DEMO_ROOTFS: Final = EXAMPLES_DIR / "demo" / "rootfs"

#: Agent links: one /30 per agent from this pool (gateway .1 on the TAP, the guest .2).
POOL: Final = IPv4Network("10.201.0.0/16")
TAP_PREFIX: Final = "nb-"

#: Per-agent ids: uid = gid = UID_BASE + the agent's slot (the same slot picks its /30).
UID_BASE: Final = 70000
#: The agent VM's vsock CID when the host has vhost-vsock: VSOCK_CID_BASE + its slot.  CIDs are global on a host
#: kernel, so a high base keeps clear of the small CIDs other VMMs hand out (3, 4, ...).
VSOCK_CID_BASE: Final = 0x4E420000

#: memory.max = the agent's max_memory_mb + this much for the VMM itself (QEMU's code, TCG translation cache, I/O).
VMM_OVERHEAD_MIB: Final = 128
PIDS_MAX: Final = 256

#: Stopping a VM: ask the guest to power down, wait; SIGTERM the VMM, wait; then cgroup.kill.  Seconds per wait.
STOP_TIMEOUT_S: Final = 5.0

#: Restart backoff for agent.restart (nullbox.backoff): initial delay, cap, and the run time that resets it.
BACKOFF_INITIAL_S: Final = 1.0
BACKOFF_MAX_S: Final = 30.0
BACKOFF_RESET_S: Final = 300.0

#: Console logs: the current file is rotated at this size; this many rotated files are kept (<agent>.log.1, .2).
LOG_MAX_BYTES: Final = 1 << 20
LOG_KEEP: Final = 2
#: Lines a `logs` request returns by default, and at most.
LOG_LINES: Final = 100
LOG_LINES_MAX: Final = 10_000
#: New lines a `logs` follower may fall behind by before its stream is ended.
FOLLOW_QUEUE: Final = 10_000

TEST_HOOKS_ENV: Final = "CAGE_TEST_HOOKS"
