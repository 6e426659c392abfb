"""Smoke tests for the real test servers in tests/servers.py: each one answers its real client."""

from __future__ import annotations

import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from pymongo import UpdateOne

from tests.servers import MicroPython, Mongo, Mosquitto, Victoria, port_accepts, require, unique_name

# Until tests/conftest.py lists it, this module loads the fixtures itself (pytest loads a plugin once).

T0_NS = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z


def write_points(victoria: Victoria, points: list[Point]) -> None:
    with InfluxDBClient(url=victoria.url, token="any-token", org="any-org") as client:
        client.write_api(write_options=SYNCHRONOUS).write(bucket="any-bucket", record=points)


def series_by_name(victoria: Victoria, measurement: str) -> dict[tuple[str, str], dict]:
    exported = victoria.export(f'{{__name__=~"{measurement}_.*"}}')
    return {(s["metric"]["__name__"], s["metric"].get("device_id", "")): s for s in exported}


def test_victoria_reads_back_influxdb_client_writes(victoria: Victoria) -> None:
    measurement = unique_name("smoke")
    write_points(
        victoria,
        [
            Point(measurement).tag("device_id", "esp-1").field("temp", 21.5).field("rssi", -70)
            .time(T0_NS, WritePrecision.NS),
            Point(measurement).tag("device_id", "esp-2").field("temp", 19.25).time(T0_NS + 10**9, WritePrecision.NS),
        ],
    )

    series = series_by_name(victoria, measurement)

    # One series per field, named <measurement>_<field>; tags become labels; timestamps in ms.
    assert set(series) == {(f"{measurement}_temp", "esp-1"), (f"{measurement}_rssi", "esp-1"),
                           (f"{measurement}_temp", "esp-2")}
    assert series[(f"{measurement}_temp", "esp-1")]["values"] == [21.5]
    assert series[(f"{measurement}_temp", "esp-1")]["timestamps"] == [T0_NS // 10**6]
    assert series[(f"{measurement}_rssi", "esp-1")]["values"] == [-70]
    assert series[(f"{measurement}_temp", "esp-2")]["timestamps"] == [T0_NS // 10**6 + 1000]


def test_victoria_export_sees_a_point_written_just_now(victoria: Victoria) -> None:
    measurement = unique_name("now")
    write_points(victoria, [Point(measurement).field("v", 1.0)])  # no timestamp: the server's "now"

    assert len(victoria.export(f'{{__name__="{measurement}_v"}}')) == 1


def test_victoria_takes_line_protocol_on_its_influx_tcp_port(victoria: Victoria) -> None:
    measurement = unique_name("tcp")
    with socket.create_connection(("127.0.0.1", victoria.influx_port)) as sock:
        sock.sendall(f"{measurement},device_id=esp-9 v=3 {T0_NS}\n".encode())

    # The TCP listener ingests asynchronously: poll with a deadline.
    deadline = time.monotonic() + 10
    while not (exported := victoria.export(f'{{__name__="{measurement}_v"}}')):
        assert time.monotonic() < deadline, "line sent over TCP never showed up"
        time.sleep(0.05)
    assert exported[0]["values"] == [3]


def test_victoria_keeps_data_across_stop_and_start(victoria: Victoria) -> None:
    measurement = unique_name("outage")
    write_points(victoria, [Point(measurement).field("v", 7.0).time(T0_NS, WritePrecision.NS)])
    url = victoria.url

    victoria.stop()
    assert not victoria.running
    assert not port_accepts(victoria.port)
    victoria.start()

    assert victoria.url == url
    assert victoria.export(f'{{__name__="{measurement}_v"}}')[0]["values"] == [7]


def test_mongo_insert_find_upsert_and_index(mongo: Mongo) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with mongo.client() as client:
        db = client[unique_name("smoke")]
        db.readings.insert_many([{"device_id": "esp-1", "seq": i, "t": now} for i in range(3)])
        db.latest.create_index("device_id", unique=True)
        db.latest.bulk_write(
            [
                UpdateOne({"device_id": "esp-1"}, {"$set": {"temp": 20.0}, "$max": {"t": now}}, upsert=True),
                # an older reading must not move "t" back
                UpdateOne({"device_id": "esp-1"}, {"$max": {"t": now - timedelta(hours=1)}}, upsert=True),
            ],
            ordered=True,
        )

        seqs = [doc["seq"] for doc in db.readings.find({"device_id": "esp-1"}).sort("seq", -1)]
        latest = db.latest.find_one({"device_id": "esp-1"}, {"_id": 0})

    assert seqs == [2, 1, 0]
    assert latest == {"device_id": "esp-1", "temp": 20.0, "t": now.replace(tzinfo=None)}


def test_mongo_keeps_data_across_stop_and_start(mongo: Mongo) -> None:
    name = unique_name("outage")
    with mongo.client() as client:
        client[name].readings.insert_one({"device_id": "esp-1"})

    mongo.stop()
    assert not port_accepts(mongo.port)
    mongo.start()

    with mongo.client() as client:
        assert client[name].readings.count_documents({}) == 1


def mosquitto_pub(broker: Mosquitto, topic: str, message: str) -> None:
    require("mosquitto_pub")
    subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-t", topic, "-m", message, "-q", "1", "-r"],
        check=True, timeout=10,
    )


def mosquitto_sub_one(broker: Mosquitto, topic: str) -> str:
    require("mosquitto_sub")
    result = subprocess.run(
        ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", topic, "-C", "1", "-W", "10"],
        check=True, timeout=15, capture_output=True, text=True,
    )
    return result.stdout.strip()


def test_mosquitto_publish_then_subscribe(mosquitto: Mosquitto) -> None:
    topic = f"{unique_name('smoke')}/esp-1/temp"
    # Retained, so the subscriber gets it whenever it connects: no race to subscribe first.
    mosquitto_pub(mosquitto, topic, "21.5")

    assert mosquitto_sub_one(mosquitto, topic) == "21.5"


def test_mosquitto_keeps_retained_messages_across_stop_and_start(mosquitto: Mosquitto) -> None:
    topic = f"{unique_name('outage')}/esp-1/temp"
    mosquitto_pub(mosquitto, topic, "19")

    mosquitto.stop()
    mosquitto.start()

    assert mosquitto_sub_one(mosquitto, topic) == "19"


def test_micropython_runs_source(micropython: MicroPython) -> None:
    assert micropython("print(1 + 1)") == "2\n"
    out = micropython("import struct, sys\nprint(sys.implementation.name, struct.pack('<hI', -2, 7))")
    assert out == "micropython b'\\xfe\\xff\\x07\\x00\\x00\\x00'\n"


def test_micropython_imports_given_modules(micropython: MicroPython) -> None:
    modules = {"packet": "def frame(n):\n    return bytes([n, 0xAA])\n", "umqtt/simple.py": "NAME = 'simple'\n"}

    out = micropython("import packet\nfrom umqtt import simple\nprint(packet.frame(1), simple.NAME)", modules)

    assert out == "b'\\x01\\xaa' simple\n"


def test_micropython_failure_shows_the_traceback(micropython: MicroPython) -> None:
    with pytest.raises(AssertionError, match=r"(?s)before.*ValueError: bad frame"):
        micropython("print('before')\nraise ValueError('bad frame')")


def test_a_missing_server_fails_rather_than_skips() -> None:
    with pytest.raises(pytest.fail.Exception, match="deploy/test-servers.sh install"):
        require("no-such-server-binary")
