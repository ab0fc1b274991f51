"""The one door to the kernel's nftables: libnftables' JSON API, one call per atomic transaction.

Commands are Python objects serialised by ``json.dumps``; nothing is ever assembled as nft text, so no name or
address can change the meaning of a command.  Every list handed to :meth:`Nft.apply` becomes one netlink batch:
the kernel applies all of it or none of it, so a failed change leaves the previous ruleset in force.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import nftables  # Debian's python3-nftables (the venv sees the system site-packages)

JSONObject = dict[str, Any]


class NftError(Exception):
    """The kernel (or libnftables) refused a transaction or a listing; nothing of it was applied."""


def _clean(error: str) -> str:
    """libnftables' error text as one line, without the "internal:0:0-0:" position JSON input always has."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    cleaned = [line.split(": ", 1)[1] if line.startswith("internal:") and ": " in line else line for line in lines]
    cleaned = [line.removeprefix("Error: ") for line in cleaned]
    return "; ".join(cleaned) or "libnftables reported an error without a message"


class Nft:
    """A libnftables context.  Calls are serialised: one context is not safe to use from two threads at once."""

    def __init__(self) -> None:
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()

    def run(self, commands: Sequence[JSONObject]) -> list[JSONObject]:
        """Run ``commands`` as one batch; the objects a listing produced (metainfo removed)."""
        with self._lock:
            rc, output, error = self._nft.json_cmd({"nftables": list(commands)})
        if rc != 0:
            raise NftError(_clean(str(error)))
        if not output:
            return []
        items = output.get("nftables", []) if isinstance(output, dict) else []
        return [item for item in items if isinstance(item, dict) and "metainfo" not in item]

    def apply(self, commands: Sequence[JSONObject]) -> None:
        """One atomic transaction: all of ``commands`` take effect together, or none does."""
        if commands:
            self.run(commands)

    def listing(self, kind: str, **names: str) -> list[JSONObject] | None:
        """``list <kind>`` (table, set, counter, ...) as JSON objects; None when the object does not exist."""
        try:
            return self.run([{"list": {kind: dict(names)}}])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
