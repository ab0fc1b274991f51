"""``make run`` until the appliance image boots: a real ctxgraph process, driven through its sockets."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from ctxgraph.process import ServerProcess
from nullbox.wire import WireError


def _show(title: str, payload: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(payload, indent=2, ensure_ascii=False)[:1200])


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="ctxgraph-demo-") as tmp:
        server = ServerProcess(Path(tmp))
        try:
            server.start()
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"ctxgraph is running as pid {server.pid}, database {server.db}")
        try:
            _walkthrough(server)
        finally:
            code = server.stop()
        print(f"\nctxgraph stopped cleanly (exit {code}) after SIGTERM")
        return 0 if code == 0 else 1


def _walkthrough(server: ServerProcess) -> None:
    with server.client() as operator:
        registered = operator.register_agent("researcher", write=["research/"])
        _show("register agent 'researcher' (may write under research/)", registered)
        watcher = server.client()
        events = watcher.watch("research/")
        next(events)  # the subscription is live
        seen: list[dict[str, Any]] = []
        listener = threading.Thread(target=lambda: seen.append(next(events)), daemon=True)
        listener.start()

        with server.client("researcher") as agent:
            first = agent.put("research/paper", {"title": "Attention Is All You Need", "year": 2017})
            _show("the agent puts research/paper over its own socket", first)
            again = agent.put("research/paper", {"year": 2017, "title": "Attention Is All You Need"})
            _show("the same value again, keys in another order: same hash, nothing new stored", again)
            agent.put("research/paper", {"title": "Attention Is All You Need", "year": 2017, "read": True})
            for title, key, writer in (
                ("the agent tries to write as someone else", "research/x", "operator"),
                ("the agent writes outside its prefixes", "secrets/x", None),
            ):
                try:
                    agent.put(key, 1, agent=writer)
                except WireError as exc:
                    _show(title, {"refused": str(exc)})
            _show("get by hash", agent.get(first["hash"]))
            _show("history of research/paper, newest first", agent.history("research/paper"))

        listener.join(timeout=10)
        _show("a watcher on research/ saw the first new entry live", seen[0] if seen else "nothing")
        watcher.close()
        page = operator.query("research/", limit=1)
        _show("query prefix research/, one entry a page", page)
        _show("... and the next page", operator.query("research/", limit=1, after=page["next"]))
        _show("stats", operator.stats())
