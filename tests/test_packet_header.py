"""One binary header: the server's definition (workers.core.packet), read by the edge's framer and the
binary decoder and built by the simulator, agrees with the firmware's MicroPython copy."""
from __future__ import annotations

import importlib.util
import struct
from types import ModuleType

import pytest

from workers.core import framing, packet
from workers.decoders import binary
from workers.tools import simulate
from tests.pipeline import REPO


def firmware_packet() -> ModuleType:
    # firmware/lib/packet.py imports only struct: it loads under CPython as it is.
    spec = importlib.util.spec_from_file_location("firmware_packet", REPO / "firmware" / "lib" / "packet.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_side_has_one_header() -> None:
    assert framing.PACKET_HEADER is packet.HEADER
    assert binary.HEADER is packet.HEADER
    assert simulate.BINARY_HEADER is packet.HEADER
    assert packet.HEADER_SIZE == 9


def test_firmware_header_agrees_with_the_server() -> None:
    fw = firmware_packet()
    assert struct.Struct(fw.HEADER).format == packet.HEADER.format
    assert fw.HEADER_SIZE == packet.HEADER_SIZE
    assert fw.MAX_RECORDS == packet.MAX_RECORDS
    records = bytes(range(3 * fw.RECORD_SIZE))
    built = fw.binary_packet(7, records, wake_s=600, measure_s=60)
    assert built == packet.build_packet(7, records, fw.RECORD_SIZE, 600, 60)
    header = packet.Header._make(packet.parse_header(built))
    assert header == packet.Header(len(records), 600, 60, fw.RECORD_SIZE, 7, 3)


def test_build_packet_refuses_partial_records() -> None:
    with pytest.raises(ValueError):
        packet.build_packet(1, b"\x00" * 7, 6, 600, 60)
    with pytest.raises(ValueError):
        packet.build_packet(1, b"\x00" * 256, 1, 600, 60)
