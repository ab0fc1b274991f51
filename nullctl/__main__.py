"""``nullctl`` / ``python -m nullctl``: the operator's CLI (see nullctl.cli and docs/nullctl.md)."""

from __future__ import annotations

import sys

from nullbox.lean_imports import lazy

# nullbox.wire imports asyncio for its servers; nullctl's blocking Client never touches it, and asyncio (with ssl)
# is most of a command's start-up: it stays a stand-in unless something really uses it.
lazy("asyncio")

from nullctl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
