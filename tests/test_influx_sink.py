"""The InfluxDB sink: line protocol, failure kinds (a fake server) and the real VictoriaMetrics.

VictoriaMetrics answers 204 even to lines it cannot parse and stores string fields as 0, so the
400/413/429/503 paths are tested against a fake write endpoint (a real HTTP server), and everything
that can be read back is tested against VictoriaMetrics itself.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.pipeline import Pipeline, free_port, wait_for
from tests.servers import Victoria, unique_name
from tests.sinktools import (BASE_TS_MS, FakeInflux, OutboxHarness, closed_port_url, restart_with_full_spool,
                             send_readings, sink_status)
from workers.core.config import InfluxSink as InfluxOptions
from workers.decoders.influx import parse_line
from workers.core.envelope import Event, Reading, Stats, rollup_reading
from workers.sinks import Batch, BatchTooLarge, PermanentError, TransientError
from workers.sinks.influx import InfluxSink, LineBuilder, precision_of, retry_after

NS = 1_000_000_000
T0 = BASE_TS_MS * 1_000_000


def build(readings: list[Reading], **options: object) -> list[str]:
    divisor, _ = precision_of([r.ts for r in readings])
    return LineBuilder(InfluxOptions(**options)).lines(readings, divisor)


def sink_for(url: str, **options: object) -> InfluxSink:
    sink = InfluxSink(InfluxOptions(enabled=True, url=url, **options))
    sink.connect()
    return sink


@pytest.fixture
def fake() -> Iterator[FakeInflux]:
    server = FakeInflux()
    yield server
    server.close()


# --------------------------------------------------------------------------- line protocol


def test_a_reading_becomes_one_line() -> None:
    reading = Reading("balcony", T0, {"temperature": 21.5, "humidity": 52, "ok": True, "state": "dry"},
                      {"place": "balcony"})
    assert build([reading]) == [
        f'sensors,device=balcony,place=balcony temperature=21.5,humidity=52.0,ok=true,state="dry" {T0 // NS}']
    assert build([reading], integers="integer")[0].split(" ")[1] == 'temperature=21.5,humidity=52i,ok=true,state="dry"'


def test_the_measurement_a_board_named_wins_and_is_not_a_tag() -> None:
    reading = Reading("esp32-1", T0, {"t": 1.0}, {"measurement": "weather", "room": "b"})
    assert build([reading]) == [f"weather,device=esp32-1,room=b t=1.0 {T0 // NS}"]
    assert build([reading], measurement_tag="")[0].startswith("sensors,device=esp32-1,measurement=weather,room=b ")


def test_precision_is_the_coarsest_that_keeps_every_timestamp() -> None:
    assert precision_of([T0, T0 + NS]) == (NS, "s")
    assert precision_of([T0, T0 + 1_000_000]) == (1_000_000, "ms")
    assert precision_of([T0, T0 + 1_000]) == (1_000, "us")
    assert precision_of([T0, T0 + 1]) == (1, "ns")
    assert precision_of([T0 + 7]) == (1, "ns")


HOSTILE_DEVICE = 'we ird,device=pwn x="q" \\ end\\'
HOSTILE_TAGS = {"place": "a=b,c d\\", "k ey,=": "v", "line": "one\ntwo", "empty": "", "uni": "Küche 温度"}
HOSTILE_FIELDS = {
    "temp c": 1.5, "a,b": 2.5, "x=y": 3.5, 'q"uote': 4.5, "back\\slash": 5.5, "tail\\": 6.5, "°C温度": 7.5,
    "text": 'x" 1\nevil,device=pwn v=1 1\r\n\\', "new\nline": 8.5,
}


def test_hostile_names_and_values_stay_inside_their_line() -> None:
    reading = Reading(HOSTILE_DEVICE, T0, dict(HOSTILE_FIELDS), dict(HOSTILE_TAGS))
    [line] = build([reading])
    assert "\n" not in line and "\r" not in line
    # Parsed back by the project's own line-protocol decoder (which follows InfluxDB's rules):
    measurement, tags, fields, ts = parse_line(line)
    assert measurement == "sensors"
    assert ts == T0 // NS
    assert tags == {"device": HOSTILE_DEVICE, "place": "a=b,c d\\", "k ey,=": "v", "line": "one\\ntwo",
                    "uni": "Küche 温度"}                      # empty tag left out; newline written as \n
    expected = {k.replace("\n", "\\n"): v for k, v in HOSTILE_FIELDS.items()}
    expected["text"] = 'x" 1\\nevil,device=pwn v=1 1\\r\\n\\'
    assert fields == expected


@pytest.mark.parametrize("fields, reason", [
    ({"": 1.0}, "empty name"),
    ({"t": math.nan}, "nan"),
    ({"t": math.inf}, "inf"),
    ({}, "without fields"),
])
def test_what_line_protocol_cannot_carry_is_refused_before_sending(fields: dict, reason: str) -> None:
    sink = sink_for(closed_port_url())
    with pytest.raises(PermanentError, match=reason):
        sink.write(Batch([Reading("d", T0, {"ok": 1.0}, {}), Reading("d", T0, fields, {})], []))
    huge = Reading("d", T0, {"n": 2 ** 70}, {})
    with pytest.raises(PermanentError, match="64 bits"):
        sink_for(closed_port_url(), integers="integer").write(Batch([huge], []))


def test_line_building_is_fast() -> None:
    readings = [Reading(f"dev-{i % 100}", T0 + i * 1_000_000, {"temp": 20.5 + i, "humi": 40 + i % 30, "rssi": -61},
                        {"place": "balcony"}) for i in range(20000)]
    builder = LineBuilder(InfluxOptions())
    started = time.process_time()
    for i in range(0, len(readings), 5000):
        chunk = readings[i:i + 5000]
        "\n".join(builder.lines(chunk, precision_of([r.ts for r in chunk])[0])).encode()
    per_line_us = (time.process_time() - started) / len(readings) * 1e6
    print(f"line protocol: {per_line_us:.2f} us per reading of 3 fields")
    assert per_line_us < 10      # about 2 us here; the bound only catches an accidental slow path


# --------------------------------------------------------------------------- failure kinds (fake server)


def test_a_batch_goes_in_one_gzip_request_with_its_precision(fake: FakeInflux) -> None:
    sink = sink_for(fake.url, bucket="b1", org="o1", token="secret")
    sink.write(Batch([Reading("d", T0 + i * NS, {"n": float(i)}, {}) for i in range(5000)], []))
    [(query, headers, count)] = fake.requests
    assert query == {"org": "o1", "bucket": "b1", "precision": "s"}
    assert headers["Content-Encoding"] == "gzip" and headers["Authorization"] == "Token secret"
    assert count == 5000 and len(fake.lines) == 5000


def test_events_are_not_written_to_influx(fake: FakeInflux) -> None:
    sink = sink_for(fake.url)
    assert sink.takes_events is False
    sink.write(Batch([], [Event("door", T0, "scan", {"card": 1})]))
    assert fake.requests == []


def test_refused_lines_become_dead_letters_and_the_rest_is_written(fake: FakeInflux, tmp_path: Path) -> None:
    sink = sink_for(fake.url)
    harness = OutboxHarness(sink, InfluxOptions(enabled=True, batch_size=1000), tmp_path)
    readings = [Reading("BAD-1" if i in (17, 600) else f"dev-{i % 7}", T0 + i * NS, {"n": float(i)}, {})
                for i in range(1000)]
    harness.outbox.add([1, 2], readings, [])
    harness.outbox.flush()
    assert harness.acked == [1, 2]
    assert sorted(float(line.split("n=")[1].split(" ")[0]) for line in fake.lines) == \
        [float(i) for i in range(1000) if i not in (17, 600)]
    dead = harness.dead()
    assert sorted(d.device for d in dead) == ["BAD-1", "BAD-1"]
    assert {d.source for d in dead} == {"sink:influx"} and "HTTP 400" in dead[0].reason
    assert harness.counters["dead_letters"] == 2 and harness.counters["written_readings"] == 998
    harness.close()


def test_too_large_batches_are_split(fake: FakeInflux, tmp_path: Path) -> None:
    fake.max_body = 20_000
    sink = sink_for(fake.url)
    with pytest.raises(BatchTooLarge):
        sink.write(Batch([Reading("d", T0 + i, {"n": float(i)}, {}) for i in range(2000)], []))
    harness = OutboxHarness(sink, InfluxOptions(enabled=True), tmp_path)
    harness.outbox.add([5], [Reading("d", T0 + i, {"n": float(i)}, {}) for i in range(2000)], [])
    harness.outbox.flush()
    assert len(fake.lines) == 2000 and harness.acked == [5] and harness.dead() == []
    harness.close()


def test_throttling_and_server_errors_are_transient_with_retry_after(fake: FakeInflux, tmp_path: Path) -> None:
    sink = sink_for(fake.url)
    batch = Batch([Reading("d", T0, {"n": 1.0}, {})], [])
    fake.script = [(429, {"Retry-After": "7"}), (503, {}), (500, {}),
                   (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), (401, {}), (404, {})]
    with pytest.raises(TransientError) as throttled:
        sink.write(batch)
    assert throttled.value.retry_after == 7.0
    for _ in range(3):
        with pytest.raises(TransientError):
            sink.write(batch)
    with pytest.raises(TransientError, match="check the token"):
        sink.write(batch)
    with pytest.raises(TransientError, match="check org and bucket"):
        sink.write(batch)
    assert fake.lines == []
    sink.write(batch)
    assert len(fake.lines) == 1

    # Through the outbox: the batch is spooled (and acknowledged), retried no sooner than Retry-After.
    fake.script = [(429, {"Retry-After": "30"})]
    harness = OutboxHarness(sink, InfluxOptions(enabled=True), tmp_path)
    harness.outbox.add([9], [Reading("d", T0 + NS, {"n": 2.0}, {})], [])
    harness.outbox.flush()
    assert harness.acked == [9] and len(harness.outbox.spool) == 1
    assert harness.outbox.retry_at - time.monotonic() > 25
    harness.outbox.tick(harness.outbox.retry_at)
    assert len(harness.outbox.spool) == 0 and len(fake.lines) == 2
    harness.close()


def test_an_unreachable_server_is_transient() -> None:
    with pytest.raises(TransientError, match="unreachable"):
        sink_for(closed_port_url()).write(Batch([Reading("d", T0, {"n": 1.0}, {})], []))


def test_retry_after_forms() -> None:
    assert retry_after({"Retry-After": "12"}) == 12.0
    assert retry_after({}) is None and retry_after(None) is None
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({"Retry-After": "Thu, 01 Jan 2099 00:00:00 GMT"}) > 1e9


# --------------------------------------------------------------------------- VictoriaMetrics


def series(victoria: Victoria, measurement: str) -> dict[tuple[str, str], dict[int, float]]:
    """(metric name, device) -> {timestamp ms: value}, failing on a duplicate timestamp."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for item in victoria.export(f'{{__name__=~"{measurement}_.*"}}'):
        key = (item["metric"]["__name__"], item["metric"].get("device", ""))
        points = out.setdefault(key, {})
        for ts, value in zip(item["timestamps"], item["values"]):
            assert ts not in points, f"{key} has two points at {ts}"
            points[ts] = value
    return out


def test_hostile_names_are_stored_as_sent(victoria: Victoria) -> None:
    measurement = unique_name("hostile")
    sink = sink_for(victoria.url, measurement=measurement)
    sink.write(Batch([Reading(HOSTILE_DEVICE, T0, dict(HOSTILE_FIELDS), dict(HOSTILE_TAGS)),
                      Reading("plain", T0 + 5_000_000, {"v": 1.25}, {})], []))
    stored = victoria.export(f'{{__name__=~"{measurement}_.*"}}')
    names = {item["metric"]["__name__"][len(measurement) + 1:] for item in stored}
    # VictoriaMetrics keeps the backslash of an escaped quote in a field name (InfluxDB drops it)
    assert names == {k.replace("\n", "\\n").replace('"', '\\"') for k in HOSTILE_FIELDS} | {"v"}
    for item in stored:
        labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
        if item["metric"]["__name__"].endswith("_v"):
            assert labels == {"device": "plain"} and item["values"] == [1.25]
            assert item["timestamps"] == [BASE_TS_MS + 5]          # ms precision kept
            continue
        assert labels == {"device": HOSTILE_DEVICE, "place": "a=b,c d\\", "k ey,=": "v", "line": "one\\ntwo",
                          "uni": "Küche 温度"}
        assert item["timestamps"] == [BASE_TS_MS]
        field = item["metric"]["__name__"][len(measurement) + 1:]
        if field != "text":                                      # VictoriaMetrics stores strings as 0
            assert item["values"] == [HOSTILE_FIELDS[field.replace("\\n", "\n").replace('\\"', '"')]]
    # the injection attempts made no point of their own
    assert victoria.export('{device="pwn"}') == []
    assert victoria.export('{__name__=~"evil.*"}') == []


def test_rollups_go_to_their_window_measurement_and_a_correction_replaces_the_point(victoria: Victoria) -> None:
    measurement = unique_name("rollup")
    sink = sink_for(victoria.url, measurement=measurement)
    assert sink.takes_rollups
    first = rollup_reading("balcony", "1m", T0, {"temperature": Stats(60, 21.0, 22.0, 21.5, 21.9)})
    corrected = rollup_reading("balcony", "1m", T0, {"temperature": Stats(61, 20.5, 22.0, 21.4, 21.9)})
    sink.write(Batch([first], []))
    sink.write(Batch([corrected, Reading("balcony", T0, {"temperature": 21.9}, {})], []))
    stored = series(victoria, measurement)
    assert stored[(f"{measurement}_temperature", "balcony")] == {BASE_TS_MS: 21.9}
    window = {name[len(measurement) + 4:]: points for (name, _), points in stored.items()
              if name.startswith(f"{measurement}_1m_")}
    assert window == {"temperature_count": {BASE_TS_MS: 61}, "temperature_min": {BASE_TS_MS: 20.5},
                      "temperature_max": {BASE_TS_MS: 22.0}, "temperature_mean": {BASE_TS_MS: 21.4},
                      "temperature_last": {BASE_TS_MS: 21.9}}
    assert not any("rollup" in item["metric"] for item in victoria.export(f'{{__name__=~"{measurement}_.*"}}'))


def influx_toml(url: str, measurement: str, endpoint_port: int, **extra: object) -> str:
    lines = ["[sinks.influx]", "enabled = true", f'endpoint = "tcp://127.0.0.1:{endpoint_port}"',
             f'url = "{url}"', f'measurement = "{measurement}"', "flush_interval_ms = 50", "retry_initial_s = 0.2",
             "retry_max_s = 1.0", "connect_timeout_s = 1.0", "timeout_s = 5.0"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "\n" + "\n".join(lines) + "\n"


ROLES = ("query", "sink-sqlite", "sink-influx", "parser", "parser", "edge")


def test_every_reading_survives_an_influx_outage_and_a_sink_restart(pipeline_factory, victoria: Victoria) -> None:
    measurement = unique_name("outage")
    pipeline: Pipeline = pipeline_factory(extra_toml=influx_toml(victoria.url, measurement, free_port()),
                                          rollups="enabled = false")      # ROLES start no rollup worker
    pipeline.start_all(ROLES)
    devices = ["dev-a", "dev-b", "dev-c"]

    def stored_count() -> int:
        return sum(len(points) for points in series(victoria, measurement).values())

    send_readings(pipeline, devices, range(0, 100))
    wait_for(lambda: stored_count() == 600, timeout=30, message="the first readings in VictoriaMetrics")

    victoria.stop()
    send_readings(pipeline, devices, range(100, 200))
    wait_for(lambda: sink_status(pipeline, "influx").get("spooled", 0) >= 300, timeout=30,
             message="readings spooled while VictoriaMetrics is away")
    assert sink_status(pipeline, "influx")["state"].startswith("spooling")
    wait_for(lambda: pipeline.count_rows("readings") == 1200, message="SQLite kept flowing meanwhile (2 fields x 600)")

    restart_with_full_spool(pipeline, "influx")           # the spool survives a restart of the worker
    send_readings(pipeline, devices, range(200, 300))
    wait_for(lambda: pipeline.count_rows("readings") == 1800, timeout=30, message="SQLite still flowing")

    victoria.start()
    wait_for(lambda: stored_count() == 1800, timeout=60, message="every reading in VictoriaMetrics")
    stored = series(victoria, measurement)
    expected_ts = {BASE_TS_MS + i * 1000 for i in range(300)}
    for device in devices:
        n = stored[(f"{measurement}_n", device)]
        assert set(n) == expected_ts
        assert all(n[BASE_TS_MS + i * 1000] == i for i in range(300))
        temp = stored[(f"{measurement}_temp", device)]
        assert all(temp[BASE_TS_MS + i * 1000] == 20 + i / 8 for i in range(300))
    wait_for(lambda: sink_status(pipeline, "influx").get("spooled") == 0
             and sink_status(pipeline, "influx").get("state") == "ok", message="spool empty again")

    status = pipeline.cli("status")
    assert status.returncode == 0, status.stderr
    header = status.stdout.splitlines()[0].split()
    assert header[:6] == ["sink", "written", "events", "pending", "spooled", "dead-lettered"]
    assert any(line.startswith("influx ") for line in status.stdout.splitlines())
