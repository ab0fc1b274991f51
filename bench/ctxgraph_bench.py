"""ctxgraph benchmark: write throughput, put latency, prefix-query latency and server memory, in one run.

    .venv/bin/python -m bench.ctxgraph_bench            # full run: 1,000,000 entries for the query phase
    .venv/bin/python -m bench.ctxgraph_bench --quick    # smoke run: small database, few samples

Every measurement uses rows of the same shape: agent ``agent-A``, key ``agent-A/topic-T/item-I``, and a small
JSON object value (~150 bytes in RFC 8785 form).  Row ``n`` has A = n % 20, T = (n // 20) % 50, I = n // 1000,
so an agent's prefix matches 5% of the entries, an agent/topic prefix 0.1%, and the rows of every prefix are
spread evenly over the commit order (the way concurrent agents interleave).

Phases (each writer phase starts from an empty database in its own directory):
  (a) raw sqlite3 executemany of pre-built rows into the ctxgraph schema, WAL, synchronous=FULL (the baseline)
  (b) Store.put_many in-process (validation, JCS canonicalisation, hashing, duplicate check, commit)
  (c1) put_batch over the admin socket of a real daemon, one request of 1000 items at a time
  (c2) single puts pipelined over one connection, 1000 per Client.call_many
  (d) single acknowledged put, one at a time: each is one durable (fsync'd) commit
  (e) prefix queries (limit 100) through the socket against a database of --entries entries
  (f) the daemon's resident memory after (e)
Diagnostics without a target: the same queries in-process (SQL cost without the wire), a bare wire round trip,
and CPU seconds spent by client and server in each socket phase.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.common import Report, log, process_cpu_s, status_kib, verdict
from ctxgraph.model import Draft
from ctxgraph.process import ServerProcess
from ctxgraph.store import _SCHEMA_V1, Store
from nullbox.wire import Client, JSONObject, WireError

AGENTS: Final = 20
TOPICS: Final = 50
BATCH: Final = 1000
FILL_BATCH: Final = 5000
QUERY_LIMIT: Final = 100
CLASSES: Final = ("broad", "narrow", "rare", "none", "empty")
CLASS_NOTES: Final = {
    "broad": "agent-A/ (~5%)",
    "narrow": "agent-A/topic-T/ (~0.1%)",
    "rare": "agent-A/topic-T/item-J (~11)",
    "none": "matches nothing",
    "empty": "'' (everything)",
}
TARGET_RATIO: Final = 0.5
TARGET_P99_MS: Final = 2.0
TARGET_RSS_MIB: Final = 64.0
INSERT_SQL: Final = "INSERT INTO entries(hash, agent, key, created_ns, value) VALUES (?, ?, ?, ?, ?)"


# ------------------------------------------------------------------------------------------------------- data


def agent_of(n: int) -> str:
    return f"agent-{n % AGENTS}"


def key_of(n: int) -> str:
    return f"agent-{n % AGENTS}/topic-{(n // AGENTS) % TOPICS}/item-{n // (AGENTS * TOPICS)}"


def value_of(n: int) -> JSONObject:
    return {
        "kind": "observation",
        "seq": n,
        "text": f"agent {n % AGENTS} noted fact {n} while working on topic {(n // AGENTS) % TOPICS}",
        "tags": ["bench", "ctxgraph", f"t{n % 7}"],
        "score": (n % 1000) / 1000,
        "final": n % 2 == 0,
    }


def items(start: int, count: int) -> list[tuple[str, str, Any]]:
    return [(agent_of(n), key_of(n), value_of(n)) for n in range(start, start + count)]


def batches(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(size, total - start)


# ---------------------------------------------------------------------------------------------------- helpers


def percentile(ordered: list[float], pct: int) -> float:
    """Nearest-rank percentile of already sorted samples: the smallest sample >= ``pct``% of all samples."""
    if not ordered:
        return float("nan")
    rank = max(1, -(-pct * len(ordered) // 100))  # ceil(pct * n / 100) in integers
    return ordered[rank - 1]


def filesystem_of(path: Path) -> str:
    best = ("", "?", "?")
    target = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
            best = (mount, parts[2], parts[0])
    return f"{best[1]} ({best[2]} on {best[0]})"


def ms(ns: float) -> float:
    return ns / 1e6


@dataclass
class Timing:
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float = 0.0


def timed(body: Callable[[], None], server_pid: int | None = None) -> Timing:
    server_before = process_cpu_s(server_pid) if server_pid is not None else 0.0
    cpu_before = time.process_time()
    start = time.perf_counter_ns()
    body()
    wall = (time.perf_counter_ns() - start) / 1e9
    cpu = time.process_time() - cpu_before
    server = process_cpu_s(server_pid) - server_before if server_pid is not None else 0.0
    return Timing(wall, cpu, server)


def entry_count(client: Client) -> int:
    count: int = client.call("stats")["entries"]
    return count


# ----------------------------------------------------------------------------------------------------- phases


def bench_raw_sqlite(path: Path, rows: int) -> Timing:
    """(a) the baseline: pre-built rows (hash, canonical value precomputed), executemany per transaction."""
    prepared: list[list[tuple[bytes, str, str, int, str]]] = []
    now = time.time_ns()
    for start, count in batches(rows, BATCH):
        drafts = [Draft.make(a, k, v) for a, k, v in items(start, count)]
        prepared.append([(d.hash, d.agent, d.key, now, d.canonical.decode("utf-8")) for d in drafts])
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA_V1:
            conn.execute(statement)

        def run() -> None:
            for batch in prepared:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(INSERT_SQL, batch)
                conn.execute("COMMIT")

        timing = timed(run)
        stored = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    finally:
        conn.close()
    if stored != rows:
        raise RuntimeError(f"raw sqlite stored {stored} rows, expected {rows}")
    return timing


def bench_store(path: Path, rows: int) -> Timing:
    """(b) Store.put_many in batches of 1000 (values built beforehand: the store's work only)."""
    prepared = [items(start, count) for start, count in batches(rows, BATCH)]
    store = Store(path)
    try:

        def run() -> None:
            for batch in prepared:
                store.put_many(batch)

        timing = timed(run)
        stored = store.stats()["entries"]
    finally:
        store.close()
    if stored != rows:
        raise RuntimeError(f"Store stored {stored} rows, expected {rows}")
    return timing


def bench_put_batch(server: ServerProcess, rows: int) -> Timing:
    """(c1) op put_batch, 1000 items per request, one request outstanding at a time."""
    prepared = [
        [{"agent": a, "key": k, "value": v} for a, k, v in items(start, count)] for start, count in batches(rows, BATCH)
    ]
    with Client(server.address, timeout=120) as client:

        def run() -> None:
            for batch in prepared:
                results = client.call("put_batch", items=batch)["results"]
                if len(results) != len(batch) or not all(r["created"] for r in results):
                    raise RuntimeError("put_batch did not create every entry")

        timing = timed(run, server.pid)
        stored = entry_count(client)
    if stored != rows:
        raise RuntimeError(f"daemon stored {stored} rows after put_batch, expected {rows}")
    return timing


def bench_pipelined_puts(server: ServerProcess, rows: int) -> Timing:
    """(c2) single put requests, BATCH of them sent at once with Client.call_many, over one connection."""
    prepared: list[list[tuple[str, JSONObject]]] = [
        [("put", {"agent": a, "key": k, "value": v}) for a, k, v in items(start, count)]
        for start, count in batches(rows, BATCH)
    ]
    with Client(server.address, timeout=120) as client:

        def run() -> None:
            for batch in prepared:
                for result in client.call_many(batch):
                    if isinstance(result, WireError):
                        raise result
                    if not result["created"]:
                        raise RuntimeError("a pipelined put did not create its entry")

        timing = timed(run, server.pid)
        stored = entry_count(client)
    if stored != rows:
        raise RuntimeError(f"daemon stored {stored} rows after pipelined puts, expected {rows}")
    return timing


def bench_put_latency(server: ServerProcess, first: int, samples: int) -> list[float]:
    """(d) one put at a time, each acknowledged after its own durable commit: latencies in ns, sorted."""
    prepared = items(first, samples)
    latencies: list[float] = []
    with Client(server.address, timeout=60) as client:
        for a, k, v in prepared:
            start = time.perf_counter_ns()
            reply = client.call("put", agent=a, key=k, value=v)
            latencies.append(time.perf_counter_ns() - start)
            if not reply["created"]:
                raise RuntimeError("a sequential put did not create its entry")
    latencies.sort()
    return latencies


def fill(path: Path, entries: int) -> float:
    """Fill a fresh database in-process with Store.put_many; returns rows/s."""
    store = Store(path)
    start = time.perf_counter_ns()
    try:
        for offset, count in batches(entries, FILL_BATCH):
            store.put_many(items(offset, count))
            if offset and offset % 200_000 == 0:
                log(f"  filled {offset:,} entries")
    finally:
        store.close()  # checkpoints the WAL into the main file
    return entries / ((time.perf_counter_ns() - start) / 1e9)


def query_plan(entries: int, per_class: int, seed: int) -> list[tuple[str, str]]:
    """(class, prefix) pairs, ``per_class`` of each class, shuffled together."""
    rng = random.Random(seed)
    per_topic = max(1, -(-entries // (AGENTS * TOPICS)))  # items per agent/topic
    low, high = max(1, per_topic // 100), max(2, per_topic // 10)  # item-J then matches J, J0..J9: ~11 keys
    plan: list[tuple[str, str]] = []
    for _ in range(per_class):
        a, t = rng.randrange(AGENTS), rng.randrange(TOPICS)
        plan.append(("broad", f"agent-{a}/"))
        plan.append(("narrow", f"agent-{a}/topic-{t}/"))
        plan.append(("rare", f"agent-{a}/topic-{t}/item-{rng.randrange(low, high)}"))
        miss = (
            f"agent-{a}/topic-{t}/zz-{rng.randrange(10**6)}" if rng.random() < 0.5 else f"ghost-{rng.randrange(10**6)}/"
        )
        plan.append(("none", miss))
        plan.append(("empty", ""))
    rng.shuffle(plan)
    return plan


@dataclass
class QueryResult:
    latencies: dict[str, list[float]]
    returned: dict[str, float]


def collect(plan: list[tuple[str, str]], one: Callable[[str], int], warmup: int) -> QueryResult:
    for _, prefix in plan[:warmup]:
        one(prefix)
    latencies: dict[str, list[float]] = {c: [] for c in CLASSES}
    returned: dict[str, list[int]] = {c: [] for c in CLASSES}
    for cls, prefix in plan:
        start = time.perf_counter_ns()
        count = one(prefix)
        latencies[cls].append(time.perf_counter_ns() - start)
        returned[cls].append(count)
    for samples in latencies.values():
        samples.sort()
    latencies["all"] = sorted(x for c in CLASSES for x in latencies[c])
    means = {c: sum(v) / len(v) for c, v in returned.items() if v}
    return QueryResult(latencies, means)


def socket_queries(server: ServerProcess, plan: list[tuple[str, str]], warmup: int) -> QueryResult:
    with Client(server.address, timeout=60) as client:

        def one(prefix: str) -> int:
            return len(client.call("query", prefix=prefix, limit=QUERY_LIMIT)["entries"])

        return collect(plan, one, warmup)


def store_queries(path: Path, plan: list[tuple[str, str]], warmup: int) -> QueryResult:
    store = Store(path)
    try:
        return collect(plan, lambda prefix: len(store.query(prefix, QUERY_LIMIT).entries), warmup)
    finally:
        store.close()


def wire_round_trip(server: ServerProcess, samples: int) -> list[float]:
    """A request that does almost nothing on the server: ``get`` of a hash that does not exist."""
    latencies: list[float] = []
    missing = "0" * 64
    with Client(server.address, timeout=60) as client:
        for _ in range(samples):
            start = time.perf_counter_ns()
            try:
                client.call("get", hash=missing)
            except WireError as exc:
                if exc.code != "not_found":
                    raise
            latencies.append(time.perf_counter_ns() - start)
    latencies.sort()
    return latencies


# ------------------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Settings:
    entries: int
    rows: int
    latency_samples: int
    queries_per_class: int
    warmup: int
    base: Path | None
    seed: int


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small smoke run (20,000 entries, few samples)")
    parser.add_argument("--entries", type=int, default=None, help="entries in the query database (1,000,000)")
    parser.add_argument("--rows", type=int, default=None, help="rows written by each throughput phase (100,000)")
    parser.add_argument("--latency-samples", type=int, default=None, help="sequential puts timed (2,000)")
    parser.add_argument("--queries", type=int, default=None, help="queries per prefix class (1,000)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default: TMPDIR)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    quick: bool = args.quick
    settings = Settings(
        entries=args.entries if args.entries is not None else (20_000 if quick else 1_000_000),
        rows=args.rows if args.rows is not None else (10_000 if quick else 100_000),
        latency_samples=args.latency_samples if args.latency_samples is not None else (200 if quick else 2_000),
        queries_per_class=args.queries if args.queries is not None else (100 if quick else 1_000),
        warmup=20 if quick else 100,
        base=args.dir,
        seed=args.seed,
    )
    if settings.entries < AGENTS * TOPICS or settings.rows < 1 or settings.latency_samples < 1:
        parser.error(f"--entries must be at least {AGENTS * TOPICS}; --rows and --latency-samples at least 1")
    if settings.queries_per_class < 1:
        parser.error("--queries must be at least 1")
    return settings


def machine_info(work: Path) -> list[str]:
    return [
        f"nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {platform.machine()}, "
        f"kernel {platform.release()}",
        f"python {platform.python_version()} ({sys.executable}), sqlite {sqlite3.sqlite_version}",
        f"work directory {work} on {filesystem_of(work)}",
    ]


def throughput_rows(report: Report, settings: Settings, work: Path) -> None:
    rows = settings.rows
    log(f"(a) raw sqlite3 executemany, {rows:,} rows")
    raw = bench_raw_sqlite(work / "raw.db", rows)
    log(f"(b) Store.put_many, {rows:,} rows")
    store = bench_store(work / "store.db", rows)
    log(f"(c1) put_batch over the socket, {rows:,} rows")
    with ServerProcess(work / "c1") as server:
        batch = bench_put_batch(server, rows)
    log(f"(c2) pipelined puts over the socket, {rows:,} rows; then (d) {settings.latency_samples:,} sequential puts")
    with ServerProcess(work / "c2") as server:
        piped = bench_pipelined_puts(server, rows)
        latencies = bench_put_latency(server, rows, settings.latency_samples)

    raw_rate, store_rate = rows / raw.wall_s, rows / store.wall_s
    report.section(f"write throughput: {rows:,} rows per phase into an empty database, {BATCH} rows per commit")
    report.add("(a) raw sqlite3 executemany (baseline)", f"{raw_rate:,.0f}", "rows/s", "1.00 (baseline)")
    report.add("(b) Store.put_many, in-process", f"{store_rate:,.0f}", "rows/s", f"{store_rate / raw_rate:.2f} x (a)")
    for name, timing in (
        ("(c1) socket put_batch, 1000 items/request", batch),
        ("(c2) socket put x1000/call_many", piped),
    ):
        rate = rows / timing.wall_s
        ratio = rate / store_rate
        report.add(
            name,
            f"{rate:,.0f}",
            "rows/s",
            f"{ratio:.2f} x (b); target >= {TARGET_RATIO}",
            verdict(ratio >= TARGET_RATIO),
        )
    report.section(f"single acknowledged put, sequential, one durable commit each ({len(latencies):,} samples)")
    report.add("(d) put latency p50", f"{ms(percentile(latencies, 50)):.3f}", "ms")
    report.add("(d) put latency p99", f"{ms(percentile(latencies, 99)):.3f}", "ms")
    report.add("(d) put latency max", f"{ms(latencies[-1]):.3f}", "ms")
    for name, timing in (("(a)", raw), ("(b)", store), ("(c1)", batch), ("(c2)", piped)):
        cpu = f"bench process CPU {timing.client_cpu_s:.2f} s"
        if name.startswith("(c"):
            cpu += f", daemon CPU {timing.server_cpu_s:.2f} s"
        report.notes.append(f"{name} wall {timing.wall_s:.2f} s, {cpu} ({rows:,} rows)")


def query_rows(report: Report, settings: Settings, work: Path) -> None:
    entries = settings.entries
    server = ServerProcess(work / "query")
    server.root.mkdir(parents=True)
    log(f"filling {entries:,} entries in-process (Store.put_many, batches of {FILL_BATCH})")
    fill_rate = fill(server.db, entries)
    plan = query_plan(entries, settings.queries_per_class, settings.seed)
    log(f"(e) {len(plan):,} prefix queries through the socket")
    with server:
        wire = wire_round_trip(server, min(1000, 5 * settings.queries_per_class))
        cpu_before = process_cpu_s(server.pid)
        remote = socket_queries(server, plan, settings.warmup)
        query_cpu = process_cpu_s(server.pid) - cpu_before
        rss_kib, hwm_kib = status_kib(server.pid, "VmRSS"), status_kib(server.pid, "VmHWM")
        log("(e, diagnostic) the same queries in-process")
        local = store_queries(server.db, plan, settings.warmup)
    db_bytes = sum(p.stat().st_size for p in server.root.glob("ctxgraph.db*"))

    report.section(
        f"prefix query, limit {QUERY_LIMIT}, through the socket, {entries:,} entries "
        f"({settings.queries_per_class:,} queries per class, shuffled)"
    )
    for cls in (*CLASSES, "all"):
        samples = remote.latencies[cls]
        note = CLASS_NOTES.get(cls, "every class")
        p99 = ms(percentile(samples, 99))
        report.add(f"(e) {cls:<6} p50", f"{ms(percentile(samples, 50)):.3f}", "ms", note)
        report.add(
            f"(e) {cls:<6} p99", f"{p99:.3f}", "ms", f"target <= {TARGET_P99_MS} ms", verdict(p99 <= TARGET_P99_MS)
        )
    report.section("diagnostics for (e): same queries in-process (Store.query: SQL + row decoding, no wire)")
    for cls in (*CLASSES, "all"):
        samples = local.latencies[cls]
        report.add(
            f"(e') {cls:<6} p50 / p99",
            f"{ms(percentile(samples, 50)):.3f} / {ms(percentile(samples, 99)):.3f}",
            "ms",
        )
    report.add(
        "(e0) wire round trip (get, not found) p50 / p99",
        f"{ms(percentile(wire, 50)):.3f} / {ms(percentile(wire, 99)):.3f}",
        "ms",
    )
    report.section(f"daemon memory with {entries:,} entries, after the queries")
    rss = rss_kib / 1024
    report.add(
        "(f) daemon RSS (VmRSS)",
        f"{rss:.1f}",
        "MiB",
        f"target <= {TARGET_RSS_MIB:.0f} MiB",
        verdict(rss <= TARGET_RSS_MIB),
    )
    report.add("(f) daemon peak RSS (VmHWM)", f"{hwm_kib / 1024:.1f}", "MiB")
    returned = ", ".join(f"{c} {remote.returned[c]:.1f}" for c in CLASSES)
    report.notes.append(f"(e) mean entries returned per query: {returned}")
    report.notes.append(
        f"(e) daemon CPU during the socket queries: {query_cpu:.2f} s for {len(plan) + settings.warmup:,}"
    )
    report.notes.append(f"fill: {fill_rate:,.0f} rows/s in-process; database + WAL {db_bytes / 2**20:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter_ns()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="ctxgraph-bench-", dir=settings.base) as tmp:
        work = Path(tmp)
        info = machine_info(work)
        for line in info:
            log(line)
        throughput_rows(report, settings, work)
        query_rows(report, settings, work)
    elapsed = (time.perf_counter_ns() - started) / 1e9
    report.show("ctxgraph benchmark", info, f"total run time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
