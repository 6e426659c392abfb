"""Rollups end to end: real worker processes (two parsers), readings with explicit timestamps in a
window that is still open, the rollups in the SQLite store, a late reading correcting a closed window,
a restart of the rollup worker in the middle of a window while the edge delivers batches twice, and
``history`` through the query endpoint and the CLI; rollups in InfluxDB (VictoriaMetrics) and MongoDB
(mongoeco) through the real sinks."""
from __future__ import annotations

import socket
import sqlite3
import time
from typing import Callable

from tests.pipeline import Pipeline, free_port, wait_for
from tests.servers import Mongo, Victoria, unique_name

NS_PER_MS = 1_000_000


def next_window_ms(size_s: int, at_least_s: float) -> int:
    """Start (ms) of the first window of ``size_s`` starting at least ``at_least_s`` from now."""
    size = size_s * 1000
    earliest = int((time.time() + at_least_s) * 1000)
    return -(-earliest // size) * size


def send_lines(pipeline: Pipeline, lines: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", pipeline.text_port)) as sock:
        sock.sendall(b"".join(lines))


def line(device: str, ts_ms: int, value: float) -> bytes:
    return b'{"device":"%s","temp":%r,"ts":%d}\n' % (device.encode(), value, ts_ms)


def rollup_rows(pipeline: Pipeline, device: str) -> dict[tuple[str, int], tuple]:
    if not (pipeline.data / "sensorpipe.db").exists():
        return {}
    db = pipeline.db()
    try:
        return {(w, start // NS_PER_MS): tuple(rest) for w, start, *rest in db.execute(
            "SELECT window, start, count, min, max, mean, last FROM rollups WHERE device = ? AND field = 'temp'",
            (device,))}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def state_points(pipeline: Pipeline, device: str) -> int:
    path = pipeline.data / "rollups.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM points WHERE device = ?", (device,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def counters(pipeline: Pipeline, worker: str) -> dict:
    return pipeline.query({"op": "status"}).get("workers", {}).get(worker, {})


def test_windows_from_two_parsers_then_a_late_correction_and_history(
        pipeline_factory: Callable[..., Pipeline]) -> None:
    pipeline = pipeline_factory(rollups='windows = ["5s", "10s"]\ngrace_s = 1')
    pipeline.start_all()
    start = next_window_ms(10, 5)
    # 40 readings, 250 ms apart, value i/2: sent as 20 batches so that both parsers get some
    readings = [(start + i * 250, i * 0.5) for i in range(40)]
    for n in range(0, 40, 2):
        send_lines(pipeline, [line("g-e2e", ts, v) for ts, v in readings[n:n + 2]])
        wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'g-e2e'") == n + 2, message=f"{n + 2} rows")
    for parser in ("parser:1", "parser:2"):            # counters arrive every 2 s
        wait_for(lambda: counters(pipeline, parser).get("batches", 0) > 0, message=f"batches decoded by {parser}")
    assert rollup_rows(pipeline, "g-e2e") == {}                         # the window is still open

    expected = {("5s", start): (20, 0.0, 9.5, 4.75, 9.5),               # i = 0..19: sum 95
                ("5s", start + 5000): (20, 10.0, 19.5, 14.75, 19.5),    # i = 20..39: sum 295
                ("10s", start): (40, 0.0, 19.5, 9.75, 19.5)}             # sum 390
    wait_for(lambda: rollup_rows(pipeline, "g-e2e") == expected, timeout=30, message="three closed windows")
    status = wait_for(lambda: counters(pipeline, "rollup").get("closed_windows") == 3 and counters(pipeline, "rollup"),
                      message="rollup counters")
    assert status.get("corrected_windows", 0) == 0

    # a reading for 9.9 s into the closed window arrives: both windows holding it are corrected
    send_lines(pipeline, [line("g-e2e", start + 9900, 100.0)])
    expected[("5s", start + 5000)] = (21, 10.0, 100.0, 395 / 21, 100.0)
    expected[("10s", start)] = (41, 0.0, 100.0, 490 / 41, 100.0)
    wait_for(lambda: rollup_rows(pipeline, "g-e2e") == expected, message="corrected windows")
    wait_for(lambda: counters(pipeline, "rollup").get("corrected_windows") == 2, message="corrections counted")
    # the points are the SQLite sink's rows (points_from_sqlite, the default): the sink counts late ones
    wait_for(lambda: counters(pipeline, "sink:sqlite").get("late_readings") == 1, message="the late reading counted")

    reply = pipeline.query({"op": "history", "device": "g-e2e", "field": "temp", "window": "5s",
                            "from": start, "to": start + 10000})
    assert reply["ok"], reply
    assert reply["points"] == [[start, 20, 0.0, 9.5, 4.75, 9.5], [start + 5000, 21, 10.0, 100.0, 395 / 21, 100.0]]
    raw = pipeline.query({"op": "history", "device": "g-e2e", "field": "temp", "from": start, "to": start + 10000})
    assert len(raw["points"]) == 41 and raw["points"][0] == [start, 0.0]

    out = pipeline.cli("history", "g-e2e", "temp", "--window", "5s", "--since", "1h")
    assert out.returncode == 0, out.stderr
    assert "2 5s rollups in the last 1h" in out.stdout
    assert "4.75" in out.stdout and "18.8095" in out.stdout               # the means, 395/21 to 6 digits
    assert any(ch in out.stdout for ch in "▁█")                          # the sparkline
    out = pipeline.cli("history", "g-e2e", "temp", "--since", "1h")
    assert out.returncode == 0 and "41 readings" in out.stdout
    out = pipeline.cli("history", "g-e2e", "temp", "--window", "1h")
    assert out.returncode == 2 and "no 1h rollups" in out.stderr


def test_restart_in_the_middle_of_a_window_with_batches_delivered_twice(
        pipeline_factory: Callable[..., Pipeline]) -> None:
    # the rollup worker keeping its own points, fed by the parsers (without the SQLite sink, or so configured)
    pipeline = pipeline_factory(rollups='windows = ["10s"]\ngrace_s = 10\npoints_from_sqlite = false')
    pipeline.start_all()
    start = next_window_ms(10, 3)
    first = [(start + i * 200, float(i)) for i in range(0, 25)]
    second = [(start + i * 200, float(i)) for i in range(25, 50)]

    # The SQLite sink is down, so the edge keeps every batch in flight (and in its journal).
    sink = next(n for n in pipeline.procs if n.startswith("sink-sqlite"))
    pipeline.stop(sink)
    send_lines(pipeline, [line("g-restart", ts, v) for ts, v in first])
    wait_for(lambda: state_points(pipeline, "g-restart") == 25, message="first half in the rollup state")

    # Kill the rollup worker mid-window; the second half arrives while it is down.
    rollup = next(n for n in pipeline.procs if n.startswith("rollup"))
    pipeline.kill(rollup)
    killed_at_ms = time.time() * 1000
    send_lines(pipeline, [line("g-restart", ts, v) for ts, v in second])
    pipeline.start("rollup")
    wait_for(lambda: state_points(pipeline, "g-restart") == 50, timeout=30, message="second half after restart")

    # Restart the edge without its acknowledgement checkpoint (as after a crash before the first one
    # was written): it replays its journal, both halves, to everyone, the rollup worker included.
    edge = next(n for n in pipeline.procs if n.startswith("edge"))
    pipeline.stop(edge)
    checkpoints = list(pipeline.data.rglob("acked.json"))
    assert checkpoints, "the edge writes its acknowledgement checkpoint on stop"
    for checkpoint in checkpoints:
        checkpoint.unlink()
    pipeline.start("edge")
    wait_for(lambda: counters(pipeline, "rollup").get("received_readings", 0) >= 75, timeout=30,
             message="the replayed batches reaching the rollup worker")
    assert killed_at_ms < start + 10_000                                # in the middle of the window
    assert rollup_rows(pipeline, "g-restart") == {}
    pipeline.start("sink-sqlite")

    # 0..49: count 50, min 0, max 49, mean 24.5, last 49, counted once
    wait_for(lambda: rollup_rows(pipeline, "g-restart") == {("10s", start): (50, 0.0, 49.0, 24.5, 49.0)},
             timeout=40, message="the window, exact")
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'g-restart'") == 50, message="raw readings")
    assert counters(pipeline, "rollup").get("corrected_windows", 0) == 0


def test_rollups_reach_influxdb_and_mongodb_through_the_pipeline(
        pipeline_factory: Callable[..., Pipeline], victoria: Victoria, mongo: Mongo) -> None:
    measurement, database = unique_name("rollup_e2e"), unique_name("rollup_e2e")
    sinks = "".join(f"""
[sinks.{name}]
enabled = true
endpoint = "tcp://127.0.0.1:{free_port()}"
{where}
flush_interval_ms = 50
""" for name, where in (("influx", f'url = "{victoria.url}"\nmeasurement = "{measurement}"'),
                        ("mongo", f'url = "{mongo.url}"\ndatabase = "{database}"')))
    pipeline = pipeline_factory(rollups='windows = ["5s"]\ngrace_s = 1', extra_toml=sinks)
    pipeline.start_all(("query", "sink-sqlite", "sink-influx", "sink-mongo", "rollup", "parser", "edge"))
    start = next_window_ms(5, 3)
    send_lines(pipeline, [line("g-db", start + i * 500, float(i)) for i in range(10)])    # 0..9: mean 4.5

    def in_influx() -> dict[str, list[float]]:
        return {item["metric"]["__name__"][len(measurement) + 4:]: item["values"]
                for item in victoria.export(f'{{__name__=~"{measurement}_5s_.*",device="g-db"}}')}

    wait_for(lambda: in_influx() == {"temp_count": [10], "temp_min": [0], "temp_max": [9], "temp_mean": [4.5],
                                     "temp_last": [9]}, timeout=30, message="the 5s rollup in InfluxDB")
    assert [item["timestamps"] for item in victoria.export(f'{{__name__="{measurement}_5s_temp_count"}}')] == [[start]]

    def in_mongo() -> list[dict]:
        with mongo.client() as client:
            return list(client[database]["rollups"].find({"device": "g-db"}, {"_id": 0, "time": 0, "tags": 0}))

    wait_for(lambda: in_mongo() == [{"device": "g-db", "field": "temp", "window": "5s", "start": start * NS_PER_MS,
                                     "count": 10, "min": 0.0, "max": 9.0, "mean": 4.5, "last": 9.0}],
             timeout=30, message="the 5s rollup in MongoDB")
    assert rollup_rows(pipeline, "g-db") == {("5s", start): (10, 0.0, 9.0, 4.5, 9.0)}
