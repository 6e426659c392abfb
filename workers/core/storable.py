"""What every store can keep: the bounds a decoded reading or event must stay within.

The stores differ (SQLite, InfluxDB, MongoDB, the rollup state), but all of them keep a timestamp as a
64-bit count of nanoseconds and an integer as a signed 64-bit number, and none takes NaN or infinity
as a number. A value a decoder can produce but no store can keep would otherwise fail deep in a sink,
where one frame's error could stall a whole batch. So the parser checks every decoded item here and
sets a frame aside as a dead letter, with the reason this module gives, before the batch moves on.

The reasons are written for the person who sent the data: what was wrong with it, never the name of
a Python exception.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone

from workers.core.envelope import Event, Reading

INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1           # every store's integer
TS_MIN, TS_MAX = INT_MIN, INT_MAX                    # Unix ns: 1677-09-21 .. 2262-04-11
MAX_ID_CHARS = 256                                   # a device id, a field name, a tag key or value
LAST_INSTANT = "2262-04-11"                          # the last day 64-bit nanoseconds can hold


def clamp_ts(ts: int) -> int:
    """``ts`` forced into 64 bits: for a dead letter's row, which must be written whatever came in."""
    return ts if TS_MIN <= ts <= TS_MAX else (TS_MAX if ts > 0 else TS_MIN)


def timestamp_problem(ts: object) -> str | None:
    if type(ts) is not int:
        return f"timestamp {ts!r} is not a whole number of nanoseconds"
    if TS_MIN <= ts <= TS_MAX:
        return None
    return (f"timestamp {ts} ns is {'after ' + LAST_INSTANT if ts > 0 else 'before 1677-09-21'},"
            " outside what 64-bit nanoseconds (every store's time) can hold")


def id_problem(what: str, text: object) -> str | None:
    if type(text) is not str:
        return f"{what} {text!r} is not text"
    if not text:
        return f"{what} is empty"
    if len(text) > MAX_ID_CHARS:
        return f"{what} {text[:40]!r}... is {len(text)} characters long (at most {MAX_ID_CHARS})"
    if not text.isprintable():
        return f"{what} {text[:60]!r} holds control characters"
    return None


def value_problem(field: str, value: object) -> str | None:
    kind = type(value)
    if kind is float:
        if math.isfinite(value):
            return None
        return f"field {field[:60]!r}: {value} is not a finite number"
    if kind is int:
        if INT_MIN <= value <= INT_MAX:
            return None
        return (f"field {field[:60]!r}: {value} is outside the 64-bit signed integers the stores keep"
                f" ({INT_MIN} .. {INT_MAX})")
    if kind is str or kind is bool:
        return None
    return f"field {field[:60]!r}: a {kind.__name__} is not a number, text or true/false"


def problem(item: Reading | Event) -> str | None:
    """Why no store could keep ``item`` (a decoded reading or event), or None if every store can."""
    if TS_MIN <= item.ts <= TS_MAX and type(item.ts) is int:     # the common case first
        pass
    else:
        return timestamp_problem(item.ts)
    device = item.device
    if type(device) is not str or not device or len(device) > MAX_ID_CHARS or not device.isprintable():
        return id_problem("device id", device)
    if isinstance(item, Event):
        return id_problem("event kind", item.kind) if not item.kind or type(item.kind) is not str else None
    for field, value in item.fields.items():
        kind = type(value)
        if kind is float:
            if value - value != 0.0:                  # NaN or an infinity
                return value_problem(field, value)
        elif kind is int:
            if not INT_MIN <= value <= INT_MAX:
                return value_problem(field, value)
        elif kind is not str and kind is not bool:
            return value_problem(field, value)
        if type(field) is not str or not field or len(field) > MAX_ID_CHARS:
            return id_problem("field name", field)
    for key, value in item.tags.items():
        if type(key) is not str or not key or len(key) > MAX_ID_CHARS or type(value) is not str:
            return id_problem("tag key", key) or f"tag {key[:40]!r}: {value!r} is not text"
    return None


def describe_ns(ts: int) -> str:
    """A timestamp as a date for a reason text, or what it would be if it could be one."""
    try:
        return datetime.fromtimestamp(ts / 1e9, timezone.utc).strftime("%Y-%m-%d")
    except (OverflowError, OSError, ValueError):
        year = 1970 + ts / 1e9 / 31_556_952
        return f"year {year:.0f}" if abs(year) < 1e9 else "beyond any calendar"
