"""Length-prefixed binary packets from battery boards; the record layout comes from the config.

A packet is a 9-byte little-endian header ``u16 data_length, u16 wake_interval_s,
u16 measure_interval_s, u8 bytes_per_record, u8 device_number, u8 record_count`` (``workers.core.packet``)
and then ``data_length`` bytes of records, oldest first. With the shipped layout for device number 1::

    0c00 5802 3c00 06 01 02 | 2c01 6e75 e264 | 2d01 fd75 e864
        -> Reading("balcony", arrival - 60 s, {"light": 300, "humidity": 51.44..., "temperature": 22.3...})
           Reading("balcony", arrival,        {"light": 301, "humidity": 51.71..., "temperature": 22.32...})

Each field is ``raw * scale + offset``; a raw value equal to the field's ``missing`` is a failed read
(a ``failed_read`` event, never a number). The newest record is stamped with the arrival time, each
older one ``measure_interval_s`` earlier (1 ns earlier when the board reports an interval of 0, so
that its records stay apart; docs/durability.md).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from workers.core.options import ConfigError
from workers.core.packet import HEADER, parse_header  # noqa: F401 (parse_header: also this decoder's API)
from workers.decoders.base import DecodeError, measurement
from workers.core.envelope import Event, FieldValue, Reading
from workers.core.stamps import STAMP_STEP_NS

if TYPE_CHECKING:
    from workers.decoders.base import Context

BINARY_TYPES = {"u8": "B", "i8": "b", "u16": "H", "i16": "h", "u32": "I", "i32": "i", "f32": "f"}
ZERO_INTERVAL_STEP_NS = 1       # records of a packet whose measure interval is 0 (at most 255 of them)
assert 255 * ZERO_INTERVAL_STEP_NS < STAMP_STEP_NS


@dataclass(frozen=True)
class BinaryField:
    name: str
    type: Literal["u8", "i8", "u16", "i16", "u32", "i32", "f32"]
    endian: Literal["little", "big"] = "little"
    scale: float = 1.0
    offset: float = 0.0
    missing: int | None = None                    # raw value meaning "sensor read failed"


@dataclass(frozen=True)
class BinaryDevice:
    """``[binary.devices.N]``: the record layout of device number N."""
    device: str
    fields: tuple[BinaryField, ...]


def check_layouts(layouts: dict[int, BinaryDevice]) -> None:
    """The ``[binary.devices.N]`` tables, as the configuration read them."""
    for number, layout in layouts.items():
        if not 0 <= number <= 255:
            raise ConfigError(f"binary.devices.{number}: device numbers are 0..255")
        if not layout.fields:
            raise ConfigError(f"binary.devices.{number}.fields: at least one field is needed")


def decode(frame: bytes, ctx: "Context") -> list[Reading | Event]:
    if len(frame) < HEADER.size:
        raise DecodeError(f"packet shorter than its {HEADER.size}-byte header", frame)
    length, wake_s, measure_s, per_record, number, count = parse_header(frame)
    if length != len(frame) - HEADER.size:
        raise DecodeError(f"header says {length} data bytes, packet has {len(frame) - HEADER.size}", frame)
    if per_record * count != length:
        raise DecodeError(f"{count} records of {per_record} bytes do not make {length} bytes", frame)
    layout = ctx.config.binary.get(number)
    if layout is None:
        raise DecodeError(f"no record layout for device number {number} (add [binary.devices.{number}])", frame)
    record = _record_struct(layout)
    if record.size != per_record:
        raise DecodeError(f"device number {number}: config layout is {record.size} bytes, packet says {per_record}",
                          frame)
    out: list[Reading | Event] = []
    # A board that reports a measure interval of 0 would put every record at one time, and the stores
    # would keep one of them: its records are spaced 1 ns apart instead, inside the room the edge
    # leaves below each arrival stamp (workers.core.stamps).
    step = measure_s * 1_000_000_000 or ZERO_INTERVAL_STEP_NS
    fields_cfg = layout.fields
    for i in range(count):
        raw = record.unpack_from(frame, HEADER.size + i * per_record)
        ts = ctx.recv_ts - (count - 1 - i) * step
        fields: dict[str, FieldValue] = {}
        failed = []
        for spec, value in zip(fields_cfg, raw):
            if spec.missing is not None and value == spec.missing:
                failed.append(spec.name)
            elif spec.scale == 1.0 and spec.offset == 0.0:
                fields[spec.name] = value
            else:
                fields[spec.name] = value * spec.scale + spec.offset
        out.extend(measurement(layout.device, ts, fields, failed))
    return out


@lru_cache(maxsize=256)
def _record_struct(layout: BinaryDevice) -> struct.Struct:
    # One struct for the whole record; fields of mixed endianness are packed as padding-free bytes.
    if len({f.endian for f in layout.fields}) == 1:
        prefix = "<" if layout.fields[0].endian == "little" else ">"
        return struct.Struct(prefix + "".join(BINARY_TYPES[f.type] for f in layout.fields))
    return _MixedStruct(layout)


class _MixedStruct:
    """A record whose fields differ in endianness: unpack field by field."""

    def __init__(self, layout: BinaryDevice) -> None:
        self.parts = [struct.Struct(("<" if f.endian == "little" else ">") + BINARY_TYPES[f.type])
                      for f in layout.fields]
        self.size = sum(p.size for p in self.parts)

    def unpack_from(self, buffer: bytes, offset: int) -> tuple:
        values = []
        for part in self.parts:
            values.append(part.unpack_from(buffer, offset)[0])
            offset += part.size
        return tuple(values)
