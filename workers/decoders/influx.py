"""InfluxDB line protocol, as boards' InfluxDB libraries write it.

    weather,device=esp32-1,place=balcony temperature=22.5,humidity=52i,ok=true 1732260000000000000
        -> Reading("esp32-1", 1732260000000000000,
                   {"temperature": 22.5, "humidity": 52, "ok": True},
                   {"place": "balcony", "measurement": "weather"})

The device id comes from the first tag named in ``decoders.influx.device_tags``, else the connection.
Timestamps are told apart by magnitude (s, ms, us or ns), since a TCP line carries no precision. The
measurement becomes the ``measurement`` tag; the other tags are kept. A frame may hold several lines.
A field of ``nan`` or ``inf`` is a failed read (a ``failed_read`` event naming it), as in the other
decoders: no store keeps them as numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.decoders.base import DecodeError
from workers.decoders.base import measurement as measure
from workers.decoders.timestamps import epoch_to_ns
from workers.core.envelope import FieldValue, Reading

if TYPE_CHECKING:
    from workers.decoders.base import Context
    from workers.core.envelope import Event



@dataclass(frozen=True)
class InfluxOptions:
    """``[decoders.influx]``: the tags that may carry the device id, tried in order."""
    device_tags: tuple[str, ...] = ("device", "device_id", "host", "id")


_TRUE = {"t", "T", "true", "True", "TRUE"}
_FALSE = {"f", "F", "false", "False", "FALSE"}


class LineError(ValueError):
    pass


def decode(frame: bytes, ctx: "Context") -> list["Reading | Event"]:
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 at byte {exc.start}", frame) from None
    out: list[Reading | Event] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            measurement, tags, fields, ts = parse_line(line)
        except LineError as exc:
            raise DecodeError(f"line protocol: {exc}", frame) from None
        device = ctx.device
        for key in ctx.config.decoders.influx.device_tags:
            if key in tags:
                device = tags.pop(key)
                break
        tags["measurement"] = measurement
        try:
            when = epoch_to_ns(ts) if ts is not None else ctx.recv_ts
        except ValueError as exc:
            raise DecodeError(f"line protocol: {exc}", frame) from None
        taken = measure(device, when, fields, [])
        for item in taken:
            if isinstance(item, Reading):
                item.tags.update(tags)
        out.extend(taken)
    if not out:
        raise DecodeError("no lines", frame)
    return out


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, FieldValue], int | None]:
    """Split one line into measurement, tags, fields and the timestamp (None if absent)."""
    key_end = _find(line, 0, " ", quotes=False)
    if key_end < 0:
        raise LineError("no field set")
    series = _split(line[:key_end], ",")
    measurement = _unescape(series[0])
    if not measurement:
        raise LineError("empty measurement")
    tags: dict[str, str] = {}
    for item in series[1:]:
        key, sep, value = _partition(item)
        if not sep or not key or not value:
            raise LineError(f"bad tag {item[:40]!r}")
        tags[_unescape(key)] = _unescape(value)
    start = key_end + 1
    fields_end = _find(line, start, " ", quotes=True)
    field_text = line[start:] if fields_end < 0 else line[start:fields_end]
    fields: dict[str, FieldValue] = {}
    for item in _split(field_text, ",", quotes=True):
        key, sep, value = _partition(item)
        if not sep or not key or not value:
            raise LineError(f"bad field {item[:40]!r}")
        fields[_unescape(key)] = _field_value(value)
    if not fields:
        raise LineError("no fields")
    ts: int | None = None
    if fields_end >= 0:
        rest = line[fields_end + 1:].strip()
        if rest:
            try:
                ts = int(rest)
            except ValueError:
                raise LineError(f"bad timestamp {rest[:30]!r}") from None
            if not -(2 ** 63) <= ts < 2 ** 63:
                raise LineError(f"timestamp {rest[:30]!r} is out of range (64 bits)")
    return measurement, tags, fields, ts


def _find(text: str, start: int, char: str, quotes: bool) -> int:
    i, in_quotes = start, False
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if quotes and c == '"':
            in_quotes = not in_quotes
        elif c == char and not in_quotes:
            return i
        i += 1
    return -1


def _split(text: str, char: str, quotes: bool = False) -> list[str]:
    parts, start = [], 0
    while True:
        end = _find(text, start, char, quotes)
        if end < 0:
            parts.append(text[start:])
            return parts
        parts.append(text[start:end])
        start = end + 1


def _partition(item: str) -> tuple[str, str, str]:
    i = _find(item, 0, "=", quotes=False)
    if i < 0:
        return item, "", ""
    return item[:i], "=", item[i + 1:]


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ' ,="\\':
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _field_value(text: str) -> FieldValue:
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise LineError(f"unterminated string {text[:40]!r}")
        return text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    try:
        if text[-1] not in "iu":
            return float(text)
        number = int(text[:-1])
    except ValueError:
        raise LineError(f"bad field value {text[:40]!r}") from None
    low, high = (-(2 ** 63), 2 ** 63 - 1) if text[-1] == "i" else (0, 2 ** 64 - 1)
    if not low <= number <= high:
        raise LineError(f"{text[:40]!r} does not fit a 64-bit {'integer' if text[-1] == 'i' else 'unsigned'} field")
    return number
