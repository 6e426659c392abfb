"""The rollup worker: per device and numeric field, count / min / max / mean / last over clock-aligned
windows (1 minute by default; 1 hour, 1 day... as configured), sent to every enabled sink.

Sockets:
    inbox  PULL  bind    <- parsers PUSH    ``readings`` with their batch seqs, like a sink (not when
                                            the points are the SQLite sink's rows: see below)
    acks   PUSH  connect -> edge PULL       ``ack`` as ``rollup``: those readings are in the state file
    live   PUB   connect -> query SUB       ``stats``

Why it cannot double count (docs/rollups.md has the whole argument): the state file
(``<data>/rollups.db``) keeps the distinct points ``(device, field, ts) -> value`` of every window that
can still change, and a window's aggregate is always recomputed from that set, never incremented. A
batch the edge delivers twice (after a kill, after an edge restart) inserts nothing new. Readings are
acknowledged to the edge only once committed there, so a killed rollup worker loses nothing either:
the edge sends it again what it had not acknowledged.

A window closes ``grace_s`` after its end (wall clock). A reading that arrives later still lands in its
window for ``correct_for_s`` more: the window is recomputed and, if it changed, sent again with the
same key (sinks upsert) and counted in ``corrected_windows``. Later than that, or more than a day
ahead of this clock, a reading is not rolled up: it is counted (``too_late_readings``,
``future_readings``) and logged; the reading itself is stored by the sinks as usual.

With the SQLite sink on (``[rollups] points_from_sqlite``, the default), the points are that sink's
``readings`` rows rather than a copy here: the sink marks the windows its rows touch after each
commit (``RollupMarks``), the parsers do not feed this worker and the edge does not wait for it, and
windows are computed from ``readings``. The rest (closing, corrections, delivery) is the same.

Each window size is built from the next smaller one (count, min, max and sum combine; ``last`` is the
last of the newest), so points are kept for the smallest windows only, and a window only while the
next larger window holding it can still change.

Rollups go to the sinks through the shared outbox (``workers/outbox.py``), one per enabled sink, in
this process: the outbox acknowledges a batch once written or spooled to disk, and only then is the
window's version marked as delivered in the state file. What was not delivered when the worker
stopped is sent again when it starts (sinks upsert, so twice is harmless).
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Callable

import orjson
import zmq

from workers.core import envelope, runtime, worker
from workers.core.config import ROLLUP, Config, window_label
from workers.core.deadletters import DeadLetter, DeadLetterStore
from workers.core.tries import BatchTries
from workers.core.envelope import Reading, Stats
from workers.core.outbox import Outbox
from workers.core.rollupstore import RollupStore
from workers.sinks import make_sink
from workers.sinks import sqlite as sqlite_sink

log = logging.getLogger(__name__)

INBOX_HWM = 100
MAX_MESSAGES_PER_POLL = 256
# Readings are gathered this long (or up to this many) before one transaction: a commit rewrites every
# page it touched, so 25 readings a commit cost 4x the CPU per reading of 5,000 (36 vs 10 µs, measured).
# Nothing is acknowledged before its commit, so holding them loses nothing.
TAKE_DELAY_S = 0.2
TAKE_MAX_READINGS = 5000
CLOSE_EVERY_S = 0.25
PRUNE_EVERY_S = 60.0


class RollupWorker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        opts = cfg.rollups
        self.counters = runtime.Counters("rollup")
        readings_db = None
        if cfg.rollups_from_sqlite:           # the points are the SQLite sink's rows; it marks the windows
            readings_db = sqlite_sink.db_path(cfg)
            sqlite_sink.open_db(readings_db).close()     # its tables, if this worker starts first
        self.store = RollupStore(Path(cfg.data_dir) / opts.path, opts.window_seconds, opts.grace_s,
                                 opts.correct_for_s, self.counters, readings_db)
        self.deadletters = DeadLetterStore.for_config(cfg)
        self.tries = BatchTries.for_role(cfg.data_dir, ROLLUP)
        self.outboxes: dict[str, Outbox] = {}
        self.outbox_counters: dict[str, runtime.Counters] = {}
        self.pending: dict[int, tuple[set[str], list[tuple[tuple[str, str, int, int], int]]]] = {}
        self.inflight: dict[tuple[str, str, int, int], int] = {}     # window key -> version being sent
        self.delivered: list[tuple[tuple[str, str, int, int], int]] = []
        self._seq = 0
        self.held_seqs: list[int] = []             # received, not yet in the state file nor acknowledged
        self.held_readings: list[Reading] = []
        self.held_since = 0.0                      # monotonic time of the oldest held message

    def open_outboxes(self) -> None:
        for name, opts in self.cfg.sinks.enabled().items():
            sink = make_sink(name, self.cfg)
            if not getattr(sink, "takes_rollups", False):
                log.warning("rollup: sink %s does not store rollups (yet); they go to the other sinks", name)
                continue
            counters = self.outbox_counters[name] = runtime.Counters(f"rollup:{name}")
            self.outboxes[name] = Outbox(sink, opts, Path(self.cfg.data_dir) / "spool" / f"rollup-{name}",
                                         self.deadletters, self._acker(name), counters)
            sink.connect()

    def _acker(self, name: str) -> Callable[[list[int]], None]:
        def ack(seqs: list[int]) -> None:
            for seq in seqs:
                entry = self.pending.get(seq)
                if entry is None:
                    continue
                entry[0].discard(name)
                if not entry[0]:
                    del self.pending[seq]
                    self.delivered.extend(entry[1])
        return ack

    # ------------------------------------------------------------------ one tick

    def take(self, messages: list[list[bytes]], acks: zmq.Socket, now: float | None = None) -> None:
        """Hold the readings of ``messages``; commit what is held once it is old or large enough."""
        if not self.held_seqs and messages:
            self.held_since = time.monotonic() if now is None else now
        self.hold(messages)
        if self.take_due_in(time.monotonic() if now is None else now) <= 0:
            self.commit(acks)

    def take_due_in(self, now: float) -> float:
        """Seconds until what is held must be committed (inf: nothing held)."""
        if not self.held_seqs:
            return float("inf")
        if len(self.held_readings) >= TAKE_MAX_READINGS:
            return 0.0
        return self.held_since + TAKE_DELAY_S - now

    def hold(self, messages: list[list[bytes]]) -> None:
        seqs = self.held_seqs
        readings = self.held_readings
        for message in messages:
            try:
                if len(message) != 3 or message[0] != envelope.READINGS:
                    raise envelope.EnvelopeError(f"expected a readings message, got {message[:1]!r}")
                batch_seqs, batch_readings, _events = envelope.parse_readings(message[1], message[2])
            except envelope.EnvelopeError as exc:
                self.counters.add("bad_messages")
                log.warning("rollup: ignoring a bad message: %s", exc)
                continue
            seqs.extend(batch_seqs)
            readings.extend(batch_readings)
            self.counters.add("received_readings", len(batch_readings))

    def commit(self, acks: zmq.Socket) -> None:
        """The held readings into the state file in one transaction, then their seqs acknowledged."""
        seqs, readings = self.held_seqs, self.held_readings
        self.held_seqs, self.held_readings = [], []
        # The poison-batch rule (workers.core.tries): a batch the worker failed on is not acknowledged
        # and comes again; its last try goes reading by reading, setting aside those at fault; after
        # that (the worker died even so) the batch is set aside whole.
        limit = self.cfg.limits.batch_tries
        tries = self.tries.begin(seqs) if seqs and readings else 0
        if readings:
            try:
                if tries > limit:
                    self.set_aside(readings, f"the rollup worker failed {tries - 1} times on the batch holding"
                                   " this reading and could not tell which was at fault; not rolled up")
                    self.counters.add("poison_batches")
                else:
                    self.store.add(readings, time.time_ns())
            except sqlite3.OperationalError as exc:     # disk full, locked: not acknowledged, sent again
                self.counters.add("state_write_failures")
                log.warning("rollup: could not write %s: %s; the edge will send these readings again",
                            self.cfg.rollups.path, exc)
                if tries:
                    self.tries.done(seqs)        # the disk's trouble, not the batch's: not a try
                return
            except Exception as exc:  # noqa: BLE001
                self.counters.add("failed_batches")
                log.exception("rollup: failed on a batch (try %d of %d)", tries, limit)
                if tries < limit:
                    return                  # not acknowledged: the edge sends it again
                self.add_carefully(readings, exc)
        if seqs:
            try:
                acks.send_multipart(envelope.ack_message(ROLLUP, seqs), zmq.NOBLOCK)
            except zmq.Again:      # the edge is away: it sends the batches again; points are a set
                self.counters.add("acks_not_sent")
            if tries:
                self.tries.done(seqs)

    def add_carefully(self, readings: list[Reading], first: Exception) -> None:
        """Each reading on its own; those the worker still fails on are set aside as dead letters."""
        at_fault: list[Reading] = []
        now = time.time_ns()
        for reading in readings:
            try:
                self.store.add([reading], now)
            except sqlite3.OperationalError:
                raise
            except Exception:  # noqa: BLE001
                at_fault.append(reading)
        if at_fault:
            self.set_aside(at_fault, f"the rollup worker failed on this reading {self.cfg.limits.batch_tries}"
                           f" times: {first}; not rolled up (it is stored as usual)")

    def set_aside(self, readings: list[Reading], reason: str) -> None:
        letters = [DeadLetter(reading.ts, "rollup", "replay", "", reading.device, reason, _raw(reading))
                   for reading in readings]
        self.deadletters.add(letters)
        self.counters.add("dead_letters", len(letters))
        log.error("rollup: %d reading(s) set aside as dead letters: %s", len(letters), reason)

    def record_delivered(self) -> None:
        """Note in the state the window versions every outbox has acknowledged."""
        if self.delivered:
            self.store.mark_emitted(self.delivered)
            for key, version in self.delivered:
                if self.inflight.get(key) == version:
                    del self.inflight[key]
            self.delivered = []

    def emit(self) -> int:
        """Hand window versions not yet delivered to every outbox; returns how many."""
        self.record_delivered()
        if not all(outbox.accepting for outbox in self.outboxes.values()):
            return 0
        fresh = [w for w in self.store.unemitted() if self.inflight.get(w.key) != w.version]
        if not fresh:
            return 0
        if not self.outboxes:             # no enabled sink stores rollups: nothing to wait for
            self.store.mark_emitted([(w.key, w.version) for w in fresh])
            return 0
        grouped: dict[tuple[str, int, int], dict[str, Stats]] = {}
        for window in fresh:
            grouped.setdefault((window.device, window.size, window.start), {})[window.field] = window.stats
            self.inflight[window.key] = window.version
        devices = self.cfg.devices
        readings = []
        for (device, size, start), stats in grouped.items():
            extra = devices.get(device)
            readings.append(envelope.rollup_reading(device, window_label(size), start, stats,
                                                    extra.tags if extra is not None else None))
        self._seq += 1
        self.pending[self._seq] = (set(self.outboxes), [(w.key, w.version) for w in fresh])
        for outbox in self.outboxes.values():
            outbox.add([self._seq], readings, [])
        self.counters.add("emitted_windows", len(fresh))
        return len(fresh)

    # ------------------------------------------------------------------ loop

    def run(self, ctx: zmq.Context, stop: runtime.StopFlag) -> None:
        cfg = self.cfg
        inbox = runtime.socket(ctx, zmq.PULL, bind=cfg.rollups.endpoint, hwm=INBOX_HWM,
                               max_message=runtime.BATCH_MESSAGE_BYTES)
        acks = runtime.socket(ctx, zmq.PUSH, connect=cfg.endpoints.acks, hwm=10000)
        live = runtime.socket(ctx, zmq.PUB, connect=cfg.endpoints.live)
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        # After a start, what the edge replays from its journal (or sends again) arrives first: windows
        # that came due while this worker was down wait one grace period more.
        next_close = time.monotonic() + cfg.rollups.grace_s
        next_prune = 0.0
        try:
            self.open_outboxes()
            log.info("rollup: windows %s, grace %g s, corrections for %g s; taking readings on %s; to %s",
                     ", ".join(window_label(s) for s in self.store.sizes), cfg.rollups.grace_s,
                     cfg.rollups.correct_for_s, cfg.rollups.endpoint, sorted(self.outboxes))
            while not stop:
                now = time.monotonic()
                timeout = min([runtime.POLL_MS, int(max(0.0, min(self.take_due_in(now), 1.0)) * 1000) + 1,
                               *(int(outbox.next_due_in(now) * 1000) + 1 for outbox in self.outboxes.values())])
                messages: list[list[bytes]] = []
                if poller.poll(timeout):
                    worker.drain(inbox, messages.append, MAX_MESSAGES_PER_POLL)
                self.take(messages, acks)
                now = time.monotonic()
                if now >= next_close:
                    next_close = now + CLOSE_EVERY_S
                    self.store.close_due(time.time_ns())
                    self.emit()
                for outbox in self.outboxes.values():
                    if outbox.due(now):
                        outbox.flush()
                    outbox.tick(now)
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY_S
                    self.store.prune(time.time_ns())
                    self.counters["state_bytes"] = self.store.file_bytes()
                self.counters["pending_emissions"] = len(self.pending)
                self.counters.publish_due(live)
                for name, counters in self.outbox_counters.items():
                    counters["spooled_batches"] = len(self.outboxes[name].spool)
                    counters.publish_due(live)
        finally:
            try:
                self.commit(acks)        # what is held goes in now rather than being sent again
                for outbox in self.outboxes.values():
                    outbox.close()
                self.record_delivered()
            finally:
                self.counters.publish_due(live, now=float("inf"))
                for sock in (inbox, acks, live):
                    sock.close(linger=500 if sock is acks else 0)    # let the last acks leave
                for outbox in self.outboxes.values():
                    outbox.sink.close()
                self.store.close()
                self.deadletters.close()
                log.info("rollup: stopped")


def _raw(reading: Reading) -> bytes:
    """A reading as JSON for its dead letter (what orjson refuses, the slower json takes)."""
    document = {"device": reading.device, "ts": reading.ts, **reading.fields}
    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document, default=str).encode()


def main(cfg: Config) -> int:
    if not cfg.rollups.enabled:
        log.info("rollups are not enabled in %s; nothing to do", cfg.source)
        return runtime.EXIT_OK
    return worker.serve(lambda ctx, stop: RollupWorker(cfg).run(ctx, stop))
