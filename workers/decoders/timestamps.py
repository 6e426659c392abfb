"""Timestamps devices send, made Unix nanoseconds. Shared by the text decoders."""
from __future__ import annotations

import math
from datetime import datetime, timezone

from workers.core.storable import LAST_INSTANT, TS_MAX, TS_MIN, describe_ns

# Epoch numbers are told apart by magnitude: seconds until the year 5138, then ms, us, ns.
_S_MAX = 1e11
_MS_MAX = 1e14
_US_MAX = 1e17


def epoch_to_ns(value: float | int) -> int:
    """1732260000 (s), 1732260000123 (ms), ...us, ...ns -> ns.

    A number whose unit, read by its magnitude, puts it past what 64-bit nanoseconds can hold is
    refused with the date it would be: 10000000000 is seconds (year 2286), not milliseconds."""
    if type(value) is int and value >= 0:         # the usual case, without rounding a float
        if value < _S_MAX:
            ns, unit = value * 1_000_000_000, "seconds"
        elif value < _MS_MAX:
            ns, unit = value * 1_000_000, "milliseconds"
        elif value < _US_MAX:
            ns, unit = value * 1_000, "microseconds"
        else:
            ns, unit = value, "nanoseconds"
        if ns <= TS_MAX:
            return ns
        raise ValueError(f"timestamp {value} read as {unit} is {describe_ns(ns)}, after {LAST_INSTANT},"
                         " the last day 64-bit nanoseconds (every store's time) can hold")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"not an epoch time: {value!r}")
    if value < _S_MAX:
        ns, unit = int(round(value * 1_000_000_000)), "seconds"
    elif value < _MS_MAX:
        ns, unit = int(round(value * 1_000_000)), "milliseconds"
    elif value < _US_MAX:
        ns, unit = int(round(value * 1_000)), "microseconds"
    else:
        ns, unit = int(value), "nanoseconds"
    if ns <= TS_MAX:
        return ns
    raise ValueError(f"timestamp {value!r} read as {unit} is {describe_ns(ns)}, after {LAST_INSTANT},"
                     " the last day 64-bit nanoseconds (every store's time) can hold")


def to_ns(value: object) -> int:
    """An epoch number, a numeric string, or ISO 8601 (naive means UTC) -> ns."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return epoch_to_ns(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            number: float | int = float(text) if "." in text else int(text)
        except ValueError:
            pass
        else:
            return epoch_to_ns(number)
        try:
            moment = datetime.fromisoformat(text.replace(" ", "T", 1) if " " in text else text)
        except ValueError:
            raise ValueError(f"not a timestamp: {value!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        ns = int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
        if not TS_MIN <= ns <= TS_MAX:       # year 9999 parses, but no store can keep it
            raise ValueError(f"timestamp {value!r} is outside 1677-09-21 .. {LAST_INSTANT}, what 64-bit"
                             " nanoseconds (every store's time) can hold")
        return ns
    raise ValueError(f"not a timestamp: {value!r}")
