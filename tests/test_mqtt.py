"""MQTT devices end to end: a real Mosquitto broker, real paho and mosquitto_pub/mosquitto_sub clients,
and the real pipeline (MQTT worker, edge, parsers, SQLite sink, commands and query workers)."""
from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import time
from typing import Iterator

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for
from tests.servers import Mosquitto, require, unique_name

MQTT_ROLES = (*COMMAND_ROLES, "mqtt")

MQTT_TOML = """
[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "{client_id}"
protocol = "{protocol}"
reconnect_min_s = 0.2
reconnect_max_s = 1

[[mqtt.subscriptions]]
name = "up"
topic = "{prefix}/{{device}}/up"
downlink = "{prefix}/{{device}}/down"

[[mqtt.subscriptions]]
name = "fungxi"
topic = "{prefix}_{{device}}_upLink"
downlink = "{prefix}_{{device}}_downLink"
decoder = "json"

[[replies]]
match = {{ cmd = "heartU" }}
reply = {{ cmd = "heartD", time = "{{now:%Y-%m-%d %H:%M:%S}}" }}

[devices.napper]
offline_after_s = 1

[events]
max_event_bytes = {max_event}
"""


class Client:
    """A paho client standing in for a board (publishes) or a listener on the downlinks (subscribes)."""

    def __init__(self, broker: Mosquitto, subscribe: str | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique_name("test"))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rc, props: subscribed.put(mid)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if subscribe:
            self.client.subscribe(subscribe, qos=1)
            subscribed.get(timeout=10)

    def publish(self, topic: str, payload: bytes | dict, qos: int = 1) -> None:
        data = orjson.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=qos).wait_for_publish(10)

    def next(self, timeout: float = 10) -> tuple[str, dict]:
        topic, payload = self.messages.get(timeout=timeout)
        return topic, json.loads(payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def mosquitto_pub(broker: Mosquitto, topic: str, *messages: str) -> None:
    require("mosquitto_pub")
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic, "-l"],
                   input="\n".join(messages) + "\n", text=True, check=True, timeout=30)


@pytest.fixture
def mqtt(pipeline_factory, mosquitto: Mosquitto, request: pytest.FixtureRequest) -> Iterator[tuple[Pipeline, str, Mosquitto]]:
    prefix = unique_name("sp")
    protocol = getattr(request, "param", "5")
    p = pipeline_factory(extra_toml=MQTT_TOML.format(port=mosquitto.port, client_id=unique_name("sensorpipe"),
                                                     prefix=prefix, max_event=400_000, protocol=protocol))
    p.start_all(MQTT_ROLES)
    yield p, prefix, mosquitto


def wait_subscribed(p: Pipeline, prefix: str, broker: Mosquitto) -> None:
    """The MQTT worker holds its subscription: a probe published now comes through."""
    board = Client(broker)
    try:
        n = iter(range(1_000_000))
        wait_for(lambda: board.publish(f"{prefix}/probe/up", {"n": next(n)}) or p.latest("probe"),
                 interval=0.3, message="the MQTT worker's subscription")
    finally:
        board.close()


def rows(p: Pipeline, device: str, field: str) -> list:
    db = p.db()
    try:
        return [r[0] for r in db.execute("SELECT value FROM readings WHERE device = ? AND field = ? ORDER BY ts",
                                         (device, field))]
    finally:
        db.close()


def test_readings_from_paho_and_mosquitto_pub_arrive_in_the_store(mqtt) -> None:
    p, prefix, broker = mqtt
    wait_subscribed(p, prefix, broker)
    board = Client(broker)
    try:
        board.publish(f"{prefix}/greenhouse-9/up", {"temp": 21.5, "humi": 48})                  # device from topic
        board.publish(f"{prefix}/greenhouse-9/up", b"soil: 512; vbat: 3.7")                   # auto decoder: kv
        board.publish(f"{prefix}/ignored/up", {"device": "named-in-payload", "temp": 3})     # the payload wins
    finally:
        board.close()
    mosquitto_pub(broker, f"{prefix}_A1B2_upLink", '{"cmd":"verifiedRecordU","data":[{"num":"1001","verifiedCode":0}]}',
                  '{"temp":19.25}', "not json at all")
    wait_for(lambda: p.latest("greenhouse-9") == {"temp": 21.5, "humi": 48, "soil": 512, "vbat": 3.7},
             message="paho readings")
    wait_for(lambda: p.latest("named-in-payload") == {"temp": 3}, message="device named in the payload")
    wait_for(lambda: p.latest("A1B2") == {"temp": 19.25}, message="mosquitto_pub reading")
    wait_for(lambda: p.count_rows("events", "WHERE device = 'A1B2' AND kind = 'verifiedRecordU'") == 1,
             message="door event")
    assert rows(p, "greenhouse-9", "temp") == [21.5]

    letters = wait_for(lambda: [d for d in json.loads(p.cli("deadletters", "--json").stdout)
                                if d["device"] == "A1B2"], message="dead letter")
    assert letters[0]["listener"] == "mqtt:fungxi" and letters[0]["peer"] == f"{prefix}_A1B2_upLink"
    assert letters[0]["raw"] == "not json at all"

    devices = {d["device"]: d for d in p.query({"op": "devices"})["devices"]}
    assert devices["greenhouse-9"]["via"] == "mqtt:up" and devices["greenhouse-9"]["online"] is True
    assert devices["A1B2"]["peer"] == f"{prefix}_A1B2_upLink"


def test_commands_and_heartbeats_go_out_on_the_downlink(mqtt) -> None:
    p, prefix, broker = mqtt
    wait_subscribed(p, prefix, broker)
    listener = Client(broker, subscribe=f"{prefix}/+/down")
    board = Client(broker, subscribe=f"{prefix}_D7_downLink")
    try:
        # heartbeat: answered on the downlink, not stored
        board.publish(f"{prefix}_D7_upLink", {"cmd": "heartU"})
        topic, reply = board.next()
        assert topic == f"{prefix}_D7_downLink"
        assert reply["cmd"] == "heartD" and abs(time.mktime(time.strptime(reply["time"], "%Y-%m-%d %H:%M:%S"))
                                                  - time.time()) < 5

        # a command to a device seen on MQTT: published on its downlink topic
        board.publish(f"{prefix}/valve-2/up", {"flow": 1.5})
        wait_for(lambda: p.latest("valve-2"), message="valve-2 seen")
        result = p.cli("send", "valve-2", '{"cmd":"relay","pin":5,"on":true}', "--id", "m1")
        assert result.returncode == 0 and "m1: delivered to valve-2 via mqtt:up" in result.stdout, result
        topic, command = listener.next()
        assert (topic, command) == (f"{prefix}/valve-2/down", {"id": "m1", "cmd": "relay", "pin": 5, "on": True})

        # mosquitto_sub sees the same as a board would
        require("mosquitto_sub")
        sub = subprocess.Popen(["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                                "-t", f"{prefix}/valve-2/down", "-C", "1", "-W", "20"], stdout=subprocess.PIPE,
                               text=True)
        try:
            # mosquitto_sub has subscribed once a command sent now reaches the test's listener too
            wait_for(lambda: p.cli("send", "valve-2", '{"cmd":"read"}').returncode == 0 and listener.next()
                     and sub.poll() is not None or sub.poll() is not None, interval=0.2, timeout=20,
                     message="mosquitto_sub got a command")
            out, _ = sub.communicate(timeout=10)
        finally:
            if sub.poll() is None:
                sub.kill()
        assert json.loads(out)["cmd"] == "read"
    finally:
        listener.close()
        board.close()
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'valve-2'") == 1, message="valve reading")
    assert p.count_rows("events", "WHERE device = 'D7'") == 0


def test_an_mqtt_device_that_is_offline_gets_its_command_after_its_next_uplink(mqtt) -> None:
    p, prefix, broker = mqtt
    wait_subscribed(p, prefix, broker)
    listener = Client(broker, subscribe=f"{prefix}/napper/down")
    board = Client(broker)
    try:
        board.publish(f"{prefix}/napper/up", {"vbat": 3.9})
        wait_for(lambda: p.latest("napper"), message="napper seen")
        # [devices.napper] offline_after_s = 1: asleep after a second; a publication now would be lost
        wait_for(lambda: not {d["device"]: d for d in p.query({"op": "devices"})["devices"]}["napper"]["online"],
                 message="napper offline")
        result = p.cli("send", "napper", '{"cmd":"interval","value":600}', "--id", "n1")
        assert "n1: queued for napper" in result.stdout, result
        with pytest.raises(queue.Empty):
            listener.messages.get(timeout=0.5)
        board.publish(f"{prefix}/napper/up", {"vbat": 3.8})       # wakes up
        topic, command = listener.next()
        assert command == {"id": "n1", "cmd": "interval", "value": 600}
    finally:
        listener.close()
        board.close()


@pytest.mark.parametrize("mqtt", ["5", "3.1.1"], indirect=True)
def test_the_persistent_session_delivers_what_was_published_while_the_worker_was_down(mqtt) -> None:
    p, prefix, broker = mqtt
    wait_subscribed(p, prefix, broker)
    assert p.stop("mqtt:1") == 0
    mosquitto_pub(broker, f"{prefix}/outage/up", *[json.dumps({"i": i}) for i in range(300)])
    p.start("mqtt")
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'outage'") == 300, timeout=30, message="300 rows")
    assert rows(p, "outage", "i") == list(range(300))


@pytest.mark.parametrize("mqtt", ["5", "3.1.1"], indirect=True)
def test_a_message_is_acknowledged_to_the_broker_only_once_journaled(mqtt) -> None:
    """The edge is down: the MQTT worker holds the messages without acknowledging them, and is killed.
    The broker sends them again to the next MQTT worker, which gets them journaled."""
    p, prefix, broker = mqtt
    wait_subscribed(p, prefix, broker)
    p.stop("edge:1")
    mosquitto_pub(broker, f"{prefix}/held/up", *[json.dumps({"i": i}) for i in range(50)])
    # the broker sends up to its in-flight window (20) and waits for acknowledgements that do not come
    wait_for(lambda: p.query({"op": "status"})["workers"].get("mqtt", {}).get("injects_in_flight", 0) >= 1,
             message="the worker holds unconfirmed messages")
    p.kill("mqtt:1")
    p.start("edge")
    p.start("mqtt")
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'held'") == 50, timeout=30, message="50 rows")
    assert rows(p, "held", "i") == list(range(50))


def test_large_events_are_kept_whole_or_set_aside_whole(mqtt) -> None:
    p, prefix, broker = mqtt
    wait_subscribed(p, prefix, broker)
    image = base64.b64encode(os.urandom(200_000)).decode()          # 266 668 bytes of base64
    record = {"cmd": "verifiedRecordU", "data": [{"num": "1001", "name": "Ada", "verifiedCode": 0, "personType": "1",
                                                  "time": "2026-11-22 14:03:05", "liveImageBase64": image}]}
    too_big = {**record, "data": [{**record["data"][0], "liveImageBase64": image * 2}]}     # over 400 000
    board = Client(broker)
    try:
        board.publish(f"{prefix}_FACE1_upLink", record)
        board.publish(f"{prefix}_FACE1_upLink", too_big)
    finally:
        board.close()
    wait_for(lambda: p.count_rows("events", "WHERE device = 'FACE1'") == 1, message="event stored")
    db = p.db()
    (body,) = db.execute("SELECT body FROM events WHERE device = 'FACE1'").fetchone()
    db.close()
    assert json.loads(body)["data"][0]["liveImageBase64"] == image
    letters = wait_for(lambda: [d for d in json.loads(p.cli("deadletters", "--json").stdout) if d["device"] == "FACE1"],
                       message="oversized event set aside")
    assert "over events.max_event_bytes (400000)" in letters[0]["reason"]
    assert json.loads(letters[0]["raw"]) == too_big
