"""The SQLite store's newest values and presence: each commit adds one ``latest_log`` row, folded into
``latest_rows`` and ``device_rows`` every ``FOLD_EVERY_S``; the views ``latest`` and ``devices`` read
both, so a reader never sees an older value than was committed; a start after a kill folds the log in;
a file made before the views has its tables moved behind them."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from workers.core.envelope import Reading, Seen
from workers.sinks import Batch, PermanentError, TransientError
from workers.sinks import sqlite as sqlite_sink
from workers.sinks.sqlite import BEYOND_64_BITS, SqliteSink


def latest(db: sqlite3.Connection) -> dict:
    return {(d, f): (ts, v) for d, f, ts, v in db.execute("SELECT device, field, ts, value FROM latest")}


def devices(db: sqlite3.Connection) -> dict:
    return {r[0]: r[1:] for r in db.execute("SELECT device, last_seen, via, peer, offline_after_s FROM devices")}


def seen(device: str, ts: int, peer: str = "p") -> Seen:
    return Seen(device, ts, "text", 1, peer)


def test_newest_values_read_through_the_views_before_and_after_a_fold(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    db = sink.db
    assert db is not None
    sink.write(Batch([Reading("a", 2_000, {"t": 21.5, "ok": True}, {}), Reading("b", 1_000, {"t": 5}, {})], [],
                     [seen("a", 10), seen("b", 11)]))
    sink.write(Batch([Reading("a", 1_000, {"t": 99.0, "h": 40}, {}),      # older: adds h, never wins t
                      Reading("a", 3_000, {"t": 22.0}, {}),
                      Reading("b", 1_000, {"t": 6}, {})], [],              # the same ts: the later wins
                     [seen("a", 20, "q"), seen("b", 5, "old")]))             # b: an older arrival never wins
    assert db.execute("SELECT count(*) FROM latest_log").fetchone() == (2,)   # not folded yet
    want = {("a", "t"): (3_000, 22.0), ("a", "ok"): (2_000, 1), ("a", "h"): (1_000, 40), ("b", "t"): (1_000, 6)}
    assert latest(db) == want
    assert devices(db) == {"a": (20, "text", "q", 900.0), "b": (11, "text", "p", 900.0)}
    assert dict(db.execute("SELECT device, online FROM presence")) == {"a": 0, "b": 0}    # 1970: long offline
    assert db.execute("SELECT count(*) FROM latest_rows").fetchone() == (0,)

    sink.fold_at = 0.0                                  # FOLD_EVERY_S has passed: the log folded
    sink.write(Batch([Reading("b", 4_000, {"t": 7}, {})], [], [seen("b", 30)]))
    assert db.execute("SELECT count(*) FROM latest_log").fetchone() == (0,)
    want[("b", "t")] = (4_000, 7)
    assert latest(db) == want                           # the newest of each device read in recent_readings
    sink.move_at = 0.0                                  # MOVE_EVERY_S has passed: they go into latest_rows
    sink.write(Batch([Reading("b", 4_000, {"t": 7}, {})], [], [seen("b", 30)]))
    assert db.execute("SELECT count(*) FROM latest_log").fetchone() == (0,)
    want[("b", "t")] = (4_000, 7)
    assert latest(db) == want
    assert {(d, f): (ts, v) for d, f, ts, v in db.execute("SELECT * FROM latest_rows")} == want
    assert devices(db)["b"] == (30, "text", "p", 900.0)
    sink.close()


def test_a_start_after_a_kill_folds_the_log_in(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    sink.write(Batch([Reading("a", 1_000, {"t": 1}, {})], [], [seen("a", 1)]))
    sink.write(Batch([Reading("a", 2_000, {"t": 2}, {})], [], [seen("a", 2)]))
    sink.write(Batch([Reading("a", 3_000, {"t": 3}, {}), Reading("c", 3_000, {"x": "on"}, {})], [], [seen("c", 3)]))
    assert sink.db is not None
    assert sink.db.execute("SELECT count(*) FROM latest_log").fetchone() == (3,)
    sink.db.close()                                     # killed: no close(), nothing folded

    reader = sqlite_sink.open_db(tmp_path / "s.db", readonly=True)     # what the query worker restores
    want = {("a", "t"): (3_000, 3), ("c", "x"): (3_000, "on")}
    assert latest(reader) == want
    again = SqliteSink(tmp_path / "s.db")
    again.connect()
    assert again.db is not None
    assert again.db.execute("SELECT count(*) FROM latest_log").fetchone() == (0,)
    assert {(d, f): (ts, v) for d, f, ts, v in again.db.execute("SELECT * FROM latest_rows")} == want
    assert latest(reader) == want
    assert devices(reader) == {"a": (2, "text", "p", 900.0), "c": (3, "text", "p", 900.0)}
    reader.close()
    again.close()


def test_close_folds_what_waits(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    sink.write(Batch([Reading("a", 1_000, {"t": 1}, {})], []))
    sink.write(Batch([Reading("a", 2_000, {"t": 2}, {})], []))
    sink.close()
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT count(*) FROM latest_log").fetchone() == (0,)
    assert db.execute("SELECT ts, value FROM latest_rows").fetchall() == [(2_000, 2)]
    db.close()


def test_a_refused_or_failed_batch_changes_no_newest_value(tmp_path: Path, monkeypatch) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    db = sink.db
    assert db is not None
    sink.write(Batch([Reading("a", 1_000, {"t": 1}, {})], []))
    with pytest.raises(PermanentError, match=BEYOND_64_BITS[:30]):
        sink.write(Batch([Reading("a", 2_000, {"t": 2 ** 63}, {})], []))
    sink.fold_at = 0.0                                  # a fold that fails half way keeps what waits
    monkeypatch.setattr(sqlite_sink, "UPSERT_DEVICE", "INSERT INTO no_such_table VALUES (?, ?, ?, ?, ?)")
    with pytest.raises(TransientError):
        sink.write(Batch([Reading("a", 3_000, {"t": 3}, {})], [], [seen("a", 3)]))
    monkeypatch.undo()
    assert latest(db) == {("a", "t"): (1_000, 1)}
    sink.write(Batch([Reading("a", 4_000, {"t": 4}, {})], []))
    assert latest(db) == {("a", "t"): (4_000, 4)}
    sink.close()


OLD_TABLES = """
CREATE TABLE latest (device TEXT NOT NULL, field TEXT NOT NULL, ts INTEGER NOT NULL, value,
                     PRIMARY KEY (device, field)) WITHOUT ROWID;
CREATE TABLE devices (device TEXT PRIMARY KEY, last_seen INTEGER NOT NULL, via TEXT NOT NULL, peer TEXT NOT NULL,
                      offline_after_s REAL NOT NULL) WITHOUT ROWID;
CREATE VIEW presence AS SELECT device, last_seen, via, peer, offline_after_s,
    (julianday('now') - 2440587.5) * 86400.0 - last_seen / 1e9 <= offline_after_s AS online FROM devices;
INSERT INTO latest VALUES ('old', 't', 5, 1.5);
INSERT INTO devices VALUES ('old', 5, 'text', 'p', 60.0);
"""


def test_a_file_made_before_the_views_moves_its_rows_behind_them(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "s.db")
    db.executescript(OLD_TABLES)
    db.close()
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    db = sink.db
    assert db is not None
    kinds = dict(db.execute("SELECT name, type FROM sqlite_master WHERE name IN ('latest', 'devices')"))
    assert kinds == {"latest": "view", "devices": "view"}
    sink.write(Batch([Reading("new", 9, {"t": 2}, {})], [], [seen("new", 9)]))
    assert latest(db) == {("old", "t"): (5, 1.5), ("new", "t"): (9, 2)}
    assert dict(db.execute("SELECT device, offline_after_s FROM presence")) == {"old": 60.0, "new": 900.0}
    sink.close()
