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

#: How long a denied destination stays listed in status, and how many are kept per agent (the kernel set's size).
DENIED_TIMEOUT_S: Final = 600
DENIED_SIZE: Final = 256
#: Names the DNS proxy refused, kept per agent for status.
DENIED_NAMES: Final = 64
#: Dropped packets logged to the kernel log, per agent: a sustained rate and a burst.
LOG_RATE_PER_S: Final = 5
LOG_BURST: Final = 10

TEST_HOOKS_ENV: Final = "EGRESS_TEST_HOOKS"
