"""The SQLite store on real database files: immutability, dedup, pagination, prefix plans, migrations."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import ctxgraph.store as store_module
from ctxgraph.model import Draft, Entry
from ctxgraph.store import SCHEMA_VERSION, AgentRecord, Store, StoreError, prefix_upper_bound


def test_update_and_delete_are_refused_by_sqlite_itself(store: Store) -> None:
    store.put("a", "k", 1)
    raw = sqlite3.connect(store.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            raw.execute("UPDATE entries SET value = '2'")
        with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
            raw.execute("DELETE FROM entries")
        assert raw.execute("SELECT value FROM entries").fetchall() == [("1",)]
    finally:
        raw.close()


def test_durable_settings(store: Store) -> None:
    raw = store._writer
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the WAL is synced at every commit


def test_dedup_keeps_first_entry(store: Store) -> None:
    first = store.put("a", "k", {"x": 1, "y": 2})
    again = store.put("a", "k", {"y": 2, "x": 1.0})
    assert first.created and not again.created
    assert again.hash == first.hash
    assert again.created_ns == first.created_ns
    other_writer = store.put("b", "k", {"x": 1, "y": 2})
    assert other_writer.created and other_writer.hash != first.hash
    assert store.stats()["entries"] == 2


def test_duplicates_within_one_batch(store: Store) -> None:
    results = store.put_many([("a", "k", 1), ("a", "k", 1), ("a", "k", 2)])
    assert [r.created for r in results] == [True, False, True]
    assert results[0].hash == results[1].hash
    assert store.stats()["entries"] == 2


def test_get_round_trips_the_canonical_value(store: Store) -> None:
    result = store.put("agent", "k", {"b": [1.0, "\u00e9"], "a": None})
    entry = store.get(result.hash)
    assert entry == Entry(result.hash, "agent", "k", '{"a":null,"b":[1,"\u00e9"]}', result.created_ns)
    assert entry.value == {"a": None, "b": [1, "\u00e9"]}
    assert store.get("0" * 64) is None


def _all_pages(fetch: Any, limit: int) -> list[list[Entry]]:
    pages: list[list[Entry]] = []
    after = None
    while True:
        page = fetch(limit=limit, after=after)
        pages.append(page.entries)
        after = page.next
        if after is None:
            return pages


def test_pagination_newest_first_without_gaps_or_overlaps(store: Store) -> None:
    written = store.put_many([("a", f"p/{i}", i) for i in range(250)])
    pages = _all_pages(lambda **kw: store.query("p/", **kw), 100)
    assert [len(p) for p in pages] == [100, 100, 50]
    flat = [e.hash for page in pages for e in page]
    assert flat == [r.hash for r in reversed(written)]


def test_exact_page_boundary_has_no_empty_trailing_page(store: Store) -> None:
    store.put_many([("a", f"p/{i}", i) for i in range(200)])
    pages = _all_pages(lambda **kw: store.query("p/", **kw), 100)
    assert [len(p) for p in pages] == [100, 100]


def test_history_and_by_agent(store: Store) -> None:
    store.put_many([("a", "k", 1), ("b", "k", 2), ("a", "other", 3), ("a", "k", 4)])
    assert [e.value for e in store.history("k").entries] == [4, 2, 1]
    assert [e.value for e in store.by_agent("a").entries] == [4, 3, 1]
    assert [e.value for e in store.by_agent("a", scopes=["o"]).entries] == [3]
    assert store.by_agent("a", scopes=[]).entries == []
    pages = _all_pages(lambda **kw: store.history("k", **kw), 2)
    assert [[e.value for e in p] for p in pages] == [[4, 2], [1]]


def test_like_wildcards_are_plain_characters(store: Store) -> None:
    keys = ["a%b", "a_b", "axb", "a%", "ab", "a\\b", "A%b"]
    store.put_many([("w", k, k) for k in keys])
    assert sorted(e.key for e in store.query("a%").entries) == ["a%", "a%b"]
    assert [e.key for e in store.query("a_").entries] == ["a_b"]
    assert [e.key for e in store.query("a\\").entries] == ["a\\b"]
    assert sorted(e.key for e in store.query("a").entries) == sorted(k for k in keys if k.startswith("a"))


def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound("") is None
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff\U0010ffff") is None
    assert prefix_upper_bound("x\ud7ff") == "x\ue000"  # skips the surrogate block


def test_unicode_prefix_edges(store: Store) -> None:
    keys = ["x\ud7ff", "x\ud7ffz", "x\ue000", "a\U0010ffff", "a\U0010ffff\U0010ffffq", "b", "\u00e9t\u00e9", "\u00e9u"]
    store.put_many([("w", k, 0) for k in keys])
    for prefix in ["x\ud7ff", "a\U0010ffff", "a\U0010ffff\U0010ffff", "\u00e9t", "\u00e9", "x"]:
        expected = sorted(k for k in keys if k.startswith(prefix))
        assert sorted(e.key for e in store.query(prefix).entries) == expected, prefix


def _plan(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> str:
    return " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_every_query_shape_uses_an_index(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_many([("w", f"k/{i}", i) for i in range(10)])
    plans: list[str] = []
    reader = store._reader

    class Recorder:
        def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
            if sql.lstrip().upper().startswith("SELECT") and "FROM entries" in sql:
                plans.append(_plan(reader, sql, params))
            return reader.execute(sql, params)

    monkeypatch.setattr(store, "_reader", Recorder())
    store.query("k/")
    store.history("k/1")
    store.by_agent("w")
    store.get("00" * 32)
    monkeypatch.undo()
    more = store_module.COUNT_CAP + 100  # enough for the newest-first walk
    store.put_many([("w", f"k/more/{i}", i) for i in range(more)])
    monkeypatch.setattr(store, "_reader", Recorder())
    store.query("k/")
    assert any("INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in p for p in plans)
    assert plans
    for plan in plans:
        # SEARCH is a b-tree lookup (an index, the rowid, or the min/max optimisation); SCAN walks a whole tree.
        table_steps = [step for step in plan.split(" | ") if " entries" in step]
        assert table_steps and all(step.startswith("SEARCH entries") for step in table_steps), plan
    assert any("COVERING INDEX entries_key" in p for p in plans)  # the capped count is index-only


def _naive(entries: list[tuple[int, str, str]], prefix: str) -> list[str]:
    return [h for _seq, key, h in sorted(entries, reverse=True) if key.startswith(prefix)]


def test_both_query_plans_agree_with_a_naive_filter(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefixes common enough for the newest-first walk, rare ones for the key range, and the adversarial
    case of a large prefix whose entries are all old (walk budget spent, the key range finishes the page)."""
    old = store_module.COUNT_CAP + 500
    newer = store_module.WALK_BUDGET + 2000
    rows: list[tuple[str, str, Any]] = [("w", f"old/{i:05d}", i) for i in range(old)]
    rows += [("w", f"hot/{i % 7}/{i}" if i % 2 else f"cold/{i}", i) for i in range(newer)]
    rows += [("w", f"late/{i}", i) for i in range(30)]
    results = store.put_many(rows)
    entries = [(seq, key, r.hash) for seq, ((_a, key, _v), r) in enumerate(zip(rows, results, strict=True), 1)]

    plans: list[str] = []
    for name in ("_key_range", "_newest_first"):
        original = getattr(store, name)

        def spy(*args: Any, _name: str = name, _original: Any = original) -> Any:
            plans.append(_name)
            return _original(*args)

        monkeypatch.setattr(store, name, spy)

    for prefix in ["old/", "hot/", "hot/3/", "cold/", "late/", "late/1", "missing/", "", "o"]:
        expected = _naive(entries, prefix)
        for limit in (3, 100, 1000):
            got: list[str] = []
            after = None
            for _ in range(40):  # the first pages, or all of them
                page = store.query(prefix, limit=limit, after=after)
                got += [e.hash for e in page.entries]
                after = page.next
                if after is None:
                    break
            assert got == expected[: len(got)], (prefix, limit)
            assert after is not None or len(got) == len(expected), (prefix, limit)
    assert "_newest_first" in plans and "_key_range" in plans
    walk_then_range = [i for i in range(1, len(plans)) if plans[i - 1 : i + 1] == ["_newest_first", "_key_range"]]
    assert walk_then_range, "the adversarial 'old/' prefix should spend the walk budget and finish with the range"


def test_stats(store: Store) -> None:
    empty = store.stats()
    assert empty["entries"] == 0 and empty["oldest_ns"] is None
    store.put_many([("a", "k", i) for i in range(5)])
    stats = store.stats()
    assert stats["entries"] == 5
    assert stats["schema_version"] == SCHEMA_VERSION
    assert stats["oldest_ns"] <= stats["newest_ns"]
    assert stats["db_bytes"] > 0


def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    first = Store(path)
    result = first.put("a", "k", [1, 2])
    first.save_agent(AgentRecord("a", ("r/",), None, 1000, None, 7, 1))
    first.close()
    second = Store(path)
    try:
        assert second.get(result.hash) is not None
        assert second.agents() == [AgentRecord("a", ("r/",), None, 1000, None, 7, 1)]
        assert second.put("a", "k", [1, 2]).created is False
    finally:
        second.close()


def test_agent_records_update_and_delete(store: Store) -> None:
    store.save_agent(AgentRecord("a", None, ("w/",), None, None, None, 5))
    store.save_agent(AgentRecord("a", ("r/",), None, 1, 2, 3, 99))
    assert store.agents() == [AgentRecord("a", ("r/",), None, 1, 2, 3, 5)]  # first registration time kept
    assert store.delete_agent("a") is True
    assert store.delete_agent("a") is False
    assert store.agents() == []


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StoreError, match=r"future\.db: schema version 99 is newer"):
        Store(path)


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"garbage\.db: not a usable ctxgraph database"):
        Store(path)


def test_migration_hook_runs_pending_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "db.sqlite"
    Store(path).close()

    def to_next(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE notes (text TEXT)")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(store_module.MIGRATIONS, SCHEMA_VERSION, to_next)
    migrated = Store(path)
    try:
        assert migrated.schema_version == SCHEMA_VERSION + 1
        assert migrated._reader.execute("SELECT count(*) FROM notes").fetchone()[0] == 0
    finally:
        migrated.close()


def test_failed_migration_leaves_the_database_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "db.sqlite"
    original = Store(path)
    original.put("a", "k", 1)
    original.close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(store_module.MIGRATIONS, SCHEMA_VERSION, broken)
    with pytest.raises(RuntimeError, match="migration bug"):
        Store(path)
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0
        assert raw.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    finally:
        raw.close()


def test_a_version_1_database_gets_the_call_budget_column(tmp_path: Path) -> None:
    """Agents registered before budgets existed keep their registration, with no limit."""
    path = tmp_path / "v1.db"
    raw = sqlite3.connect(path)
    for statement in store_module._SCHEMA_V1:
        raw.execute(statement)
    raw.execute("INSERT INTO agents(name, write_prefixes, uid, registered_ns) VALUES ('old', '[\"w/\"]', 7, 5)")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    with contextlib.closing(Store(path)) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        assert store.agents() == [AgentRecord("old", None, ("w/",), 7, None, None, 5, 0)]
        store.save_agent(AgentRecord("old", None, ("w/",), 7, None, None, 9, 120))
        assert store.agents()[0].max_calls_per_hour == 120


def test_insert_is_atomic(store: Store) -> None:
    good = Draft.make("a", "k", 1)
    bad = Draft(b"\x00" * 32, "a", "k", b"not json")  # stored fine, but the batch below fails half-way
    store.insert([bad])
    broken = Draft(b"\x01" * 32, "a", None, b"1")  # type: ignore[arg-type]  # NOT NULL violation
    with pytest.raises(sqlite3.IntegrityError):
        store.insert([good, broken])
    assert store.get(good.hash.hex()) is None
