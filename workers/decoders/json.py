"""JSON objects, flat or nested, one per frame.

    {"device":"d1","temp":22.6,"humi":52}
        -> Reading("d1", <arrival>, {"temp": 22.6, "humi": 52}, {})
    {"Name":"HumiTure_Sensor_No1","Value":{"temp":22.6,"humi":52},"ts":1732260000}
        -> Reading("HumiTure_Sensor_No1", 1732260000000000000, {"temp": 22.6, "humi": 52}, {})
    {"cmd":"verifiedRecordU","data":[...]}
        -> Event(<device>, <arrival>, "verifiedRecordU", {...the whole object...})
    {"device":"d1","cmd_ack":"c42","ok":true}
        -> Event("d1", <arrival>, "cmd_ack", {...the whole object...})

The device id comes from the first of ``decoders.json.device_keys`` present, else the connection. A
timestamp key (epoch s/ms/us/ns or ISO 8601) is optional. Nested objects are flattened with ``_``
(``{"bme":{"t":1}}`` -> ``bme_t``), lists by index (``v_0``). A ``null`` value is a failed sensor read:
it becomes a ``failed_read`` event naming the fields, never a zero. A top-level list holds several
objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import orjson

from workers.decoders.base import DecodeError, measurement
from workers.decoders.timestamps import epoch_to_ns, to_ns
from workers.core.envelope import Event, FieldValue, Reading
from workers.core.storable import INT_MAX, MAX_ID_CHARS, TS_MAX

if TYPE_CHECKING:
    from workers.decoders.base import Context

MAX_DEPTH = 8
_NUMBERS = frozenset((float, int, bool))
_TEXT_AND_INTEGERS = frozenset((str, int, bool))       # no float, so nothing to check for NaN
_SCALARS = frozenset((float, int, bool, str))
_new = tuple.__new__                                   # Reading(...) without its Python __new__
ACK_KEY = "cmd_ack"       # a device's answer to a command (docs/commands.md)


@dataclass(frozen=True)
class JsonOptions:
    """``[decoders.json]``: which members name the device, the time, nested fields and events."""
    device_keys: tuple[str, ...] = ("device", "device_id", "id", "Name", "name")
    time_keys: tuple[str, ...] = ("ts", "time", "timestamp")
    fields_keys: tuple[str, ...] = ("Value", "value", "fields", "data")  # nested objects holding fields
    event_keys: tuple[str, ...] = ("cmd", "event", "cmd_ack")  # objects with one of these are events


def decode(frame: bytes, ctx: "Context") -> list[Reading | Event]:
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc}", frame) from None
    return decode_doc(doc, ctx, frame)


def decode_doc(doc: object, ctx: "Context", frame: bytes) -> list[Reading | Event]:
    """``decode`` of a frame already loaded (``frame`` is for the error)."""
    if type(doc) is dict:
        out = _decode_object(doc, ctx, frame)
        if not out:
            raise DecodeError("no objects in frame", frame)
        return out
    objects = doc if isinstance(doc, list) else [doc]
    out = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise DecodeError(f"expected a JSON object, got {type(obj).__name__}", frame)
        out.extend(_decode_object(obj, ctx, frame))
    if not out:
        raise DecodeError("no objects in frame", frame)
    return out


def flat_reader(opts: JsonOptions) -> Callable[[dict, str, int, int], Reading | None]:
    """``read(doc, device, recv_ts, size)``: the reading ``decode_doc`` makes of ``doc`` (loaded from a
    frame of ``size`` bytes, ``device`` and ``recv_ts`` as in ``Context``) when it is the common shape
    and every store can keep it as it is (``storable.problem`` is None); None for anything else, which
    ``decode_doc`` and the parser's checks then take the general way.

    The common shape: a flat object, the first device key a non-empty printable string (or none), the
    first time key an epoch integer (or none), no event or fields key, and values that are numbers,
    or text with no integer beside it. The parser calls it for every frame of a JSON board, so it is
    a handful of C calls. One ``max`` checks both that every value is a number (comparing any other
    JSON value with a number raises) and the 64-bit bound: orjson gives no NaN nor infinity, and an
    integer it gives is at least -2**63, so only the top bound is left to check."""
    device_keys, time_keys = opts.device_keys, opts.time_keys
    special = frozenset((*opts.event_keys, *opts.fields_keys))
    scalars, new, reading = _SCALARS, _new, Reading

    def read(doc: dict, device: str, recv_ts: int, size: int) -> Reading | None:
        if not special.isdisjoint(doc):
            return None
        fields = doc.copy()
        for key in device_keys:
            if key in fields:
                device = fields.pop(key)
                if type(device) is not str or not device:
                    return None
                break
        ts = recv_ts
        for key in time_keys:
            if key in fields:
                raw = fields.pop(key)
                if type(raw) is not int or raw < 0:
                    return None
                ts = (raw * 1_000_000_000 if raw < 100_000_000_000 else raw * 1_000_000 if raw < 100_000_000_000_000
                      else raw * 1_000 if raw < 100_000_000_000_000_000 else raw)       # epoch_to_ns
                if ts > TS_MAX:
                    return None
                break
        if not fields or not device or len(device) > MAX_ID_CHARS or not device.isprintable() or "" in fields:
            return None
        if size > MAX_ID_CHARS and max(map(len, fields)) > MAX_ID_CHARS:     # (a longer name needs more bytes)
            return None
        values = fields.values()
        try:                 # raises for any value not a number: text, null, a list or an object
            if max(values) > INT_MAX:
                return None
        except TypeError:
            kinds = set(map(type, values))
            if not kinds <= scalars or int in kinds:
                return None
        return new(reading, (device, ts, fields, {}))

    return read


def _decode_object(obj: dict, ctx: "Context", frame: bytes) -> list[Reading | Event]:
    # Every frame of a JSON board comes through here, so the common shape (a string device id, an
    # epoch timestamp, flat numbers) is checked with C calls (isdisjoint, a set of the value types,
    # one sum) rather than a Python loop per member; anything else takes the general path below.
    opts = ctx.config.decoders.json
    device = ctx.device
    device_key = time_key = None
    for key in opts.device_keys:
        value = obj.get(key)
        if value is None:
            continue
        if type(value) is str:
            if value:
                device, device_key = value, key
                break
        elif isinstance(value, int) and not isinstance(value, bool):
            device, device_key = str(value), key
            break
    ts = ctx.recv_ts
    for key in opts.time_keys:
        if key in obj:
            raw = obj[key]
            try:
                ts = epoch_to_ns(raw) if type(raw) is int else to_ns(raw)
            except ValueError as exc:
                raise DecodeError(f"{key}: {exc}", frame) from None
            time_key = key
            break
    keys = obj.keys()
    if not keys.isdisjoint(opts.event_keys):
        for key in opts.event_keys:
            if key in obj:
                # {"cmd":"heartU"} is a "heartU" event; a command ack {"cmd_ack":"c42",...} a "cmd_ack" one
                return [Event(device, ts, key if key == ACK_KEY else str(obj[key]), obj)]

    if not keys.isdisjoint(opts.fields_keys):
        for key in opts.fields_keys:
            if isinstance(obj.get(key), dict):
                return _measurement(device, ts, obj[key], (), frame)
    else:
        fields = obj.copy()
        if device_key is not None:
            del fields[device_key]
        if time_key is not None:
            del fields[time_key]
        if fields:
            values = fields.values()
            kinds = set(map(type, values))
            if kinds <= _NUMBERS:
                total = sum(values)
                if total - total == 0:       # every number finite (NaN and infinities go the long way)
                    return [_new(Reading, (device, ts, fields, {}))]
            elif kinds <= _TEXT_AND_INTEGERS:
                return [_new(Reading, (device, ts, fields, {}))]
    return _measurement(device, ts, obj, (device_key, time_key), frame)


def _measurement(device: str, ts: int, source: dict, used: tuple, frame: bytes) -> list[Reading | Event]:
    """The general path: nested members flattened, ``null`` a failed read, NaN set apart."""
    fields: dict[str, FieldValue] = {}
    failed: list[str] = []
    for key, value in source.items():
        if key in used:
            continue
        kind = type(value)
        if kind is float or kind is int or kind is str or kind is bool:
            fields[key] = value
        else:
            _flatten(key, value, fields, failed, 0)
    out = measurement(device, ts, fields, failed)
    if not out:
        raise DecodeError("object has no fields", frame)
    return out


def _flatten(name: str, value: object, fields: dict[str, FieldValue], failed: list[str], depth: int) -> None:
    if value is None:
        failed.append(name)
    elif isinstance(value, (bool, int, float, str)):
        fields[name] = value
    elif depth >= MAX_DEPTH:
        fields[name] = orjson.dumps(value).decode()
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{name}_{key}", item, fields, failed, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _flatten(f"{name}_{i}", item, fields, failed, depth + 1)
