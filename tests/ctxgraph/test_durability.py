"""Crash durability of the real daemon on a real SQLite file.

The contract (ARCHITECTURE.md, ctxgraph): an acknowledged ``put`` survives SIGKILL of the server.  These tests run
the daemon as a child process (:class:`ServerProcess`), stream pipelined puts into it from several threads, kill
it at a random moment while puts are in flight, and then check that

- every put whose reply said ``ok: true`` is in the database file (read directly with stdlib ``sqlite3``) and is
  served again by a restarted daemon (``get`` by hash returns the same agent, key and value);
- ``PRAGMA integrity_check`` says ``ok``;
- the database holds at least as many entries as there were distinct acknowledged hashes (puts that were in
  flight when the server died may or may not be there).

A clean SIGTERM while puts are streaming must exit 0, keep every acknowledged put, and leave the WAL checkpointed.

The random seed of a run is in every assertion message; set ``CTXGRAPH_DURABILITY_SEED`` to replay it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ctxgraph.access import OPERATOR
from ctxgraph.model import hash_hex
from ctxgraph.process import ServerProcess
from nullbox.wire import Client, JSONObject, WireError

ROUNDS: Final = 25
WRITERS: Final = 3
PIPELINE: Final = 16
"""Requests per ``call_many``: small enough that the replies never fill the socket buffers both ways."""
GET_CHUNK: Final = 200
KILL_DELAY_S: Final = (0.0, 0.25)
STREAM_LIMIT_S: Final = 15.0
"""Safety net only: a writer that streams this long without its server dying ends the round as a failure."""
AGENTS: Final = ("alpha", "beta_2", "gamma-3")


def _seed() -> int:
    fixed = os.environ.get("CTXGRAPH_DURABILITY_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**32)


# ------------------------------------------------------------------------------------------------- bookkeeping


@dataclass(frozen=True)
class Put:
    """One acknowledged write, as the client asked for it and as the server named it."""

    hash: str
    agent: str
    key: str
    value: Any


@dataclass
class Ledger:
    """Every acknowledged put of a test, by hash; shared by the writer threads."""

    acked: dict[str, Put] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    error_codes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, put: Put, expected_hash: str) -> None:
        with self.lock:
            if put.hash != expected_hash:
                self.mismatches.append(f"{put.key!r}: server said {put.hash}, the contract says {expected_hash}")
            previous = self.acked.setdefault(put.hash, put)
            if previous != put:
                self.mismatches.append(f"hash {put.hash} acknowledged for both {previous} and {put}")

    def failed(self, code: str) -> None:
        with self.lock:
            self.error_codes.append(code)

    def snapshot(self) -> dict[str, Put]:
        with self.lock:
            return dict(self.acked)


@dataclass(frozen=True)
class Item:
    agent: str | None  # None: the admin socket writes as OPERATOR
    key: str
    value: Any

    @property
    def writer(self) -> str:
        return OPERATOR if self.agent is None else self.agent

    def params(self) -> JSONObject:
        params: JSONObject = {"key": self.key, "value": self.value}
        if self.agent is not None:
            params["agent"] = self.agent
        return params


class Workload:
    """Pipelined batches of ``put`` and ``put_batch`` requests with unique keys and a few deliberate repeats."""

    def __init__(self, tag: str, rng: random.Random) -> None:
        self._tag = tag
        self._rng = rng
        self._count = 0
        self._sent: list[Item] = []

    def _item(self) -> Item:
        if self._sent and self._rng.random() < 0.05:
            return self._rng.choice(self._sent)  # same (agent, key, value): same hash, one entry
        self._count += 1
        agent = self._rng.choice((None, *AGENTS))
        value: Any = {"tag": self._tag, "n": self._count, "pad": "x" * self._rng.randrange(0, 300)}
        if self._rng.random() < 0.3:
            value = [value, self._rng.random(), None, True, "é\u2028🙂"]
        item = Item(agent, f"{self._tag}/{self._count}", value)
        self._sent.append(item)
        return item

    def batch(self) -> list[tuple[str, list[Item]]]:
        """``PIPELINE`` requests: each is an op and the items it writes."""
        requests: list[tuple[str, list[Item]]] = []
        for _ in range(PIPELINE):
            if self._rng.random() < 0.25:
                requests.append(("put_batch", [self._item() for _ in range(self._rng.randint(1, 8))]))
            else:
                requests.append(("put", [self._item()]))
        return requests


def _wire_request(op: str, items: list[Item]) -> tuple[str, JSONObject]:
    if op == "put":
        return op, items[0].params()
    return op, {"items": [item.params() for item in items]}


def _acknowledged(op: str, items: list[Item], reply: JSONObject) -> Iterable[tuple[Item, str]]:
    """(item, hash) for every write a successful reply acknowledges."""
    if op == "put":
        return [(items[0], reply["hash"])]
    results: list[JSONObject] = reply["results"]
    assert len(results) == len(items)
    return [(item, result["hash"]) for item, result in zip(items, results, strict=True)]


# ----------------------------------------------------------------------------------------------------- writers


@dataclass
class WriterOutcome:
    connection_lost: bool = False
    batches: int = 0


def _write_until_disconnected(
    address: str, workload: Workload, ledger: Ledger, first_ack: threading.Event, outcome: WriterOutcome
) -> None:
    """Stream pipelined puts until the server goes away; record every acknowledged one."""
    deadline = threading.Event()
    timer = threading.Timer(STREAM_LIMIT_S, deadline.set)
    timer.start()
    try:
        client = Client(address, timeout=30.0)
        try:
            while not deadline.is_set():
                requests = workload.batch()
                replies = client.call_many([_wire_request(op, items) for op, items in requests])
                for (op, items), reply in zip(requests, replies, strict=True):
                    if isinstance(reply, WireError):
                        ledger.failed(str(reply.code))
                        continue
                    for item, digest in _acknowledged(op, items, reply):
                        expected = hash_hex(item.writer, item.key, item.value)
                        ledger.record(Put(digest, item.writer, item.key, item.value), expected)
                outcome.batches += 1
                first_ack.set()
        finally:
            client.close()
    except (WireError, OSError):
        # The server died (or shut down) under us: a reset, a broken pipe, EOF, or a reply cut in half.
        outcome.connection_lost = True
    finally:
        timer.cancel()
        first_ack.set()


def _stream_and_interrupt(
    server: ServerProcess, ledger: Ledger, rng: random.Random, tag: str, interrupt: Callable[[], None]
) -> list[WriterOutcome]:
    """Run ``WRITERS`` streaming threads; once puts are being acknowledged, wait a random moment and interrupt."""
    first_ack = threading.Event()
    outcomes = [WriterOutcome() for _ in range(WRITERS)]
    threads = [
        threading.Thread(
            target=_write_until_disconnected,
            args=(server.address, Workload(f"{tag}w{i}", random.Random(rng.random())), ledger, first_ack, outcome),
            name=f"writer-{tag}-{i}",
        )
        for i, outcome in enumerate(outcomes)
    ]
    for thread in threads:
        thread.start()
    delay = rng.uniform(*KILL_DELAY_S)
    # Wait for the first acknowledgement so the interruption lands while writes are streaming; then a random delay.
    first_ack.wait(STREAM_LIMIT_S)
    time.sleep(delay)
    interrupt()
    for thread in threads:
        thread.join(STREAM_LIMIT_S + 30.0)
        assert not thread.is_alive(), f"{thread.name} did not notice its server went away"
    return outcomes


# ---------------------------------------------------------------------------------------------------- checking


def _check_file(db: Path, acked: dict[str, Put], context: str) -> int:
    """Read the database file directly (read-only: no recovery side effects); returns the number of entries."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
        assert integrity == [("ok",)], f"{context}: integrity_check says {integrity}"
        count: int = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        stored = {
            digest.hex(): (agent, key, value)
            for digest, agent, key, value in conn.execute("SELECT hash, agent, key, value FROM entries")
        }
    finally:
        conn.close()
    missing = [put for digest, put in acked.items() if digest not in stored]
    assert not missing, f"{context}: {len(missing)} of {len(acked)} acknowledged puts are not in {db}: {missing[:3]}"
    for digest, put in acked.items():
        agent, key, value = stored[digest]
        assert (agent, key, json.loads(value)) == (put.agent, put.key, put.value), f"{context}: {digest} differs"
    assert count == len(stored)
    assert count >= len(acked), f"{context}: {count} entries < {len(acked)} distinct acknowledged hashes"
    return count


def _check_daemon(server: ServerProcess, acked: dict[str, Put], context: str) -> None:
    """``get`` every acknowledged hash from the (restarted) daemon, pipelined in chunks."""
    puts = list(acked.values())
    with Client(server.address, timeout=60.0) as client:
        for start in range(0, len(puts), GET_CHUNK):
            chunk = puts[start : start + GET_CHUNK]
            replies = client.call_many([("get", {"hash": put.hash}) for put in chunk])
            for put, reply in zip(chunk, replies, strict=True):
                assert not isinstance(reply, WireError), f"{context}: get {put.hash} ({put.key!r}) failed: {reply}"
                entry = reply["entry"]
                got = (entry["hash"], entry["agent"], entry["key"], entry["value"])
                assert got == (put.hash, put.agent, put.key, put.value), f"{context}: {got} != {put}"
        stats = client.call("stats")
    assert stats["entries"] >= len(acked), f"{context}: stats {stats} < {len(acked)} acknowledged"


def _wal(db: Path) -> Path:
    return db.with_name(db.name + "-wal")


# ------------------------------------------------------------------------------------------------------- tests


def test_acknowledged_puts_survive_sigkill_of_the_server(tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    root = tmp_path / "ctxgraph"
    ledger = Ledger()
    last_round: dict[str, Put] = {}  # acknowledged in the round just killed
    total_batches = 0
    for round_no in range(ROUNDS):
        context = f"seed {seed}, round {round_no}"
        server = ServerProcess(root).start()
        try:
            # The daemon recovers from the previous crash and serves what was acknowledged just before it.
            # (Everything older is checked in the file after every round, and through the daemon at the end.)
            _check_daemon(server, last_round, f"{context} (after restart)")
            outcomes = _stream_and_interrupt(server, ledger, rng, f"r{round_no}", server.kill)
        finally:
            server.kill()
        assert server.proc is not None
        assert server.proc.returncode == -signal.SIGKILL, f"{context}: exit status {server.proc.returncode}"
        assert all(o.connection_lost for o in outcomes), f"{context}: a writer outlived the SIGKILL: {outcomes}"
        total_batches += sum(o.batches for o in outcomes)
        assert not ledger.mismatches, f"{context}: {ledger.mismatches[:3]}"
        assert not ledger.error_codes, f"{context}: puts were refused: {sorted(set(ledger.error_codes))}"
        acked = ledger.snapshot()
        last_round = {digest: put for digest, put in acked.items() if put.key.startswith(f"r{round_no}w")}
        _check_file(server.db, acked, f"{context} (file after SIGKILL)")

    assert total_batches >= ROUNDS, f"seed {seed}: only {total_batches} pipelined batches acknowledged in total"
    acked = ledger.snapshot()
    assert len(acked) >= ROUNDS * PIPELINE
    server = ServerProcess(root).start()
    try:
        # Durability across later crashes too: everything from every round, after 25 SIGKILLs.
        _check_daemon(server, acked, f"seed {seed}, final")
    finally:
        status = server.stop()
    assert status == 0
    _check_file(server.db, acked, f"seed {seed}, final (file after SIGTERM)")


def test_sigterm_while_streaming_exits_0_keeps_acknowledged_puts_and_checkpoints(tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    root = tmp_path / "ctxgraph"
    ledger = Ledger()
    server = ServerProcess(root).start()
    status: list[int] = []
    try:
        outcomes = _stream_and_interrupt(server, ledger, rng, "term", lambda: status.append(server.stop(30.0)))
    finally:
        server.kill()
    assert status == [0], f"seed {seed}: SIGTERM exit status {status}"
    assert all(o.connection_lost for o in outcomes), f"seed {seed}: a writer outlived the shutdown: {outcomes}"
    assert not ledger.mismatches, ledger.mismatches[:3]
    # A put that arrives after the shutdown began is refused as retryable, never failed otherwise.
    assert set(ledger.error_codes) <= {"unavailable"}, sorted(set(ledger.error_codes))
    acked = ledger.snapshot()
    assert acked, f"seed {seed}: nothing was acknowledged before SIGTERM"

    wal = _wal(server.db)
    assert not wal.exists() or wal.stat().st_size == 0, f"{wal} holds {wal.stat().st_size} bytes after a clean stop"
    _check_file(server.db, acked, f"seed {seed} (file after SIGTERM)")

    server = ServerProcess(root).start()
    try:
        _check_daemon(server, acked, f"seed {seed} (after restart)")
    finally:
        assert server.stop() == 0
