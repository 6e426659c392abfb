"""The SQLite store's history layout: one row per reading (``packed_readings``), read per field through
the ``readings`` view; a second reading at the same timestamp adds only the fields the first lacked;
what the packed layout cannot carry is refused with a reason; a file made before keeps its layout."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from workers.core.envelope import Reading
from workers.sinks import Batch, PermanentError
from workers.sinks.sqlite import SqliteSink

OLD_READINGS = """CREATE TABLE readings (
    device TEXT NOT NULL, field TEXT NOT NULL, ts INTEGER NOT NULL, value, tags TEXT,
    PRIMARY KEY (device, field, ts)
) WITHOUT ROWID;"""


def test_one_row_per_reading_read_back_per_field(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    assert sink.packed
    sink.write(Batch([Reading("b1", 1_000, {"temp": 0.1 + 0.2, "n": -(2 ** 63), "ok": True, "s": 'a"\\\n'},
                              {"place": "north"})], []))
    sink.write(Batch([Reading("b1", 1_000, {"temp": 99.0, "humi": 40}, {}),        # same ts: adds humi only
                      Reading("b1", 2_000, {"temp": 21.5}, {})], []))
    db = sink.db
    assert db is not None
    assert db.execute("SELECT count(*) FROM packed_readings").fetchone() == (2,)
    assert db.execute("SELECT field, value, tags FROM readings WHERE device = 'b1' AND ts = 1000 ORDER BY field"
                      ).fetchall() == [("humi", 40, '{"place":"north"}'), ("n", -(2 ** 63), '{"place":"north"}'),
                                       ("ok", 1, '{"place":"north"}'), ("s", 'a"\\\n', '{"place":"north"}'),
                                       ("temp", 0.30000000000000004, '{"place":"north"}')]
    assert db.execute("SELECT ts, value FROM readings WHERE device = 'b1' AND field = 'temp' ORDER BY ts"
                      ).fetchall() == [(1_000, 0.30000000000000004), (2_000, 21.5)]
    before = db.total_changes
    sink.write(Batch([Reading("b1", 2_000, {"temp": 21.5}, {})], []))             # redelivered: no rewrite
    assert db.total_changes - before == 1          # the latest_log row; the reading's row untouched
    sink.close()


def test_what_the_packed_layout_cannot_carry_is_refused(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    with pytest.raises(PermanentError, match="NUL"):
        sink.write(Batch([Reading("b1", 1, {"a\0b": 1.0}, {})], []))
    with pytest.raises(PermanentError, match="NaN or infinite"):
        sink.write(Batch([Reading("b1", 1, {"t": float("inf")}, {})], []))
    with pytest.raises(PermanentError, match="64-bit"):
        sink.write(Batch([Reading("b1", 1, {"big": 2 ** 64 - 1}, {})], []))
    sink.write(Batch([Reading("b1", 1, {"text": "\\u0000 is six characters"}, {})], []))   # no NUL in it
    db = sink.db
    assert db is not None
    assert db.execute("SELECT value FROM readings").fetchall() == [("\\u0000 is six characters",)]
    sink.close()


def test_a_file_made_before_keeps_a_row_per_field(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    old = sqlite3.connect(path)
    old.executescript(OLD_READINGS)
    old.execute("INSERT INTO readings VALUES ('b1', 'temp', 1, 20.0, NULL)")
    old.commit()
    old.close()
    sink = SqliteSink(path)
    sink.connect()
    assert not sink.packed
    sink.write(Batch([Reading("b1", 2, {"temp": 21.0, "humi": 40}, {})], []))
    db = sink.db
    assert db is not None
    assert db.execute("SELECT type FROM sqlite_master WHERE name = 'readings'").fetchone() == ("table",)
    assert db.execute("SELECT count(*) FROM readings").fetchone() == (3,)
    assert db.execute("SELECT count(*) FROM packed_readings").fetchone() == (0,)
    sink.close()
