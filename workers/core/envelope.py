"""The ZeroMQ messages between sensorpipe workers. The only code that packs or unpacks them.

Every message is multipart; its first frame names its kind:

=========  ==========================  ==================================================================
kind       from -> to (socket)         frames
=========  ==========================  ==================================================================
frames     edge PUSH -> parser PULL    ``b"frames"``, header JSON ``{"seq": 17, "targets": null|[sink..],
                                       "conns": [[conn_id, listener, peer], ...]}``, packed frames (an
                                       authenticated connection adds ``device, [patterns]``: ``Conn``)
inject     MQTT DEALER, replay REQ     ``b"inject"``, header JSON ``{"conns": [...], "ref": 5}``, packed
           -> edge ROUTER              frames (MQTT messages, replayed dead letters): journaled like
                                       device frames
injected   edge ROUTER -> the same     ``b"injected"``, JSON ``{"ref": 5, "seq": 812}`` once the frames
                                       are in the journal (``{"ref": 5, "error": "..."}`` if refused)
readings   parser PUSH -> sink PULL    ``b"readings"``, header JSON ``{"seqs": [17, 18], "seen": [...]}``,
           parser PUB -> query SUB     JSON body ``[[readings...], [events...]]``; ``seen`` lists the
                                       devices' newest frames of the batch that are news (presence:
                                       a device new, moved, or not told of for 10 s), see ``Seen``
ack        sink PUSH -> edge PULL      ``b"ack"``, sink name, JSON ``[17, 18]``: these batches are durable
                                       in that sink (written, or spooled to its disk)
seen       parser PUSH -> commands     ``b"seen"``, JSON ``{"seen": [Seen...], "acks": [[device, id, ok,
           PULL                        error]...], "replies": [[device, listener, conn_id, peer, text]]}``
deliver    commands ROUTER -> edge /   ``b"deliver"``, JSON ``{"ref": 9, "device", "listener", "conn_id",
           MQTT DEALER                 "peer", "payload": "<one line of JSON>"}``: write it to the device
delivered  edge / MQTT DEALER ->       ``b"delivered"``, JSON ``{"ref": 9, "ok": true}`` or ``{"ref": 9,
           commands ROUTER             "ok": false, "error": "not connected"}``
stats      any PUB -> query SUB        ``b"stats"``, worker name, JSON counters
=========  ==========================  ==================================================================

Packed frames are back to back: ``<IqI`` (frame length, arrival time in ns, index into ``conns``)
followed by the frame's bytes. The index's top bit marks a frame the edge could not cut (oversized,
garbage between JSON objects): its bytes are ``reason\n`` and the raw excerpt, bound for the
dead-letter store. A reading is ``[device, ts_ns, {field: value}, {tag: value}]``; an
event is ``[device, ts_ns, kind, {body}]``; a seen entry is ``[device, arrival_ns, listener, conn_id,
peer]``.

A **rollup** (a window aggregate made by the rollup worker, docs/rollups.md) travels to the sinks as
a reading marked with the tag ``rollup`` = the window (``"1m"``, ``"1h"``...). Its timestamp is the
window's start, and each aggregated field ``F`` gives five fields, named as Telegraf's basicstats
names them: ``F_count`` (int), ``F_min``, ``F_max``, ``F_mean``, ``F_last``::

    ["greenhouse-1", 1732277580000000000,
     {"temp_count": 30, "temp_min": 21.5, "temp_max": 22.75, "temp_mean": 22.1, "temp_last": 22.5},
     {"rollup": "1m", "place": "north"}]

A corrected window is sent again with the same device, window and start: sinks upsert. Parsers drop a
``rollup`` tag a device sends (counted), so only the rollup worker makes rollups. Use
``rollup_window()`` and ``rollup_stats()`` to read one; never parse the field names by hand.

``inject`` is a request with a confirmation: an injector (the MQTT worker, ``sensorpipe replay``)
holds on to what it injected, and acknowledges it to its own source (the MQTT broker, the dead-letter
store), only once ``injected`` says it is in the edge's journal. The edge answers every well-formed
inject; one that gets no answer in time (the edge was restarting) is sent again, with the same
arrival times, so the stores, keyed by (device, field, timestamp), keep it once.
"""
from __future__ import annotations

import functools
import struct
from typing import Iterator, NamedTuple, Sequence

import orjson

FRAMES = b"frames"
INJECT = b"inject"
INJECTED = b"injected"
READINGS = b"readings"
ACK = b"ack"
SEEN = b"seen"
DELIVER = b"deliver"
DELIVERED = b"delivered"
STATS = b"stats"

ROLLUP_TAG = "rollup"
ROLLUP_STATS = ("count", "min", "max", "mean", "last")

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
    """Where frames came from: an edge connection (or an injector such as the MQTT worker).

    ``device`` is the device the connection authenticated as ("" when its listener has ``auth =
    "off"``) and ``may_report`` the patterns of the other devices its credential may report for
    (a gateway's); the parser sets aside a frame naming any other device. Packed as
    ``[conn_id, listener, peer]``, plus ``device, [patterns]`` when authenticated."""
    conn_id: int
    listener: str
    peer: str
    device: str = ""
    may_report: tuple[str, ...] = ()


class Seen(NamedTuple):
    """A device's newest frame in a batch: when it arrived and by which way (presence, command routes).
    ``conn_id`` is the edge connection (0 for MQTT, whose ``listener`` is ``mqtt:<subscription>`` and
    ``peer`` the topic)."""
    device: str
    ts: int
    listener: str
    conn_id: int
    peer: str


class Frame(NamedTuple):
    payload: bytes
    recv_ts: int
    conn: Conn
    reject: str | None = None      # set when the edge could not cut this frame: the reason


class EnvelopeError(ValueError):
    """A message that does not follow this module's layout."""


# --------------------------------------------------------------------------- frames


def _pack_conns(conns: Sequence[Conn]) -> list[list]:
    return [list(c) if c.device else [c.conn_id, c.listener, c.peer] for c in conns]


def _parse_conn(c: Sequence) -> Conn:
    if len(c) > 3:
        return Conn(int(c[0]), str(c[1]), str(c[2]), str(c[3]), tuple(str(p) for p in c[4]))
    return Conn(int(c[0]), str(c[1]), str(c[2]))


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
              "conns": _pack_conns(conns)}
    return [FRAMES, orjson.dumps(header), body]


def journal_record(conns: Sequence[Conn], body: bytes) -> bytes:
    """What the edge journals for one batch: the connection table and the packed frames."""
    table = orjson.dumps(_pack_conns(conns))
    return struct.pack("<I", len(table)) + table + body


def frames_message_of_record(seq: int, record: bytes, targets: Sequence[str] | None = None) -> list[bytes]:
    """``frames_message`` for a batch as ``journal_record`` wrote it, without unpacking and packing its
    connection table again (the edge sends every batch it journals)."""
    (n,) = struct.unpack_from("<I", record, 0)
    header = b'{"seq":%d,"targets":%b,"conns":%b}' % (seq, orjson.dumps(list(targets) if targets is not None
                                                                     else None), record[4:4 + n])
    return [FRAMES, header, record[4 + n:]]


def parse_journal_record(record: bytes) -> tuple[list[Conn], bytes]:
    (n,) = struct.unpack_from("<I", record, 0)
    conns = [_parse_conn(c) for c in orjson.loads(record[4:4 + n])]
    return conns, record[4 + n:]


def inject_message(conns: Sequence[Conn], body: bytes, ref: int = 0) -> list[bytes]:
    return [INJECT, orjson.dumps({"conns": _pack_conns(conns), "ref": ref}), body]


def parse_inject(message: Sequence[bytes]) -> tuple[list[bytes], int, list[Conn], bytes]:
    """An inject as a ROUTER receives it: (route to answer on, ref, conns, packed frames). The route is
    the peer's identity, and the empty delimiter when the peer is a REQ socket."""
    try:
        at = list(message).index(INJECT, 1)
    except ValueError:
        raise EnvelopeError("expected an inject message") from None
    if len(message) != at + 3:
        raise EnvelopeError(f"an inject message has 3 frames, got {len(message) - at}")
    _, _, conns = parse_frames_header(message[at + 1])
    try:
        ref = orjson.loads(message[at + 1]).get("ref", 0)
    except AttributeError:
        raise EnvelopeError("bad inject header") from None
    return list(message[:at]), ref, conns, message[at + 2]


def injected_message(route: Sequence[bytes], ref: int, seq: int | None, error: str | None = None) -> list[bytes]:
    reply: dict = {"ref": ref, "seq": seq} if error is None else {"ref": ref, "error": error}
    return [*route, INJECTED, orjson.dumps(reply)]


def parse_injected(message: Sequence[bytes]) -> tuple[int, int | None, str | None]:
    """(ref, journal seq, error) from an ``injected`` reply (a REQ socket's empty delimiter is gone)."""
    try:
        if message[-2] != INJECTED:
            raise EnvelopeError(f"expected an injected reply, got {message[-2][:20]!r}")
        reply = orjson.loads(message[-1])
        return int(reply["ref"]), reply.get("seq"), reply.get("error")
    except (IndexError, KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise EnvelopeError(f"bad injected reply: {exc}") from None


KNOWN_CONNS_MAX = 65536          # a parser's ``known`` table of connections: emptied when it grows past this


def parse_frames_header(raw: bytes, known: dict[str, tuple[list, Conn]] | None = None
                        ) -> tuple[int | None, list[str] | None, list[Conn]]:
    """(seq, targets, conns). ``known``, the caller's table of connections from earlier batches (by
    peer): a connection packed as it was then is the same ``Conn`` object, not unpacked again. The
    edge's connections outlive many batches, and in a fleet each frame of a batch is from its own."""
    try:
        header = orjson.loads(raw)
        if known is None:
            conns = [_parse_conn(c) for c in header["conns"]]
        else:
            conns = []
            add = conns.append
            get = known.get
            for c in header["conns"]:
                try:
                    hit = get(c[2])
                except (TypeError, KeyError, IndexError):  # not a list of three or more: _parse_conn says why
                    hit = None
                if hit is not None and hit[0] == c:             # the same id, listener, peer and device
                    add(hit[1])
                    continue
                conn = _parse_conn(c)
                if _plain(c):                  # (1 == 1.0 == True, but str() of them differ: not kept)
                    if len(known) >= KNOWN_CONNS_MAX:
                        known.clear()
                    known[c[2]] = (c, conn)
                add(conn)
        return header.get("seq"), header.get("targets"), conns
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise EnvelopeError(f"bad frames header: {exc}") from None


def _plain(c: object) -> bool:
    """A packed connection whose texts are all str: one that only an equal list unpacks the same as."""
    return (type(c) is list and type(c[1]) is str and type(c[2]) is str
            and (len(c) == 3 or type(c[3]) is str and all(type(p) is str for p in c[4])))


def frame_rows(body: bytes, n_conns: int) -> list[tuple[bytes, int, int, str | None]]:
    """``iter_frames`` as a list of (payload, arrival ns, index into the conns, reject reason or None):
    the parser's loop, one tuple per frame and no generator to resume."""
    rows: list[tuple[bytes, int, int, str | None]] = []
    add = rows.append
    pos, end, size = 0, len(body), _FRAME_HEAD.size
    unpack = _FRAME_HEAD.unpack_from
    while pos < end:
        if pos + size > end:
            raise EnvelopeError("truncated frame header")
        length, ts, ci = unpack(body, pos)
        pos += size
        start, pos = pos, pos + length
        if pos > end or ci >= n_conns:
            if ci & REJECTED and pos <= end and ci & ~REJECTED < n_conns:
                reason, _, raw = body[start:pos].partition(b"\n")
                add((raw, ts, ci & ~REJECTED, reason.decode(errors="replace")))
                continue
            raise EnvelopeError("truncated frame or bad connection index")
        add((body[start:pos], ts, ci, None))
    return rows


def iter_frames(body: bytes, conns: Sequence[Conn]) -> Iterator[Frame]:
    pos, end, size = 0, len(body), _FRAME_HEAD.size
    unpack = _FRAME_HEAD.unpack_from
    new = tuple.__new__               # Frame(...) without the Python-level __new__: once per frame
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
            yield new(Frame, (payload, ts, conns[ci], None))


# --------------------------------------------------------------------------- readings


def readings_body(readings: Sequence[Reading], events: Sequence[Event]) -> bytes:
    # orjson does not serialize NamedTuples; plain tuples are arrays.
    return orjson.dumps([list(map(tuple, readings)), list(map(tuple, events))])


def readings_message(seqs: Sequence[int], body: bytes, seen: Sequence[Seen] = ()) -> list[bytes]:
    header: dict = {"seqs": list(seqs)}
    if seen:
        header["seen"] = [tuple(s) for s in seen]
    return [READINGS, orjson.dumps(header), body]


def parse_seen(header: bytes) -> list[Seen]:
    """The ``seen`` list of a readings message's header (empty when it has none)."""
    try:
        return [Seen(str(d), int(ts), str(lst), int(ci), str(peer))
                for d, ts, lst, ci, peer in orjson.loads(header).get("seen", ())]
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad seen list: {exc}") from None


def parse_readings_rows(header: bytes, body: bytes) -> tuple[list[int], list[list], list[list]]:
    """``parse_readings`` without building Reading/Event objects: ``[device, ts_ns, fields, tags]``
    lists, for a consumer that only reads them (the query worker's latest values)."""
    try:
        seqs = orjson.loads(header)["seqs"]
        raw_readings, raw_events = orjson.loads(body)
        return seqs, raw_readings, raw_events
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad readings message: {exc}") from None


def parse_live(header: bytes, body: bytes) -> tuple[list, list]:
    """A readings message as the query worker takes it: the header's ``seen`` rows and the readings
    rows, each part parsed once and nothing built (lists the taker checks: a fleet's query worker
    gets every reading and a presence entry for one in five)."""
    try:
        seen = orjson.loads(header).get("seen", [])
        raw_readings, _ = orjson.loads(body)
        return seen, raw_readings
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad readings message: {exc}") from None


_FOUR = frozenset((4,))
_new_reading = functools.partial(tuple.__new__, Reading)
_new_event = functools.partial(tuple.__new__, Event)


def parse_readings(header: bytes, body: bytes) -> tuple[list[int], list[Reading], list[Event]]:
    try:
        seqs = orjson.loads(header)["seqs"]
        raw_readings, raw_events = orjson.loads(body)
        # Built in C: the length of every row checked at once, then tuple.__new__ with no Python call
        # per reading (Reading(*r) and Reading._make each run Python code per reading, and every sink
        # and the rollup worker parse every batch)
        if not _FOUR.issuperset(map(len, raw_readings)) or not _FOUR.issuperset(map(len, raw_events)):
            raise EnvelopeError("bad readings message: a reading or event is not 4 values")
        return seqs, list(map(_new_reading, raw_readings)), list(map(_new_event, raw_events))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad readings message: {exc}") from None


# --------------------------------------------------------------------------- rollups


class Stats(NamedTuple):
    """One field's aggregate over one window."""
    count: int
    min: float
    max: float
    mean: float
    last: float


def rollup_reading(device: str, window: str, start_ns: int, stats: dict[str, Stats],
                   tags: dict[str, str] | None = None) -> Reading:
    fields: dict[str, FieldValue] = {}
    for field, values in stats.items():
        for name, value in zip(ROLLUP_STATS, values):
            fields[f"{field}_{name}"] = value
    return Reading(device, start_ns, fields, {**(tags or {}), ROLLUP_TAG: window})


def rollup_window(reading: Reading) -> str | None:
    """The window of a rollup (``"1m"``), None for a device's reading."""
    return reading.tags.get(ROLLUP_TAG)


def rollup_stats(reading: Reading) -> dict[str, Stats]:
    """field -> Stats of a rollup reading. A field missing one of the five is an EnvelopeError."""
    parts: dict[str, dict[str, FieldValue]] = {}
    for name, value in reading.fields.items():
        field, _, stat = name.rpartition("_")
        if not field or stat not in ROLLUP_STATS:
            raise EnvelopeError(f"rollup field {name!r} is not <field>_<{'|'.join(ROLLUP_STATS)}>")
        parts.setdefault(field, {})[stat] = value
    try:
        return {field: Stats(*(values[s] for s in ROLLUP_STATS)) for field, values in parts.items()}
    except KeyError as exc:
        raise EnvelopeError(f"rollup of {reading.device!r} lacks {exc.args[0]!r}") from None


# --------------------------------------------------------------------------- devices: seen, deliver


class Ack(NamedTuple):
    """A device's answer to a command: ``{"device":"ID","cmd_ack":"c42","ok":true}``."""
    device: str
    command_id: str
    ok: bool
    error: str | None


class Downlink(NamedTuple):
    """Something to write to a device by the way it was last seen: a command, or an automatic reply."""
    device: str
    listener: str
    conn_id: int
    peer: str
    payload: bytes                 # one JSON object, no newline (the edge adds it on TCP)


def seen_message(seen: Sequence[Seen], acks: Sequence[Ack], replies: Sequence[Downlink]) -> list[bytes]:
    return [SEEN, orjson.dumps({"seen": [tuple(s) for s in seen], "acks": [tuple(a) for a in acks],
                                "replies": [(r.device, r.listener, r.conn_id, r.peer, r.payload.decode())
                                            for r in replies]})]


def parse_seen_message(message: Sequence[bytes]) -> tuple[list[Seen], list[Ack], list[Downlink]]:
    try:
        if len(message) != 2 or message[0] != SEEN:
            raise EnvelopeError(f"expected a seen message, got {message[:1]!r}")
        doc = orjson.loads(message[1])
        seen = [Seen(str(d), int(ts), str(lst), int(ci), str(peer)) for d, ts, lst, ci, peer in doc["seen"]]
        acks = [Ack(str(d), str(i), bool(ok), None if e is None else str(e)) for d, i, ok, e in doc["acks"]]
        replies = [Downlink(str(d), str(lst), int(ci), str(peer), str(text).encode())
                   for d, lst, ci, peer, text in doc["replies"]]
        return seen, acks, replies
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise EnvelopeError(f"bad seen message: {exc}") from None


def deliver_message(route: Sequence[bytes], ref: int, downlink: Downlink) -> list[bytes]:
    return [*route, DELIVER, orjson.dumps({"ref": ref, "device": downlink.device, "listener": downlink.listener,
                                           "conn_id": downlink.conn_id, "peer": downlink.peer,
                                           "payload": downlink.payload.decode()})]


def parse_deliver(message: Sequence[bytes]) -> tuple[int, Downlink]:
    try:
        if message[0] != DELIVER:
            raise EnvelopeError(f"expected a deliver message, got {message[:1]!r}")
        doc = orjson.loads(message[1])
        return int(doc["ref"]), Downlink(str(doc["device"]), str(doc["listener"]), int(doc["conn_id"]),
                                         str(doc["peer"]), str(doc["payload"]).encode())
    except (IndexError, KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise EnvelopeError(f"bad deliver message: {exc}") from None


def delivered_message(ref: int, error: str | None = None) -> list[bytes]:
    reply: dict = {"ref": ref, "ok": True} if error is None else {"ref": ref, "ok": False, "error": error}
    return [DELIVERED, orjson.dumps(reply)]


def parse_delivered(message: Sequence[bytes]) -> tuple[int, str | None]:
    """(ref, error) from a ``delivered`` message as the commands ROUTER gets it (identity first)."""
    try:
        if message[-2] != DELIVERED:
            raise EnvelopeError(f"expected a delivered message, got {message[-2][:20]!r}")
        doc = orjson.loads(message[-1])
        return int(doc["ref"]), None if doc.get("ok") else str(doc.get("error") or "refused")
    except (IndexError, KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise EnvelopeError(f"bad delivered message: {exc}") from None


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
