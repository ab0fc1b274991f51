"""A service for tests/nulld/test_preload.py: reports, as one JSON line, the process state a service sees."""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> int:
    try:
        import ssl  # here, not at the top: nulld blocks ssl for itself and a forked service must get it back

        ssl_ok = ssl.OPENSSL_VERSION != ""
    except ImportError:
        ssl_ok = False
    state = {
        "argv": sys.argv[1:],
        "name": __name__,
        "env": sorted(os.environ),
        "cwd": os.getcwd(),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "sid_is_pid": os.getsid(0) == os.getpid(),
        "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, set())),
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "ssl": ssl_ok,
        "running_loop": _running_loop(),
    }
    print(json.dumps(state), flush=True)
    return int(os.environ.get("PROBE_EXIT", "0"))


def _running_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
