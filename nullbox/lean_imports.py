"""Start-up trims for the appliance's Python processes: imports they would pay for on every boot but never use.

Under TCG every imported module costs tens of milliseconds, and the boot waits for each service's imports.
"""

from __future__ import annotations

import importlib.util
import sys


def without_ssl() -> None:
    """Make ``import ssl`` fail, so asyncio runs without TLS support (it is written to).

    Our daemons speak only over Unix sockets, virtio ports and vsock; ssl pulls in libssl and libcrypto (~4 MiB
    resident) and a long import.  Call before importing asyncio.
    """
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]


def pyroute2_submodules_only() -> None:
    """Use pyroute2's submodules without running ``pyroute2/__init__.py``.

    The package's ``__init__`` eagerly imports NDB, IPDB, conntrack and more: about 150 ms on the build host and
    several seconds under TCG, for code the uplink and egress never call.  Registering the package as an un-executed
    module (the import system then only needs its ``__path__``) lets ``pyroute2.iproute.linux`` and
    ``pyroute2.dhcp.*`` import on their own.  Call before the process's first pyroute2 import; after it, a no-op.
    """
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("pyroute2 is not installed as a package")
    sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
