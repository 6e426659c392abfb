"""The binary packet's header: the one definition on the server side (docs/protocols.md).

A battery board sends a 9-byte little-endian header and then ``data_length`` bytes of records, oldest
first::

    <HHHBBB  data_length, wake_interval_s, measure_interval_s, bytes_per_record, device_number, record_count

    0c00 5802 3c00 06 01 02 | 2c01 6e75 e264 | 2d01 fd75 e864
    -> 12 data bytes, wakes every 600 s, measured every 60 s, 2 records of 6 bytes, device number 1

The edge's framer reads it to cut packets, the binary decoder to split records, the simulator builds
it. The firmware keeps its own MicroPython copy (firmware/lib/packet.py); tests/test_packet_header.py
checks that the two agree.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

HEADER = struct.Struct("<HHHBBB")
HEADER_SIZE = HEADER.size                    # 9
MAX_RECORDS = 255                            # record_count is one byte


class Header(NamedTuple):
    data_length: int
    wake_interval_s: int
    measure_interval_s: int
    bytes_per_record: int
    device_number: int
    record_count: int


def parse_header(packet: bytes) -> tuple[int, int, int, int, int, int]:
    """(data_length, wake_interval_s, measure_interval_s, bytes_per_record, device_number, record_count).

    A plain tuple, as ``struct`` gives it: the decoder's hot path unpacks it at once. ``Header._make``
    names the members where that reads better."""
    return HEADER.unpack_from(packet, 0)


def build_packet(device_number: int, records: bytes, bytes_per_record: int, wake_interval_s: int,
                 measure_interval_s: int) -> bytes:
    """A whole packet: the header for ``records`` (whole records, oldest first), then the records."""
    count, rest = divmod(len(records), bytes_per_record)
    if rest or count > MAX_RECORDS:
        raise ValueError(f"{len(records)} bytes are not 0..{MAX_RECORDS} records of {bytes_per_record} bytes")
    return HEADER.pack(len(records), wake_interval_s, measure_interval_s, bytes_per_record, device_number,
                       count) + records
