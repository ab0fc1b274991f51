"""Where ctxgraph lives on the appliance (ARCHITECTURE.md); every default path in one place."""

from pathlib import Path
from typing import Final

DB: Final = Path("/var/lib/nullbox/ctxgraph/ctxgraph.db")
SOCKET: Final = Path("/run/nullbox/ctxgraph.sock")
AGENTS_DIR: Final = Path("/run/nullbox/ctxgraph/agents")
VSOCK_GUEST_PORT: Final = 7000
"""The port an agent VM connects to; the VMM maps it onto the agent's unix socket."""
