"""A sink worker: one sink (SQLite, InfluxDB, MongoDB...) fed through the shared outbox.

Sockets:
    inbox  PULL  bind    <- parsers PUSH    ``readings`` with the seqs of the edge batches they came from
    acks   PUSH  connect -> edge PULL       ``ack``: those batches are durable here (written or spooled)
    live   PUB   connect -> query SUB       ``stats``

A sink that is not enabled in the configuration exits at once with status 0, so one static
supervisord.conf serves every configuration.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq

from workers.core import envelope, runtime, worker
from workers.core.config import Config
from workers.core.deadletters import DeadLetterStore
from workers.core.outbox import Outbox
from workers.core.tries import BatchTries
from workers.sinks import make_sink

log = logging.getLogger(__name__)

INBOX_HWM = 100
MAX_MESSAGES_PER_POLL = 256


def run(cfg: Config, name: str, ctx: zmq.Context, stop: runtime.StopFlag) -> int:
    opts = getattr(cfg.sinks, name)
    if not opts.enabled:
        log.info("sink %s is not enabled in %s; nothing to do", name, cfg.source)
        return runtime.EXIT_OK
    sink = make_sink(name, cfg)
    counters = runtime.Counters(f"sink:{name}")
    if hasattr(sink, "counters"):      # a sink that counts something of its own counts here
        sink.counters = counters
    takes_events = getattr(sink, "takes_events", True)     # InfluxDB keeps time series only
    takes_readings = getattr(sink, "takes_readings", True)   # the webhook sink takes events only
    inbox = runtime.socket(ctx, zmq.PULL, bind=opts.endpoint, hwm=INBOX_HWM, max_message=runtime.BATCH_MESSAGE_BYTES)
    acks = runtime.socket(ctx, zmq.PUSH, connect=cfg.endpoints.acks, hwm=10000)
    live = runtime.socket(ctx, zmq.PUB, connect=cfg.endpoints.live)
    deadletters = DeadLetterStore.for_config(cfg)

    def ack(seqs: list[int]) -> None:
        try:
            acks.send_multipart(envelope.ack_message(name, seqs), zmq.NOBLOCK)
        except zmq.Again:           # the edge is away; it will send the batches again, writes are idempotent
            counters.add("acks_not_sent")

    outbox = Outbox(sink, opts, Path(cfg.data_dir) / "spool" / name, deadletters, ack, counters,
                    BatchTries.for_role(cfg.data_dir, f"sink-{name}"), cfg.limits.batch_tries)
    def take(message: list[bytes]) -> None:
        """One readings message into the outbox; a bad one raises EnvelopeError (counted by the drain)."""
        if len(message) != 3 or message[0] != envelope.READINGS:
            raise envelope.EnvelopeError(f"expected a readings message, got {message[:1]!r}")
        seqs, readings, events = envelope.parse_readings(message[1], message[2])
        seen = envelope.parse_seen(message[1]) if takes_readings else []
        if events and not takes_events:
            counters.add("events_not_for_this_sink", len(events))
            events = []
        if readings and not takes_readings:
            counters.add("readings_not_for_this_sink", len(readings))
            readings = []
        outbox.add(seqs, readings, events, seen)
        counters.add("received_readings", len(readings))
        if outbox.pending >= opts.batch_size:
            outbox.flush()

    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    try:
        sink.connect()
        log.info("sink %s: taking readings on %s", name, opts.endpoint)
        while not stop:
            now = time.monotonic()
            timeout = min(runtime.POLL_MS, int(outbox.next_due_in(now) * 1000) + 1)
            if outbox.accepting and poller.poll(timeout):
                # stats, spool and the stop flag wait no longer than the budget
                worker.drain(inbox, take, MAX_MESSAGES_PER_POLL, budget_s=runtime.POLL_MS / 1000,
                             counters=counters, logger=log, warning=f"sink {name}: ignoring a bad message: %s")
            elif not outbox.accepting:
                time.sleep(runtime.POLL_MS / 1000)
            now = time.monotonic()
            if outbox.due(now):
                outbox.flush()
            outbox.tick(now)
            outbox.report(counters)
            counters.publish_due(live)
    finally:
        try:
            outbox.close()
            log.info("sink %s: final flush done", name)
        finally:
            outbox.report(counters)
            counters.publish_due(live, now=float("inf"))
            for sock in (inbox, acks, live):
                sock.close(linger=500 if sock is acks else 0)   # let the last acks leave
            sink.close()
            deadletters.close()
    return runtime.EXIT_OK


def main(cfg: Config, name: str) -> int:
    return worker.serve(lambda ctx, stop: run(cfg, name, ctx, stop))
