"""Rollups whose points are the SQLite sink's rows (``[rollups] points_from_sqlite``, the default with
the SQLite sink on): the sink marks the windows its rows touch (``RollupMarks``) and the state computes
them from ``readings``. No sockets; the sink classifies by the real clock, so timestamps are taken
around now."""
from __future__ import annotations

import time
from pathlib import Path

from workers.core import envelope
from workers.core.envelope import Reading, Stats
from workers.core.rollupstore import MARK_MARGIN_NS, NS, RollupMarks, RollupStore
from workers.core.runtime import Counters
from workers.sinks import Batch
from workers.sinks.sqlite import SqliteSink, open_db

SIZES = (60, 3600)
GRACE_S = 30.0
CORRECT_FOR_S = 6 * 3600.0


def minute_now() -> int:
    now = time.time_ns()
    return now - now % (60 * NS)


def sink_and_state(tmp_path: Path) -> tuple[SqliteSink, RollupStore]:
    sink = SqliteSink(tmp_path / "sensorpipe.db", rollups=(tmp_path / "rollups.db", SIZES, GRACE_S, CORRECT_FOR_S))
    sink.connect()
    state = RollupStore(tmp_path / "rollups.db", SIZES, GRACE_S, CORRECT_FOR_S, Counters("rollup"),
                        readings_db=tmp_path / "sensorpipe.db")
    return sink, state


def minutes(state: RollupStore) -> dict[tuple[str, str, int], tuple[Stats, int]]:
    return {(w.device, w.field, w.start): (w.stats, w.version) for w in state.unemitted(10_000) if w.size == 60}


def test_windows_come_from_the_rows_once_whatever_is_written_twice(tmp_path: Path) -> None:
    sink, state = sink_and_state(tmp_path)
    start = minute_now()
    readings = [Reading("g1", start + 1 * NS, {"temp": 20.0, "state": "ok", "door": True}, {}),
                Reading("g1", start + 3 * NS, {"temp": 22.0, "rssi": -70}, {}),
                Reading("g1", start + 2 * NS, {"temp": 21.0}, {}),
                # a rollup the rollup worker wrote through this sink: never a point of a window
                envelope.rollup_reading("g1", "1m", start - 60 * NS, {"temp": Stats(1, 1.0, 1.0, 1.0, 1.0)})]
    sink.write(Batch(readings, []))
    sink.write(Batch(readings, []))                   # redelivered: the same rows, nothing new
    assert state.close_due(start + 91 * NS) >= 2     # (4 in the last minute of an hour: the hours too)
    assert minutes(state) == {("g1", "temp", start): (Stats(3, 20.0, 22.0, 21.0, 22.0), 1),
                              ("g1", "rssi", start): (Stats(1, -70, -70, -70.0, -70), 1)}
    sink.write(Batch(readings, []))                   # and again after the window was computed
    assert state.close_due(start + 92 * NS) == 0        # nothing changed: no new version
    assert sink.counters.get("late_readings", 0) == 0
    sink.close()
    state.close()


def test_a_late_reading_corrects_its_window_and_counts_once(tmp_path: Path) -> None:
    sink, state = sink_and_state(tmp_path)
    closed = minute_now() - 120 * NS                    # due 90 s after its start: closed by now
    sink.write(Batch([Reading("g2", closed + 5 * NS, {"temp": 1.0}, {})], []))
    sink.write(Batch([Reading("g2", closed + 5 * NS, {"temp": 1.0}, {})], []))   # written twice
    assert sink.counters["late_readings"] == 1
    now = time.time_ns()
    assert state.close_due(now) >= 1       # its minute, and its hour too when an hour has just begun
    assert minutes(state)[("g2", "temp", closed)] == (Stats(1, 1.0, 1.0, 1.0, 1.0), 1)
    hours_closed = sum(1 for w in state.unemitted(10_000) if w.size == 3600)   # then corrected too
    sink.write(Batch([Reading("g2", closed + 6 * NS, {"temp": 3.0}, {})], []))
    assert sink.counters["late_readings"] == 2
    assert state.close_due(time.time_ns()) >= 1
    assert minutes(state)[("g2", "temp", closed)] == (Stats(2, 1.0, 3.0, 2.0, 3.0), 2)
    assert state.counters["corrected_windows"] == 1 + hours_closed
    # older than the correction horizon, or a day ahead: stored, not rolled up, counted by the sink
    sink.write(Batch([Reading("g2", closed - 7 * 3600 * NS, {"temp": 5.0}, {}),
                      Reading("g2", closed + 2 * 86400 * NS, {"temp": 6.0}, {})], []))
    assert sink.counters["too_late_readings"] == 1 and sink.counters["future_readings"] == 1
    assert state.close_due(time.time_ns()) == 0
    sink.close()
    state.close()


def test_a_window_due_soon_is_marked_after_every_commit(tmp_path: Path) -> None:
    """The race the marks guard against: rows committed just before the rollup worker computes a
    window it had marked earlier. Within MARK_MARGIN_NS of its due time a window is marked again."""
    open_db(tmp_path / "sensorpipe.db").close()
    state = RollupStore(tmp_path / "rollups.db", SIZES, GRACE_S, CORRECT_FOR_S, Counters("rollup"),
                        readings_db=tmp_path / "sensorpipe.db")
    marks = RollupMarks(tmp_path / "rollups.db", SIZES, GRACE_S, CORRECT_FOR_S, Counters("sink:sqlite"))
    start = minute_now()
    due = start + 90 * NS
    window = ("g3", "temp", start)
    assert marks.mark({window}, [], now=start + 1 * NS) == 1
    assert marks.mark({window}, [], now=start + 2 * NS) == 0          # marked and far from due: nothing to do
    assert marks.mark({window}, [], now=due - MARK_MARGIN_NS) == 1    # due soon: marked again
    state.close_due(due)
    dirty = "SELECT dirty FROM windows WHERE device = 'g3' AND size = 60"
    assert state.db.execute(dirty).fetchone() == (0,)
    assert marks.mark({window}, [], now=due - MARK_MARGIN_NS // 2) == 1
    assert state.db.execute(dirty).fetchone() == (1,)                 # so it is computed again
    marks.close()
    state.close()
