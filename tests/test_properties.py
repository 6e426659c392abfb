"""Property-based tests (Hypothesis): whatever a device sends, and whatever a decoder produces, is
stored or becomes a dead letter with a reason; no decoder, parser or sink ever raises on data.

Over the real parser (every decoder), the real SQLite sink, the rollup worker's state and the
InfluxDB sink on VictoriaMetrics (tests/servers.py), each behind the shared outbox. Example counts are
kept modest (``MODEST``, ``FEW`` for the server) so the suite stays fast.
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import Victoria, unique_name
from tests.sinktools import OutboxHarness
from workers.core import envelope, storable
from workers.core.config import InfluxSink as InfluxOptions
from workers.core.config import SqliteSink as SqliteOptions
from workers.core.config import from_dict
from workers.core.envelope import Event, Reading
from workers.sinks import Batch

MODEST = settings(max_examples=60, deadline=None, derandomize=False,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(MODEST, max_examples=12)
RECV_TS = 1_732_260_000_000_000_000

# --------------------------------------------------------------------------- what devices send

numbers = st.one_of(
    st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -(2 ** 63) - 1, 10_000_000_000, 99_999_999_999_999,
                     1e308, -1e308, 5e-324]))
texts = st.text(max_size=20)
timestamps = st.one_of(numbers, texts, st.sampled_from(["9999-12-31T00:00:00", "0001-01-01", "2024-11-22 10:00",
                                                         "1e400", "-1", "nan", "10000000000"]))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, texts),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(texts, inner, max_size=3)), max_leaves=8)


@st.composite
def json_frames(draw: st.DrawFn) -> bytes:
    obj = draw(st.dictionaries(texts, json_values, max_size=4))
    if draw(st.booleans()):
        obj["device"] = draw(st.one_of(texts, numbers))
    if draw(st.booleans()):
        obj["ts"] = draw(timestamps)
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:                                       # beyond what JSON carries: as text, roughly
        return repr(obj).encode()


@st.composite
def kv_frames(draw: st.DrawFn) -> bytes:
    pairs = draw(st.lists(st.tuples(st.text(alphabet="abcxyz_", min_size=1, max_size=6),
                                    st.one_of(numbers.map(str), texts, timestamps.map(str))), max_size=4))
    head = draw(st.sampled_from(["", "from dev-1; ", "ts: 10000000000; ", "id: \x01; "]))
    sep = draw(st.sampled_from(["; ", ", ", " "]))
    return (head + sep.join(f"{k}: {v}" for k, v in pairs)).encode("utf-8", "surrogatepass")


@st.composite
def line_protocol_frames(draw: st.DrawFn) -> bytes:
    measurement = draw(st.text(alphabet="mw,= \\", min_size=1, max_size=4))
    fields = draw(st.lists(st.tuples(st.text(alphabet="fv", min_size=1, max_size=3),
                                     st.one_of(numbers.map(repr), numbers.map(lambda n: f"{n}i"),
                                               numbers.map(lambda n: f"{n}u"),
                                               st.sampled_from(["nan", "inf", "-inf", "NaN", "t", '"x"', '"']))),
                           min_size=1, max_size=3))
    ts = draw(st.one_of(st.just(""), numbers.map(lambda n: f" {n}")))
    tag = draw(st.sampled_from(["", ",device=d", ",device=", ",place=x y"]))
    return f"{measurement}{tag} {','.join(f'{k}={v}' for k, v in fields)}{ts}".encode("utf-8", "surrogatepass")


frames = st.one_of(st.binary(max_size=60), json_frames(), kv_frames(), line_protocol_frames())


@st.composite
def binary_packets(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(min_value=0, max_value=5))
    records = draw(st.binary(min_size=6 * count, max_size=6 * count))
    measure_s = draw(st.sampled_from([0, 1, 60, 65535]))
    number = draw(st.sampled_from([1, 2, 255]))
    length = draw(st.sampled_from([len(records), len(records) + 1]))
    return envelope_header(length, measure_s, number, count) + records


def envelope_header(length: int, measure_s: int, number: int, count: int) -> bytes:
    import struct
    return struct.pack("<HHHBBB", length, 600, measure_s, 6, number, count)


def parser_for(tmp_path: Path, decoder: str):
    from workers.processes.parser import Parser

    cfg = from_dict({"data_dir": str(tmp_path), "sinks": {"sqlite": {"enabled": True}},
                     "listeners": [{"name": "in", "bind": "127.0.0.1:7000", "decoder": decoder}],
                     "binary": {"devices": {"1": {"device": "board", "fields": [
                         {"name": "a", "type": "u16"}, {"name": "b", "type": "i16", "scale": 0.5},
                         {"name": "c", "type": "u16"}]}}}})
    return Parser(cfg)


def check_every_frame_is_stored_or_dead(parser, frame: bytes) -> None:
    """One frame per batch: it gives readings or events that every store can keep, or one dead letter
    with a reason a person can read; never an exception, never nothing."""
    conn = envelope.Conn(1, "in", "10.0.0.7:5000")
    body = envelope.pack_frames([(frame, RECV_TS, 0)])
    readings, events, dead = parser.decode_batch([conn], body)
    if not (readings or events or dead):                   # only a binary packet of 0 records says nothing
        assert frame[8:9] == b"\x00" and len(frame) == 9, frame
    assert not (readings or events) or not dead, (frame, readings, events, dead)
    for item in [*readings, *events]:
        assert storable.problem(item) is None, (frame, item)
    envelope.readings_body(readings, events)               # the envelope carries it
    for letter in dead:
        assert letter.reason and letter.raw == frame
        assert "Error(" not in letter.reason and "Traceback" not in letter.reason, letter.reason


@pytest.fixture(scope="module")
def parsers(tmp_path_factory) -> Iterator[dict]:
    """One parser per decoder for every example (a parser opens two SQLite files)."""
    made = {name: parser_for(tmp_path_factory.mktemp(name), name) for name in ("auto", "json", "kv", "influx", "binary")}
    yield made
    for parser in made.values():
        parser.deadletters.close()
        parser.known.close()


@MODEST
@given(frame=frames, decoder=st.sampled_from(["auto", "json", "kv", "influx"]))
def test_every_text_frame_is_stored_or_dead_lettered(parsers: dict, frame: bytes, decoder: str) -> None:
    check_every_frame_is_stored_or_dead(parsers[decoder], frame)


@MODEST
@given(packet=binary_packets())
def test_every_binary_packet_is_stored_or_dead_lettered_and_its_records_never_share_a_time(
        parsers: dict, packet: bytes) -> None:
    parser = parsers["binary"]
    check_every_frame_is_stored_or_dead(parser, packet)
    conn = envelope.Conn(1, "in", "10.0.0.7:5000")
    readings, events, _ = parser.decode_batch([conn], envelope.pack_frames([(packet, RECV_TS, 0)]))
    times = [r.ts for r in readings]
    assert len(times) == len(set(times))                   # a measure interval of 0 does not collapse them
    if packet[4:6] == b"\x00\x00":                         # measure interval 0: inside the edge's stamp spacing
        assert all(RECV_TS - 256 < t <= RECV_TS for t in times)


# --------------------------------------------------------------------------- the parser's fast path

# Frames near the JSON fast path's edges (workers.decoders.json.flat_reader): its keys, its value kinds,
# the 64-bit and 256-character bounds, control characters, epoch units; from plain and authenticated
# connections, devices with tags, and more devices than the cap admits.
fast_keys = st.sampled_from(["device", "device_id", "id", "name", "ts", "time", "timestamp", "cmd", "cmd_ack",
                             "value", "data", "temp", "hum", "", "k" * 257, "rollup"])
fast_values = st.one_of(numbers, st.booleans(), st.none(), texts, st.sampled_from(
    ["d1", "d2", "gw-7", "d\x01", "x" * 257, "", 1_732_260_000, 1_732_260_000_123, 1_732_260_000_123_456,
     1_732_260_000_123_456_789, 10 ** 17 - 1, 2 ** 63, -5, 2.5, [1, None], {"t": 1}]))

plain_keys = st.sampled_from(["temp", "hum", "rssi", "k" * 257, "id", "ts", "time"])


@st.composite
def fast_batches(draw: st.DrawFn) -> tuple[list[envelope.Conn], bytes]:
    conns = [envelope.Conn(1, "in", "10.0.0.7:5000"), envelope.Conn(2, "in", "10.0.0.8:5000", "d1", ()),
             envelope.Conn(3, "in", "10.0.0.9:5000", "gw-7", ("d*",)), envelope.Conn(4, "json", "10.0.0.7:5001"),
             envelope.Conn(5, "json", ":5002")]                       # (no address: no default device)
    frames = []
    for i in range(draw(st.integers(min_value=1, max_value=6))):
        obj = draw(st.one_of(st.dictionaries(fast_keys, fast_values, max_size=5),
                             st.dictionaries(plain_keys, st.one_of(numbers, st.booleans(), st.sampled_from(
                                 ["on", "", "\x00"])), min_size=1, max_size=4)))
        if draw(st.booleans()):
            obj = {"device": draw(st.sampled_from(["d1", "d2", "d3", "gw-7", "tagged", "y" * 300])),
                   "ts": draw(st.sampled_from([1_732_260_000_123, 1_732_260_000, -1, 2 ** 62])), **obj}
        try:
            raw = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            raw = repr(obj).encode()
        raw = draw(st.sampled_from([raw, raw, b" " + raw, raw[:-1], b"[" + raw + b"]"]))
        frames.append((raw, RECV_TS + i, draw(st.integers(min_value=0, max_value=4))))
    return conns, envelope.pack_frames(frames)


@pytest.fixture(scope="module")
def fast_and_general(tmp_path_factory) -> Iterator[tuple]:
    """Two parsers of one configuration, each with its own state (known devices, counters)."""
    from workers.processes.parser import Parser

    made = []
    for name in ("fast", "general"):
        cfg = from_dict({"data_dir": str(tmp_path_factory.mktemp(name)), "sinks": {"sqlite": {"enabled": True}},
                         "limits": {"max_devices": 6},
                         "devices": {"tagged": {"tags": {"place": "north", "rollup": "1m"}}},
                         "replies": [{"match": {"cmd": "heartU"}, "reply": {"ok": 1}}],
                         "listeners": [{"name": "in", "bind": "127.0.0.1:7000", "decoder": "auto"},
                                       {"name": "json", "bind": "127.0.0.1:7001", "decoder": "json"}]})
        made.append(Parser(cfg))
    yield tuple(made)
    for parser in made:
        parser.deadletters.close()
        parser.known.close()


@MODEST
@given(batch=fast_batches())
def test_the_parsers_fast_path_gives_what_the_general_path_gives(fast_and_general: tuple, batch: tuple) -> None:
    fast, general = fast_and_general
    conns, body = batch
    got = fast.decode_batch(conns, body), fast.last, fast.acks, fast.replies, dict(fast.counters)
    want = (general.decode_batch(conns, body, fast=False), general.last, general.acks, general.replies,
            dict(general.counters))
    assert got == want
    assert [list(r) for r in got[0][0]] == [list(r) for r in want[0][0]]    # field order too
    fast.acks, fast.replies, general.acks, general.replies = [], [], [], []


conn_rows = st.lists(st.one_of(
    st.tuples(st.integers(1, 3), st.sampled_from(["text", "in"]), st.sampled_from(["10.0.0.1:1", "10.0.0.2:1"])),
    st.tuples(st.integers(1, 3), st.just("text"), st.sampled_from(["10.0.0.1:1", "10.0.0.2:1"]),
              st.sampled_from(["d1", "d2"]), st.lists(st.sampled_from(["d*", "e?", 1, 1.0, True]), max_size=2))), max_size=4)


@MODEST
@given(batches=st.lists(conn_rows, max_size=5))
def test_a_parsers_table_of_connections_gives_what_unpacking_each_header_gives(batches: list) -> None:
    """Connection ids and peers reused with another listener, device or patterns: never a stale Conn."""
    known: dict = {}
    for rows in batches:
        raw = orjson.dumps({"seq": 1, "targets": None, "conns": [list(r) for r in rows]})
        assert envelope.parse_frames_header(raw, known) == envelope.parse_frames_header(raw)


# --------------------------------------------------------------------------- what sinks are handed

ids = st.one_of(st.text(min_size=0, max_size=12), st.sampled_from(["", "a\x00b", "x" * 300, "dev\nice", "é"]))
field_values = st.one_of(numbers, st.booleans(), st.text(max_size=10))
any_ts = st.one_of(st.integers(min_value=RECV_TS - 10 ** 15, max_value=RECV_TS + 10 ** 15),
                   st.sampled_from([0, 2 ** 63 - 1, 2 ** 63, 10 ** 19, -(2 ** 63), -(2 ** 63) - 1]))
sink_readings = st.lists(st.tuples(ids, any_ts, st.dictionaries(st.text(min_size=0, max_size=8), field_values,
                                                                  min_size=1, max_size=3)), max_size=12)


def numbered(raw: list) -> list[Reading]:
    """Readings with one key each (a number in the device id), so what is stored can be counted."""
    return [Reading(f"{device}#{i}", ts, fields, {}) for i, (device, ts, fields) in enumerate(raw)]


@MODEST
@given(raw=sink_readings)
def test_the_sqlite_sink_stores_or_dead_letters_whatever_it_is_handed(tmp_path_factory, raw: list) -> None:
    from workers.sinks.sqlite import SqliteSink

    tmp = tmp_path_factory.mktemp("s")
    sink = SqliteSink(tmp / "store.db", rollups=(tmp / "rollups.db", (60, 3600), 30.0, 3600.0))   # marks too
    sink.connect()
    harness = OutboxHarness(sink, SqliteOptions(), tmp)
    try:
        readings = numbered(raw)
        harness.outbox.add([1], readings, [Event("e", RECV_TS, "k", {"n": 2 ** 64 - 1})])
        harness.outbox.flush()
        assert harness.acked == [1]
        stored = {d for (d,) in sink.db.execute("SELECT DISTINCT device FROM readings")}   # type: ignore[union-attr]
        dead = {d.device for d in harness.dead()}
        for reading in readings:
            assert (reading.device in stored) != (reading.device in dead), reading
            if reading.device in dead:
                assert any(storable.value_problem(f, v) for f, v in reading.fields.items()) or \
                    storable.timestamp_problem(reading.ts) or \
                    any("\0" in f or "\0" in str(v) for f, v in reading.fields.items()), reading   # NUL: json_each
            else:       # read back per field exactly as written (booleans as 1 and 0), packed or not
                db = sink.db
                assert db is not None
                back = dict(db.execute("SELECT field, value FROM readings WHERE device = ?", (reading.device,)))
                assert back == {f: int(v) if type(v) is bool else v for f, v in reading.fields.items()
                                if not (type(v) is float and v != v)}, reading
    finally:
        sink.close()
        harness.close()


@MODEST
@given(raw=sink_readings)
def test_the_rollup_state_takes_whatever_it_is_handed(tmp_path_factory, raw: list) -> None:
    from workers.processes.rollup import RollupWorker

    cfg = from_dict({"data_dir": str(tmp_path_factory.mktemp("r")), "sinks": {"sqlite": {"enabled": True}},
                     "rollups": {"points_from_sqlite": False}})     # the state's own points
    worker = RollupWorker(cfg)
    now = time.time_ns()
    try:
        readings = [r._replace(ts=now - (r.ts - RECV_TS) // 1000) if TS_OK(r.ts) else r for r in numbered(raw)]
        worker.store.add(readings, now)
        worker.store.close_due(now + 10 ** 12)
        for window in worker.store.unemitted():
            assert window.stats.count >= 1
    finally:
        worker.store.close()
        worker.deadletters.close()


def TS_OK(ts: int) -> bool:  # noqa: N802  (a predicate read as a constant in the comprehension above)
    return storable.TS_MIN <= ts <= storable.TS_MAX


_measurements = itertools.count()


@FEW
@given(raw=sink_readings)
def test_the_influx_sink_stores_or_dead_letters_whatever_it_is_handed(tmp_path_factory, victoria: Victoria,
                                                                       raw: list) -> None:
    from workers.sinks.influx import InfluxSink

    tmp = tmp_path_factory.mktemp("i")
    measurement = unique_name(f"prop{next(_measurements)}")
    sink = InfluxSink(InfluxOptions(enabled=True, url=victoria.url, measurement=measurement, timeout_s=10))
    sink.connect()
    harness = OutboxHarness(sink, InfluxOptions(), tmp)
    try:
        readings = numbered(raw)
        harness.outbox.add([1], readings, [])
        harness.outbox.flush()
        assert harness.acked == [1] and not harness.outbox.spool.files, "nothing spooled: the server is up"
        dead = {d.device for d in harness.dead()}
        for reading in readings:             # integers = "float" (the default): a u64 is kept as a float
            unstorable = any(type(v) is float and not math.isfinite(v) for v in reading.fields.values()) \
                or not reading.device or any(not f for f in reading.fields)
            if unstorable:
                assert reading.device in dead, reading
        written = len(readings) - len(dead & {r.device for r in readings})
        assert harness.counters.get("written_readings", 0) == written
    finally:
        sink.close()
        harness.close()



def _observe_one_by_one(counters: dict, seen: list, now_ns: int) -> None:
    """``latency.observe_stored`` as it was, an observation at a time: the reference."""
    from workers.core.latency import BUCKETS_MS, PREFIX
    for entry in seen:
        ms = max(0, now_ns - entry.ts) // 1_000_000
        bucket = next((f"{PREFIX}{b}" for b in BUCKETS_MS if ms <= b), f"{PREFIX}inf")
        counters[bucket] = counters.get(bucket, 0) + 1
        counters["stored_latency_count"] = counters.get("stored_latency_count", 0) + 1
        counters["stored_latency_sum_ms"] = counters.get("stored_latency_sum_ms", 0) + ms


@given(ages_ms=st.lists(st.one_of(st.integers(-5_000, 70_000), st.sampled_from([0, 5, 6, 10, 60000, 60001])),
                        max_size=50), start=st.dictionaries(st.sampled_from(["stored_latency_le_5", "x"]),
                                                            st.integers(0, 9)))
def test_stored_latency_counted_per_batch_as_one_by_one(ages_ms: list[int], start: dict) -> None:
    from workers.core.latency import observe_stored
    now = 1_765_000_000_000_000_000
    seen = [envelope.Seen("d", now - age * 1_000_000 - 123, "tcp", 1, "p") for age in ages_ms]
    want, got = dict(start), dict(start)
    _observe_one_by_one(want, seen, now)
    observe_stored(got, seen, now)
    assert got == want
