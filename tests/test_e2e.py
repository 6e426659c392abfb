"""End to end: real worker processes, real sockets, readings back through the query endpoint and SQLite."""
from __future__ import annotations

import json
import os
import socket
import struct

from tests.pipeline import Pipeline, wait_for
from workers.core import framing


def balcony_packet(records: list[tuple[int, int, int]], wake: int = 600, measure: int = 60) -> bytes:
    data = b"".join(struct.pack("<HHH", *r) for r in records)
    return struct.pack("<HHHBBB", len(data), wake, measure, 6, 1, len(records)) + data


def test_three_kinds_of_board(pipeline: Pipeline) -> None:
    # a JSON-lines board, an Arduino writing bare JSON objects, a kv-text board, a battery board
    pipeline.send(b'{"device":"greenhouse-1","temp":22.6,"humi":52}\n')
    pipeline.send(b'{"Name":"arduino-1","Value":{"temp":22.6,"humi":52}}{"Name":"arduino-1","Value":{"temp":22.7,"humi":53}}')
    pipeline.send(b"Soil: 512; temp: 22; hum: 40; from 5c:cf:7f:a1:b2:c3\r\n")
    pipeline.send(b"weather,device=esp32-1,place=roof temperature=21.5,rssi=-60i\n")
    ack = pipeline.send(balcony_packet([(300, 30200, 25826), (301, 30300, 25832), (302, 30400, 25838)]),
                        port=pipeline.binary_port, read_reply=1)
    assert ack == b"A"

    wait_for(lambda: pipeline.latest("greenhouse-1") == {"temp": 22.6, "humi": 52}, message="greenhouse-1")
    wait_for(lambda: pipeline.latest("arduino-1") == {"temp": 22.7, "humi": 53}, message="arduino-1")
    wait_for(lambda: pipeline.latest("5c:cf:7f:a1:b2:c3") == {"soil": 512, "temp": 22, "hum": 40}, message="kv")
    wait_for(lambda: pipeline.latest("esp32-1") == {"temperature": 21.5, "rssi": -60}, message="influx")
    balcony = wait_for(lambda: pipeline.latest("balcony"), message="balcony")
    assert balcony["light"] == 302
    assert abs(balcony["temperature"] - (175.72 * 25838 / 65536 - 46.85)) < 1e-9
    assert abs(balcony["humidity"] - (125 * 30400 / 65536 - 6)) < 1e-9

    # the same values are in the SQLite store, the balcony records 60 s apart, tagged
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'balcony'") == 9, message="balcony rows")
    db = pipeline.db()
    ts = [row[0] for row in db.execute(
        "SELECT ts FROM readings WHERE device = 'balcony' AND field = 'light' ORDER BY ts")]
    assert [b - a for a, b in zip(ts, ts[1:])] == [60_000_000_000, 60_000_000_000]
    assert db.execute("SELECT DISTINCT tags FROM readings WHERE device = 'balcony'").fetchall() == [('{"place":"balcony"}',)]
    assert db.execute("SELECT value FROM latest WHERE device='arduino-1' AND field='temp'").fetchone() == (22.7,)
    db.close()

    devices = pipeline.query({"op": "devices"})
    assert {d["device"] for d in devices["devices"]} >= {"greenhouse-1", "arduino-1", "balcony", "esp32-1"}


def test_one_byte_at_a_time(pipeline: Pipeline) -> None:
    data = b'{"device":"slow","a":1}{"device":"slow","b":2}'
    with socket.create_connection(("127.0.0.1", pipeline.text_port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
    wait_for(lambda: pipeline.latest("slow") == {"a": 1, "b": 2}, message="slow device")


def test_garbage_does_not_disturb_others(pipeline: Pipeline) -> None:
    good = socket.create_connection(("127.0.0.1", pipeline.text_port))
    bad = socket.create_connection(("127.0.0.1", pipeline.text_port))
    bad_port = bad.getsockname()[1]
    try:
        for i in range(20):
            bad.sendall(os.urandom(200) + b"\n" + b"\xff\xfe{{{{\n")
            good.sendall(b'{"device":"steady","n":%d}\n' % i)
        bad.sendall(b"x" * 70000 + b"\n")          # oversized frame
        good.sendall(b'{"device":"steady","n":99}\n')
    finally:
        good.close()
        bad.close()
    wait_for(lambda: pipeline.latest("steady") == {"n": 99}, message="steady device")
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'steady'") == 21, message="steady rows")
    bad_peer = "127.0.0.1:%d" % bad_port

    def letters() -> list[dict]:
        result = pipeline.cli("deadletters", "--json", "--limit", "1000")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    # The oversized frame is set aside whole in reason and in part in bytes (an excerpt), from the bad
    # connection; the good device's frames never become dead letters.
    oversized = wait_for(lambda: [d for d in letters() if d["reason"] == "frame longer than 65536 bytes"],
                         message="the oversized frame's dead letter")
    assert len(oversized) == 1
    assert oversized[0]["peer"] == bad_peer and oversized[0]["raw"] == "x" * framing.REJECT_EXCERPT
    assert all(d["peer"] == bad_peer for d in letters()), "only the bad connection's frames are dead letters"


def test_bad_binary_packet_gets_no_ack(pipeline: Pipeline) -> None:
    bad = struct.pack("<HHHBBB", 12, 600, 60, 6, 1, 3) + b"\x00" * 12      # 3 x 6 != 12
    assert pipeline.send(bad, port=pipeline.binary_port, read_reply=1) == b""
    unknown = struct.pack("<HHHBBB", 2, 600, 60, 2, 9, 1) + b"\x01\x02"     # no layout for device 9
    assert pipeline.send(unknown, port=pipeline.binary_port, read_reply=1) == b"A"   # kept as a dead letter
    wait_for(lambda: "no record layout for device number 9" in pipeline.cli("deadletters").stdout,
             message="dead letter for device 9")


def test_query_protocol_errors(pipeline: Pipeline) -> None:
    assert pipeline.query({"op": "nope"})["ok"] is False
    assert pipeline.query({"op": "latest"})["ok"] is False
    assert "unknown device" in pipeline.query({"op": "latest", "device": "ghost"})["error"]
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.plain_username, sock.plain_password = b"sensorpipe", pipeline.secret
    sock.connect(pipeline.query_endpoint)
    for raw in (b"not json", b"[1,2]", b"\xff\xfe", b"{}"):
        sock.send(raw)
        assert sock.poll(2000)
        assert b'"ok":false' in sock.recv()
    sock.close()
    ctx.term()


def test_cli_latest_and_devices(pipeline: Pipeline) -> None:
    pipeline.send(b'{"device":"cli-dev","temp":19.5}\n')
    wait_for(lambda: pipeline.latest("cli-dev"), message="cli-dev")
    out = pipeline.cli("--config", str(pipeline.config_path), "latest", "cli-dev")
    assert out.returncode == 0 and "temp" in out.stdout and "19.5" in out.stdout
    out = pipeline.cli("latest", "cli-dev", "--json")
    assert '"value": 19.5' in out.stdout
    out = pipeline.cli("devices")
    assert "cli-dev" in out.stdout


def test_cli_says_when_pipeline_is_not_running(tmp_path) -> None:
    import subprocess
    import sys
    from tests.pipeline import REPO, free_port
    result = subprocess.run([sys.executable, "-m", "workers", "latest", "x", "--endpoint",
                             f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3"],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "is the pipeline running" in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_start_loses_nothing(pipeline: Pipeline) -> None:
    sent = 0
    with socket.create_connection(("127.0.0.1", pipeline.text_port)) as sock:
        for i in range(500):
            sock.sendall(b'{"device":"restart","i":%d}\n' % i)
            sent += 1
    wait_for(lambda: pipeline.latest("restart") == {"i": 499}, message="first half")
    pipeline.stop_all()
    pipeline.start_all()
    with socket.create_connection(("127.0.0.1", pipeline.text_port)) as sock:
        for i in range(500, 1000):
            sock.sendall(b'{"device":"restart","i":%d}\n' % i)
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'restart'") == 1000, message="1000 rows")
    wait_for(lambda: pipeline.latest("restart") == {"i": 999}, message="latest after restart")


def test_replay_after_config_fix(pipeline: Pipeline) -> None:
    # A board with device number 7 has no layout yet: its packet is acknowledged and set aside.
    packet = struct.pack("<HHHBBB", 4, 600, 60, 4, 7, 1) + struct.pack("<hH", -125, 4000)
    assert pipeline.send(packet, port=pipeline.binary_port, read_reply=1) == b"A"
    wait_for(lambda: "device number 7" in pipeline.cli("deadletters").stdout, message="dead letter")

    # The user adds the layout, restarts the parsers, and replays.
    with open(pipeline.config_path, "a") as fh:
        fh.write('\n[binary.devices.7]\ndevice = "cellar"\nfields = [\n'
                 '  { name = "temperature", type = "i16", scale = 0.1 },\n'
                 '  { name = "soil", type = "u16" },\n]\n')
    for name in [n for n in pipeline.procs if n.startswith("parser")]:
        pipeline.stop(name)
        pipeline.start("parser")
    result = pipeline.cli("replay", "--all")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: pipeline.latest("cellar") == {"temperature": -12.5, "soil": 4000}, message="replayed reading")
    assert "waiting for replay" in pipeline.cli("deadletters").stdout or \
        "device number 7" not in pipeline.cli("deadletters").stdout


def test_an_older_reading_never_wins(pipeline: Pipeline) -> None:
    pipeline.send(b'{"device":"late","temp":30,"ts":1732260060000}\n')
    wait_for(lambda: pipeline.latest("late") == {"temp": 30}, message="newer reading")
    pipeline.send(b'{"device":"late","temp":10,"ts":1732260000000}\n')     # a minute older, arriving later
    wait_for(lambda: pipeline.count_rows("readings", "WHERE device = 'late'") == 2, message="both stored")
    assert pipeline.latest("late") == {"temp": 30}
    db = pipeline.db()
    assert db.execute("SELECT value FROM latest WHERE device = 'late'").fetchone() == (30,)
    db.close()


def test_config_error_names_the_key(tmp_path) -> None:
    import subprocess
    import sys
    from tests.pipeline import REPO
    bad = tmp_path / "bad.toml"
    bad.write_text('[sinks.sqlite]\nbatch_sise = 10\n')
    result = subprocess.run([sys.executable, "-m", "workers", "--config", str(bad), "worker", "edge"],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "sinks.sqlite.batch_sise: unknown key (did you mean 'batch_size'?)" in result.stderr
