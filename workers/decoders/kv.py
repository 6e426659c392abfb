"""``key: value;`` text lines, as many Arduino sketches print them.

    Soil: 512; temp: 22; hum: 40; from 5c:cf:7f:a1:b2:c3
        -> Reading("5c:cf:7f:a1:b2:c3", <arrival>, {"soil": 512, "temp": 22, "hum": 40}, {})

Pairs are ``key: value``, ``key=value`` or ``key value``, separated by ``;`` or ``,``. Keys are
lower-cased. ``from X`` (or a ``device``/``id`` key) names the device, else the connection does. Values
that are not numbers are kept as text fields; ``nan``/``null``/``err`` mean a failed read, and so do
``inf`` and ``-inf`` (no store keeps them as numbers).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from workers.decoders.base import DecodeError, measurement
from workers.decoders.timestamps import to_ns
from workers.core.envelope import Event, FieldValue, Reading

if TYPE_CHECKING:
    from workers.decoders.base import Context

_SPLIT = re.compile(r"[;,]")
_PAIR = re.compile(r"^\s*([^\s:=]+)\s*(?::\s*|=\s*|\s+)(.*?)\s*$")
DEVICE_KEYS = ("from", "device", "id")
TIME_KEYS = ("ts", "time", "timestamp")
FAILED = {"nan", "null", "none", "err", "error", ""}


def decode(frame: bytes, ctx: "Context") -> list[Reading | Event]:
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 at byte {exc.start}", frame) from None
    device, ts = ctx.device, ctx.recv_ts
    fields: dict[str, FieldValue] = {}
    failed: list[str] = []
    for part in _SPLIT.split(text.strip()):
        if not part.strip():
            continue
        match = _PAIR.match(part)
        if not match:
            raise DecodeError(f"not a key/value pair: {part.strip()[:40]!r}", frame)
        key, value = match.group(1).lower(), match.group(2)
        if key in DEVICE_KEYS and value:
            device = value
        elif key in TIME_KEYS:
            try:
                ts = to_ns(value)
            except ValueError as exc:
                raise DecodeError(str(exc), frame) from None
        elif value.lower() in FAILED:
            failed.append(key)
        else:
            fields[key] = _number(value)
    out = measurement(device, ts, fields, failed)
    if not out:
        raise DecodeError("no key/value pairs", frame)
    return out


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _number(text: str) -> FieldValue:
    try:
        number = int(text)
        if INT64_MIN <= number <= INT64_MAX:
            return number                  # beyond 64 bits: a float, as the JSON decoder makes it
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number                          # nan, inf, 1e999: a failed read (decoders.measurement)
