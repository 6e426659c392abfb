"""The ZeroMQ messages between sensorpipe workers. The only code that packs or unpacks them.

Every message is multipart; its first frame names its kind:

=========  ==========================  ==================================================================
kind       from -> to (socket)         frames
=========  ==========================  ==================================================================
frames     edge PUSH -> parser PULL    ``b"frames"``, header JSON ``{"seq": 17, "targets": null|[sink..],
                                       "conns": [[conn_id, listener, peer], ...]}``, packed frames
inject     any PUSH -> edge PULL       ``b"inject"``, header JSON ``{"conns": [...]}``, packed frames
                                       (replayed dead letters, MQTT messages): the edge journals them
readings   parser PUSH -> sink PULL    ``b"readings"``, header JSON ``{"seqs": [17, 18]}``, JSON body
           parser PUB -> query SUB     ``[[readings...], [events...]]``
ack        sink PUSH -> edge PULL      ``b"ack"``, sink name, JSON ``[17, 18]``: these batches are durable
                                       in that sink (written, or spooled to its disk)
stats      any PUB -> query SUB        ``b"stats"``, worker name, JSON counters
=========  ==========================  ==================================================================

Packed frames are back to back: ``<IqI`` (frame length, arrival time in ns, index into ``conns``)
followed by the frame's bytes. The index's top bit marks a frame the edge could not cut (oversized,
garbage between JSON objects): its bytes are ``reason\n`` and the raw excerpt, bound for the
dead-letter store. A reading is ``[device, ts_ns, {field: value}, {tag: value}]``; an
event is ``[device, ts_ns, kind, {body}]``.
"""
from __future__ import annotations

import struct
from typing import Iterator, NamedTuple, Sequence

import orjson

FRAMES = b"frames"
INJECT = b"inject"
READINGS = b"readings"
ACK = b"ack"
STATS = b"stats"

_FRAME_HEAD = struct.Struct("<IqI")
REJECTED = 0x8000_0000

FieldValue = float | int | str | bool


class Reading(NamedTuple):
    """Values a device measured at one instant. ``ts`` is Unix time in nanoseconds."""
    device: str
    ts: int
    fields: dict[str, FieldValue]
    tags: dict[str, str]


class Event(NamedTuple):
    """Something a device reported that is not a measurement (a door scan, a command ack)."""
    device: str
    ts: int
    kind: str
    body: dict


class Conn(NamedTuple):
    """Where frames came from: an edge connection (or an injector such as the MQTT worker)."""
    conn_id: int
    listener: str
    peer: str


class Frame(NamedTuple):
    payload: bytes
    recv_ts: int
    conn: Conn
    reject: str | None = None      # set when the edge could not cut this frame: the reason


class EnvelopeError(ValueError):
    """A message that does not follow this module's layout."""


# --------------------------------------------------------------------------- frames


def pack_frames(frames: Sequence[tuple[bytes, int, int]]) -> bytes:
    """``frames`` are (payload, recv_ts_ns, conn_index) triples; see ``reject_frame`` for rejects."""
    head = _FRAME_HEAD.pack
    parts: list[bytes] = []
    add = parts.append
    for payload, ts, ci in frames:
        add(head(len(payload), ts, ci))
        add(payload)
    return b"".join(parts)


def reject_frame(reason: str, raw: bytes, recv_ts: int, conn_index: int) -> tuple[bytes, int, int]:
    return reason.encode() + b"\n" + raw, recv_ts, conn_index | REJECTED


def frames_message(seq: int, conns: Sequence[Conn], body: bytes, targets: Sequence[str] | None = None) -> list[bytes]:
    header = {"seq": seq, "targets": list(targets) if targets is not None else None,
              "conns": [list(c) for c in conns]}
    return [FRAMES, orjson.dumps(header), body]


def journal_record(conns: Sequence[Conn], body: bytes) -> bytes:
    """What the edge journals for one batch: the connection table and the packed frames."""
    table = orjson.dumps([list(c) for c in conns])
    return struct.pack("<I", len(table)) + table + body


def parse_journal_record(record: bytes) -> tuple[list[Conn], bytes]:
    (n,) = struct.unpack_from("<I", record, 0)
    conns = [Conn(int(c[0]), str(c[1]), str(c[2])) for c in orjson.loads(record[4:4 + n])]
    return conns, record[4 + n:]


def inject_message(conns: Sequence[Conn], body: bytes) -> list[bytes]:
    return [INJECT, orjson.dumps({"conns": [list(c) for c in conns]}), body]


def parse_frames_header(raw: bytes) -> tuple[int | None, list[str] | None, list[Conn]]:
    try:
        header = orjson.loads(raw)
        conns = [Conn(int(c[0]), str(c[1]), str(c[2])) for c in header["conns"]]
        return header.get("seq"), header.get("targets"), conns
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise EnvelopeError(f"bad frames header: {exc}") from None


def iter_frames(body: bytes, conns: Sequence[Conn]) -> Iterator[Frame]:
    pos, end, size = 0, len(body), _FRAME_HEAD.size
    unpack = _FRAME_HEAD.unpack_from
    while pos < end:
        if pos + size > end:
            raise EnvelopeError("truncated frame header")
        length, ts, ci = unpack(body, pos)
        pos += size
        rejected = ci & REJECTED
        ci &= ~REJECTED
        if pos + length > end or ci >= len(conns):
            raise EnvelopeError("truncated frame or bad connection index")
        payload = body[pos:pos + length]
        pos += length
        if rejected:
            reason, _, raw = payload.partition(b"\n")
            yield Frame(raw, ts, conns[ci], reason.decode(errors="replace"))
        else:
            yield Frame(payload, ts, conns[ci])


# --------------------------------------------------------------------------- readings


def readings_body(readings: Sequence[Reading], events: Sequence[Event]) -> bytes:
    # orjson does not serialize NamedTuples; plain tuples are arrays.
    return orjson.dumps([[tuple(r) for r in readings], [tuple(e) for e in events]])


def readings_message(seqs: Sequence[int], body: bytes) -> list[bytes]:
    return [READINGS, orjson.dumps({"seqs": list(seqs)}), body]


def parse_readings_rows(header: bytes, body: bytes) -> tuple[list[int], list[list], list[list]]:
    """``parse_readings`` without building Reading/Event objects: ``[device, ts_ns, fields, tags]``
    lists, for a consumer that only reads them (the query worker's latest values)."""
    try:
        seqs = orjson.loads(header)["seqs"]
        raw_readings, raw_events = orjson.loads(body)
        return seqs, raw_readings, raw_events
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad readings message: {exc}") from None


def parse_readings(header: bytes, body: bytes) -> tuple[list[int], list[Reading], list[Event]]:
    try:
        seqs = orjson.loads(header)["seqs"]
        raw_readings, raw_events = orjson.loads(body)
        return seqs, [Reading(*r) for r in raw_readings], [Event(*e) for e in raw_events]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad readings message: {exc}") from None


# --------------------------------------------------------------------------- acks and stats


def ack_message(sink: str, seqs: Sequence[int]) -> list[bytes]:
    return [ACK, sink.encode(), orjson.dumps(list(seqs))]


def parse_ack(frames: Sequence[bytes]) -> tuple[str, list[int]]:
    try:
        return frames[1].decode(), [int(s) for s in orjson.loads(frames[2])]
    except (IndexError, UnicodeDecodeError, orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad ack: {exc}") from None


def stats_message(worker: str, counters: dict) -> list[bytes]:
    return [STATS, worker.encode(), orjson.dumps(counters)]


def parse_stats(frames: Sequence[bytes]) -> tuple[str, dict]:
    try:
        return frames[1].decode(), orjson.loads(frames[2])
    except (IndexError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise EnvelopeError(f"bad stats: {exc}") from None
