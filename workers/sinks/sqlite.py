"""The embedded SQLite store: the default when no database server is configured.

Tables (one file, ``<data>/sensorpipe.db``, WAL so the query worker and the CLI can read while it
writes): ``readings`` (history, one row per device, field and timestamp: a view over
``packed_readings``, see below), ``latest`` (the newest value
of each device's fields; a view, see below), ``events``, ``rollups`` (window aggregates from the rollup worker, one row
per device, field, window and start; a corrected window replaces its row), ``devices`` (presence:
when each device was last heard from, by which listener and peer, and its offline threshold; a view). The
view ``presence`` adds ``online``, worked out when it is read: ``SELECT device, online FROM presence``.
A batch is one transaction. Device input only ever reaches SQL as parameters. Writing the same
reading twice stores it once; an older reading never replaces a newer latest value.

History is kept one row per reading, ``packed_readings (device, ts, fields, tags)`` with the fields as
a JSON object, and read per field through the view ``readings (device, field, ts, value, tags)``
(``json_each``): a row per field cost three B-tree inserts per reading where one does, and three times
the pages written per commit when many devices each send a little. SQLite reads back every float
exactly as written (orjson writes the shortest text that round-trips), integers as integers, booleans as
1 and 0 (as the row per field kept them); a field name or text holding a NUL, and NaN or an infinity
(which the parser never passes on), are refused with a reason. A second reading of a device at the same timestamp adds
the fields the first lacked and changes none it had: per field, the first stored wins, as before. A
file made before this layout (``readings`` a table) is written as it always was.

A reading newer than every row of its device in ``packed_readings`` goes first into ``recent_readings``,
keyed (ts, device): in arrival order, so that a commit of readings from 2,000 devices appends a few
pages there instead of dirtying a page per device (4 KB of WAL per reading in a 10,000-board fleet, and
again when checkpointed). Every ``MOVE_EVERY_S`` its rows move into ``packed_readings`` in one
statement, sorted by (device, ts): a page per device per move, not per commit. The view ``readings``
reads both tables; no (device, ts) is ever in both (``SqliteSink.device_ts``: a reading no newer than
its device's newest moved row is written into ``packed_readings``), the move is one transaction, so a
reader sees every committed reading once; a start moves what the last run left. A query of one
device over a span reads ``recent_readings`` by ts, so every device's rows of that span there (at most
``MOVE_EVERY_S`` of them); a rollup window is read once due, after its rows have mostly moved. A file
made before ``recent_readings`` gets the new view at the sink's first start.

The newest values and presence are not upserted per commit: with thousands of devices each sending a
little, that dirtied every page of ``latest`` and ``devices`` at every commit (a fifth of the
sink's CPU in a 10,000-board fleet). Each commit instead adds one row to ``latest_log`` (the batch's
newest value per device and field, and its presence rows, as JSON), and every ``FOLD_EVERY_S`` the
values waiting in memory are upserted once into ``latest_rows`` and ``device_rows`` and the log is
emptied, in the same transaction as a batch. A reading newer than every other of its device (as most
are) is not logged at all: it is in ``recent_readings``, which the view ``latest`` reads too, and each
device's newest such reading is upserted with the move. The views ``latest`` and ``devices`` read the
tables, the log and ``recent_readings`` (a newer ts wins; at the same ts the later write), so a reader
never sees an older value than was committed; a start after a kill folds the log and
``recent_readings`` in. A file made before these views has its
``latest`` and ``devices`` tables moved behind them by the sink's first start.

With rollups on, ``readings`` is also the rollup worker's set of points (``[rollups]
points_from_sqlite``, docs/rollups.md): after each commit this sink marks the windows its rows touched
in the rollup state (``RollupMarks``), and counts ``late_readings``, ``too_late_readings`` and
``future_readings`` as the rollup worker does when it keeps the points itself.
"""
from __future__ import annotations

import logging
import operator
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import orjson

from workers.core.rollupstore import RollupMarks
from workers.core.runtime import Counters, open_wal_db
from workers.core.storable import INT_MAX, INT_MIN
from workers.core.envelope import ROLLUP_TAG, EnvelopeError, rollup_stats
from workers.sinks import Batch, PermanentError, TransientError

if TYPE_CHECKING:
    from workers.core.config import Config

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS packed_readings (
    device TEXT NOT NULL, ts INTEGER NOT NULL, fields TEXT NOT NULL, tags TEXT,   -- fields: a JSON object
    PRIMARY KEY (device, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recent_readings (    -- history in arrival order, moved into packed_readings
    ts INTEGER NOT NULL, device TEXT NOT NULL, fields TEXT NOT NULL, tags TEXT,    -- every MOVE_EVERY_S
    PRIMARY KEY (ts, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS latest_rows (     -- read through the view latest
    device TEXT NOT NULL, field TEXT NOT NULL, ts INTEGER NOT NULL, value,
    PRIMARY KEY (device, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS latest_log (      -- per commit, its newest values and presence, until folded in
    id INTEGER PRIMARY KEY, latest TEXT NOT NULL, seen TEXT NOT NULL   -- JSON: [[device, field, ts, value]...],
);                                                                     -- [[device, last_seen, via, peer, offline_after_s]...]
CREATE TABLE IF NOT EXISTS events (
    device TEXT NOT NULL, ts INTEGER NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (device, ts, kind, body)    -- two scans in one message are two events; a redelivered one, one
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollups (
    device TEXT NOT NULL, field TEXT NOT NULL, window TEXT NOT NULL, start INTEGER NOT NULL,
    count INTEGER NOT NULL, min, max, mean, last,
    PRIMARY KEY (device, field, window, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_rows (     -- read through the view devices
    device TEXT PRIMARY KEY, last_seen INTEGER NOT NULL, via TEXT NOT NULL, peer TEXT NOT NULL,
    offline_after_s REAL NOT NULL
) WITHOUT ROWID;
"""

READINGS_VIEW = """
CREATE VIEW IF NOT EXISTS readings (device, field, ts, value, tags) AS    -- a no-op where readings is a table
    SELECT r.device, f.key, r.ts, f.value, r.tags FROM packed_readings AS r, json_each(r.fields) AS f
    UNION ALL
    SELECT r.device, f.key, r.ts, f.value, r.tags FROM recent_readings AS r, json_each(r.fields) AS f;
"""
# recent_readings is part of it: a reading newer than every other of its device is not logged (k: of
# two at one ts, the later write wins; one in recent_readings is the first at its ts, see write())
LATEST_VIEW = """
CREATE VIEW IF NOT EXISTS latest (device, field, ts, value) AS     -- a no-op where latest is a table
    SELECT device, field, ts, value FROM (
        SELECT *, row_number() OVER (PARTITION BY device, field ORDER BY ts DESC, k DESC) AS n FROM (
            SELECT device, field, ts, value, 0 AS k FROM latest_rows
            UNION ALL
            SELECT e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 3, l.id
            FROM latest_log AS l, json_each(l.latest) AS e
            UNION ALL
            SELECT r.device, f.key, r.ts, f.value, -1 FROM recent_readings AS r, json_each(r.fields) AS f))
    WHERE n = 1;
"""
VIEWS = LATEST_VIEW + """
CREATE VIEW IF NOT EXISTS devices (device, last_seen, via, peer, offline_after_s) AS    -- a no-op where a table
    SELECT device, last_seen, via, peer, offline_after_s FROM (
        SELECT *, row_number() OVER (PARTITION BY device ORDER BY last_seen DESC, k DESC) AS n FROM (
            SELECT device, last_seen, via, peer, offline_after_s, 0 AS k FROM device_rows
            UNION ALL
            SELECT e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 3, e.value ->> 4, l.id
            FROM latest_log AS l, json_each(l.seen) AS e))
    WHERE n = 1;
CREATE VIEW IF NOT EXISTS presence AS
    SELECT device, last_seen, via, peer, offline_after_s,
           (julianday('now') - 2440587.5) * 86400.0 - last_seen / 1e9 <= offline_after_s AS online
    FROM devices;
"""
SCHEMA += READINGS_VIEW + VIEWS

UPSERT_DEVICE = (
    "INSERT INTO device_rows (device, last_seen, via, peer, offline_after_s) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen, via = excluded.via,"
    " peer = excluded.peer, offline_after_s = excluded.offline_after_s WHERE excluded.last_seen >= device_rows.last_seen"
)

# A reading at a (device, ts) already stored adds only the fields it lacked: json_patch(new, old)
# is new with old's values over it. Rewritten only when that adds something (redelivery adds nothing).
INSERT_PACKED = (
    "INSERT INTO packed_readings (device, ts, fields, tags) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (device, ts) DO UPDATE SET fields = json_patch(excluded.fields, packed_readings.fields)"
    " WHERE json_patch(excluded.fields, packed_readings.fields) != packed_readings.fields"
)
INSERT_RECENT = (       # the same merge in the table of readings not moved yet
    "INSERT INTO recent_readings (device, ts, fields, tags) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (ts, device) DO UPDATE SET fields = json_patch(excluded.fields, recent_readings.fields)"
    " WHERE json_patch(excluded.fields, recent_readings.fields) != recent_readings.fields"
)
# recent_readings into packed_readings, in the order of its key: each device's rows go in together, so
# a move dirties about a page per device whatever the number of commits since the last. No (device, ts)
# is in both tables (``SqliteSink.device_ts``): the merge is there for safety, it never runs.
MOVE_RECENT = (
    "INSERT INTO packed_readings (device, ts, fields, tags)"
    " SELECT device, ts, fields, tags FROM recent_readings WHERE true ORDER BY device, ts"
    " ON CONFLICT (device, ts) DO UPDATE SET fields = json_patch(excluded.fields, packed_readings.fields)"
    " WHERE json_patch(excluded.fields, packed_readings.fields) != packed_readings.fields"
)
NEWEST_MOVED = "SELECT max(ts) FROM packed_readings WHERE device = ?"
# A start after a kill, before the log's values (which win at the same ts): the values of recent_readings
# into latest_rows, in ts order, each kept only when newer (at the same ts latest_rows holds a later write)
FOLD_RECENT = (
    "INSERT INTO latest_rows (device, field, ts, value)"
    " SELECT r.device, f.key, r.ts, f.value FROM recent_readings AS r, json_each(r.fields) AS f"
    " WHERE true ORDER BY r.ts"
    " ON CONFLICT (device, field) DO UPDATE SET ts = excluded.ts, value = excluded.value"
    " WHERE excluded.ts > latest_rows.ts"
)
INSERT_BY_FIELD = "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?)"     # a file made before packing

UPSERT_LATEST = (
    "INSERT INTO latest_rows (device, field, ts, value) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (device, field) DO UPDATE SET ts = excluded.ts, value = excluded.value"
    " WHERE excluded.ts >= latest_rows.ts"
)
# A device's newest reading from recent_readings, folded with the move: a value of latest_rows at the same
# ts is a later write's (folded from the log before), so it stays
UPSERT_NEWEST = UPSERT_LATEST.replace("excluded.ts >= latest_rows.ts", "excluded.ts > latest_rows.ts")

# A file made before latest and devices were views: their rows move into the tables behind the views
MIGRATE = """
INSERT INTO latest_rows (device, field, ts, value) SELECT device, field, ts, value FROM latest WHERE true
    ON CONFLICT (device, field) DO UPDATE SET ts = excluded.ts, value = excluded.value WHERE excluded.ts >= latest_rows.ts;
INSERT INTO device_rows (device, last_seen, via, peer, offline_after_s)
    SELECT device, last_seen, via, peer, offline_after_s FROM devices WHERE true
    ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen, via = excluded.via, peer = excluded.peer,
    offline_after_s = excluded.offline_after_s WHERE excluded.last_seen >= device_rows.last_seen;
DROP TABLE latest;
DROP TABLE devices;
"""

# A commit of a fleet's readings dirties a page per device (packed_readings is keyed by device, ts): with
# SQLite's default (1,000 pages) every such commit was followed by a checkpoint copying its pages into the
# file; every 10,000 pages (a WAL of up to 40 MB), a page written by several commits is copied once.
WAL_CHECKPOINT_PAGES = 10_000
FOLD_EVERY_S = 5.0       # newest values and presence go from latest_log into their tables this often
FOLD_MAX_KEYS = 200_000  # or once this many (device, field) and devices wait in memory
MOVE_EVERY_S = 20.0      # recent_readings into packed_readings this often
MOVE_MAX_ROWS = 400_000  # or once it holds this many rows
DENSE_READINGS_PER_DEVICE = 16   # a batch with as many per device (on average) bypasses recent_readings
DEVICES_KNOWN_MAX = 500_000   # device_ts and offline_s forgotten past this many (after a move: then safely)

UPSERT_ROLLUP = (
    "INSERT INTO rollups (device, field, window, start, count, min, max, mean, last)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, field, window, start) DO UPDATE SET"
    " count = excluded.count, min = excluded.min, max = excluded.max, mean = excluded.mean,"
    " last = excluded.last"
)


BEYOND_64_BITS = "sqlite: a number or timestamp is beyond the 64-bit integers SQLite keeps"


# json_each hands names and text back as C strings: a NUL would cut them short, so it is refused
NUL_IN_TEXT = "sqlite: a field name or text value holds a NUL character (\\u0000), which the store cannot keep"


def _holds_nul(fields: dict) -> bool:
    return any("\0" in name or (type(value) is str and "\0" in value) for name, value in fields.items())


# The parser turns NaN and infinities into failed reads (storable.py); one reaching this sink is refused
NOT_FINITE = "sqlite: a value is NaN or infinite, which the store does not keep (the parser reads it as a failed read)"


def _check_64_bits(fields: dict) -> None:
    """PermanentError for an integer beyond the 64 bits SQLite keeps (orjson writes up to 2**64 - 1)."""
    for value in fields.values():
        if type(value) is int and not INT_MIN <= value <= INT_MAX:
            raise PermanentError(BEYOND_64_BITS)


def _not_finite(fields: dict) -> bool:
    return any(type(value) is float and value - value != 0.0 for value in fields.values())


def _merge_latest(into: dict[tuple[str, str], tuple[int, object]], rows: list) -> None:
    """Newest values ``[device, field, ts, value]`` over older ones: a newer ts wins, of two at one ts the later."""
    for device, field, ts, value in rows:
        known = into.get((device, field))
        if known is None or ts >= known[0]:
            into[(device, field)] = (ts, value)


def _merge_seen(into: dict[str, tuple], rows: list) -> None:
    """Presence rows ``(device, last_seen, via, peer, offline_after_s)`` likewise, per device."""
    for row in rows:
        known = into.get(row[0])
        if known is None or row[1] >= known[1]:
            into[row[0]] = row


def _keep_older(device: str, before: tuple[int, dict], fields: dict,
                kept: dict[tuple[str, str], tuple[int, object]],
                unfolded: dict[tuple[str, str], tuple[int, object]]) -> None:
    """A device's newest reading lacks fields of its newest before: those stay its newest values, per
    field (a later write at the same ts wins), in ``kept``."""
    ts = before[0]
    for field, value in before[1].items():
        if field not in fields:
            key = (device, field)
            seen = kept.get(key) or unfolded.get(key)
            if seen is None or ts > seen[0]:
                kept[key] = (ts, value)


_NEVER = ("", INT_MIN)
_device = operator.itemgetter(0)
_NOTHING = INT_MIN - 1       # the newest moved timestamp of a device with no rows


def _unstorable(exc: Exception) -> str:
    return BEYOND_64_BITS if "64-bit" in str(exc) else f"sqlite: a value SQLite cannot store ({exc})"


def open_db(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None)
    else:
        db = open_wal_db(path, SCHEMA)
    return db


def db_path(cfg: Config) -> Path:
    return Path(cfg.data_dir) / cfg.sinks.sqlite.path


class SqliteSink:
    name = "sqlite"
    takes_rollups = True

    def __init__(self, path: Path, offline_after_s: Callable[[str], float] | None = None,
                 rollups: tuple[Path, tuple[int, ...], float, float] | None = None) -> None:
        self.path = path
        self.offline_after_s = offline_after_s or (lambda device: 900.0)
        self.db: sqlite3.Connection | None = None
        self.rollups = rollups       # (state path, window sizes, grace_s, correct_for_s): rows are the points
        self.marks: RollupMarks | None = None
        self.packed = True          # one row per reading (packed_readings); False: a file made before
        self.counters = Counters("sink:sqlite")     # the sink worker hands its own in (marks count there)
        # newest values and presence committed to latest_log and not folded into their tables yet
        self.unfolded_latest: dict[tuple[str, str], tuple[int, object]] = {}
        self.unfolded_seen: dict[str, tuple] = {}
        # device -> (ts, fields) of its newest reading, when that was newer than every other of the device
        # written before (the fast path of write()): in recent_readings, not logged; folded with the move
        self.unfolded_newest: dict[str, tuple[int, dict]] = {}
        self.unfolded_kept: dict[tuple[str, str], tuple[int, object]] = {}     # see _keep_older
        self.fold_at = 0.0
        # device -> [the newest ts of its rows in packed_readings, the newest ts written], the first
        # looked up once per device. A reading newer than the first goes into recent_readings, any other
        # into packed_readings, so that no (device, ts) is ever in both tables; the move makes the second
        # the first. A reading at least as new as the second is its device's newest in every field. Either
        # may be larger than what was committed (a failed write), which only sends more readings into
        # packed_readings and more through the per-field comparison: both are right for any reading.
        self.device_ts: dict[str, list[int]] = {}
        self.offline_s: dict[str, float] = {}      # offline_after_s per device, asked once
        self.recent_rows = 0
        self.move_at = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> "SqliteSink":
        rollups = None
        if cfg.rollups_from_sqlite:
            opts = cfg.rollups
            rollups = (Path(cfg.data_dir) / opts.path, opts.window_seconds, opts.grace_s, opts.correct_for_s)
        return cls(db_path(cfg), cfg.offline_after_s, rollups)

    def connect(self) -> None:
        self.db = open_db(self.path)
        self.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        kind = self.db.execute("SELECT type FROM sqlite_master WHERE name = 'readings'").fetchone()
        self.packed = kind == ("view",)
        if self.db.execute("SELECT type FROM sqlite_master WHERE name = 'latest'").fetchone() == ("table",):
            self._migrate(MIGRATE + VIEWS)
        view = self.db.execute("SELECT sql FROM sqlite_master WHERE name = 'readings'").fetchone()
        if self.packed and "recent_readings" not in view[0]:       # a file made before recent_readings
            self._migrate("DROP VIEW readings;" + READINGS_VIEW)
        view = self.db.execute("SELECT sql FROM sqlite_master WHERE name = 'latest'").fetchone()
        if "recent_readings" not in view[0]:
            self._migrate("DROP VIEW latest;" + LATEST_VIEW)
        self._recover()
        if self.rollups is not None:
            self.marks = RollupMarks(*self.rollups, counters=self.counters)

    def _migrate(self, script: str) -> None:
        """A file made before latest and devices were views (their rows go into the tables behind them),
        or before recent_readings (the readings view reads it too)."""
        assert self.db is not None
        try:
            self.db.executescript("BEGIN IMMEDIATE;" + script + "COMMIT;")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _recover(self) -> None:
        """What the last run committed to latest_log and did not fold in (it was killed), folded in now;
        and its recent_readings moved (``device_ts`` starts empty)."""
        assert self.db is not None
        latest: dict[tuple[str, str], tuple[int, object]] = {}
        seen: dict[str, tuple] = {}
        for log_latest, log_seen in self.db.execute("SELECT latest, seen FROM latest_log ORDER BY id"):
            _merge_latest(latest, orjson.loads(log_latest))
            _merge_seen(seen, orjson.loads(log_seen))
        self.unfolded_latest, self.unfolded_seen = latest, seen
        self.recent_rows = 1 if self.packed else 0      # whatever the last run left there
        self._fold_now(recover=True)

    def _fold_now(self, recover: bool = False) -> None:
        """The newest values and presence waiting in memory (and in latest_log, and with ``recover`` in
        recent_readings) into their tables, and recent_readings into packed_readings."""
        assert self.db is not None
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if recover and self.recent_rows:
                self.db.execute(FOLD_RECENT)
            self._fold(self.unfolded_latest, self.unfolded_seen, self.unfolded_newest, self.unfolded_kept)
            if self.recent_rows:
                self._move()
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.unfolded_latest, self.unfolded_seen, self.unfolded_newest, self.unfolded_kept = {}, {}, {}, {}
        self.fold_at = time.monotonic() + FOLD_EVERY_S
        self._moved()

    def _move(self) -> None:
        """Inside a transaction, after FOLD_RECENT and the log's fold: recent_readings into packed_readings."""
        assert self.db is not None
        self.db.execute(MOVE_RECENT)
        self.db.execute("DELETE FROM recent_readings")

    def _moved(self) -> None:
        """After the move's commit: every device's newest written ts is in packed_readings."""
        if len(self.device_ts) > DEVICES_KNOWN_MAX:    # none in recent_readings: looked up again when seen
            self.device_ts, self.offline_s = {}, {}
        for known in self.device_ts.values():
            known[0] = known[1]
        self.recent_rows = 0
        self.move_at = time.monotonic() + MOVE_EVERY_S

    def _device_ts(self, device: str) -> list[int]:
        """``device_ts`` of a device not known yet: none of its rows is in recent_readings."""
        assert self.db is not None
        ts = None
        if self.packed:
            try:
                (ts,) = self.db.execute(NEWEST_MOVED, (device,)).fetchone()
            except sqlite3.OperationalError as exc:
                raise TransientError(f"sqlite: {exc}") from None
        known = self.device_ts[device] = [_NOTHING, _NOTHING] if ts is None else [ts, ts]
        return known

    def _offline_after_s(self, device: str) -> float:
        value = self.offline_s[device] = self.offline_after_s(device)
        return value

    def _fold(self, latest: dict[tuple[str, str], tuple[int, object]], seen: dict[str, tuple],
              newest: dict[str, tuple[int, dict]] | None = None,
              kept: dict[tuple[str, str], tuple[int, object]] | None = None) -> None:
        """Inside a transaction: ``newest`` and ``kept`` (before a move), then ``latest`` (at the same ts
        a later write) and ``seen`` into latest_rows and device_rows; the log emptied."""
        assert self.db is not None
        if newest:
            self.db.executemany(UPSERT_NEWEST, [(d, f, ts, v) for d, (ts, fields) in newest.items()
                                                for f, v in fields.items()])
        if kept:
            self.db.executemany(UPSERT_NEWEST, [(d, f, ts, v) for (d, f), (ts, v) in kept.items()])
        if latest:
            self.db.executemany(UPSERT_LATEST, [(d, f, ts, v) for (d, f), (ts, v) in latest.items()])
        if seen:
            self.db.executemany(UPSERT_DEVICE, seen.values())
        self.db.execute("DELETE FROM latest_log")

    def write(self, batch: Batch) -> None:
        assert self.db is not None
        rows = []
        rollups = []
        # the batch's newest values that are newer than those waiting to be folded (an older one could
        # never win), so that after the commit a dict update puts them with the others
        latest: dict[tuple[str, str], tuple[int, object]] = {}
        unfolded = self.unfolded_latest
        marks = self.marks
        packed = self.packed
        recent = []                   # readings newer than any of their device's in packed_readings
        # Many readings per device (a few boards at full speed): a page per device per commit costs
        # little, and a row written once is cheaper than written and moved
        dense = packed and (len(batch.readings)
                            >= DENSE_READINGS_PER_DEVICE * len(set(map(_device, batch.readings))))
        direct: dict[str, tuple[int, dict]] = {}      # device -> its newest reading written so, this batch
        newest: dict[str, tuple[int, dict]] = {}      # the fast path's (see unfolded_newest)
        kept: dict[tuple[str, str], tuple[int, object]] = {}
        unfolded_newest = self.unfolded_newest
        device_ts = self.device_ts
        plain: list = []              # readings that are not rollups, for the marks
        for reading in batch.readings:
            device, ts, fields, tags = reading
            window = tags.get(ROLLUP_TAG) if tags else None
            if window is not None:
                try:
                    stats = rollup_stats(reading)
                except EnvelopeError as exc:
                    raise PermanentError(str(exc)) from None
                rollups.extend((device, field, window, ts, *values) for field, values in stats.items())
                continue
            if marks is not None:
                plain.append(reading)
            tag_text = orjson.dumps(tags).decode() if tags else None
            known = device_ts.get(device)
            if known is None:
                known = self._device_ts(device)
            if packed:
                if fields:
                    try:
                        packed_fields = orjson.dumps(fields).decode()
                    except TypeError as exc:      # orjson: an integer beyond 64 bits, a lone surrogate
                        raise PermanentError(_unstorable(exc)) from None
                    if "\\u0000" in packed_fields and _holds_nul(fields):
                        raise PermanentError(NUL_IN_TEXT)
                    if "null" in packed_fields and _not_finite(fields):     # orjson writes NaN, inf as null
                        raise PermanentError(NOT_FINITE)
                    if ts > known[0]:
                        if dense and known[0] == known[1]:     # none of its rows in recent_readings
                            known[0] = known[1] = ts           # its newest, straight into packed_readings
                            rows.append((device, ts, packed_fields, tag_text))
                            _check_64_bits(fields)
                            # its values logged once per device, after the loop
                            before = direct.get(device)
                            if before is not None and not before[1].keys() <= fields.keys():
                                _keep_older(device, before, fields, latest, unfolded)
                            direct[device] = (ts, fields)
                            continue
                        else:
                            recent.append((device, ts, packed_fields, tag_text))
                    else:           # redelivered, or older than what was moved: where its (device, ts) is
                        rows.append((device, ts, packed_fields, tag_text))
            else:
                rows.extend((device, field, ts, value, tag_text) for field, value in fields.items())
            if ts > known[1] and packed:
                # Newer than every reading of its device written before (as it mostly is), so it went
                # into recent_readings, the first there at its ts: the view latest reads its values
                # there, the fold puts them into latest_rows (before the move). Not logged.
                known[1] = ts
                _check_64_bits(fields)
                before = newest.get(device) or unfolded_newest.get(device)
                if before is not None and not before[1].keys() <= fields.keys():
                    _keep_older(device, before, fields, kept, self.unfolded_kept)
                newest[device] = (ts, fields)
                continue
            for field, value in fields.items():
                if type(value) is int and not INT_MIN <= value <= INT_MAX:
                    raise PermanentError(BEYOND_64_BITS)
                key = (device, field)
                seen = latest.get(key) or unfolded.get(key)
                if seen is None or ts >= seen[0]:
                    latest[key] = (ts, value)
        for device, (ts, fields) in direct.items():     # each the first write at its ts: a later one wins
            for field, value in fields.items():
                key = (device, field)
                seen = latest.get(key) or unfolded.get(key)
                if seen is None or ts > seen[0]:
                    latest[key] = (ts, value)
        events = [(e.device, e.ts, e.kind, orjson.dumps(e.body).decode()) for e in batch.events]
        devices: dict[str, tuple] = {}
        if batch.seen:
            offline_s, unfolded_seen = self.offline_s, self.unfolded_seen
            _merge_seen(devices, [(s.device, s.ts, s.listener, s.peer,
                                   offline_s.get(s.device) or self._offline_after_s(s.device))
                                  for s in batch.seen if s.ts >= unfolded_seen.get(s.device, _NEVER)[1]])
        try:      # the log a kill leaves behind; folded into latest_rows and device_rows every FOLD_EVERY_S
            log_row = (orjson.dumps([(d, f, ts, v) for (d, f), (ts, v) in latest.items()]).decode(),
                       orjson.dumps(list(devices.values())).decode())
        except TypeError as exc:              # (the by-field layout, which does not encode fields)
            raise PermanentError(_unstorable(exc)) from None
        touched: set = set()
        late: list = []
        late_new = 0
        if marks is not None and plain:
            touched, late = marks.points(plain, time.time_ns())
        # Every FOLD_EVERY_S, the newest values and presence waiting in memory, with this batch's, go into
        # their tables and the log is emptied; in between, each commit adds one row to latest_log.
        now = time.monotonic()
        fold = now >= self.fold_at or len(self.unfolded_latest) + len(self.unfolded_seen) >= FOLD_MAX_KEYS
        self.recent_rows += len(recent)
        move = self.recent_rows > 0 and (now >= self.move_at or self.recent_rows >= MOVE_MAX_ROWS)
        fold = fold or move         # the log's values into latest_rows with (after) recent_readings' ones
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for device, field, ts, _value in late:     # rare: only a point not stored before is news
                    if self.db.execute("SELECT 1 FROM readings WHERE device = ? AND field = ? AND ts = ?",
                                       (device, field, ts)).fetchone() is None:
                        late_new += 1
                if rows:
                    self.db.executemany(INSERT_PACKED if packed else INSERT_BY_FIELD, rows)
                if recent:
                    self.db.executemany(INSERT_RECENT, recent)
                if events:
                    self.db.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?)", events)
                if rollups:
                    self.db.executemany(UPSERT_ROLLUP, rollups)
                if fold:
                    self._fold({**self.unfolded_latest, **latest}, {**self.unfolded_seen, **devices},
                               {**unfolded_newest, **newest} if move else None,
                               {**self.unfolded_kept, **kept} if move else None)
                elif latest or devices:
                    self.db.execute("INSERT INTO latest_log (latest, seen) VALUES (?, ?)", log_row)
                if move:
                    self._move()
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            if fold:
                self.unfolded_latest, self.unfolded_seen = {}, {}
                self.fold_at = time.monotonic() + FOLD_EVERY_S
            else:
                self.unfolded_latest.update(latest)
                self.unfolded_seen.update(devices)
            if move:
                self.unfolded_newest, self.unfolded_kept = {}, {}
            else:
                unfolded_newest.update(newest)
                self.unfolded_kept.update(kept)
            if move:
                self._moved()
            if touched or late:
                # after the rows' commit, never before: a window computed before the rows were in is
                # always marked again (RollupMarks); a failure here writes the batch again, marks too
                marks.mark(touched, late, late_new)      # type: ignore[union-attr]
        except sqlite3.OperationalError as exc:   # locked, disk full, I/O error: try again later
            raise TransientError(f"sqlite: {exc}") from None
        except OverflowError:                     # an integer beyond 64 bits (JSON allows up to 2**64 - 1)
            raise PermanentError(BEYOND_64_BITS) from None
        except (sqlite3.InterfaceError, UnicodeEncodeError, ValueError) as exc:    # a value SQLite cannot take
            raise PermanentError(f"sqlite: a value SQLite cannot store ({exc})") from None

    def close(self) -> None:
        if self.db is not None and (self.unfolded_latest or self.unfolded_seen or self.unfolded_newest
                                    or self.unfolded_kept or self.recent_rows):
            try:
                self._fold_now()       # the tables whole when the sink stops
            except sqlite3.Error as exc:    # locked, disk full: latest_log keeps it, the next start folds it
                log.warning("sqlite: newest values left in latest_log for the next start (%s)", exc)
        if self.marks is not None:
            self.marks.close()
            self.marks = None
        if self.db is not None:
            self.db.close()
            self.db = None
