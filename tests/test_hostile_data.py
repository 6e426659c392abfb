"""Issue 12, the data side: no value, timestamp, id or size a decoder can produce stops a worker or
costs another device its readings, and readings never collide silently.

Each case is sent on a real pipeline (edge, two parsers, the SQLite sink, the InfluxDB sink on
VictoriaMetrics, the rollup worker) inside the same writes as good readings, while good devices
stream beside it on their own connections; the good readings must all be stored in every store, the
bad frames must be dead letters with a reason that names what was wrong, and no worker may fail.
"""
from __future__ import annotations

import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.pipeline import Pipeline, free_port, wait_for
from tests.servers import Victoria, unique_name
from tests.test_influx_sink import influx_toml, series
from workers.core.deadletters import DeadLetterStore

ROLES = ("query", "sink-sqlite", "sink-influx", "rollup", "parser", "parser", "edge")
GOOD_DEVICES = [f"good-{i}" for i in range(4)]

# (what is sent, a phrase its dead letter's reason must hold; None: stored, not a dead letter)
HOSTILE = [
    (b"from evil-kv; v: 1; ts: 10000000000", "read as seconds is 2286-11-20"),
    (b'{"device":"evil-json","v":1,"ts":10000000000}', "read as seconds is 2286-11-20"),
    (b'{"device":"evil-ms","v":1,"ts":99999999999999999}', "after 2262-04-11"),
    (b'{"device":"evil-iso","v":1,"ts":"9999-12-31T00:00:00"}', "outside 1677-09-21 .. 2262-04-11"),
    (b'{"device":"evil-u64","v":18446744073709551615}', "outside the 64-bit signed integers"),
    (b'{"device":"evil-neg","v":-9223372036854775809}', None),     # orjson reads it as a float: stored
    (b'{"device":"evil-inf","v":1e400}', "invalid JSON"),
    (b"weather,device=evil-lp v=1 99999999999999999999", "out of range (64 bits)"),
    (b"weather,device=evil-lp-s v=1 10000000000", "read as seconds is 2286-11-20"),
    (b"weather,device=evil-lp-u v=18446744073709551615u", "outside the 64-bit signed integers"),
    (b'{"device":"evil\\nid","v":1}', "holds control characters"),
    (b'{"device":"' + b"x" * 300 + b'","v":1}', "characters long"),
    (b'{"device":"evil-field","' + b"f" * 300 + b'":1}', "field name"),
]
# NaN and infinity are failed reads (a failed_read event), the other fields of the frame are stored.
FAILED_READS = [
    (b"weather,device=nan-lp v=nan,w=1", "nan-lp", "v", "w"),
    (b"weather,device=inf-lp v=inf,w=2", "inf-lp", "v", "w"),
    (b"weather,device=ninf-lp v=-inf,w=3", "ninf-lp", "v", "w"),
    (b"from inf-kv; temp: inf; hum: 4", "inf-kv", "temp", "hum"),
    (b"from ninf-kv; temp: -Infinity; hum: 5", "ninf-kv", "temp", "hum"),
]


def good_line(device: str, i: int, base_ms: int) -> bytes:
    return orjson.dumps({"device": device, "ts": base_ms + i * 1000, "n": i, "temp": 20 + i / 8}) + b"\n"


class GoodStream(threading.Thread):
    """One good device streaming ``count`` readings with its own timestamps on its own connection."""

    def __init__(self, port: int, device: str, base_ms: int, count: int = 300) -> None:
        super().__init__(daemon=True)
        self.port, self.device, self.base_ms, self.count = port, device, base_ms, count
        self.sent = 0

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            while self.sent < self.count:
                sock.sendall(good_line(self.device, self.sent, self.base_ms))
                self.sent += 1
                time.sleep(0.002)           # a steady stream across the whole time the hostile frames come


def rollup_points(pipeline: Pipeline, like: str) -> int:
    path = pipeline.data / "rollups.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM points WHERE device LIKE ?", (like,)).fetchone()[0]
    finally:
        db.close()


def worker_counters(pipeline: Pipeline) -> dict:
    return pipeline.query({"op": "status"}).get("workers", {})


def test_hostile_values_are_dead_letters_and_good_devices_beside_them_lose_nothing(
        pipeline_factory, victoria: Victoria) -> None:
    measurement = unique_name("hostile")
    # the rollup worker with its own points, so that it is handed the hostile values too
    pipeline: Pipeline = pipeline_factory(extra_toml=influx_toml(victoria.url, measurement, free_port()),
                                          rollups="points_from_sqlite = false")
    pipeline.start_all(ROLES)
    base_ms = (time.time_ns() // 1_000_000 - 600_000) // 1000 * 1000     # recent: the rollups take it
    streams = [GoodStream(pipeline.text_port, device, base_ms) for device in GOOD_DEVICES]
    for stream in streams:
        stream.start()
    # Each hostile frame shares a write, so an edge batch, with good readings of its own device.
    mixed = 0
    for frame, _ in HOSTILE + [(f[0], None) for f in FAILED_READS]:
        pipeline.send(good_line("good-mixed", mixed, base_ms) + frame + b"\n" + good_line("good-mixed", mixed + 1, base_ms))
        mixed += 2
        time.sleep(0.02)                    # spread across the good streams (pacing a sender, not a wait)
    for stream in streams:
        stream.join(30)
    assert all(stream.sent == stream.count for stream in streams)
    good = sum(s.sent for s in streams) + mixed

    # Every good reading (2 fields each) in SQLite, in InfluxDB and in the rollup state.
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device LIKE 'good-%'") == 2 * good, timeout=30,
             message=f"{2 * good} good values in SQLite")
    wait_for(lambda: sum(len(p) for (name, dev), p in series(victoria, measurement).items()
                         if dev.startswith("good-")) == 2 * good, timeout=30,
             message=f"{2 * good} good values in VictoriaMetrics")
    wait_for(lambda: rollup_points(pipeline, "good-%") == 2 * good, timeout=30, message="good values rolled up")

    # Every hostile frame a dead letter with a reason that says what was wrong with it.
    def dead_by_frame() -> dict[bytes, str]:
        store = DeadLetterStore(pipeline.data / "deadletters.db")
        try:
            return {d.raw: d.reason for d in store.list(limit=1000)}
        finally:
            store.close()

    expected_dead = {frame: phrase for frame, phrase in HOSTILE if phrase}
    wait_for(lambda: set(expected_dead) <= set(dead_by_frame()), message="every hostile frame dead-lettered")
    dead = dead_by_frame()
    for frame, phrase in expected_dead.items():
        assert phrase in dead[frame], (frame, dead[frame])
        assert "Error" not in dead[frame], dead[frame]              # what was wrong, not an exception's name
    assert not any(raw.startswith(b'{"device":"good') for raw in dead)

    # NaN and infinity: a failed_read event naming the field; the frame's other fields are stored.
    for _, device, failed_field, stored_field in FAILED_READS:
        wait_for(lambda: pipeline.count_rows("readings", "WHERE device = ? AND field = ?", (device, stored_field)) == 1,
                 message=f"{device}.{stored_field} stored")
        assert pipeline.count_rows("readings", "WHERE device = ? AND field = ?", (device, failed_field)) == 0
        wait_for(lambda: pipeline.count_rows("events", "WHERE device = ? AND kind = 'failed_read' AND body LIKE ?",
                                             (device, f'%"{failed_field}"%')) == 1,
                 message=f"a failed_read event for {device}.{failed_field}")
    assert pipeline.count_rows("readings", "WHERE device = 'evil-neg'") == 1

    # No worker failed or died, and nothing waits: every sink and the rollup worker acknowledged.
    for name, proc in pipeline.procs.items():
        assert proc.poll() is None, f"{name} exited"
    counters = worker_counters(pipeline)
    assert not any(c.get("failed_batches") or c.get("poison_batches") for c in counters.values()), counters
    wait_for(lambda: worker_counters(pipeline).get("edge", {}).get("inflight_batches", 1) == 0,
             message="the edge has nothing in flight")


def test_readings_never_collide_across_connections(pipeline: Pipeline) -> None:
    """Frames without their own timestamp: two connections of one device, boards behind one NAT
    sending ``key: value`` lines without a device id, boards sharing one binary device number, and a
    board reporting a measure interval of 0. Every reading is stored, each once."""
    per_connection = 1000

    def send_lines(lines: list[bytes], port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for i in range(0, len(lines), 50):                         # many small writes, interleaved
                sock.sendall(b"".join(lines[i:i + 50]))

    twin = [[orjson.dumps({"device": "twin", "n": c * per_connection + i}) + b"\n" for i in range(per_connection)]
            for c in range(2)]
    nat = [[f"n: {c * per_connection + i}\n".encode() for i in range(per_connection)] for c in range(2)]
    threads = [threading.Thread(target=send_lines, args=(lines, pipeline.text_port)) for lines in twin + nat]
    for thread in threads:
        thread.start()

    # Three boards under device number 1, at once, 10 packets of 3 records each; one board says 0 s.
    def board(measure_s: int, packets: int, acked: list[int]) -> None:
        for p in range(packets):
            records = b"".join(struct.pack("<HHH", 300 + p, 30000, 30000) for _ in range(3))
            packet = struct.pack("<HHHBBB", len(records), 600, measure_s, 6, 1, 3) + records
            if pipeline.send(packet, port=pipeline.binary_port, read_reply=1) == b"A":
                acked.append(p)

    acks: list[list[int]] = [[], [], []]
    boards = [threading.Thread(target=board, args=(60 if b else 0, 10, acks[b])) for b in range(3)]
    for thread in boards:
        thread.start()
    for thread in threads + boards:
        thread.join(30)

    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'twin'") == 2 * per_connection, timeout=30,
             message="both connections of one device stored whole")
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = '127.0.0.1'") == 2 * per_connection,
             timeout=30, message="both boards behind one address stored whole")
    assert sum(len(a) for a in acks) == 30
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'balcony' AND field = 'light'") == 30 * 3,
             timeout=30, message="every record of every acknowledged packet stored")
    db = pipeline.db()
    try:
        values = sorted(v for (v,) in db.execute("SELECT value FROM readings WHERE device = 'twin'"))
    finally:
        db.close()
    assert values == list(range(2 * per_connection))


def test_a_crash_loop_shows_in_status(pipeline: Pipeline) -> None:
    """A worker killed again and again shows as a crash loop in ``status``: its starts are kept in
    the data directory, not in the counters that restart with it."""
    for starts in range(2, 5):
        pipeline.kill("sink-sqlite:1")
        pipeline.start("sink-sqlite", "sink-sqlite:1")
        wait_for(lambda: worker_counters(pipeline).get("sink:sqlite", {}).get("starts") == starts,
                 message=f"the sink's start number {starts} reported")
    status = pipeline.cli("status")
    assert status.returncode == 0, status.stderr
    assert "CRASH LOOP? started 4 times" in status.stdout
    assert "dead letters:" in status.stdout


def test_devices_past_the_cap_are_dead_letters(pipeline_factory) -> None:
    pipeline: Pipeline = pipeline_factory(extra_toml="\n[limits]\nmax_devices = 5\n")
    pipeline.start_all()
    pipeline.send(b"".join(orjson.dumps({"device": f"d{i}", "v": i}) + b"\n" for i in range(5)))
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device LIKE 'd%'") == 5, message="five devices stored")
    pipeline.send(b"".join(orjson.dumps({"device": f"{name}", "v": 1}) + b"\n" for name in ("d0", "new1", "d4", "new2")))
    wait_for(lambda: pipeline.count_rows("readings", "WHERE field = 'v'") == 7, message="known devices still stored")
    store = DeadLetterStore(pipeline.data / "deadletters.db")
    try:
        dead = wait_for(lambda: store.list() if len(store.list()) == 2 else None, message="two dead letters")
    finally:
        store.close()
    assert {d.raw for d in dead} == {b'{"device":"new1","v":1}', b'{"device":"new2","v":1}'}
    assert all("limits.max_devices" in d.reason for d in dead)
    wait_for(lambda: sum(c.get("devices_over_cap", 0) for c in worker_counters(pipeline).values()) == 2,
             message="counted")
