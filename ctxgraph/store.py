"""ctxgraph's SQLite store: append-only, content-addressed, durable on acknowledgement.

Design notes:
- ``seq`` (the rowid) is the commit order; "newest first" and pagination cursors are in terms of it.
- Triggers make UPDATE and DELETE of entries fail inside SQLite itself, not only in this code.
- WAL with ``synchronous=FULL``: a commit is on stable storage before ``insert`` returns, so an acknowledged put
  survives SIGKILL and power loss.  Writers batch many puts into one transaction (group commit).
- One writer connection (used by one thread at a time) and one reader connection; WAL lets them run together.
- Prefix queries are key ranges on the ``entries_key`` index, never ``LIKE``, so ``%`` and ``_`` in keys are just
  characters.  See :meth:`Store.query` for how "newest first" stays cheap for both rare and common prefixes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ctxgraph.model import Draft, Entry, Page, PutResult

SCHEMA_VERSION: Final = 2
MAX_SEQ: Final = 2**63 - 1
COUNT_CAP: Final = 2048
WALK_CHUNK: Final = 4096
WALK_BUDGET: Final = 16384


class StoreError(Exception):
    """The database cannot be used (newer schema, not a ctxgraph database, ...)."""


_SCHEMA_V1: Final = (
    """CREATE TABLE entries (
        seq        INTEGER PRIMARY KEY,
        hash       BLOB    NOT NULL,
        agent      TEXT    NOT NULL,
        key        TEXT    NOT NULL,
        created_ns INTEGER NOT NULL,
        value      TEXT    NOT NULL   -- RFC 8785 canonical JSON; last, so scans skip its overflow pages
    )""",
    "CREATE UNIQUE INDEX entries_hash ON entries(hash)",
    "CREATE INDEX entries_key ON entries(key)",  # (key, rowid): prefix ranges, history newest first
    "CREATE INDEX entries_agent ON entries(agent)",  # (agent, rowid): by_agent newest first
    "CREATE INDEX entries_created ON entries(created_ns)",
    """CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
        BEGIN SELECT RAISE(ABORT, 'ctxgraph entries are immutable'); END""",
    """CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
        BEGIN SELECT RAISE(ABORT, 'ctxgraph entries are never deleted'); END""",
    """CREATE TABLE agents (
        name           TEXT PRIMARY KEY,
        read_prefixes  TEXT,              -- JSON list, NULL = unrestricted
        write_prefixes TEXT,
        uid            INTEGER,
        gid            INTEGER,
        cid            INTEGER UNIQUE,
        registered_ns  INTEGER NOT NULL
    )""",
)


def _create_v1(conn: sqlite3.Connection) -> None:
    # One statement at a time: executescript() would commit the migration's transaction half-way.
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _add_call_budget(conn: sqlite3.Connection) -> None:
    """v2: each agent's ``max_calls_per_hour`` (0 = no limit, what every agent registered before had)."""
    conn.execute("ALTER TABLE agents ADD COLUMN max_calls_per_hour INTEGER NOT NULL DEFAULT 0")


Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: dict[int, Migration] = {0: _create_v1, 1: _add_call_budget}
"""``MIGRATIONS[v]`` turns a schema at version ``v`` into ``v + 1``; each runs in its own transaction."""


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with ``prefix`` (None: no such bound).

    SQLite's BINARY collation compares UTF-8 bytes, whose order is code point order, so incrementing the last
    code point that can be incremented gives an exclusive upper bound for the range scan.
    """
    chars = list(prefix)
    while chars:
        point = ord(chars.pop()) + 1
        if point > 0x10FFFF:
            continue
        if 0xD800 <= point <= 0xDFFF:
            point = 0xE000
        return "".join(chars) + chr(point)
    return None


@dataclass(frozen=True)
class AgentRecord:
    name: str
    read: tuple[str, ...] | None
    write: tuple[str, ...] | None
    uid: int | None
    gid: int | None
    cid: int | None
    registered_ns: int
    max_calls_per_hour: int = 0  # 0: no limit

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.name,
            "read": None if self.read is None else list(self.read),
            "write": None if self.write is None else list(self.write),
            "uid": self.uid,
            "gid": self.gid,
            "cid": self.cid,
            "registered_ns": self.registered_ns,
            "max_calls_per_hour": self.max_calls_per_hour,
        }


_ENTRY_COLUMNS: Final = "seq, hash, agent, key, value, created_ns"


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(hash=row[1].hex(), agent=row[2], key=row[3], canonical=row[4], created_ns=row[5])


def _page(rows: list[tuple[Any, ...]], limit: int) -> Page:
    more = len(rows) > limit
    rows = rows[:limit]
    cursors = [str(r[0]) for r in rows]
    return Page([_entry(r) for r in rows], cursors[-1] if more and rows else None, cursors)


def parse_cursor(after: str | None) -> int:
    """A page cursor as handed out in ``next``; raises ValueError for anything else."""
    if after is None:
        return MAX_SEQ
    if not after.isascii() or not after.isdecimal() or len(after) > 19 or int(after) > MAX_SEQ:
        raise ValueError("not a cursor")
    return int(after)


class Store:
    """The in-process API.  Reads may run on any one thread; writes on one (possibly other) thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            self._configure(self._writer)
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._writer.close()
            raise StoreError(f"{self.path}: not a usable ctxgraph database ({exc})") from exc
        except BaseException:
            self._writer.close()
            raise
        self._reader = self._connect()
        self._reader.execute("PRAGMA query_only=ON")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._configure(conn)
        return conn

    @staticmethod
    def _configure(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA trusted_schema=OFF")

    def _migrate(self) -> None:
        version: int = self._writer.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this ctxgraph ({SCHEMA_VERSION}); "
                "refusing to open it"
            )
        while version < SCHEMA_VERSION:
            step = MIGRATIONS.get(version)
            if step is None:
                raise StoreError(f"{self.path}: no migration from schema version {version}")
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                step(self._writer)
                self._writer.execute(f"PRAGMA user_version = {version + 1:d}")
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            version += 1

    @property
    def schema_version(self) -> int:
        version: int = self._reader.execute("PRAGMA user_version").fetchone()[0]
        return version

    def close(self) -> None:
        """Close both connections; the last close checkpoints the WAL into the main file."""
        with self._write_lock:
            self._reader.close()
            self._writer.execute("PRAGMA optimize")
            self._writer.close()

    # ------------------------------------------------------------------------------------------------ writes

    def insert(self, drafts: Sequence[Draft]) -> list[PutResult]:
        """Store drafts in one durable transaction; duplicates (stored or within the batch) keep the first."""
        if not drafts:
            return []
        now = time.time_ns()
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                known = self._existing(conn, {d.hash for d in drafts})
                fresh: dict[bytes, Draft] = {}
                for draft in drafts:
                    if draft.hash not in known and draft.hash not in fresh:
                        fresh[draft.hash] = draft
                conn.executemany(
                    "INSERT INTO entries(hash, agent, key, created_ns, value) VALUES (?, ?, ?, ?, ?)",
                    ((d.hash, d.agent, d.key, now, d.canonical.decode("utf-8")) for d in fresh.values()),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        results: list[PutResult] = []
        for draft in drafts:
            created = fresh.pop(draft.hash, None) is not None
            results.append(PutResult(draft.hash.hex(), created, now if created else known.get(draft.hash, now)))
        return results

    @staticmethod
    def _existing(conn: sqlite3.Connection, hashes: set[bytes]) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        pending = list(hashes)
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT hash, created_ns FROM entries WHERE hash IN ({marks})"
            found.update(conn.execute(sql, chunk).fetchall())
        return found

    def put(self, agent: str, key: str, value: Any) -> PutResult:
        return self.insert([Draft.make(agent, key, value)])[0]

    def put_many(self, items: Iterable[tuple[str, str, Any]]) -> list[PutResult]:
        return self.insert([Draft.make(a, k, v) for a, k, v in items])

    # ------------------------------------------------------------------------------------------------- reads

    def get(self, digest: str) -> Entry | None:
        row = self._reader.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE hash = ?", (bytes.fromhex(digest),)
        ).fetchone()
        return None if row is None else _entry(row)

    def history(self, key: str, limit: int = 100, after: str | None = None) -> Page:
        rows = self._reader.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries INDEXED BY entries_key "
            "WHERE key = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (key, parse_cursor(after), limit + 1),
        ).fetchall()
        return _page(rows, limit)

    def by_agent(
        self, agent: str, limit: int = 100, after: str | None = None, scopes: Sequence[str] | None = None
    ) -> Page:
        """Entries written by ``agent``, newest first; with ``scopes``, only keys under one of those prefixes."""
        sql = f"SELECT {_ENTRY_COLUMNS} FROM entries INDEXED BY entries_agent WHERE agent = ? AND seq < ?"
        params: list[Any] = [agent, parse_cursor(after)]
        if scopes is not None:
            clauses, scope_params = _prefix_clauses(scopes)
            sql += f" AND ({clauses})"
            params += scope_params
        rows = self._reader.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1)).fetchall()
        return _page(rows, limit)

    def query(self, prefix: str, limit: int = 100, after: str | None = None) -> Page:
        """Entries whose key starts with ``prefix``, newest first.

        Two index plans, so that neither a rare nor a common prefix costs a walk through the whole table:
        - *key range*: take the newest ``limit`` seqs from the ``entries_key`` range of the prefix (index only:
          the index holds key and rowid), then read just those rows.  Cost: one index entry per match.
        - *newest first*: walk the rowid backwards from the cursor, keeping rows whose key matches.  Cost: about
          ``limit * total / matching`` rows.
        The key range is counted up to ``COUNT_CAP`` first (index only, cheap).  Below the cap it is the plan.
        Above it the prefix is common and the newest-first walk usually fills the page quickly; if it has not
        within ``WALK_BUDGET`` rows (the matches are old), the key range finishes the page below the walk.
        """
        before = parse_cursor(after)
        want = limit + 1
        if not prefix:
            everything = self._reader.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (before, want),
            ).fetchall()
            return _page(everything, limit)
        upper = prefix_upper_bound(prefix)
        if self._count_range(prefix, upper, before, COUNT_CAP) < COUNT_CAP:
            return _page(self._key_range(prefix, upper, before, want), limit)
        rows: list[tuple[Any, ...]] = []
        high = min(before, self._last_seq() + 1)
        walked = 0
        while len(rows) < want and high > 1 and walked < WALK_BUDGET:
            low = max(high - WALK_CHUNK, 0)
            rows += self._newest_first(prefix, upper, high, low, want - len(rows))
            walked += high - low
            high = low
        if len(rows) < want and high > 1:
            rows += self._key_range(prefix, upper, high, want - len(rows))
        return _page(rows, limit)

    def _count_range(self, prefix: str, upper: str | None, before: int, cap: int) -> int:
        sql = "SELECT count(*) FROM (SELECT 1 FROM entries INDEXED BY entries_key WHERE key >= ? AND seq < ?"
        params: list[Any] = [prefix, before]
        if upper is not None:
            sql += " AND key < ?"
            params.append(upper)
        count: int = self._reader.execute(sql + " LIMIT ?)", (*params, cap)).fetchone()[0]
        return count

    def _key_range(self, prefix: str, upper: str | None, before: int, want: int) -> list[tuple[Any, ...]]:
        # The inner select never leaves the index; only the rows that make the page are read from the table.
        inner = "SELECT seq FROM entries INDEXED BY entries_key WHERE key >= ? AND seq < ?"
        params: list[Any] = [prefix, before]
        if upper is not None:
            inner += " AND key < ?"
            params.append(upper)
        sql = f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq IN ({inner} ORDER BY seq DESC LIMIT ?) ORDER BY seq DESC"
        return self._reader.execute(sql, (*params, want)).fetchall()

    def _newest_first(self, prefix: str, upper: str | None, high: int, low: int, want: int) -> list[tuple[Any, ...]]:
        # The unary '+' keeps SQLite off entries_key: this plan walks the rowid.
        sql = f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq < ? AND seq >= ? AND +key >= ?"
        params: list[Any] = [high, low, prefix]
        if upper is not None:
            sql += " AND +key < ?"
            params.append(upper)
        return self._reader.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, want)).fetchall()

    def _last_seq(self) -> int:
        # Entries are never deleted (triggers) and rowids are assigned max+1, so this is also the entry count.
        last = self._reader.execute("SELECT max(seq) FROM entries").fetchone()[0]
        return int(last or 0)

    def stats(self) -> dict[str, Any]:
        oldest, newest = self._reader.execute("SELECT min(created_ns), max(created_ns) FROM entries").fetchone()
        page_size = self._reader.execute("PRAGMA page_size").fetchone()[0]
        page_count = self._reader.execute("PRAGMA page_count").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        return {
            "entries": self._last_seq(),
            "oldest_ns": oldest,
            "newest_ns": newest,
            "db_bytes": page_size * page_count,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "schema_version": self.schema_version,
        }

    # ---------------------------------------------------------------------------------------- agent records

    def agents(self) -> list[AgentRecord]:
        rows = self._reader.execute(
            "SELECT name, read_prefixes, write_prefixes, uid, gid, cid, registered_ns, max_calls_per_hour "
            "FROM agents ORDER BY name"
        ).fetchall()
        return [_agent_record(r) for r in rows]

    def save_agent(self, record: AgentRecord) -> None:
        with self._write_lock:
            self._writer.execute(
                "INSERT INTO agents(name, read_prefixes, write_prefixes, uid, gid, cid, registered_ns, "
                "max_calls_per_hour) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "read_prefixes = excluded.read_prefixes, write_prefixes = excluded.write_prefixes, "
                "uid = excluded.uid, gid = excluded.gid, cid = excluded.cid, "
                "max_calls_per_hour = excluded.max_calls_per_hour",
                (
                    record.name,
                    None if record.read is None else json.dumps(list(record.read)),
                    None if record.write is None else json.dumps(list(record.write)),
                    record.uid,
                    record.gid,
                    record.cid,
                    record.registered_ns,
                    record.max_calls_per_hour,
                ),
            )

    def delete_agent(self, name: str) -> bool:
        with self._write_lock:
            return self._writer.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount > 0


def _prefix_clauses(prefixes: Sequence[str]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for prefix in prefixes:
        upper = prefix_upper_bound(prefix)
        if upper is None:
            clauses.append("+key >= ?")
            params.append(prefix)
        else:
            clauses.append("(+key >= ? AND +key < ?)")
            params += [prefix, upper]
    return " OR ".join(clauses) or "0", params


def _agent_record(row: tuple[Any, ...]) -> AgentRecord:
    def prefixes(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(json.loads(text))

    return AgentRecord(row[0], prefixes(row[1]), prefixes(row[2]), row[3], row[4], row[5], row[6], row[7])
