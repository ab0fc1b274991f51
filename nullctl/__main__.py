"""``nullctl`` / ``python -m nullctl``: the operator's CLI (see nullctl.cli and docs/nullctl.md)."""

from __future__ import annotations

import sys

from nullctl.cli import main

if __name__ == "__main__":
    sys.exit(main())
