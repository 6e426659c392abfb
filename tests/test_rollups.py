"""Rollups: the configuration of the windows, the rollup representation, the SQLite rollups table, the
worker's delivery, the history op and the sparkline (the window store alone: tests/test_rollupstore.py)."""
from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from workers.core import config as config_mod
from workers.core import envelope
from workers.tools.cli import sparkline
from workers.core.envelope import Stats
from workers.processes.rollup import RollupWorker
from tests.test_rollupstore import EXAMPLE, at, example_readings, reading


def test_window_configuration_is_checked() -> None:
    ok = config_mod.from_dict({"rollups": {"windows": ["1h", "60s", "1d"], "grace_s": 5}})
    assert ok.rollups.window_seconds == (60, 3600, 86400)
    assert [config_mod.window_label(s) for s in ok.rollups.window_seconds] == ["1m", "1h", "1d"]
    # with the SQLite sink on, its rows are the points and the parsers do not feed the rollup worker
    assert "rollup" not in ok.consumers() and "sqlite" in ok.consumers() and ok.rollups_from_sqlite
    own = config_mod.from_dict({"rollups": {"points_from_sqlite": False}})
    assert "rollup" in own.consumers() and not own.rollups_from_sqlite
    without_sqlite = config_mod.from_dict({"sinks": {"sqlite": {"enabled": False},
                                                     "influx": {"enabled": True, "url": "http://127.0.0.1:1"}}})
    assert "rollup" in without_sqlite.consumers() and not without_sqlite.rollups_from_sqlite
    assert "rollup" not in config_mod.from_dict({"rollups": {"enabled": False}}).consumers()
    for windows_, message in ((["1m", "90s"], "rollups.windows: 90s is not a multiple of 1m"),
                              (["1m", "45m", "1h"], "1h is not a multiple of 45m"),
                              (["1m", "60s"], "the same size twice"),
                              (["1 minute"], "rollups.windows[0]: expected a duration like"),
                              (["0m"], "rollups.windows[0]"),
                              ([], "list at least one window")):
        with pytest.raises(config_mod.ConfigError, match=re.escape(message)):
            config_mod.from_dict({"rollups": {"windows": windows_}})
    with pytest.raises(config_mod.ConfigError, match="rollups.grace_s: must not be negative"):
        config_mod.from_dict({"rollups": {"grace_s": -1}})


# --------------------------------------------------------------------------- representation and sinks


def test_rollup_reading_round_trip() -> None:
    stats = {"temp": Stats(4, 20.0, 22.5, 21.0, 20.5), "soil_moisture": Stats(2, 300, 310, 305.0, 310)}
    r = envelope.rollup_reading("g1", "1m", at(12, 3), stats, {"place": "north"})
    assert r.tags == {"place": "north", "rollup": "1m"}
    assert r.fields["temp_mean"] == 21.0 and r.fields["soil_moisture_count"] == 2
    assert envelope.rollup_window(r) == "1m"
    assert envelope.rollup_window(reading(1, temp=1.0)) is None
    body = envelope.readings_body([r], [])
    _, [back], _ = envelope.parse_readings(orjson.dumps({"seqs": []}), body)
    assert envelope.rollup_stats(back) == stats
    with pytest.raises(envelope.EnvelopeError):
        envelope.rollup_stats(r._replace(fields={"temp_mean": 1.0}))
    with pytest.raises(envelope.EnvelopeError):
        envelope.rollup_stats(r._replace(fields={"temp": 1.0}))


def sqlite_cfg(tmp_path: Path, points_from_sqlite: bool = False, **query) -> config_mod.Config:
    return config_mod.from_dict({"data_dir": str(tmp_path / "data"), "query": query,
                                 "rollups": {"windows": ["1m", "1h"], "points_from_sqlite": points_from_sqlite}})


def test_sqlite_sink_upserts_rollups_apart_from_readings(tmp_path: Path) -> None:
    from workers.sinks import Batch
    from workers.sinks.sqlite import SqliteSink, db_path, open_db

    cfg = sqlite_cfg(tmp_path)
    sink = SqliteSink.from_config(cfg)
    sink.connect()
    first = envelope.rollup_reading("g1", "1m", at(12, 3), {"temp": Stats(4, 20.0, 22.5, 21.0, 20.5)})
    corrected = envelope.rollup_reading("g1", "1m", at(12, 3), {"temp": Stats(5, 20.0, 25.0, 21.8, 20.5)})
    sink.write(Batch([first, reading(at(12, 3, 5), temp=20.0)], []))
    sink.write(Batch([corrected], []))
    sink.close()
    db = open_db(db_path(cfg), readonly=True)
    assert db.execute("SELECT device, field, window, start, count, min, max, mean, last FROM rollups").fetchall() == [
        ("g1", "temp", "1m", at(12, 3), 5, 20.0, 25.0, 21.8, 20.5)]
    assert db.execute("SELECT count(*) FROM readings").fetchone() == (1,)
    assert db.execute("SELECT field, value FROM latest").fetchall() == [("temp", 20.0)]
    db.close()


def test_worker_delivers_rollups_and_remembers_it(tmp_path: Path) -> None:
    """The worker's own path without sockets: state -> outbox -> SQLite sink -> marked delivered."""
    from workers.sinks.sqlite import db_path, open_db

    cfg = sqlite_cfg(tmp_path)
    worker = RollupWorker(cfg)
    worker.open_outboxes()
    worker.store.add(example_readings(), now=at(12, 4, 5))
    worker.store.close_due(at(13, 0, 30))
    assert worker.emit() == 4
    assert worker.emit() == 0                          # in flight: not handed over twice
    for outbox in worker.outboxes.values():
        outbox.flush()
    worker.emit()                                      # records the delivery
    assert worker.store.unemitted() == [] and worker.pending == {}
    for outbox in worker.outboxes.values():
        outbox.close()
        outbox.sink.close()
    worker.store.close()
    db = open_db(db_path(cfg), readonly=True)
    rows = db.execute("SELECT window, start, count, min, max, mean, last FROM rollups"
                      " ORDER BY window, start").fetchall()
    db.close()
    assert rows == [("1h", at(12, 0), 6, 18.0, 30.0, 22.0, 30.0),
                    ("1m", at(12, 2), 1, 18.0, 18.0, 18.0, 18.0),
                    ("1m", at(12, 3), 4, 20.0, 22.5, 21.0, 20.5),
                    ("1m", at(12, 4), 1, 30.0, 30.0, 30.0, 30.0)]


def test_with_no_sink_that_stores_rollups_nothing_waits(tmp_path: Path) -> None:
    worker = RollupWorker(sqlite_cfg(tmp_path))         # outboxes not opened: as if no sink took rollups
    worker.store.add(example_readings(), now=at(12, 4, 5))
    worker.store.close_due(at(12, 5, 30))
    assert worker.emit() == 0
    assert worker.store.unemitted() == []               # so they can be pruned in time
    worker.store.close()


def test_history_op(tmp_path: Path) -> None:
    from workers.processes.query import QueryWorker
    from workers.sinks import Batch
    from workers.sinks.sqlite import SqliteSink

    cfg = sqlite_cfg(tmp_path, history_max_points=3)
    worker = QueryWorker(cfg)

    def ask(**request) -> dict:
        return orjson.loads(worker.answer(orjson.dumps({"op": "history", **request})))

    assert "no store yet" in ask(device="g1", field="temp", **{"from": 0, "to": 1})["error"]
    sink = SqliteSink.from_config(cfg)
    sink.connect()
    sink.write(Batch([reading(ts, temp=v) for ts, v in EXAMPLE]
                     + [envelope.rollup_reading("g1", "1m", at(12, m), {"temp": Stats(1, m, m, float(m), m)})
                        for m in range(2, 8)], []))
    sink.close()
    ms = lambda ns: ns // 1_000_000  # noqa: E731
    reply = ask(device="g1", field="temp", window="60s", **{"from": ms(at(12, 3)), "to": ms(at(12, 6))})
    assert reply["ok"] and reply["window"] == "1m"
    assert reply["columns"] == ["ts", "count", "min", "max", "mean", "last"]
    assert reply["points"] == [[ms(at(12, m)), 1, m, m, float(m), m] for m in (3, 4, 5)]
    raw = ask(device="g1", field="temp", **{"from": ms(at(12, 3)), "to": ms(at(12, 3, 31))})
    assert raw["columns"] == ["ts", "value"] and raw["points"] == [[ms(at(12, 3, 5)), 20.0], [ms(at(12, 3, 30)), 22.5]]
    too_many = ask(device="g1", field="temp", window="1m", **{"from": ms(at(12, 0)), "to": ms(at(13, 0))})
    assert too_many["ok"] is False and "more than 3 points" in too_many["error"]
    assert "history_max_points" in too_many["error"]
    assert "no 5m rollups" in ask(device="g1", field="temp", window="5m")["error"]
    assert "expected a duration" in ask(device="g1", field="temp", window="often")["error"]
    assert '"from" must be' in ask(device="g1", field="temp", **{"from": "yesterday"})["error"]
    assert '"field"' in ask(device="g1")["error"]


def test_sparkline() -> None:
    assert sparkline([(0, 1.0), (1, 2.0), (2, 3.0), (3, 8.0)], 0, 4, 4) == "▁▂▃█"
    assert sparkline([(0, 5.0), (3, 5.0)], 0, 4, 4) == "▄  ▄"        # gaps in time stay gaps
    assert sparkline([(0, 1.0), (1, 3.0)], 0, 2, 1) == "▄"            # a column is the mean of its points
    assert sparkline([], 0, 4, 4) == ""
