"""What the firmware sends, decoded by the server's own decoders (workers.decoders), byte for byte.

The server runs its shipped configuration (deploy/sensorpipe.toml) with the binary layout of
firmware/server-config-example.toml added: the snippet docs/firmware.md tells users to copy, so the
firmware's record format and the documented server config cannot drift apart.
"""
from __future__ import annotations

import importlib
import struct
import tomllib

import pytest

from tests.firmware.harness import FIRMWARE, REPO
from workers.core import config as config_mod
from workers.decoders import REGISTRY, Context
from workers.core.envelope import Event, Reading

RECV_TS = 1_732_260_000_000_000_000
EXAMPLE_TOML = FIRMWARE / "server-config-example.toml"
SHIPPED_TOML = REPO / "deploy" / "sensorpipe.toml"


@pytest.fixture
def packet(firmware_path: None):
    return importlib.import_module("packet")


@pytest.fixture(scope="module")
def server_config() -> config_mod.Config:
    table = tomllib.loads(SHIPPED_TOML.read_text())
    table.setdefault("binary", {}).setdefault("devices", {}).update(
        tomllib.loads(EXAMPLE_TOML.read_text())["binary"]["devices"])
    return config_mod.from_dict(table)


def decode(name: str, frame: bytes, cfg: config_mod.Config) -> list[Reading | Event]:
    return REGISTRY[name](frame.rstrip(b"\n"), Context("peer", RECV_TS, cfg))


def test_example_layout_matches_the_firmware(packet, server_config) -> None:
    layout = server_config.binary[1]
    assert [f.name for f in layout.fields] == [name for name, *_ in packet.FIELDS]
    assert "<" + "".join(config_mod.BINARY_TYPES[f.type] for f in layout.fields) == packet.RECORD
    for spec, (_, _, mult, missing) in zip(layout.fields, packet.FIELDS):
        assert spec.missing == missing
        assert spec.scale == pytest.approx(1 / mult)
        assert spec.offset == 0.0
    assert struct.calcsize(packet.RECORD) == packet.RECORD_SIZE


def test_binary_packet_bytes_and_decoding(packet, server_config) -> None:
    readings = [
        [("temp", 22.6), ("humi", 52.0), ("soil", 512), ("vbat", 3.712)],
        [("temp", -3.4), ("humi", 99.9), ("soil", 1023), ("vbat", 4.2)],
        [("temp", None), ("humi", None), ("soil", 498), ("vbat", 3.69)],   # the DHT did not answer
    ]
    records = b"".join(packet.record(r) for r in readings)
    frame = packet.binary_packet(1, records, 600, 60)
    assert frame == bytes.fromhex(
        "1800" "5802" "3c00" "08" "01" "03"          # 24 data bytes, wake 600 s, measure 60 s, 8 B x 3, dev 1
        "e200" "0802" "0002" "800e"                  # 226, 520, 512, 3712
        "deff" "e703" "ff03" "6810"                  # -34, 999, 1023, 4200
        "0080" "ffff" "f201" "6a0e")                 # missing, missing, 498, 3690

    out = decode("binary", frame, server_config)
    minute = 60_000_000_000
    assert [type(x).__name__ for x in out] == ["Reading", "Reading", "Reading", "Event"]
    first, second, third, failed = out
    assert (first.device, first.ts) == ("greenhouse-1", RECV_TS - 2 * minute)
    assert first.fields == pytest.approx({"temp": 22.6, "humi": 52.0, "soil": 512, "vbat": 3.712})
    assert second.ts == RECV_TS - minute
    assert second.fields == pytest.approx({"temp": -3.4, "humi": 99.9, "soil": 1023, "vbat": 4.2})
    assert third.ts == RECV_TS
    assert third.fields == pytest.approx({"soil": 498, "vbat": 3.69})
    assert failed == Event("greenhouse-1", RECV_TS, "failed_read", {"fields": ["temp", "humi"]})


def test_a_full_buffer_is_one_packet_the_server_takes(packet, server_config) -> None:
    records = b"".join(packet.record([("temp", i / 10), ("humi", 50.0), ("soil", i), ("vbat", 3.3)])
                       for i in range(packet.MAX_RECORDS))
    frame = packet.binary_packet(1, records, 65535, 60)
    out = decode("binary", frame, server_config)
    assert len(out) == 255
    assert [r.fields["soil"] for r in out] == list(range(255))
    assert out[-1].ts - out[0].ts == 254 * 60_000_000_000


def test_json_line(packet, server_config) -> None:
    line = packet.json_line("greenhouse-1", [("temp", 22.6), ("humi", None), ("soil", 512), ("rssi", -61),
                                             ("mem_free", 21344)], 1732260000123)
    assert line == (b'{"device":"greenhouse-1","temp":22.6,"humi":null,"soil":512,"rssi":-61,"mem_free":21344,'
                    b'"ts":1732260000123}\n')
    for decoder in ("json", "auto"):
        reading, failed = decode(decoder, line, server_config)
        assert reading == Reading("greenhouse-1", 1732260000123 * 1_000_000,
                                  {"temp": 22.6, "soil": 512, "rssi": -61, "mem_free": 21344}, {})
        assert failed == Event("greenhouse-1", 1732260000123 * 1_000_000, "failed_read", {"fields": ["humi"]})


def test_kv_line(packet, server_config) -> None:
    line = packet.kv_line("5c:cf:7f:a1:b2:c3", [("temp", 22.6), ("humi", None), ("soil", 512), ("vbat", 3.3)])
    assert line == b"temp: 22.6; humi: nan; soil: 512; vbat: 3.3; from 5c:cf:7f:a1:b2:c3\n"
    for decoder in ("kv", "auto"):
        reading, failed = decode(decoder, line, server_config)
        assert reading == Reading("5c:cf:7f:a1:b2:c3", RECV_TS, {"temp": 22.6, "soil": 512, "vbat": 3.3}, {})
        assert failed == Event("5c:cf:7f:a1:b2:c3", RECV_TS, "failed_read", {"fields": ["humi"]})
    with_ts = packet.kv_line("d1", [("temp", 1)], 1732260000123)
    assert decode("auto", with_ts, server_config)[0].ts == 1732260000123 * 1_000_000


def test_status_and_ack_lines_are_json_the_server_reads(packet, server_config) -> None:
    status = packet.json_line("greenhouse-1", [("rssi", -61), ("mem_free", 21344), ("dropped", 3)])
    assert decode("auto", status, server_config) == [
        Reading("greenhouse-1", RECV_TS, {"rssi": -61, "mem_free": 21344, "dropped": 3}, {})]
    ack = packet.ack_line("greenhouse-1", "c42", "pin 6 is not in OUTPUT_PINS")
    [event] = decode("auto", ack, server_config)
    assert isinstance(event, Event) and event.device == "greenhouse-1"
    assert event.body == {"device": "greenhouse-1", "cmd_ack": "c42", "ok": False,
                          "error": "pin 6 is not in OUTPUT_PINS"}
