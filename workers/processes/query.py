"""The query worker: latest values per device, served from memory (the zguide's lvcache).

Sockets:
    query  ROUTER  bind  <- clients REQ          JSON requests, one JSON reply each
    live   SUB     bind  <- parsers/workers PUB  ``readings`` (kept newest-first per field), ``stats``
    stream PUB     bind  -> http SUB             the same ``readings`` messages, as they came (live streams)

Requests (docs/query-protocol.md)::

    {"op":"latest","device":"ID"}  -> {"ok":true,"device":"ID","fields":{"temp":{"value":22.6,"ts":1732260000123}}}
    {"op":"devices"}               -> {"ok":true,"devices":[{"device":"ID","last_seen":1732260000123,
                                                              "online":true,"via":"text","peer":"..."}]}
    {"op":"status"}                -> {"ok":true,"sinks":{"sqlite":{"written":..,"pending":..,"spooled":..,
                                        "dead_lettered":..,"state":"ok",...}},
                                       "workers":{"edge":{...counters...},"sink:sqlite":{...}}}
    {"op":"history","device":"ID","field":"temp","window":"1m","from":ms,"to":ms}
        -> {"ok":true,...,"columns":["ts","count","min","max","mean","last"],"points":[[ms,30,21.5,...],...]}
        without "window": the raw readings, "columns":["ts","value"]
    anything else                  -> {"ok":false,"code":"...","error":"..."} (codes: workers.core.errors)

Timestamps in replies are Unix epoch milliseconds. ``last_seen`` is when the device's newest frame
arrived (heartbeats included), to within ``parser.PRESENCE_REFRESH_S`` (a tenth of its offline_after_s
when shorter); ``online`` is whether that is within its ``offline_after_s``
(``[presence]``, or ``[devices.ID]``). ``history`` reads the SQLite store (read-only): the ``rollups``
table, or ``readings`` when no window is given. On start the values are restored from the store
(SQLite, or MongoDB when that sink is on), and restored once more ``resync_after_s`` later to cover
readings that were on their way while the worker was down; and again ``resync_after_s`` after a
parser (re)starts, for what it published before its PUB socket was connected (a PUB drops that). A newer timestamp always wins, so the
order in which parsers deliver does not matter.
"""
from __future__ import annotations

import functools
import logging
import sqlite3
import time
from itertools import chain
from typing import Any, Callable

import orjson
import zmq

from workers.core import envelope, errors, runtime, worker
from workers.core.config import Config, parse_window, window_label

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.5
STATS_STALE_S = 30.0
DEFAULT_HISTORY_SPAN_MS = 24 * 3600 * 1000     # "from" defaults to a day before "to"
ROLLUP_COLUMNS = ["ts", "count", "min", "max", "mean", "last"]

FIELD_TYPES = frozenset((int, float, str, bool, type(None)))   # what a reading's field may hold
_LIST, _FOUR, _STR, _INT, _DICT = (frozenset((x,)) for x in (list, 4, str, int, dict))
_SEEN_ROW = (str, int, str, int, str)        # device, arrival ns, listener, conn_id, peer
_new_seen = functools.partial(tuple.__new__, envelope.Seen)


class QueryError(runtime.RequestError):
    """The pipeline did not answer, or answered with an error. The message says what to do."""


class LatestValues:
    """Per device its newest reading as it came (its timestamp and its fields, the very dict the live
    message was parsed into), and for a field that reading lacks, the value and time of the newest
    reading that had it. A fleet's every reading is its device's newest with the fields the one before
    had: taking it is two stores, with no object made and no loop over its fields."""

    def __init__(self) -> None:
        # device -> [ts, fields, older]: older is None, or {field: (value, ts)} for fields not in fields
        self.newest: dict[str, list] = {}
        self.presence: dict[str, envelope.Seen] = {}    # newest frame's arrival, and by which way

    def seen(self, entry: envelope.Seen) -> None:
        known = self.presence.get(entry.device)
        if known is None or entry.ts >= known.ts:
            self.presence[entry.device] = entry

    def apply_seen(self, rows: list) -> int:
        """``seen`` for the presence rows of a live message (``envelope.parse_live``), each checked;
        returns how many were malformed and skipped. An entry older than the one kept is no news."""
        presence = self.presence
        bad = 0
        if type(rows) is not list:
            return 1
        for row in rows:
            if type(row) is not list or tuple(map(type, row)) != _SEEN_ROW:
                bad += 1
                continue
            known = presence.get(row[0])
            if known is None or row[1] >= known.ts:
                presence[row[0]] = _new_seen(row)
        return bad

    def fields(self, device: str) -> dict[str, tuple[Any, int]] | None:
        """``{field: (value, ts)}`` of ``device`` (None: never seen): each field's value in the newest
        reading that had it; of equal timestamps, the reading taken last."""
        entry = self.newest.get(device)
        if entry is None:
            return None
        ts, fields, older = entry
        out = {name: (value, ts) for name, value in fields.items()}
        if older:
            out.update(older)
        return out

    def last_seen(self, device: str) -> int | None:
        """The timestamp of ``device``'s newest reading."""
        entry = self.newest.get(device)
        return None if entry is None else entry[0]

    def update(self, device: str, field: str, value: Any, ts: int) -> None:
        """One field of a reading (values restored from a store)."""
        self._take(device, ts, {field: value})

    def _take(self, device: str, ts: int, fields: dict) -> None:
        """A reading whose values are all of ``FIELD_TYPES``: the general case of ``apply_readings``."""
        entry = self.newest.get(device)
        if entry is None:
            self.newest[device] = [ts, fields, None]
            return
        newest_ts, newest_fields, older = entry
        if ts >= newest_ts:         # the device's newest: what the one before had and it lacks stays
            kept = {name: (value, newest_ts) for name, value in newest_fields.items() if name not in fields}
            if older:
                kept.update((name, seen) for name, seen in older.items() if name not in fields)
            entry[0], entry[1], entry[2] = ts, fields, kept or None
            return
        for name, value in fields.items():     # older than the newest: only for fields it lacks
            if name in newest_fields:
                continue
            if older is None:
                older = entry[2] = {}
            seen = older.get(name)
            if seen is None or ts >= seen[1]:
                older[name] = (value, ts)

    def apply_readings(self, readings: list) -> int:
        """Take every reading of a live message; this runs for every reading. Returns how many rows and
        field values were malformed and skipped: one kept with a timestamp that is not an integer would
        make every later reading of its device fail to compare."""
        if type(readings) is not list:
            return 1
        try:   # the whole message checked at once, in C: rows, their members, every field's value
            devices, stamps, fieldsets, _ = zip(*readings)
            wellformed = (_LIST.issuperset(map(type, readings)) and _FOUR.issuperset(map(len, readings))
                          and _STR.issuperset(map(type, devices)) and _INT.issuperset(map(type, stamps))
                          and _DICT.issuperset(map(type, fieldsets))
                          and FIELD_TYPES.issuperset(map(type, chain.from_iterable(map(dict.values, fieldsets)))))
        except (TypeError, ValueError):
            wellformed = False
        if not wellformed:
            return self._apply_checked(readings)
        newest = self.newest
        for device, ts, fields in zip(devices, stamps, fieldsets):
            entry = newest.get(device)
            # the device's newest reading with at least the fields of the one before: a fleet's every one
            if entry is not None and ts >= entry[0] and entry[2] is None and fields.keys() >= entry[1].keys():
                entry[0] = ts
                entry[1] = fields
            else:
                self._take(device, ts, fields)
        return 0

    def _apply_checked(self, readings: list) -> int:
        """``apply_readings`` row by row for a message that holds something malformed."""
        bad = 0
        for row in readings:
            if type(row) is not list or len(row) != 4:
                bad += 1
                continue
            device, ts, fields, _tags = row
            if type(device) is not str or type(ts) is not int or type(fields) is not dict:
                bad += 1
                continue
            kept = {name: value for name, value in fields.items() if type(value) in FIELD_TYPES}
            bad += len(fields) - len(kept)
            self._take(device, ts, kept)
        return bad


def restore_from_sqlite(cfg: Config, latest: LatestValues) -> int:
    from workers.sinks.sqlite import db_path, open_db

    path = db_path(cfg)
    if not path.exists():
        return 0
    db = open_db(path, readonly=True)
    try:
        rows = db.execute("SELECT device, field, ts, value FROM latest").fetchall()
    finally:
        db.close()
    for device, field, ts, value in rows:
        latest.update(device, field, value, ts)
    db = open_db(path, readonly=True)
    try:
        devices = db.execute("SELECT device, last_seen, via, peer FROM devices").fetchall()
    except sqlite3.OperationalError:        # a store from before presence was kept
        devices = []
    finally:
        db.close()
    for device, last_seen, via, peer in devices:
        latest.seen(envelope.Seen(device, last_seen, via, 0, peer))
    return len(rows)


def restore_from_mongo(cfg: Config, latest: LatestValues) -> int:
    from workers.sinks.mongo import latest_values

    count = 0
    for device, field, value, ts in latest_values(cfg.sinks.mongo):
        latest.update(device, field, value, ts)
        count += 1
    return count


RESTORERS: dict[str, Callable[[Config, LatestValues], int]] = {"sqlite": restore_from_sqlite,
                                                               "mongo": restore_from_mongo}


def restore_source(cfg: Config) -> str:
    choice = cfg.query.restore_from
    if choice == "auto":
        enabled = cfg.sinks.enabled()
        return "mongo" if "mongo" in enabled and "mongo" in RESTORERS else ("sqlite" if "sqlite" in enabled else "none")
    return choice


class QueryWorker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.latest = LatestValues()
        self.stats: dict[str, tuple[float, dict]] = {}
        self.resync_at = 0.0            # monotonic time of the next restore from the store; 0: none due
        self.counters = runtime.Counters("query")
        self._logged: set[str] = set()          # kinds of bad live input already logged once
        self.ops: dict[str, Callable[[dict], dict]] = {
            "latest": self.op_latest,
            "devices": self.op_devices,
            "status": self.op_status,
            "history": self.op_history,
            "ping": lambda req: {"ok": True},
        }

    # ------------------------------------------------------------------ requests

    def answer(self, raw: bytes) -> bytes:
        """Never raises: a bad request gets ``{"ok": false, "error": ...}``."""
        return orjson.dumps(runtime.dispatch(raw, self.ops, self.counters))

    def op_latest(self, request: dict) -> dict:
        device = request.get("device")
        if not isinstance(device, str) or not device:
            raise QueryError('"device" must be a non-empty string')
        fields = self.latest.fields(device)
        if fields is None:
            raise QueryError(f"unknown device {device!r}", errors.UNKNOWN_DEVICE)
        return {"ok": True, "device": device,
                "fields": {name: {"value": value, "ts": ts // 1_000_000} for name, (value, ts) in fields.items()}}

    def op_devices(self, request: dict) -> dict:
        now = time.time_ns()
        presence, readings = self.latest.presence, self.latest.newest
        devices = []
        for device in sorted(presence.keys() | readings.keys()):
            seen = presence.get(device)
            last_seen = seen.ts if seen is not None else readings[device][0]    # arrival, else reading time
            devices.append({"device": device, "last_seen": last_seen // 1_000_000,
                            "online": now - last_seen <= self.cfg.offline_after_s(device) * 1e9,
                            "via": seen.listener if seen else "", "peer": seen.peer if seen else ""})
        return {"ok": True, "devices": devices}

    def op_status(self, request: dict) -> dict:
        from workers.core.outbox import sink_summary

        now = time.monotonic()
        self.counters["resync_due"] = 1 if self.resync_at else 0     # a restore from the store is still to come
        self.stats["query"] = (now, self.counters.snapshot())
        sinks = {name.split(":", 1)[1]: {**sink_summary(counters), "stale": now - at > STATS_STALE_S}
                 for name, (at, counters) in sorted(self.stats.items()) if name.startswith("sink:")}
        return {"ok": True, "sinks": sinks,
                "workers": {name: {**counters, "stale": now - at > STATS_STALE_S}
                            for name, (at, counters) in sorted(self.stats.items())}}

    def op_history(self, request: dict) -> dict:
        cfg = self.cfg
        device, field = request.get("device"), request.get("field")
        if not isinstance(device, str) or not device:
            raise QueryError('"device" must be a non-empty string')
        if not isinstance(field, str) or not field:
            raise QueryError('"field" must be a non-empty string')
        window = request.get("window")
        if window is not None:
            try:
                window = window_label(parse_window(window))
            except ValueError as exc:
                raise QueryError(f'"window": {exc}') from None
            known = [window_label(s) for s in cfg.rollups.window_seconds] if cfg.rollups.enabled else []
            if window not in known:
                raise QueryError(f"no {window} rollups: the configured windows are {', '.join(known) or 'none'}"
                                 " ([rollups] windows)", errors.NOT_FOUND)
        to_ms = request.get("to", time.time_ns() // 1_000_000)
        from_ms = request.get("from", to_ms - DEFAULT_HISTORY_SPAN_MS if isinstance(to_ms, int) else None)
        for name, value in (("from", from_ms), ("to", to_ms)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise QueryError(f'"{name}" must be Unix epoch milliseconds (an integer)')
        if from_ms > to_ms:
            raise QueryError('"from" is after "to"')
        if not cfg.sinks.sqlite.enabled:
            raise QueryError("history is read from the SQLite store, and [sinks.sqlite] is not enabled",
                             errors.UNAVAILABLE)
        from workers.sinks.sqlite import db_path, open_db

        path = db_path(cfg)
        if not path.exists():
            raise QueryError(f"no store yet at {path}: nothing has been written", errors.UNAVAILABLE)
        cap = cfg.query.history_max_points
        span = (from_ms * 1_000_000, to_ms * 1_000_000)
        db = open_db(path, readonly=True)
        try:
            if window is None:
                columns = ["ts", "value"]
                # ts itself, not ts / 1000000: ordered by a column, the view's two tables (packed_readings
                # and recent_readings) are merged in key order and stop at the limit instead of sorted whole
                rows = ((ts // 1_000_000 if ts >= 0 else -(-ts // 1_000_000), value)     # as SQLite's ts / 1000000
                        for ts, value in db.execute(
                            "SELECT ts, value FROM readings WHERE device = ? AND field = ? AND ts >= ? AND ts < ?"
                            " ORDER BY ts LIMIT ?", (device, field, *span, cap + 1)))
            else:
                columns = ROLLUP_COLUMNS
                rows = db.execute("SELECT start / 1000000, count, min, max, mean, last FROM rollups"
                                  " WHERE device = ? AND field = ? AND window = ? AND start >= ? AND start < ?"
                                  " ORDER BY start LIMIT ?", (device, field, window, *span, cap + 1))
            points = [list(row) for row in rows]
        except sqlite3.OperationalError as exc:
            raise QueryError(f"the store cannot answer yet ({exc})", errors.UNAVAILABLE) from None
        finally:
            db.close()
        if len(points) > cap:
            advice = ("ask for a window (" + ", ".join(window_label(s) for s in cfg.rollups.window_seconds) + ")"
                      if window is None and cfg.rollups.enabled else "ask for a larger window")
            raise QueryError(f"more than {cap} points for {device} {field} between {from_ms} and {to_ms}"
                             f" ([query] history_max_points): narrow the range or {advice}", errors.LIMIT_EXCEEDED)
        self.counters.add("history_points", len(points))
        return {"ok": True, "device": device, "field": field, "window": window, "from": from_ms, "to": to_ms,
                "columns": columns, "points": points}

    # ------------------------------------------------------------------ live feed

    def on_live(self, message: list[bytes]) -> None:
        """A malformed message (or row) is counted, logged once per kind, and ignored: nothing on the
        live socket may take the query worker down or spoil the values it keeps."""
        kind = message[0] if message else b""
        try:
            if kind == envelope.READINGS:
                seen, readings = envelope.parse_live(message[1], message[2])
                bad = self.latest.apply_readings(readings)
                if bad:
                    self._bad_live("bad_live_readings", bad, f"{bad} malformed reading(s) in {message[2][:120]!r}")
                self.counters.add("live_readings", len(readings) - bad if type(readings) is list else 0)
                if self.latest.apply_seen(seen):
                    raise envelope.EnvelopeError(f"bad seen list in {message[1][:120]!r}")
            elif kind == envelope.STATS:
                worker, counters = envelope.parse_stats(message)
                if not isinstance(counters, dict) or not worker:
                    raise envelope.EnvelopeError(f"stats of {worker!r} are not an object of counters")
                previous = self.stats.get(worker)
                if worker.startswith("parser") and (previous is None or previous[1].get("pid") != counters.get("pid")):
                    # A parser (re)started: what it published before its PUB was connected never came,
                    # and is in the store by the time this runs out. Latest values catch up from there.
                    self.resync_at = self.resync_at or time.monotonic() + self.cfg.query.resync_after_s
                self.stats[worker] = (time.monotonic(), counters)
        except (envelope.EnvelopeError, IndexError, ValueError, TypeError, AttributeError) as exc:
            self._bad_live("bad_live_messages", 1, f"{kind[:20]!r} message: {exc}")

    def _bad_live(self, counter: str, n: int, what: str) -> None:
        self.counters.add(counter, n)
        if counter not in self._logged:
            self._logged.add(counter)
            log.warning("ignoring malformed input on the live socket (logged once; counted as %s): %s", counter, what)

    def restore(self) -> None:
        self.counters.add("restores")           # passes made (the first at start, the resyncs after it)
        source = restore_source(self.cfg)
        restorer = RESTORERS.get(source)
        if restorer is None:
            return
        try:
            count = restorer(self.cfg, self.latest)
            log.info("restored %d latest values from %s", count, source)
        except Exception as exc:
            log.warning("could not restore latest values from %s: %s", source, exc)

    # ------------------------------------------------------------------ loop

    def pass_on(self, message: list[bytes], stream: zmq.Socket) -> None:
        """A message from the live feed, taken in and passed on to the live streams when it holds readings."""
        self.on_live(message)
        if message[0] == envelope.READINGS:
            try:
                stream.send_multipart(message, zmq.NOBLOCK)
            except zmq.Again:
                pass

    def take_request(self, message: list[bytes], front: zmq.Socket) -> None:
        if len(message) < 3 or message[-2] != b"":
            self.counters.add("bad_messages")     # not from a REQ socket: nowhere to answer
            return
        front.send_multipart([*message[:-1], self.answer(message[-1])])

    def run(self, ctx: zmq.Context, stop: runtime.StopFlag) -> None:
        cfg = self.cfg
        front = runtime.socket(ctx, zmq.ROUTER, bind=cfg.endpoints.query)
        live = runtime.socket(ctx, zmq.SUB, bind=cfg.endpoints.live, hwm=10000, max_message=runtime.BATCH_MESSAGE_BYTES)
        live.setsockopt(zmq.SUBSCRIBE, envelope.READINGS)
        live.setsockopt(zmq.SUBSCRIBE, envelope.STATS)
        # Readings go on to the HTTP worker's live streams from here, so the parsers publish once, to one
        # place. A PUB drops what no one subscribes to, and drops rather than blocks at its bound.
        stream = runtime.socket(ctx, zmq.PUB, bind=cfg.endpoints.stream, hwm=1000)
        self.restore()          # after subscribing, so nothing falls between the two
        self.resync_at = time.monotonic() + cfg.query.resync_after_s
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(live, zmq.POLLIN)
        log.info("query: answering on %s", cfg.endpoints.query)
        try:
            while not stop:
                events = dict(poller.poll(runtime.POLL_MS))
                if live in events:
                    worker.drain(live, lambda message: self.pass_on(message, stream))
                if front in events:
                    worker.drain(front, lambda message: self.take_request(message, front))
                if self.resync_at and time.monotonic() >= self.resync_at:
                    self.resync_at = 0.0
                    self.restore()
        finally:
            front.close(linger=0)
            live.close(linger=0)
            stream.close(linger=0)
            log.info("query: stopped")


# --------------------------------------------------------------------------- client


def request(endpoint: str, message: dict, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = 1,
            worker: str = "query worker", hint: str = "start it with `sensorpipe run`") -> dict:
    """Ask the query worker, or another REQ/REP worker (Lazy Pirate: a REQ socket that timed out is
    closed, never reused). Raises ``QueryError`` naming ``worker`` when nothing answers."""
    ctx = zmq.Context()
    try:
        payload = orjson.dumps(message)
        for _ in range(retries + 1):
            sock = runtime.socket(ctx, zmq.REQ, connect=endpoint, max_message=runtime.BATCH_MESSAGE_BYTES)
            try:
                sock.send(payload)
                if sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                    return orjson.loads(sock.recv())
            finally:
                sock.close(linger=0)
        tries = f"after {retries + 1} tries of {timeout_s:g} s" if retries else f"in {timeout_s:g} s"
        raise QueryError(f"no answer from the {worker} at {endpoint} {tries}: is the pipeline running? ({hint})",
                         errors.UNAVAILABLE)
    finally:
        ctx.term()


def main(cfg: Config) -> int:
    return worker.serve(lambda ctx, stop: QueryWorker(cfg).run(ctx, stop))
