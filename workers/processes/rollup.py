"""The rollup worker: per device and numeric field, count / min / max / mean / last over clock-aligned
windows (1 minute by default; 1 hour, 1 day... as configured), sent to every enabled sink.

Sockets:
    inbox  PULL  bind    <- parsers PUSH    ``readings`` with their batch seqs, like a sink
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
import math
import sqlite3
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import orjson
import zmq

from workers.core import envelope, runtime, worker
from workers.core.config import ROLLUP, Config, window_label
from workers.core.deadletters import DeadLetter, DeadLetterStore
from workers.core.storable import INT_MAX, INT_MIN, TS_MAX, TS_MIN
from workers.core.tries import BatchTries
from workers.core.envelope import Reading, Stats
from workers.core.outbox import Outbox
from workers.sinks import make_sink

log = logging.getLogger(__name__)

NS = 1_000_000_000
FUTURE_LIMIT_NS = 86_400 * NS      # readings further ahead of this clock are not rolled up (a wrong clock)
INBOX_HWM = 100
MAX_MESSAGES_PER_POLL = 256
CLOSE_EVERY_S = 0.25
CLOSE_LIMIT = 5000                 # windows computed per size and tick; the rest next tick
EMIT_LIMIT = 2000                  # window versions handed to the outboxes per tick
PRUNE_EVERY_S = 60.0
LOG_EVERY_S = 60.0
CACHE_KIB = 64 * 1024              # SQLite page cache for the state: points arrive spread over many series

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    device TEXT NOT NULL, field TEXT NOT NULL, ts INTEGER NOT NULL, value NOT NULL,
    PRIMARY KEY (device, field, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS windows (
    device TEXT NOT NULL, field TEXT NOT NULL,
    size INTEGER NOT NULL,                  -- seconds
    start INTEGER NOT NULL,                 -- ns, a multiple of size
    due INTEGER NOT NULL,                   -- ns: end + grace, the earliest it is computed
    dirty INTEGER NOT NULL DEFAULT 1,       -- its points (or smaller windows) changed since computed
    count INTEGER NOT NULL DEFAULT 0, min, max, total REAL, last, last_ts INTEGER,
    version INTEGER NOT NULL DEFAULT 0,     -- +1 each time the aggregate is computed and differs
    emitted INTEGER NOT NULL DEFAULT 0,     -- the version every sink has (written or spooled)
    has_points INTEGER NOT NULL DEFAULT 0,  -- smallest windows: its points are still kept
    PRIMARY KEY (device, field, size, start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS windows_due ON windows (due) WHERE dirty = 1;
CREATE INDEX IF NOT EXISTS windows_unemitted ON windows (start) WHERE version > emitted;
CREATE INDEX IF NOT EXISTS windows_with_points ON windows (start) WHERE has_points = 1;
CREATE INDEX IF NOT EXISTS windows_start ON windows (start);
"""

TOUCH_WINDOW = (
    "INSERT INTO windows (device, field, size, start, due, dirty, has_points) VALUES (?, ?, ?, ?, ?, 1, ?)"
    " ON CONFLICT (device, field, size, start) DO UPDATE SET dirty = 1, has_points = excluded.has_points"
)


class Window(NamedTuple):
    """A computed window: what is sent to the sinks."""
    device: str
    field: str
    size: int                   # seconds
    start: int                  # ns
    stats: Stats
    version: int

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.device, self.field, self.size, self.start


def floor(ts: int, size_ns: int) -> int:
    return ts - ts % size_ns


class RollupStore:
    """The rollup state in SQLite; every method takes the time (``now``, ns) so tests can set it."""

    def __init__(self, path: Path, sizes: Iterable[int], grace_s: float, correct_for_s: float,
                 counters: runtime.Counters | None = None) -> None:
        self.sizes = sorted(sizes)                  # seconds, smallest first, each a multiple of the one before
        self.base = self.sizes[0]
        self.larger = dict(zip(self.sizes, self.sizes[1:]))        # size -> the next size up
        self.smaller = dict(zip(self.sizes[1:], self.sizes))       # size -> the next size down
        self.base_ns = self.base * NS
        self.grace_ns = int(grace_s * NS)
        self.correct_ns = int(correct_for_s * NS)
        self.counters = counters if counters is not None else runtime.Counters("rollup")
        self._logged: dict[str, float] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.db.executescript(SCHEMA)
        self._open: set[tuple[str, str, int]] = set()   # smallest windows known to be marked dirty
        self._adopt_sizes()

    def close(self) -> None:
        self.db.close()

    def _adopt_sizes(self) -> None:
        """After ``windows`` changed in the configuration: forget the sizes no longer wanted, and give
        the points kept a window of the new smallest size (so they are rolled up and pruned)."""
        stored = [size for (size,) in self.db.execute("SELECT DISTINCT size FROM windows ORDER BY size")]
        gone = [size for size in stored if size not in self.sizes]
        if not gone:
            return
        log.warning("rollup: windows changed (%s s no longer configured): dropping their state",
                    ", ".join(map(str, gone)))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("DELETE FROM windows WHERE size = ?", [(size,) for size in gone])
            b = self.base_ns
            self.db.execute(
                "INSERT INTO windows (device, field, size, start, due, dirty, has_points)"
                " SELECT device, field, ?, ts - ts % ?, ts - ts % ? + ?, 1, 1 FROM points WHERE true"
                " GROUP BY device, field, ts - ts % ? ON CONFLICT DO NOTHING",
                (self.base, b, b, b + self.grace_ns, b))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def final_before(self, now: int) -> int:
        """Smallest windows starting before this can no longer change: their points are gone."""
        return floor(now - self.grace_ns - self.correct_ns - self.base_ns, self.base_ns) + self.base_ns

    # ------------------------------------------------------------------ readings in

    def add(self, readings: Iterable[Reading], now: int) -> int:
        """Put the numeric values in their windows; returns how many were taken. One transaction."""
        base_ns, grace_ns = self.base_ns, self.grace_ns
        final_before = self.final_before(now)
        future = now + FUTURE_LIMIT_NS
        on_time: list[tuple[str, str, int, float]] = []
        late: list[tuple[str, str, int, float]] = []
        touched: set[tuple[str, str, int]] = set()
        too_late = ahead = 0
        for device, ts, fields, tags in readings:
            if not TS_MIN <= ts <= TS_MAX:                       # the parser sets these aside; never here
                self.counters.add("unstorable_values", len(fields))
                continue
            for field, value in fields.items():
                kind = type(value)
                if kind is not float and kind is not int:      # strings, booleans: not rolled up
                    continue
                if kind is float and not math.isfinite(value):
                    continue
                if kind is int and not INT_MIN <= value <= INT_MAX:
                    self.counters.add("unstorable_values")
                    continue
                if ts < final_before:
                    too_late += 1
                    self._log_once(f"late:{device}", "reading of %s at %d ns is older than the correction "
                                   "horizon (rollups.correct_for_s): not rolled up", device, ts)
                    continue
                if ts > future:
                    ahead += 1
                    self._log_once(f"future:{device}", "reading of %s at %d ns is more than a day ahead "
                                   "of this clock: not rolled up", device, ts)
                    continue
                start = ts - ts % base_ns
                if start + base_ns + grace_ns <= now:
                    late.append((device, field, ts, value))
                else:
                    on_time.append((device, field, ts, value))
                    touched.add((device, field, start))
        late_new = 0
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO points VALUES (?, ?, ?, ?)", on_time)
            for point in late:           # one by one: only a point not seen before changes its window
                if db.execute("INSERT OR IGNORE INTO points VALUES (?, ?, ?, ?)", point).rowcount:
                    late_new += 1
                    touched.add((point[0], point[1], point[2] - point[2] % base_ns))
            fresh = touched - self._open      # a window already marked dirty needs no second mark
            db.executemany(TOUCH_WINDOW, [(d, f, self.base, s, s + base_ns + grace_ns, 1) for d, f, s in fresh])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._open |= fresh
        taken = len(on_time) + len(late)
        self.counters.add("points", taken)
        if late_new:
            self.counters.add("late_readings", late_new)
        if too_late:
            self.counters.add("too_late_readings", too_late)
        if ahead:
            self.counters.add("future_readings", ahead)
        return taken

    def _log_once(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[key] = now
            log.warning(message, *args)

    # ------------------------------------------------------------------ closing windows

    def close_due(self, now: int) -> int:
        """Compute every window that is due and changed; returns how many got a new version."""
        changed = 0
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for size in self.sizes:
                rows = db.execute(
                    "SELECT device, field, start, count, min, max, total, last, last_ts, version FROM windows"
                    " WHERE dirty = 1 AND due <= ? AND size = ? LIMIT ?", (now, size, CLOSE_LIMIT)).fetchall()
                for device, field, start, *old, version in rows:
                    if size == self.base:
                        self._open.discard((device, field, start))
                    new = self._compute(device, field, size, start)
                    if tuple(old) == new and version:
                        db.execute("UPDATE windows SET dirty = 0 WHERE device = ? AND field = ? AND size = ?"
                                   " AND start = ?", (device, field, size, start))
                        continue
                    db.execute("UPDATE windows SET dirty = 0, count = ?, min = ?, max = ?, total = ?, last = ?,"
                               " last_ts = ?, version = version + 1 WHERE device = ? AND field = ? AND size = ?"
                               " AND start = ?", (*new, device, field, size, start))
                    changed += 1
                    self.counters.add("corrected_windows" if version else "closed_windows")
                    larger = self.larger.get(size)
                    if larger is not None:
                        outer = floor(start, larger * NS)
                        db.execute(TOUCH_WINDOW, (device, field, larger, outer,
                                                  outer + larger * NS + self.grace_ns, 0))
                if len(rows) == CLOSE_LIMIT:
                    break      # larger windows wait until every smaller one due is computed
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return changed

    def _compute(self, device: str, field: str, size: int, start: int) -> tuple:
        """(count, min, max, total, last, last_ts) of one window, from its points or the next smaller windows."""
        end = start + size * NS
        if size == self.base:
            count, low, high, total = self.db.execute(
                "SELECT count(*), min(value), max(value), total(value) FROM points"
                " WHERE device = ? AND field = ? AND ts >= ? AND ts < ?", (device, field, start, end)).fetchone()
            last = self.db.execute(
                "SELECT value, ts FROM points WHERE device = ? AND field = ? AND ts >= ? AND ts < ?"
                " ORDER BY ts DESC LIMIT 1", (device, field, start, end)).fetchone()
        else:
            count, low, high, total = self.db.execute(
                "SELECT coalesce(sum(count), 0), min(min), max(max), total(total) FROM windows"
                " WHERE device = ? AND field = ? AND size = ? AND start >= ? AND start < ? AND count > 0",
                (device, field, self.smaller[size], start, end)).fetchone()
            last = self.db.execute(
                "SELECT last, last_ts FROM windows WHERE device = ? AND field = ? AND size = ? AND start >= ?"
                " AND start < ? AND count > 0 ORDER BY start DESC LIMIT 1",
                (device, field, self.smaller[size], start, end)).fetchone()
        last_value, last_ts = last if last is not None else (None, None)
        return count, low, high, total, last_value, last_ts

    # ------------------------------------------------------------------ sending

    def unemitted(self, limit: int = EMIT_LIMIT) -> list[Window]:
        """Computed windows whose newest version not every sink has yet, oldest first."""
        rows = self.db.execute(
            "SELECT device, field, size, start, count, min, max, total, last, version FROM windows"
            " WHERE version > emitted ORDER BY start LIMIT ?", (limit,)).fetchall()
        return [Window(device, field, size, start, Stats(count, low, high, total / count if count else None, last),
                       version)
                for device, field, size, start, count, low, high, total, last, version in rows]

    def mark_emitted(self, windows: Iterable[tuple[tuple[str, str, int, int], int]]) -> None:
        """((device, field, size, start), version) pairs every sink now has."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("UPDATE windows SET emitted = ? WHERE device = ? AND field = ? AND size = ?"
                                " AND start = ? AND emitted < ?",
                                [(version, *key, version) for key, version in windows])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ bounds

    def prune(self, now: int) -> tuple[int, int]:
        """Drop the points of windows past the correction horizon, and the windows no larger window
        needs any more (once delivered). Returns (points, windows) deleted."""
        final_before = self.final_before(now)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            rows = db.execute("SELECT device, field, start FROM windows WHERE has_points = 1 AND start < ?"
                              " AND dirty = 0 AND size = ?", (final_before, self.base)).fetchall()
            for device, field, start in rows:
                db.execute("DELETE FROM points WHERE device = ? AND field = ? AND ts >= ? AND ts < ?",
                           (device, field, start, start + self.base_ns))
            points = db.total_changes - before
            db.executemany("UPDATE windows SET has_points = 0 WHERE device = ? AND field = ? AND size = ?"
                           " AND start = ?", [(d, f, self.base, s) for d, f, s in rows])
            before = db.total_changes
            for size in self.sizes:
                # a window of size k+1 can change until all of its windows of size k are final; a window
                # of size k is kept while the window of size k+1 holding it can change
                cutoff = floor(final_before, self.larger.get(size, size) * NS)
                db.execute("DELETE FROM windows WHERE start < ? AND size = ? AND dirty = 0 AND version = emitted"
                           " AND has_points = 0", (cutoff, size))
            windows = db.total_changes - before
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.counters.add("pruned_points", points)
        self.counters.add("pruned_windows", windows)
        return points, windows

    def file_bytes(self) -> int:
        """The state file's size without its WAL (pages in use and free ones)."""
        return self.db.execute("PRAGMA page_count").fetchone()[0] * self.db.execute("PRAGMA page_size").fetchone()[0]

    def sizes_on_disk(self) -> tuple[int, int]:
        """(points, windows) held now: counts every row, so for tests and tools, not for every tick."""
        return (self.db.execute("SELECT count(*) FROM points").fetchone()[0],
                self.db.execute("SELECT count(*) FROM windows").fetchone()[0])


# --------------------------------------------------------------------------- the worker


class RollupWorker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        opts = cfg.rollups
        self.counters = runtime.Counters("rollup")
        self.store = RollupStore(Path(cfg.data_dir) / opts.path, opts.window_seconds, opts.grace_s,
                                 opts.correct_for_s, self.counters)
        self.deadletters = DeadLetterStore.for_config(cfg)
        self.tries = BatchTries.for_role(cfg.data_dir, ROLLUP)
        self.outboxes: dict[str, Outbox] = {}
        self.outbox_counters: dict[str, runtime.Counters] = {}
        self.pending: dict[int, tuple[set[str], list[tuple[tuple[str, str, int, int], int]]]] = {}
        self.inflight: dict[tuple[str, str, int, int], int] = {}     # window key -> version being sent
        self.delivered: list[tuple[tuple[str, str, int, int], int]] = []
        self._seq = 0

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

    def take(self, messages: list[list[bytes]], acks: zmq.Socket) -> None:
        seqs: list[int] = []
        readings: list[Reading] = []
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
        self.counters.add("received_readings", len(readings))
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
                timeout = min([runtime.POLL_MS,
                               *(int(outbox.next_due_in(now) * 1000) + 1 for outbox in self.outboxes.values())])
                if poller.poll(timeout):
                    messages: list[list[bytes]] = []
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
