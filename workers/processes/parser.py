"""A parser worker: frames in, readings out. Run as many as needed; they are all equal.

Sockets:
    frames   PULL  connect <- edge PUSH          batches of frames
    <sink>   PUSH  connect -> each sink's PULL   ``readings`` with the batch's seq (fan-out; the rollup
                                                 worker's PULL too: ``Config.consumers()``)
    live     PUB   connect -> query SUB          ``readings``: of each batch only what the latest values
                                                 need (``newest_per_field``), and ``stats``
    seen     PUSH  connect -> commands PULL      ``seen``: where each device was seen, command acks,
                                                 automatic replies to send

A frame is decoded with its listener's decoder, or its MQTT subscription's (listener ``mqtt:<name>``,
device id from the topic). A frame from a connection that authenticated as a device (``Conn.device``,
docs/security.md) names that device by default, and one that names a device its credential may not
report for is set aside as a dead letter (``foreign_device_frames``), never stored. A frame that cannot be decoded, and an event larger than
``[events] max_event_bytes``, go whole to the dead-letter store (committed before the batch moves on)
and never stop the worker. An event that matches a ``[[replies]]`` rule (a heartbeat) is answered
through the commands worker and, unless the rule says ``store = true``, not kept. A sink whose queue is full is skipped for this batch: the edge sends the
batch again to that sink when it does not acknowledge it, so a slow sink never holds up the others.
Latest-value stores keep the newest timestamp, so parsers may finish batches in any order.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import orjson
import zmq

from workers.core import envelope, runtime, storable, worker
from workers.core.config import Config
from workers.core.credentials import may_write_as
from workers.core.deadletters import DeadLetter, DeadLetterStore
from workers.core.knowndevices import KnownDevices
from workers.core.tries import BatchTries
from workers.decoders import REGISTRY, Context, DecodeError, Decoder, auto
from workers.decoders import json as json_decoder
from workers.core.envelope import Ack, Downlink, Event, Reading, Seen
from workers.core.templates import TemplateError, TopicTemplate, matches, render_reply

log = logging.getLogger(__name__)

SINK_HWM = 200            # readings messages queued per sink before the parser skips it
LOG_EVERY_S = 10.0        # bad input from one peer is logged at most this often, and always counted
SEEN_HWM = 1000           # seen messages queued for the commands worker before they are skipped
REPLY_MAX_AGE_S = 30.0    # a heartbeat older than this (replayed from the journal) is not answered
PRESENCE_REFRESH_S = 10.0  # a device seen again the same way is told on at most this often (or a tenth
                           # of its offline_after_s): a fleet's presence costs per device, not per reading
ACK_KIND = "cmd_ack"
JSON_ANY, JSON_OBJECTS = "json", "auto"   # source_of: the decoder reads every frame / a "{" frame as JSON


def newest_per_field(readings: list[Reading]) -> list[Reading]:
    """What the query worker's latest values need of a batch: per device its newest reading, and an
    older one only for a field the newer ones lack. A board whose 20 readings share a batch then costs
    the query worker one reading instead of 20; ``readings`` itself when there is nothing to drop."""
    newest: dict[str, Reading] = {}
    for reading in readings:           # the usual batch: each device's readings in time order, the newest
        device = reading[0]            # with every field of the older ones: only the newest is needed
        older = newest.get(device)
        if older is not None and (reading[1] < older[1] or not reading[2].keys() >= older[2].keys()):
            break
        newest[device] = reading
    else:
        return readings if len(newest) == len(readings) else list(newest.values())
    return newest_per_field_general(readings)


def newest_per_field_general(readings: list[Reading]) -> list[Reading]:
    """``newest_per_field`` for any batch (readings out of time order, fields that come and go)."""
    by_device: dict[str, list[Reading]] = {}
    for reading in readings:
        group = by_device.get(reading.device)
        if group is None:
            by_device[reading.device] = [reading]
        else:
            group.append(reading)
    if len(by_device) == len(readings):
        return readings
    out: list[Reading] = []
    for group in by_device.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        group.reverse()              # of equal timestamps the later wins, as in the query worker
        group.sort(key=_reading_ts, reverse=True)          # (a stable sort: that order stays)
        covered: set[str] = set()
        for reading in group:
            if not covered.issuperset(reading.fields):
                out.append(reading)
                covered.update(reading.fields)
    return out


def _reading_ts(reading: Reading) -> int:
    return reading.ts


class Parser:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.name = runtime.worker_name("parser")
        self.counters = runtime.Counters(self.name)
        self.listeners = {listener.name: listener for listener in cfg.listeners}
        self.subscriptions = {sub.listener: (sub, TopicTemplate(sub.topic)) for sub in cfg.mqtt.subscriptions}
        self.deadletters = DeadLetterStore.for_config(cfg)
        self.known = KnownDevices(Path(cfg.data_dir) / "knowndevices.db", cfg.limits.max_devices)
        self.tries = BatchTries.for_role(cfg.data_dir, "parser")
        self._last_logged: dict[str, float] = {}
        self.last: dict[str, tuple[int, envelope.Conn]] = {}    # of the batch being decoded: device ->
                                                                # its newest frame's (arrival, conn)
        # device -> (the connection, its arrival ns) of the presence this parser last passed on
        self.presence_told: dict[str, tuple[envelope.Conn, int]] = {}
        refresh = min(PRESENCE_REFRESH_S, cfg.presence.offline_after_s / 10)
        self.presence_refresh_ns = int(refresh * 1e9)
        self.presence_refresh_of = {device: int(min(PRESENCE_REFRESH_S, extra.offline_after_s / 10) * 1e9)
                                    for device, extra in cfg.devices.items() if extra.offline_after_s is not None}
        self.acks: list[Ack] = []
        self.replies: list[Downlink] = []
        self.conns: dict[str, tuple[list, envelope.Conn]] = {}    # parse_frames_header's table (by peer)
        self.sources: dict[int, tuple] = {}                       # id(conn) -> source_of(conn), conn held
        self.flat = json_decoder.flat_reader(cfg.decoders.json)
        self.tagged = frozenset(device for device, extra in cfg.devices.items() if extra.tags)

    def source(self, conn: envelope.Conn) -> tuple[str, str]:
        """(decoder name, default device id) for frames from ``conn``."""
        listener = self.listeners.get(conn.listener)
        if listener is not None:
            if conn.device:                        # authenticated: what names no device is its own
                return listener.decoder, conn.device
            return listener.decoder, listener.default_device or conn.peer.rsplit(":", 1)[0]
        mqtt = self.subscriptions.get(conn.listener)
        if mqtt is not None:
            return mqtt[0].decoder, mqtt[1].device(conn.peer) or conn.peer
        return "auto", conn.peer.rsplit(":", 1)[0]

    def decode_batch(self, conns: list[envelope.Conn], body: bytes, check: bool = False, fast: bool = True
                     ) -> tuple[list[Reading], list[Event], list[DeadLetter]]:
        """Decode every frame of a batch. ``check``: also set aside a frame whose values the envelope
        cannot carry (the slow path, taken only after a batch failed to serialize).

        A JSON frame (decoder ``json``, or ``auto`` and a frame starting with ``{``) of the common flat
        shape (``json.flat_reader``), from a device already known, with no configured tags, that its
        connection may report for, is taken here with no further call; everything else goes the
        general way (``_take``) with the same result, as ``fast=False`` does for every frame (the
        property tests hold the two to each other)."""
        readings: list[Reading] = []
        events: list[Event] = []
        dead: list[DeadLetter] = []
        last: dict[str, tuple[int, envelope.Conn]] = {}      # device -> its newest frame's (arrival, conn)
        cfg = self.cfg
        known_source, source_of = self.sources.get, self.source_of
        sources = [known_source(id(conn)) or source_of(conn) for conn in conns]
        fast = fast and not check
        flat, loads, known, tagged = self.flat, orjson.loads, self.known.known, self.tagged
        add_reading = readings.append
        new = tuple.__new__              # a Context per frame without the NamedTuple's Python __new__
        for payload, recv_ts, ci, reject in envelope.frame_rows(body, len(conns)):
            conn, decoder_name, default_device, decoder, json_like, auth = sources[ci]
            if reject is not None:
                dead.append(DeadLetter(recv_ts, "edge", conn.listener, conn.peer, default_device, reject, payload))
                continue
            try:
                if fast and json_like and (payload[:1] == b"{" or json_like is JSON_ANY):
                    try:
                        doc = loads(payload)
                    except orjson.JSONDecodeError:
                        items = decoder(payload, new(Context, (default_device, recv_ts, cfg)))  # its DecodeError
                    else:
                        reading = flat(doc, default_device, recv_ts, len(payload)) if type(doc) is dict else None
                        if reading is not None:
                            device = reading[0]
                            if (device in known and device not in tagged
                                    and (not auth or device == auth)):
                                last[device] = (recv_ts, conn)
                                add_reading(reading)
                                continue
                            items = [reading]
                        else:
                            items = json_decoder.decode_doc(doc, new(Context, (default_device, recv_ts, cfg)),
                                                            payload)
                else:
                    items = decoder(payload, new(Context, (default_device, recv_ts, cfg)))
            except DecodeError as exc:
                dead.append(DeadLetter(recv_ts, "parser", conn.listener, conn.peer, default_device,
                                       exc.reason, payload))
                continue
            except Exception as exc:  # a decoder bug must not cost anyone else's data
                log.exception("decoder %s failed on %r", decoder_name, payload[:80])
                dead.append(DeadLetter(recv_ts, "parser", conn.listener, conn.peer, default_device,
                                       f"the {decoder_name} decoder could not read this frame (a bug in"
                                       f" sensorpipe; replay it once fixed): {exc}"[:300], payload))
                continue
            try:
                reason = self._take(items, payload, recv_ts, conn, check, readings, events, last)
            except Exception as exc:  # a bug after decoding must cost this frame only, never the batch
                log.exception("failed on a frame after decoding it: %r", payload[:80])
                reason = (f"sensorpipe failed on this frame after decoding it (a bug; replay it once fixed):"
                          f" {exc}")[:300]
            if reason is not None:
                dead.append(DeadLetter(recv_ts, "parser", conn.listener, conn.peer, default_device,
                                       reason, payload))
        self.last = last
        return readings, events, dead

    def source_of(self, conn: envelope.Conn) -> tuple[envelope.Conn, str, str, Decoder, object, str]:
        """(conn, decoder name, default device, decoder, JSON_ANY / JSON_OBJECTS / None, authenticated
        device) for frames from ``conn``; kept while the connection lasts (``parse_frames_header``
        hands the same Conn object to every batch of one connection)."""
        source = self.sources.get(id(conn))     # (the table holds the conn: its id is not reused meanwhile)
        if source is None:
            name, device = self.source(conn)
            decoder = REGISTRY[name]
            json_like = JSON_ANY if decoder is json_decoder.decode else JSON_OBJECTS if decoder is auto.decode else None
            if len(self.sources) >= envelope.KNOWN_CONNS_MAX:
                self.sources.clear()
            source = self.sources[id(conn)] = (conn, name, device, decoder, json_like, conn.device)
        return source

    def presence_news(self, last: dict[str, tuple[int, envelope.Conn]]) -> list[Seen]:
        """Of a batch's newest frame per device, what the commands and query workers and the stores do
        not know yet: a device new to this parser, one that came another way (another connection,
        listener or topic: commands follow it at once), or one whose presence was last passed on more
        than ``PRESENCE_REFRESH_S`` ago (a tenth of its ``offline_after_s`` when that is less). So
        ``last_seen`` lags a device's newest frame by less than that, and a board sending every second
        costs the presence chain one entry in ten instead of one per reading."""
        told = self.presence_told
        default, refresh_of = self.presence_refresh_ns, self.presence_refresh_of
        news: list[Seen] = []
        for device, (ts, conn) in last.items():
            known = told.get(device)
            if known is not None and known[0] == conn and ts - known[1] < refresh_of.get(device, default):
                continue                      # (an older frame, from a batch sent again, is no news either)
            told[device] = (conn, ts)
            news.append(Seen(device, ts, conn.listener, conn.conn_id, conn.peer))
        return news

    def _take(self, items: list[Reading | Event], payload: bytes, recv_ts: int, conn: envelope.Conn, check: bool,
              readings: list[Reading], events: list[Event], last: dict[str, tuple[int, envelope.Conn]]) -> str | None:
        """Add one decoded frame's items to the batch; or the reason to set the frame aside instead."""
        if conn.device:
            foreign = next((i.device for i in items if not may_write_as(conn.device, conn.may_report, i.device)), None)
            if foreign is not None:            # stored nowhere: one device may not write as another
                self.counters.add("foreign_device_frames")
                return f"connection authenticated as {conn.device!r} may not report for {foreign!r}"
        for item in items:                # what no store could keep sets the frame aside, before a sink fails on it
            unstorable = storable.problem(item)
            if unstorable is not None:
                self.counters.add("unstorable_frames")
                return unstorable[:300]
            if item.device not in self.known.known and not self.known.admit(item.device):
                self.counters.add("devices_over_cap")
                return (f"device {item.device[:60]!r} is new and {self.known.limit} devices are known already"
                        " (limits.max_devices): raise it and replay")
        max_event = self.cfg.events.max_event_bytes
        if len(payload) > max_event:
            size = max((len(orjson.dumps(i.body)) for i in items if isinstance(i, Event)), default=0)
            if size > max_event:
                self.counters.add("oversized_events")
                return f"event of {size} bytes is over events.max_event_bytes ({max_event}); raise it and replay"
        if check:
            try:
                envelope.readings_body([i for i in items if isinstance(i, Reading)],
                                       [i for i in items if isinstance(i, Event)])
            except TypeError:                # orjson: an integer beyond 64 bits, a type it has no form for
                self.counters.add("uncarriable_frames")
                return "an event holds a value JSON cannot carry (an integer beyond 64 bits)"
        devices = self.cfg.devices
        for item in items:
            last[item.device] = (recv_ts, conn)
            if isinstance(item, Reading):
                extra = devices.get(item.device)
                if extra is not None and extra.tags:
                    item = item._replace(tags={**extra.tags, **item.tags})
                if envelope.ROLLUP_TAG in item.tags:     # reserved: it marks the rollup worker's rollups
                    item = item._replace(tags={k: v for k, v in item.tags.items() if k != envelope.ROLLUP_TAG})
                    self.counters.add("reserved_tag_dropped")
                readings.append(item)
            elif self.take_event(item, recv_ts, conn):
                events.append(item)
        return None

    def take_event(self, event: Event, recv_ts: int, conn: envelope.Conn) -> bool:
        """Note command acks, answer heartbeats; False when the event is not to be kept."""
        body = event.body
        if ACK_KIND in body and isinstance(body[ACK_KIND], (str, int)) and not isinstance(body[ACK_KIND], bool):
            error = body.get("error")
            self.acks.append(Ack(event.device, str(body[ACK_KIND]), body.get("ok") is True,
                                 None if error is None else str(error)))
        for rule in self.cfg.replies:
            if not matches(rule.match, body):
                continue
            self.counters.add(f"replies:{rule.name}")
            if time.time_ns() - recv_ts <= REPLY_MAX_AGE_S * 1e9:
                try:
                    payload = render_reply(rule.reply, event.device)
                except TemplateError as exc:          # checked at start; a device id cannot break it
                    log.warning("reply %s: %s", rule.name, exc)
                else:
                    self.replies.append(Downlink(event.device, conn.listener, conn.conn_id, conn.peer, payload))
            return rule.store
        return True

    def set_aside(self, dead: list[DeadLetter]) -> None:
        self.deadletters.add(dead)
        self.counters.add("dead_letters", len(dead))
        now = time.monotonic()
        for letter in dead:
            key = f"{letter.listener}/{letter.peer.rsplit(':', 1)[0]}"
            if now - self._last_logged.get(key, 0.0) >= LOG_EVERY_S:
                self._last_logged[key] = now
                log.info("dead letter from %s (%s): %s; frame %r", letter.peer, letter.listener,
                         letter.reason, letter.raw[:60])

    def run(self, ctx: zmq.Context, stop: runtime.StopFlag) -> None:
        cfg = self.cfg
        frames = runtime.socket(ctx, zmq.PULL, connect=cfg.endpoints.frames, hwm=4,
                                max_message=runtime.BATCH_MESSAGE_BYTES)
        notices = runtime.socket(ctx, zmq.PUSH, connect=cfg.endpoints.seen, hwm=SEEN_HWM)
        sinks = {name: runtime.socket(ctx, zmq.PUSH, connect=endpoint, hwm=SINK_HWM)
                 for name, endpoint in cfg.consumers().items()}
        live = runtime.socket(ctx, zmq.PUB, connect=cfg.endpoints.live, hwm=1000)
        poller = zmq.Poller()
        poller.register(frames, zmq.POLLIN)
        log.info("%s: decoding frames from %s for sinks %s", self.name, cfg.endpoints.frames, sorted(sinks))
        try:
            while not stop:
                if poller.poll(runtime.POLL_MS):
                    worker.drain(frames, lambda message: self.handle(message, sinks, live, notices), 64,
                                 budget_s=runtime.POLL_MS / 1000)
                self.counters.publish_due(live)
        finally:
            for sock in (frames, live, notices, *sinks.values()):
                sock.close(linger=0)
            self.deadletters.close()
            self.known.close()
            log.info("%s: stopped", self.name)

    def handle(self, message: list[bytes], sinks: dict[str, zmq.Socket], live: zmq.Socket,
               notices: zmq.Socket | None = None) -> None:
        """One batch, under the poison-batch rule (``workers.core.tries``): a batch the parsers failed
        on ``[limits] batch_tries`` times (raised, or died) is set aside whole the next time."""
        self.last, self.acks, self.replies = {}, [], []
        try:
            if len(message) != 3 or message[0] != envelope.FRAMES:
                raise envelope.EnvelopeError(f"expected a frames message, got {message[:1]!r}")
            seq, targets, conns = envelope.parse_frames_header(message[1], self.conns)
        except envelope.EnvelopeError as exc:
            self.counters.add("bad_messages")
            log.warning("ignoring a bad message: %s", exc)
            return
        keys = [seq] if seq is not None else []
        tries = self.tries.begin(keys) if keys else 1
        try:
            if tries > self.cfg.limits.batch_tries:
                self.set_aside_batch(conns, message[2], tries - 1)
                self.send(envelope.readings_message(keys, envelope.readings_body([], []), []), targets, sinks,
                          live=None)
            else:
                self.handle_batch(seq, targets, conns, message[2], sinks, live, notices)
        except sqlite3.OperationalError as exc:   # the dead-letter store is locked or the disk full: not a try
            self.tries.done(keys)
            self.counters.add("deadletter_write_failures")
            log.warning("could not write dead letters (%s); the edge will send batch %s again", exc, seq)
            return
        except Exception:  # noqa: BLE001  not acknowledged: the edge sends it again, and the try counts
            self.counters.add("failed_batches")
            log.exception("failed on batch %s (try %d of %d); the edge will send it again", seq, tries,
                          self.cfg.limits.batch_tries)
            return
        self.tries.done(keys)

    def set_aside_batch(self, conns: list[envelope.Conn], body: bytes, failures: int) -> None:
        """Every frame of a batch the parsers could not get through, as dead letters."""
        reason = (f"the parsers failed {failures} times on the batch holding this frame and could not tell"
                  " which frame was at fault; set aside with the whole batch (replay it once fixed)")
        letters = [DeadLetter(frame.recv_ts, "parser", frame.conn.listener, frame.conn.peer,
                              self.source(frame.conn)[1], reason, frame.payload)
                   for frame in envelope.iter_frames(body, conns)]
        self.counters.add("poison_batches")
        log.error("set aside a batch of %d frames after %d failed tries ([limits] batch_tries)", len(letters),
                  failures)
        self.set_aside(letters)

    def handle_batch(self, seq: int | None, targets: list[str] | None, conns: list[envelope.Conn], raw: bytes,
                     sinks: dict[str, zmq.Socket], live: zmq.Socket, notices: zmq.Socket | None) -> None:
        try:
            readings, events, dead = self.decode_batch(conns, raw)
            try:
                body = envelope.readings_body(readings, events)
            except TypeError:         # some frame decoded to a value JSON cannot carry: find it, set it aside
                self.last, self.acks, self.replies = {}, [], []
                readings, events, dead = self.decode_batch(conns, raw, check=True)
                body = envelope.readings_body(readings, events)
        except envelope.EnvelopeError as exc:
            self.counters.add("bad_messages")
            log.warning("ignoring a bad message: %s", exc)
            return
        if targets is None:
            seen = self.presence_news(self.last)
        else:                 # sent again to a sink that missed it: all of it, that sink was told nothing
            seen = [Seen(d, ts, c.listener, c.conn_id, c.peer) for d, (ts, c) in self.last.items()]
        if notices is not None and targets is None and (seen or self.acks or self.replies):
            try:
                notices.send_multipart(envelope.seen_message(seen, self.acks, self.replies), zmq.NOBLOCK)
            except zmq.Again:             # the commands worker is away: presence catches up, replies are moot
                self.counters.add("seen_not_sent")
                for entry in seen:        # told again with the device's next frame
                    self.presence_told.pop(entry.device, None)
        if dead:
            self.set_aside(dead)
        self.counters.add("batches")
        self.counters.add("readings", len(readings))
        self.counters.add("events", len(events))
        out = envelope.readings_message([seq] if seq is not None else [], body, seen)
        live_out = None
        if targets is None and (readings or events or seen):
            latest = newest_per_field(readings)
            if latest is not readings:        # (the query worker reads no events)
                live_out = envelope.readings_message([seq] if seq is not None else [],
                                                     envelope.readings_body(latest, ()), seen)
            else:
                live_out = out
        self.send(out, targets, sinks, live, live_out)

    def send(self, out: list, targets: list[str] | None, sinks: dict[str, zmq.Socket],
             live: zmq.Socket | None, live_out: list | None = None) -> None:
        """``out`` to the sinks (``targets``, or all); ``live_out``, what the query worker's latest values
        need of it, published first."""
        # Live first: a batch sent again to some sinks only (``targets``) is not published again, so
        # the query worker must have seen it before any sink could acknowledge it.
        if live is not None and live_out is not None:
            try:
                live.send_multipart(live_out, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
        for name in targets if targets is not None else sinks:
            sock = sinks.get(name)
            if sock is None:
                continue
            try:
                sock.send_multipart(out, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.counters.add(f"skipped_busy_sink:{name}")

def main(cfg: Config) -> int:
    return worker.serve(lambda ctx, stop: Parser(cfg).run(ctx, stop))
