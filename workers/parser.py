"""A parser worker: frames in, readings out. Run as many as needed; they are all equal.

Sockets:
    frames   PULL  connect <- edge PUSH          batches of frames
    <sink>   PUSH  connect -> each sink's PULL   ``readings`` with the batch's seq (fan-out)
    live     PUB   connect -> query SUB          the same ``readings``, and ``stats``

A frame that cannot be decoded goes to the dead-letter store (committed before the batch moves on)
and never stops the worker. A sink whose queue is full is skipped for this batch: the edge sends the
batch again to that sink when it does not acknowledge it, so a slow sink never holds up the others.
Latest-value stores keep the newest timestamp, so parsers may finish batches in any order.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq

from workers import envelope, runtime
from workers.config import Config
from workers.deadletters import DeadLetter, DeadLetterStore
from workers.decoders import REGISTRY, Context, DecodeError, Decoder
from workers.envelope import Event, Reading

log = logging.getLogger(__name__)

SINK_HWM = 200            # readings messages queued per sink before the parser skips it
LOG_EVERY_S = 10.0        # bad input from one peer is logged at most this often, and always counted


class Parser:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.name = runtime.worker_name("parser")
        self.counters = runtime.Counters(self.name)
        self.listeners = {listener.name: listener for listener in cfg.listeners}
        self.deadletters = DeadLetterStore(Path(cfg.data_dir) / "deadletters.db")
        self._last_logged: dict[str, float] = {}

    def decode_batch(self, conns: list[envelope.Conn], body: bytes) -> tuple[list[Reading], list[Event],
                                                                               list[DeadLetter]]:
        readings: list[Reading] = []
        events: list[Event] = []
        dead: list[DeadLetter] = []
        devices = self.cfg.devices
        per_conn: dict[int, tuple[str, Decoder, str]] = {}      # id(conn) -> listener, decoder, device
        for frame in envelope.iter_frames(body, conns):
            conn = frame.conn
            known = per_conn.get(id(conn))
            if known is None:
                listener = self.listeners.get(conn.listener)
                decoder_name = listener.decoder if listener else "auto"
                known = per_conn[id(conn)] = (
                    decoder_name, REGISTRY[decoder_name],
                    (listener.default_device if listener else "") or conn.peer.rsplit(":", 1)[0])
            decoder_name, decoder, default_device = known
            if frame.reject is not None:
                dead.append(DeadLetter(frame.recv_ts, "edge", conn.listener, conn.peer, default_device,
                                       frame.reject, frame.payload))
                continue
            try:
                items = decoder(frame.payload, Context(default_device, frame.recv_ts, self.cfg))
            except DecodeError as exc:
                dead.append(DeadLetter(frame.recv_ts, "parser", conn.listener, conn.peer, default_device,
                                       exc.reason, frame.payload))
                continue
            except Exception as exc:  # a decoder bug must not cost anyone else's data
                log.exception("decoder %s failed on %r", decoder_name, frame.payload[:80])
                dead.append(DeadLetter(frame.recv_ts, "parser", conn.listener, conn.peer, default_device,
                                       f"decoder error: {exc!r}"[:200], frame.payload))
                continue
            for item in items:
                if isinstance(item, Reading):
                    extra = devices.get(item.device)
                    if extra is not None and extra.tags:
                        item = item._replace(tags={**extra.tags, **item.tags})
                    readings.append(item)
                else:
                    events.append(item)
        return readings, events, dead

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
        frames = runtime.socket(ctx, zmq.PULL, connect=cfg.endpoints.frames, hwm=4)
        sinks = {name: runtime.socket(ctx, zmq.PUSH, connect=sink.endpoint, hwm=SINK_HWM)
                 for name, sink in cfg.sinks.enabled().items()}
        live = runtime.socket(ctx, zmq.PUB, connect=cfg.endpoints.live, hwm=1000)
        poller = zmq.Poller()
        poller.register(frames, zmq.POLLIN)
        log.info("%s: decoding frames from %s for sinks %s", self.name, cfg.endpoints.frames, sorted(sinks))
        try:
            while not stop:
                if poller.poll(runtime.POLL_MS):
                    for _ in range(64):
                        try:
                            message = frames.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle(message, sinks, live)
                self.counters.publish_due(live)
        finally:
            for sock in (frames, live, *sinks.values()):
                sock.close(linger=0)
            self.deadletters.close()
            log.info("%s: stopped", self.name)

    def handle(self, message: list[bytes], sinks: dict[str, zmq.Socket], live: zmq.Socket) -> None:
        try:
            if len(message) != 3 or message[0] != envelope.FRAMES:
                raise envelope.EnvelopeError(f"expected a frames message, got {message[:1]!r}")
            seq, targets, conns = envelope.parse_frames_header(message[1])
            readings, events, dead = self.decode_batch(conns, message[2])
        except envelope.EnvelopeError as exc:
            self.counters.add("bad_messages")
            log.warning("ignoring a bad message: %s", exc)
            return
        if dead:
            self.set_aside(dead)
        self.counters.add("batches")
        self.counters.add("readings", len(readings))
        self.counters.add("events", len(events))
        out = envelope.readings_message([seq] if seq is not None else [],
                                        envelope.readings_body(readings, events))
        for name in targets if targets is not None else sinks:
            sock = sinks.get(name)
            if sock is None:
                continue
            try:
                sock.send_multipart(out, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.counters.add(f"skipped_busy_sink:{name}")
        if targets is None and (readings or events):
            try:
                live.send_multipart(out, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass


def main(cfg: Config) -> int:
    stop = runtime.StopFlag().install()
    ctx = zmq.Context()
    try:
        Parser(cfg).run(ctx, stop)
    finally:
        ctx.term()
    return runtime.EXIT_OK
