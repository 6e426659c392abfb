"""The rollup worker's window store (``<data>/rollups.db``): the distinct points of every window that
can still change, and each window's aggregate, recomputed from them, never incremented. Pure state:
no sockets; every method takes the time (``now``, ns), so its tests set the clock
(tests/test_rollupstore.py). The worker (``workers.processes.rollup``) feeds it and sends what it emits.

With the SQLite sink on, the points are that sink's ``readings`` rows: keeping them a second time
here cost as much B-tree work again in a second process. Then ``RollupMarks`` is what the sink uses,
after each commit, to mark the smallest windows its rows touched, and ``RollupStore(readings_db=...)``
computes those windows from ``readings`` (attached read-only). What makes that exact: the marks are
written after the rows are committed, and ``close_due`` takes the state's write lock before it reads
``readings``; so a window computed without some rows is always marked again once they are in.
"""
from __future__ import annotations

import logging
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
MARK_MARGIN_NS = 2 * NS            # a window due this soon is marked again after every commit (clock reads)
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


class WindowRules:
    """Which window a reading's values belong to, and whether they are on time, late, too late or
    too far ahead: shared by the state (``RollupStore``) and the SQLite sink's marks (``RollupMarks``)."""

    def __init__(self, sizes: Iterable[int], grace_s: float, correct_for_s: float,
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

    def final_before(self, now: int) -> int:
        """Smallest windows starting before this can no longer change: their points are gone."""
        return floor(now - self.grace_ns - self.correct_ns - self.base_ns, self.base_ns) + self.base_ns

    def sort(self, readings: Iterable[Reading], now: int, margin_ns: int = 0, points: bool = True) -> tuple[
            list[tuple[str, str, int, float]], list[tuple[str, str, int, float]], set[tuple[str, str, int]], int, int]:
        """The numeric values of ``readings`` as points: (on time, late: their window is due within
        ``margin_ns`` or closed, the smallest windows the on-time ones touch, too late, too far ahead).
        ``points=False``: the on-time points themselves are not listed (the windows are enough)."""
        base_ns, grace_ns = self.base_ns, self.grace_ns
        final_before = self.final_before(now)
        future = now + FUTURE_LIMIT_NS
        closed_before = now + margin_ns
        on_time: list[tuple[str, str, int, float]] = []
        late: list[tuple[str, str, int, float]] = []
        touched: set[tuple[str, str, int]] = set()
        too_late = ahead = 0
        # Per reading first, then per field: this runs for every reading the SQLite sink writes.
        for device, ts, fields, tags in readings:
            if not TS_MIN <= ts <= TS_MAX:                       # the parser sets these aside; never here
                self.counters.add("unstorable_values", len(fields))
                continue
            start = ts - ts % base_ns
            outside = ts < final_before or ts > future
            is_late = start + base_ns + grace_ns <= closed_before
            for field, value in fields.items():
                kind = type(value)
                if kind is float:
                    if value - value != 0.0:                     # NaN, infinities: not rolled up
                        continue
                elif kind is int:
                    if not INT_MIN <= value <= INT_MAX:
                        self.counters.add("unstorable_values")
                        continue
                else:                                            # strings, booleans: not rolled up
                    continue
                if outside:
                    if ts < final_before:
                        too_late += 1
                        self._log_once(f"late:{device}", "reading of %s at %d ns is older than the correction "
                                       "horizon (rollups.correct_for_s): not rolled up", device, ts)
                    else:
                        ahead += 1
                        self._log_once(f"future:{device}", "reading of %s at %d ns is more than a day ahead "
                                       "of this clock: not rolled up", device, ts)
                    continue
                if is_late:
                    late.append((device, field, ts, value))
                else:
                    if points:
                        on_time.append((device, field, ts, value))
                    touched.add((device, field, start))
        return on_time, late, touched, too_late, ahead

    def _log_once(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[key] = now
            log.warning(message, *args)


def _open_state(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    db.executescript(SCHEMA)
    return db


class RollupStore(WindowRules):
    """The rollup state in SQLite; every method takes the time (``now``, ns) so tests can set it."""

    def __init__(self, path: Path, sizes: Iterable[int], grace_s: float, correct_for_s: float,
                 counters: runtime.Counters | None = None, readings_db: Path | None = None) -> None:
        super().__init__(sizes, grace_s, correct_for_s, counters)
        self.db = _open_state(path)
        self._open: set[tuple[str, str, int]] = set()   # smallest windows known to be marked dirty
        # Where the points of the smallest windows are: our own table, or the SQLite sink's rows (only
        # numbers: a string or a boolean in ``readings`` never marked a window, but shares its series).
        self.points = "points"
        self.numeric = ""
        if readings_db is not None:
            # read-only: BEGIN IMMEDIATE here then takes only a read snapshot of the SQLite store (after
            # the state's write lock), never its write lock, so the SQLite sink never waits for us
            uri = readings_db.resolve().as_uri() + "?mode=ro"
            self.db.execute("ATTACH DATABASE ? AS store", (uri,))
            self.points = "store.readings"
            self.numeric = " AND typeof(value) IN ('integer', 'real')"
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
                f" SELECT device, field, ?, ts - ts % ?, ts - ts % ? + ?, 1, 1 FROM {self.points}"
                f" WHERE ts >= ?{self.numeric} GROUP BY device, field, ts - ts % ? ON CONFLICT DO NOTHING",
                # the SQLite sink's rows go back for ever: only those that can still change a window
                (self.base, b, b, b + self.grace_ns, self.final_before(time.time_ns()) if self.numeric else TS_MIN, b))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ readings in

    def add(self, readings: Iterable[Reading], now: int) -> int:
        """Put the numeric values in their windows; returns how many were taken. One transaction."""
        on_time, late, touched, too_late, ahead = self.sort(readings, now)
        base_ns, grace_ns = self.base_ns, self.grace_ns
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
                f"SELECT count(*), min(value), max(value), total(value) FROM {self.points}"
                f" WHERE device = ? AND field = ? AND ts >= ? AND ts < ?{self.numeric}",
                (device, field, start, end)).fetchone()
            last = self.db.execute(
                f"SELECT value, ts FROM {self.points} WHERE device = ? AND field = ? AND ts >= ? AND ts < ?"
                f"{self.numeric} ORDER BY ts DESC LIMIT 1", (device, field, start, end)).fetchone()
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
                if self.points != "points":
                    break          # the SQLite sink's rows are its history: never deleted here
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


class RollupMarks(WindowRules):
    """The SQLite sink's part when its rows are the rollup points: after each commit of rows, mark
    the smallest windows they touched as dirty in the state, so the rollup worker computes them.

    A window this process marked and that is not due soon needs no second mark (``marked``): the
    rollup worker computes it only once due, and then reads every row committed before. A window due
    within ``MARK_MARGIN_NS``, or already closed (a late reading), is marked after every commit that
    touched it, new rows or not: recomputing an unchanged window emits nothing, and a batch written
    again after a failure between the two commits marks what the first try could not.
    """

    def __init__(self, path: Path, sizes: Iterable[int], grace_s: float, correct_for_s: float,
                 counters: runtime.Counters | None = None) -> None:
        super().__init__(sizes, grace_s, correct_for_s, counters)
        self.path = path
        self.db: sqlite3.Connection | None = None
        # (device, start) -> the numeric fields whose window this process marked, while not due soon
        self.marked: dict[tuple[str, int], set[str]] = {}
        self._purge_at = 0

    def points(self, readings: Iterable[Reading], now: int) -> tuple[set[tuple[str, str, int]],
                                                                     list[tuple[str, str, int, float]]]:
        """(the windows on-time values touch, the late points), from readings about to be written."""
        # Most readings belong to windows marked already, with the same fields: a look-up per reading
        # skips them (a device's fields are checked at once, as a set) before any work per field.
        base_ns = self.base_ns
        after = now + MARK_MARGIN_NS - base_ns - self.grace_ns      # start > after: due not soon
        marked = self.marked
        rest = []
        for reading in readings:
            ts = reading[1]
            start = ts - ts % base_ns
            if start > after:
                known = marked.get((reading[0], start))
                if known is not None and reading[2].keys() <= known:
                    continue
            rest.append(reading)
        _on_time, late, touched, too_late, ahead = self.sort(rest, now, MARK_MARGIN_NS, points=False)
        if too_late:
            self.counters.add("too_late_readings", too_late)
        if ahead:
            self.counters.add("future_readings", ahead)
        return touched, late

    def mark(self, touched: set[tuple[str, str, int]], late: list[tuple[str, str, int, float]],
             late_new: int = 0, now: int | None = None) -> int:
        """Once the rows are committed: one short transaction. ``late_new``: how many of the late
        points were not stored before (counted as ``late_readings``). Returns the windows marked."""
        now = time.time_ns() if now is None else now
        soon = now + MARK_MARGIN_NS
        base, base_ns, grace_ns = self.base, self.base_ns, self.grace_ns
        marked = self.marked
        rows = []
        fresh = []
        for device, field, start in touched:
            due = start + base_ns + grace_ns
            if due > soon:
                known = marked.get((device, start))
                if known is not None and field in known:
                    continue
                fresh.append((device, field, start))
            rows.append((device, field, base, start, due, 1))
        for device, field, ts, _value in late:
            start = ts - ts % base_ns
            rows.append((device, field, base, start, start + base_ns + grace_ns, 1))
        if rows:
            db = self.db
            if db is None:
                db = self.db = _open_state(self.path)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(TOUCH_WINDOW, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            for device, field, start in fresh:
                known = marked.get((device, start))
                if known is None:
                    marked[(device, start)] = {field}
                else:
                    known.add(field)
        if late_new:
            self.counters.add("late_readings", late_new)
        if now >= self._purge_at:                  # windows now due are marked again after each commit
            self._purge_at = now + 10 * NS
            after = soon - base_ns - grace_ns
            self.marked = {key: fields for key, fields in marked.items() if key[1] > after}
        return len(rows)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

