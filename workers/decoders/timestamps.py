"""Timestamps devices send, made Unix nanoseconds. Shared by the text decoders."""
from __future__ import annotations

from datetime import datetime, timezone

# Epoch numbers are told apart by magnitude: seconds until the year 5138, then ms, us, ns.
_S_MAX = 1e11
_MS_MAX = 1e14
_US_MAX = 1e17


def epoch_to_ns(value: float | int) -> int:
    """1732260000 (s), 1732260000123 (ms), ...us, ...ns -> ns."""
    if type(value) is int and value >= 0:         # the usual case, without rounding a float
        if value < _S_MAX:
            return value * 1_000_000_000
        if value < _MS_MAX:
            return value * 1_000_000
        if value < _US_MAX:
            return value * 1_000
        return value
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"not an epoch time: {value!r}")
    if value < _S_MAX:
        return int(round(value * 1_000_000_000))
    if value < _MS_MAX:
        return int(round(value * 1_000_000))
    if value < _US_MAX:
        return int(round(value * 1_000))
    return int(value)


def to_ns(value: object) -> int:
    """An epoch number, a numeric string, or ISO 8601 (naive means UTC) -> ns."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return epoch_to_ns(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return epoch_to_ns(float(text)) if "." in text else epoch_to_ns(int(text))
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text.replace(" ", "T", 1) if " " in text else text)
        except ValueError:
            raise ValueError(f"not a timestamp: {value!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
    raise ValueError(f"not a timestamp: {value!r}")
