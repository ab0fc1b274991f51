"""``make run`` until the appliance image boots: a real ctxgraph process, driven through its sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from ctxgraph.client import CtxClient
from nullbox.notify import ReadinessListener
from nullbox.wire import WireError


def _show(title: str, payload: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(payload, indent=2, ensure_ascii=False)[:1200])


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="ctxgraph-demo-") as tmp:
        root = Path(tmp)
        admin = root / "ctxgraph.sock"
        agents = root / "agents"
        with ReadinessListener(str(root / "notify.sock")) as ready:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ctxgraph",
                    "serve",
                    "--db",
                    str(root / "ctxgraph.db"),
                    "--socket",
                    str(admin),
                    "--agents-dir",
                    str(agents),
                ],
                env={**os.environ, **ready.env()},
            )
            try:
                if not ready.wait_ready(30):
                    print("ctxgraph did not become ready", file=sys.stderr)
                    return 1
                print(f"ctxgraph is running as pid {server.pid}, database {root / 'ctxgraph.db'}")
                _walkthrough(admin, agents)
            finally:
                server.send_signal(signal.SIGTERM)
                code = server.wait(timeout=30)
        print(f"\nctxgraph stopped cleanly (exit {code}) after SIGTERM")
        return 0 if code == 0 else 1


def _walkthrough(admin: Path, agents: Path) -> None:
    with CtxClient(f"unix:{admin}") as operator:
        _show(
            "register agent 'researcher' (may write under research/)",
            operator.register_agent("researcher", write=["research/"]),
        )
        watcher = CtxClient(f"unix:{admin}")
        events = watcher.watch("research/")
        next(events)  # the subscription is live
        seen: list[dict[str, Any]] = []
        listener = threading.Thread(target=lambda: seen.append(next(events)), daemon=True)
        listener.start()

        with CtxClient(f"unix:{agents / 'researcher.sock'}") as agent:
            first = agent.put("research/paper", {"title": "Attention Is All You Need", "year": 2017})
            _show("the agent puts research/paper over its own socket", first)
            _show(
                "the same put again: same hash, nothing new stored",
                agent.put("research/paper", {"year": 2017, "title": "Attention Is All You Need"}),
            )
            agent.put("research/paper", {"title": "Attention Is All You Need", "year": 2017, "read": True})
            try:
                agent.put("research/x", 1, agent="operator")
            except WireError as exc:
                _show("the agent tries to write as someone else", {"refused": str(exc)})
            try:
                agent.put("secrets/x", 1)
            except WireError as exc:
                _show("the agent writes outside its prefixes", {"refused": str(exc)})
            _show("get by hash", agent.get(first["hash"]))
            _show("history of research/paper, newest first", agent.history("research/paper"))

        listener.join(timeout=10)
        _show("a watcher on research/ saw the first new entry live", seen[0] if seen else "nothing")
        watcher.close()
        _show("query prefix research/ (limit 1, then the next page)", operator.query("research/", limit=1))
        _show("stats", operator.stats())
