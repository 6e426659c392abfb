"""What every decoder shares: the error it raises, the context it is given, what a measurement becomes.

Decoders import from here, never from ``workers.decoders`` (whose registry imports them) nor from the
configuration (which imports them to compose their options).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from workers.core.envelope import Event, Reading

if TYPE_CHECKING:
    from workers.core.config import Config


class DecodeError(ValueError):
    """A frame that cannot become readings. ``reason`` is short and safe to show to a user."""

    def __init__(self, reason: str, frame: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame = frame


class Context(NamedTuple):
    device: str        # the device id to use when the frame names none
    recv_ts: int       # arrival time, Unix ns
    config: "Config"


_new = tuple.__new__

Decoder = Callable[[bytes, Context], list[Reading | Event]]


def measurement(device: str, ts: int, fields: dict, failed: list[str]) -> list[Reading | Event]:
    """What one measurement becomes: a reading of the fields that were read, and a ``failed_read``
    event naming those the sensor could not read (never a zero). Empty when there is neither.

    NaN and infinity are failed reads too: no store keeps them as numbers, and a sensor that reports
    one has not measured anything."""
    for value in fields.values():
        if type(value) is float and value - value != 0.0:     # NaN or an infinity: the slow path
            failed = [*failed, *(k for k, v in fields.items() if type(v) is float and v - v != 0.0)]
            fields = {k: v for k, v in fields.items() if not (type(v) is float and v - v != 0.0)}
            break
    out: list[Reading | Event] = []
    if fields:
        out.append(_new(Reading, (device, ts, fields, {})))   # Reading(...) without its Python __new__
    if failed:
        out.append(Event(device, ts, "failed_read", {"fields": failed}))
    return out
