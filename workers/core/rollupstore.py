"""The rollup worker's window store (``<data>/rollups.db``): the distinct points of every window that
can still change, and each window's aggregate, recomputed from them, never incremented. Pure state:
no sockets; every method takes the time (``now``, ns), so its tests set the clock
(tests/test_rollupstore.py). The worker (``workers.processes.rollup``) feeds it and sends what it emits.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import Iterable, NamedTuple

from workers.core import runtime
from workers.core.envelope import Reading, Stats
from workers.core.storable import INT_MAX, INT_MIN, TS_MAX, TS_MIN

log = logging.getLogger(__name__)

NS = 1_000_000_000
FUTURE_LIMIT_NS = 86_400 * NS      # readings further ahead of this clock are not rolled up (a wrong clock)
CLOSE_LIMIT = 5000                 # windows computed per size and tick; the rest next tick
EMIT_LIMIT = 2000                  # window versions handed to the outboxes per tick
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
