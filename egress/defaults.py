"""Where egress lives on the appliance and the numbers it runs with; every default in one place."""

from pathlib import Path
from typing import Final

SOCKET: Final = Path("/run/nullbox/egress.sock")
STATE_DIR: Final = Path("/run/nullbox/egress")
STATE_FILE: Final = "agents.json"
UPLINK: Final = "eth0"
RESOLV_CONF: Final = Path("/run/resolv.conf")

#: Bounds every DNS answer's TTL is clamped into before it becomes an allow-set element's timeout.
MIN_TTL: Final = 60
MAX_TTL: Final = 300

TABLE: Final = "nullbox"
FAMILY: Final = "inet"

#: Elements the allow set holds for all agents together, and for one agent (the controller refuses more): a
#: wildcard entry cannot make the kernel hold an unbounded set, nor one agent fill it for the others.
ALLOW_SIZE: Final = 262144
AGENT_ALLOW_LIMIT: Final = 16384
#: How long a denied destination stays listed in status; how many the kernel keeps for all agents together, and how
#: many status shows per agent (the most recent).
DENIED_TIMEOUT_S: Final = 600
DENIED_SIZE: Final = 16384
DENIED_SHOWN: Final = 256
#: Names the DNS proxy refused, kept per agent for status.
DENIED_NAMES: Final = 64
#: Dropped packets logged to the kernel log, per agent interface: a sustained rate and a burst; the meter's
#: per-interface state is forgotten after this long without drops, and it tracks at most this many interfaces.
LOG_RATE_PER_S: Final = 5
LOG_BURST: Final = 10
LOG_LIMIT_IDLE_S: Final = 60
LOG_LIMITS_SIZE: Final = 4096

TEST_HOOKS_ENV: Final = "EGRESS_TEST_HOOKS"
