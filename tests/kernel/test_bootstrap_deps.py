"""make test's bootstrap installs what the kernel's config and build need (the two lists must not drift apart)."""

from __future__ import annotations

import ast
from pathlib import Path

from kernel import build

BOOTSTRAP = Path(__file__).resolve().parent.parent.parent / "scripts" / "bootstrap.py"


def _apt_packages() -> set[str]:
    """scripts/bootstrap.py's APT_PACKAGES, read from its source (it is a script, not an importable module)."""
    for node in ast.parse(BOOTSTRAP.read_text()).body:
        names = [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.Assign) and "APT_PACKAGES" in names:
            return set(ast.literal_eval(node.value))
    raise AssertionError("scripts/bootstrap.py has no APT_PACKAGES")


def test_bootstrap_installs_the_kernel_build_dependencies() -> None:
    assert set(build.BUILD_DEPS) <= _apt_packages()
