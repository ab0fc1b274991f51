"""The start-up trims, each in a fresh interpreter (they act on sys.modules)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(script: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_lazy_module_loads_on_first_use_only() -> None:
    out = _run("""
        import json, sys
        from nullbox import lean_imports
        lean_imports.without_ssl()
        lean_imports.lazy("ssl")  # a blocked module becomes lazily importable again
        import ssl
        before = "_ssl" in sys.modules
        version = ssl.OPENSSL_VERSION
        print(json.dumps({"before": before, "after": "_ssl" in sys.modules, "version": version}))
    """)
    assert out["before"] is False and out["after"] is True
    assert str(out["version"]).startswith("OpenSSL")


def test_pyroute2_submodules_without_its_package_init() -> None:
    out = _run("""
        import json, sys
        from nullbox import lean_imports
        lean_imports.pyroute2_submodules_only()
        from pyroute2.iproute.linux import AsyncIPRoute
        print(json.dumps({"ndb": "pyroute2.ndb.main" in sys.modules, "ipdb": "pyroute2.ipdb" in sys.modules}))
    """)
    assert out == {"ndb": False, "ipdb": False}


def test_without_ssl_blocks_the_import() -> None:
    out = _run("""
        import json
        from nullbox import lean_imports
        lean_imports.without_ssl()
        try:
            import ssl
            blocked = False
        except ImportError:
            blocked = True
        print(json.dumps({"blocked": blocked}))
    """)
    assert out == {"blocked": True}
