"""Start-up trims for the appliance's Python processes: imports they would pay for on every boot but never use.

Under TCG every imported module costs tens of milliseconds, and the boot waits for each service's imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


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


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used; then imports the real one and delegates.

    importlib.util.LazyLoader is not enough on Python 3.11: a second ``import name`` statement reads the module's
    ``__spec__``, and that already triggers the load.  Here ``__spec__`` is an ordinary attribute and only a
    missing attribute (anything the real module defines) triggers it.
    """

    def __getattr__(self, attribute: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        return getattr(real, attribute)


def lazy(name: str) -> None:
    """Make ``import name`` cheap until the module is used: it is imported on its first attribute access.

    For modules a library imports at its top but our code path never touches (pyroute2's rtnl marshalling imports
    ssl for TLS probes the uplink never makes: loading libssl and libcrypto is costly under TCG).  A no-op for a
    module already imported; a module that was blocked (None in sys.modules, see without_ssl) becomes importable.
    """
    present: object = sys.modules.get(name, sys)
    if present is not sys and present is not None:
        return
    sys.modules.pop(name, None)
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"no module named {name!r}")
    stand_in = _Deferred(name)
    stand_in.__spec__ = spec
    sys.modules[name] = stand_in
