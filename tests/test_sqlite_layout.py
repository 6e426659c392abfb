"""The SQLite store's history layout: one row per reading (``packed_readings``), read per field through
the ``readings`` view; a second reading at the same timestamp adds only the fields the first lacked;
what the packed layout cannot carry is refused with a reason; a file made before keeps its layout."""
from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.core.envelope import Reading
from workers.sinks import Batch, PermanentError
from workers.sinks import sqlite as sqlite_sink
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
    assert db.execute("SELECT (SELECT count(*) FROM packed_readings) + (SELECT count(*) FROM recent_readings)"
                      ).fetchone() == (2,)
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


# --------------------------------------------------------------------------- recent_readings

def _stored(db: sqlite3.Connection) -> list[tuple]:
    return sorted(db.execute("SELECT device, ts, field, value FROM readings"))


def test_readings_newer_than_the_moved_wait_in_recent_readings_and_move_in_bulk(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    db = sink.db
    assert db is not None
    sink.write(Batch([Reading("a", 2, {"t": 1.0}, {}), Reading("b", 1, {"t": 2.0}, {})], []))
    assert db.execute("SELECT count(*) FROM recent_readings").fetchone() == (2,)
    sink.move_at = 0.0                                    # MOVE_EVERY_S has passed
    sink.write(Batch([Reading("a", 3, {"t": 3.0}, {})], []))
    assert db.execute("SELECT count(*) FROM recent_readings").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM packed_readings").fetchone() == (3,)
    sink.write(Batch([Reading("a", 1, {"t": 0.5}, {}),       # older than the moved: straight into packed
                      Reading("a", 3, {"t": 9.0, "h": 40}, {}),   # moved already: adds h there
                      Reading("a", 4, {"t": 4.0}, {})], []))
    assert db.execute("SELECT device, ts FROM recent_readings").fetchall() == [("a", 4)]
    assert _stored(db) == [("a", 1, "t", 0.5), ("a", 2, "t", 1.0), ("a", 3, "h", 40), ("a", 3, "t", 3.0),
                           ("a", 4, "t", 4.0), ("b", 1, "t", 2.0)]
    plan = " ".join(r[-1] for r in db.execute(          # each table read by its key, not scanned
        "EXPLAIN QUERY PLAN SELECT value FROM readings WHERE device = 'a' AND field = 't' AND ts >= 1 AND ts < 9"))
    assert "SCAN r" not in plan, plan
    sink.close()


def test_a_file_made_before_recent_readings_has_its_view_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE packed_readings (device TEXT NOT NULL, ts INTEGER NOT NULL, fields TEXT NOT NULL, tags TEXT,
            PRIMARY KEY (device, ts)) WITHOUT ROWID;
        CREATE VIEW readings (device, field, ts, value, tags) AS
            SELECT r.device, f.key, r.ts, f.value, r.tags FROM packed_readings AS r, json_each(r.fields) AS f;
        INSERT INTO packed_readings VALUES ('a', 5, '{"t":1.5}', NULL);""")
    old.commit()
    old.close()
    sink = SqliteSink(path)
    sink.connect()
    sink.write(Batch([Reading("a", 5, {"t": 2.0}, {}), Reading("a", 6, {"t": 3.0}, {})], []))
    db = sink.db
    assert db is not None
    assert "recent_readings" in db.execute("SELECT sql FROM sqlite_master WHERE name = 'readings'").fetchone()[0]
    assert _stored(db) == [("a", 5, "t", 1.5), ("a", 6, "t", 3.0)]
    sink.close()


KNOWN_MAX, DENSE = sqlite_sink.DEVICES_KNOWN_MAX, sqlite_sink.DENSE_READINGS_PER_DEVICE
_devices = st.sampled_from(["a", "b", "c"])
_reading = st.builds(lambda d, ts, fields: Reading(d, ts, fields, {}), _devices, st.integers(0, 6),
                     st.dictionaries(st.sampled_from(["t", "h", "s"]), st.integers(-3, 3), min_size=1, max_size=3))
_step = st.one_of(st.lists(_reading, min_size=1, max_size=6), st.sampled_from(["move", "fold", "restart", "kill"]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_step, min_size=1, max_size=12), forget=st.booleans(), dense=st.sampled_from([1, 2, 16]))
def test_every_reading_is_read_once_whatever_the_moves_folds_and_restarts(tmp_path: Path, steps: list,
                                                                          forget: bool, dense: int) -> None:
    """The store against a model: per (device, ts) the first value of each field stored wins; per
    (device, field) the newest ts wins, of two at one ts the later; each readings row is there once.
    ``forget``: the sink forgets what it knows of the devices at every move (as past DEVICES_KNOWN_MAX);
    ``dense``: DENSE_READINGS_PER_DEVICE (1: every batch writes its devices' newest straight into
    packed_readings when none of theirs wait in recent_readings)."""
    path = tmp_path / f"{uuid.uuid4().hex}.db"
    sqlite_sink.DEVICES_KNOWN_MAX = 0 if forget else KNOWN_MAX
    sqlite_sink.DENSE_READINGS_PER_DEVICE = dense
    history: dict[tuple[str, int], dict[str, int]] = {}
    newest: dict[tuple[str, str], tuple[int, int]] = {}
    sink = SqliteSink(path)
    sink.connect()
    try:
        for step in steps:
            if step == "move":
                sink.move_at = 0.0
            elif step == "fold":
                sink.fold_at = 0.0
            elif step in ("restart", "kill"):
                if step == "restart":
                    sink.close()
                else:                                       # killed: nothing folded or moved
                    assert sink.db is not None
                    sink.db.close()
                sink = SqliteSink(path)
                sink.connect()              # a start folds and moves what the last run left
                assert sink.db is not None
                assert sink.db.execute("SELECT count(*) FROM latest_log").fetchone() == (0,)
                assert {(d, f): (ts, v) for d, f, ts, v in sink.db.execute("SELECT * FROM latest_rows")} == newest
            else:
                sink.write(Batch(step, []))
                for device, ts, fields, _tags in step:
                    stored = history.setdefault((device, ts), {})
                    for field, value in fields.items():
                        stored.setdefault(field, value)
                        if (device, field) not in newest or ts >= newest[(device, field)][0]:
                            newest[(device, field)] = (ts, value)
            db = sink.db
            assert db is not None
            want = sorted((d, ts, f, v) for (d, ts), fields in history.items() for f, v in fields.items())
            assert _stored(db) == want
            assert {(d, f): (ts, v) for d, f, ts, v in db.execute("SELECT device, field, ts, value FROM latest")
                    } == newest
    finally:
        sink.close()
        sqlite_sink.DEVICES_KNOWN_MAX = KNOWN_MAX
        sqlite_sink.DENSE_READINGS_PER_DEVICE = DENSE
