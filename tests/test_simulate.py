"""``sensorpipe simulate``: what it sends decodes to the readings it planned, against a real pipeline,
a real MQTT broker and a server that only discards (its own speed)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.pipeline import REPO, Pipeline, free_port, wait_for
from workers.core import config
from workers.decoders import REGISTRY, Context
from workers.core.envelope import Reading
from workers.core.framing import AutoFramer, PacketFramer
from workers.tools.simulate import Board, Plan

START_MS = 1_732_260_000_000


def plan(fmt: str, devices: int = 3, total: int = 30, **kw) -> Plan:
    values = dict(devices=devices, total=total, rate=0.0, fmt=fmt, host="127.0.0.1", port=1, procs=1, prefix="t",
                  measurement="sim", start_ms=START_MS, step_ms=5, chunk=4, qos=0, hold_s=0.0, connect_rate=0.0,
                  ack_timeout_s=1.0, seed=1)
    values.update(kw)
    return Plan(**values)


def board_bytes(p: Plan, index: int) -> bytes:
    board = Board(p, index, [0.01, -0.02, 0.03])
    return b"".join(data for data, _ in board.chunks())


def simulate(*args: str, config_path: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    top = ["--config", str(config_path)] if config_path else []
    return subprocess.run([sys.executable, "-m", "workers", *top, "simulate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("fmt", ["json", "kv", "line"])
def test_text_formats_decode_to_the_planned_readings(fmt: str) -> None:
    cfg = config.load()
    p = plan(fmt)
    for index in range(p.devices):
        frames, rejects = AutoFramer(65536).feed(board_bytes(p, index))
        assert not rejects and len(frames) == p.readings_of(index) == 10
        readings = [r for frame in frames for r in REGISTRY["auto"](frame, Context("peer", 0, cfg))]
        assert all(isinstance(r, Reading) for r in readings)
        assert [r.device for r in readings] == [p.device_name(index)] * 10
        assert [r.ts for r in readings] == [(START_MS + i * 5) * 1_000_000 for i in range(10)]
        for r in readings:
            assert set(r.fields) == {"temp", "humi", "rssi"}
            assert 5 < r.fields["temp"] < 35 and 15 < r.fields["humi"] < 85 and -100 < r.fields["rssi"] < -30
            assert isinstance(r.fields["rssi"], int)


def test_uneven_totals_are_spread_over_the_boards() -> None:
    p = plan("json", devices=3, total=10)
    assert [p.readings_of(i) for i in range(3)] == [4, 3, 3]
    assert p.device_name(0) == "t-0001"


def test_binary_packets_decode_with_the_shipped_layout() -> None:
    cfg = config.load()                          # deploy/sensorpipe.toml: device number 1 is the balcony
    p = plan("binary", devices=1, total=6)
    frames, rejects = PacketFramer(65536).feed(board_bytes(p, 0))
    assert not rejects and len(frames) == 6
    for frame in frames:
        (reading,) = REGISTRY["binary"](frame, Context("peer", 10**18, cfg))
        assert reading.device == "balcony"
        assert 5 < reading.fields["temperature"] < 35 and 15 < reading.fields["humidity"] < 85


def test_mqtt_publish_packets() -> None:
    p = plan("mqtt", devices=2, total=4, qos=1)
    data = board_bytes(p, 1)
    messages = []
    while data:
        assert data[0] == 0x32                     # PUBLISH, QoS 1
        length, shift, pos = 0, 0, 1
        while True:
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            shift += 7
            pos += 1
            if not byte & 0x80:
                break
        packet, data = data[pos:pos + length], data[pos + length:]
        (topic_len,) = struct.unpack(">H", packet[:2])
        topic = packet[2:2 + topic_len].decode()
        packet_id = struct.unpack(">H", packet[2 + topic_len:4 + topic_len])[0]
        messages.append((topic, packet_id, json.loads(packet[4 + topic_len:])))
    assert [m[0] for m in messages] == ["sensorpipe/t-0002/up"] * 2
    assert [m[1] for m in messages] == [1, 2]
    assert [m[2]["ts"] for m in messages] == [START_MS, START_MS + 5]
    assert all(m[2]["device"] == "t-0002" for m in messages)


def test_against_a_pipeline_every_reading_stored_once(pipeline: Pipeline) -> None:
    # no --target: the configured text listener
    result = simulate("--devices", "20", "--total", "3000", "--json", config_path=pipeline.config_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sent"] == 3000 and summary["connected"] == 20 and summary["errors"] == 0 and summary["ok"]
    wait_for(lambda: pipeline.count_rows("readings", "WHERE field = 'temp'") == 3000, timeout=30,
             message="3000 readings stored")
    db = pipeline.db()
    assert db.execute("SELECT count(DISTINCT device) FROM readings WHERE field = 'temp'").fetchone() == (20,)
    assert db.execute("SELECT min(ts), max(ts) FROM readings").fetchone() == (
        summary["start_ms"] * 1_000_000, (summary["start_ms"] + 149 * summary["step_ms"]) * 1_000_000)
    db.close()


def test_binary_boards_are_acknowledged(pipeline: Pipeline) -> None:
    result = simulate("--target", f"127.0.0.1:{pipeline.binary_port}", "--format", "binary", "--devices", "1",
                      "--total", "40", "--chunk", "1", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["acks"] == 40 and summary["ok"]
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'balcony' AND field = 'light'") == 40,
             message="40 balcony records")


def test_mqtt_to_a_real_broker(mosquitto) -> None:
    import paho.mqtt.client as mqtt

    received: list[tuple[str, dict]] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, userdata, flags, rc, props: c.subscribe("sensorpipe/+/up", qos=1)
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = lambda c, userdata, msg: received.append((msg.topic, json.loads(msg.payload)))
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        result = simulate("--target", f"{mosquitto.host}:{mosquitto.port}", "--format", "mqtt", "--qos", "1",
                          "--devices", "5", "--total", "200", "--json")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["acks"] == 200 and summary["ok"]
        wait_for(lambda: len(received) == 200, message="200 messages at the subscriber")
    finally:
        client.loop_stop()
        client.disconnect()
    assert all(topic == f"sensorpipe/{body['device']}/up" for topic, body in received)
    assert len({(body["device"], body["ts"]) for _, body in received}) == 200


def test_rate_is_kept(tmp_path: Path) -> None:
    port, server = _discard(tmp_path)
    try:
        started = time.monotonic()
        result = simulate("--target", f"127.0.0.1:{port}", "--devices", "10", "--rate", "2000", "--duration", "1.5",
                          "--json")
        elapsed = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(10)
    summary = json.loads(result.stdout)
    assert summary["sent"] == 3000
    assert 1.2 < summary["seconds"] < 3.0 and elapsed >= 1.2


def test_simulator_is_not_the_bottleneck(tmp_path: Path) -> None:
    # The issue asks for at least 200,000 readings/s of sending on this 2-core machine.
    port, server = _discard(tmp_path)
    try:
        result = simulate("--target", f"127.0.0.1:{port}", "--devices", "1000", "--total", "400000", "--json")
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=10)
    summary = json.loads(result.stdout)
    received = json.loads(out.strip().splitlines()[-1])
    assert received["bytes"] == summary["bytes"]
    assert summary["sent"] / (received["last"] - summary["first_send"]) > 200_000


def test_nobody_listening_is_reported(tmp_path: Path) -> None:
    result = simulate("--target", f"127.0.0.1:{free_port()}", "--devices", "3", "--total", "30")
    assert result.returncode == 1
    assert "boards connected: 0/3" in result.stdout and "errors: 3" in result.stdout


def test_progress_bar_and_human_summary(tmp_path: Path) -> None:
    port, server = _discard(tmp_path)
    try:
        result = simulate("--target", f"127.0.0.1:{port}", "--devices", "4", "--rate", "400", "--duration", "1",
                          "--progress", "always")
    finally:
        server.terminate()
        server.wait(10)
    assert result.returncode == 0, result.stderr
    assert "[########################] 400/400 readings" in result.stderr and "errors 0" in result.stderr
    assert result.stdout.startswith("simulate: 4 boards (json) -> 127.0.0.1:")
    assert "sent 400 of 400 readings" in result.stdout


def test_bad_arguments_are_one_line() -> None:
    result = simulate("--devices", "300", "--format", "binary", "--total", "10")
    assert result.returncode == 2 and result.stderr.startswith("sensorpipe: binary boards are device numbers")
    result = simulate("--devices", "3")
    assert result.returncode == 2 and "say how much" in result.stderr


def _discard(tmp_path: Path) -> tuple[int, subprocess.Popen]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "discard.py"), str(port)],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return port, server
