"""MongoDB through pymongo: the state of each device, its events, and (optionally) readings history.

Collections in ``[sinks.mongo] database``::

    latest    {_id: "balcony", last_seen: Date,
               fields: {"temperature": {ts: 1732260000000000000, value: 21.5, time: Date}, ...}}
    events    {_id: '["door-1",1732260000000000000,"verifiedRecordU","9f2c..."]', device: "door-1",
               ts: 1732260000000000000, time: Date, kind: "verifiedRecordU", body: {...the message...}}
    readings  {_id: '["balcony",1732260000000000000]', device: "balcony", ts: ..., time: Date,
               fields: {"temperature": 21.5, ...}, tags: {"place": "balcony"}}     (store_readings = true)
    devices   {_id: "balcony", seen_ts: 1732260000000000000, last_seen: Date, via: "text",
               peer: "10.0.0.7:51234", offline_after_s: 900}     (presence: the newest frame's arrival)
    rollups   {_id: '["balcony","temperature","1m",1732260000000000000]', device: "balcony",
               field: "temperature", window: "1m", start: ..., time: Date,
               count: 60, min: 21.1, max: 21.6, mean: 21.34, last: 21.5, tags: {...}}   (docs/rollups.md)

``ts`` is Unix nanoseconds (int64, exact); ``time`` and ``last_seen`` are the same instant as a BSON
date (milliseconds) for queries and TTL indexes. Indexes, created at start: latest ``last_seen``;
events ``(device, time)`` and ``(kind, time)``; readings ``(device, time)``; devices ``last_seen``; rollups
``(device, field, window, time)``.

latest: one update per device per batch (``bulk_write``), the batch's readings coalesced first. The
update is a pipeline that sets each field only when the stored ``ts`` is not newer, so a reading that
arrives late never overwrites a newer value, whatever the order of writes; ``last_seen`` is the newest
reading's time. Values go in as ``$literal``: a device string such as ``"$fields"`` stays a string.

Idempotent: events and readings have ``_id`` derived from what they are (device, time, kind and a digest
of the body for events: two different scans in one message are two events; the same one delivered
twice is one), written with upserts, so a batch written twice is stored once. A rollup is set whole
on its (device, field, window, start): a corrected window replaces the first one.

Names: MongoDB cannot take ``$`` or ``.`` in field names used as update paths, nor NUL. Field names,
tag keys and event body keys are escaped with a reversible rule (``escape_key``/``unescape_key``):
``%`` -> ``%25``, ``$`` -> ``%24``, ``.`` -> ``%2E``, NUL -> ``%00``, and the empty name -> ``%``
(unambiguous: every other ``%`` is followed by two hex digits). ``temp.c`` is stored as ``temp%2Ec``.

Failures: the server away, a timeout, not primary, authentication -> ``TransientError`` (the readings
wait in the spool); a document MongoDB refuses (a number beyond 64 bits, a document too large, a write
error naming a document) -> ``PermanentError``, isolated by the outbox as a dead letter.
"""
from __future__ import annotations

import hashlib
import logging
import re
from typing import TYPE_CHECKING, Any, Callable, Iterator

import orjson
from bson import Int64
from bson.datetime_ms import DatetimeMS
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, MongoClient, UpdateOne
from pymongo.errors import (AutoReconnect, BulkWriteError, ConnectionFailure, DocumentTooLarge, OperationFailure,
                            PyMongoError, WriteConcernError)

from workers.core.envelope import ROLLUP_TAG, EnvelopeError, rollup_stats
from workers.sinks import Batch, PermanentError, TransientError
from workers.sinks.options import MongoOptions, redact_url

if TYPE_CHECKING:
    from workers.core.config import Config

log = logging.getLogger(__name__)

LATEST = "latest"
EVENTS = "events"
READINGS = "readings"
ROLLUPS = "rollups"
DEVICES = "devices"
INDEXES: dict[str, list[list[tuple[str, int]]]] = {
    LATEST: [[("last_seen", DESCENDING)]],
    EVENTS: [[("device", ASCENDING), ("time", DESCENDING)], [("kind", ASCENDING), ("time", DESCENDING)]],
    READINGS: [[("device", ASCENDING), ("time", DESCENDING)]],
    ROLLUPS: [[("device", ASCENDING), ("field", ASCENDING), ("window", ASCENDING), ("time", DESCENDING)]],
    DEVICES: [[("last_seen", DESCENDING)]],
}
# Server error codes that say "try again later", not "this document is wrong".
TRANSIENT_CODES = {
    6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 50,   # network, shutdown, not primary, timeouts
    11000,            # duplicate key: two upserts of one _id raced; the retry updates
    13, 18,           # unauthorized, authentication failed: the configuration, not the data
    112, 251,         # write conflict, no such transaction
}
# Command-level errors that are about the documents sent (a write error naming a document is always so).
DATA_CODES = {
    2,                # BadValue
    14,               # TypeMismatch
    52, 56, 57,       # DollarPrefixedFieldName, EmptyFieldName, DottedFieldName
    10334, 17419,     # BSONObjectTooLarge, a document grown past 16 MB
}

_ESCAPES = str.maketrans({"%": "%25", "$": "%24", ".": "%2E", "\x00": "%00"})
_ESCAPED = re.compile("%([0-9A-F]{2})")


def escape_key(name: str) -> str:
    """A device's name made safe as a MongoDB field name; ``unescape_key`` reverses it."""
    if not name:
        return "%"
    if "%" in name or "$" in name or "." in name or "\x00" in name:
        return name.translate(_ESCAPES)
    return name


def unescape_key(key: str) -> str:
    if "%" not in key:
        return key
    if key == "%":
        return ""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), key)


def escape_document(value: Any) -> Any:
    """``value`` (an event body) with every key escaped, at any depth."""
    if isinstance(value, dict):
        return {escape_key(str(k)): escape_document(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_document(v) for v in value]
    return value


def unescape_document(value: Any) -> Any:
    if isinstance(value, dict):
        return {unescape_key(k): unescape_document(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape_document(v) for v in value]
    return value


def event_id(device: str, ts: int, kind: str, body: dict) -> str:
    digest = hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()
    return orjson.dumps([device, ts, kind, digest]).decode()


def rollup_id(device: str, field: str, window: str, start: int) -> str:
    return orjson.dumps([device, field, window, start]).decode()


def reading_id(device: str, ts: int) -> str:
    return orjson.dumps([device, ts]).decode()


def _date(ts: int) -> DatetimeMS:
    return DatetimeMS(ts // 1_000_000)


def client_for(opts: MongoOptions) -> MongoClient:
    """A client that gives up on an absent server after ``connect_timeout_s`` and does not retry on its
    own (the outbox retries). Making it does not touch the network."""
    return MongoClient(
        opts.url,
        serverSelectionTimeoutMS=int(opts.connect_timeout_s * 1000),
        connectTimeoutMS=int(opts.connect_timeout_s * 1000),
        socketTimeoutMS=int(opts.timeout_s * 1000),
        retryWrites=False, retryReads=False, tz_aware=True, appname="sensorpipe")


def latest_values(opts: MongoOptions) -> Iterator[tuple[str, str, Any, int]]:
    """(device, field, value, ts) for every field in ``latest``, names unescaped (the query worker's restore)."""
    client = client_for(opts)
    try:
        for doc in client[opts.database][LATEST].find({}, {"fields": 1}):
            for key, entry in (doc.get("fields") or {}).items():
                if isinstance(entry, dict) and "ts" in entry:
                    yield str(doc["_id"]), unescape_key(key), entry.get("value"), int(entry["ts"])
    finally:
        client.close()


class MongoSink:
    name = "mongo"
    takes_rollups = True

    def __init__(self, opts: MongoOptions, offline_after_s: Callable[[str], float] | None = None) -> None:
        self.opts = opts
        self.offline_after_s = offline_after_s or (lambda device: 900.0)
        self.client: MongoClient | None = None
        self.indexed = False

    @classmethod
    def from_config(cls, cfg: Config) -> "MongoSink":
        return cls(cfg.sinks.mongo, cfg.offline_after_s)

    def connect(self) -> None:
        self.client = client_for(self.opts)
        log.info("mongo: writing to %s, database %r", redact_url(self.opts.url), self.opts.database)
        try:
            self._ensure_indexes()
        except TransientError as exc:
            log.warning("%s; indexes will be made on the first write that reaches the server", exc)

    def write(self, batch: Batch) -> None:
        if self.client is None:
            raise TransientError("mongo: not connected")
        try:
            self._ensure_indexes()
            db = self.client[self.opts.database]
            readings = [r for r in batch.readings if ROLLUP_TAG not in r.tags]
            if len(readings) < len(batch.readings):
                rollups = [r for r in batch.readings if ROLLUP_TAG in r.tags]
                db[ROLLUPS].bulk_write(self.rollup_upserts(rollups), ordered=False)
            if readings:
                db[LATEST].bulk_write(self.latest_updates(readings), ordered=False)
                if self.opts.store_readings:
                    db[READINGS].bulk_write(self.reading_upserts(readings), ordered=False)
            if batch.events:
                db[EVENTS].bulk_write(self.event_upserts(batch.events), ordered=False)
            if batch.seen:
                db[DEVICES].bulk_write(self.presence_updates(batch.seen), ordered=False)
        except BulkWriteError as exc:
            raise _classify_bulk(exc) from None
        except (AutoReconnect, ConnectionFailure, WriteConcernError) as exc:
            raise TransientError(f"mongo: {redact_url(self.opts.url)} unreachable: {_short(exc)}") from None
        except (BSONError, OverflowError, DocumentTooLarge) as exc:
            raise PermanentError(f"mongo: cannot store: {_short(exc)}") from None
        except OperationFailure as exc:
            raise _classify_code(exc.code, _short(exc)) from None
        except PyMongoError as exc:
            raise TransientError(f"mongo: {_short(exc)}") from None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # ------------------------------------------------------------------ documents

    @staticmethod
    def latest_updates(readings: list) -> list[UpdateOne]:
        newest: dict[str, dict[str, tuple[int, Any]]] = {}
        last_seen: dict[str, int] = {}
        for device, ts, fields, _tags in readings:
            known = newest.get(device)
            if known is None:
                known = newest[device] = {}
            for name, value in fields.items():
                seen = known.get(name)
                if seen is None or ts >= seen[0]:
                    known[name] = (ts, value)
            if ts > last_seen.get(device, ts - 1):
                last_seen[device] = ts
        updates = []
        for device, fields in newest.items():
            assignments: dict[str, Any] = {}
            for name, (ts, value) in fields.items():
                path = "fields." + escape_key(name)
                # set only when the stored value is not newer; a missing field counts as older than anything
                assignments[path] = {"$cond": [
                    {"$gte": [Int64(ts), {"$ifNull": ["$" + path + ".ts", Int64(-2 ** 63)]}]},
                    {"$literal": {"ts": Int64(ts), "value": value, "time": _date(ts)}},
                    "$" + path,
                ]}
            assignments["last_seen"] = {"$max": ["$last_seen", {"$literal": _date(last_seen[device])}]}
            updates.append(UpdateOne({"_id": device}, [{"$set": assignments}], upsert=True))
        return updates

    @staticmethod
    def reading_upserts(readings: list) -> list[UpdateOne]:
        merged: dict[tuple[str, int], tuple[dict, dict]] = {}
        for device, ts, fields, tags in readings:
            entry = merged.get((device, ts))
            if entry is None:
                entry = merged[(device, ts)] = ({}, tags)
            entry[0].update(fields)
        return [UpdateOne({"_id": reading_id(device, ts)},
                          {"$set": {"fields." + escape_key(k): v for k, v in fields.items()},
                           "$setOnInsert": {"device": device, "ts": Int64(ts), "time": _date(ts),
                                            "tags": escape_document(tags)}},
                          upsert=True)
                for (device, ts), (fields, tags) in merged.items()]

    def presence_updates(self, seen: list) -> list[UpdateOne]:
        """One update per device: set only when this arrival is not older than the stored one."""
        newest: dict[str, Any] = {}
        for entry in seen:
            if entry.device not in newest or entry.ts >= newest[entry.device].ts:
                newest[entry.device] = entry
        updates = []
        for device, entry in newest.items():
            newer = {"$gte": [Int64(entry.ts), {"$ifNull": ["$seen_ts", Int64(-2 ** 63)]}]}
            values = {"seen_ts": Int64(entry.ts), "last_seen": _date(entry.ts), "via": entry.listener,
                      "peer": entry.peer, "offline_after_s": float(self.offline_after_s(device))}
            updates.append(UpdateOne({"_id": device}, [{"$set": {
                key: {"$cond": [newer, {"$literal": value}, "$" + key]} for key, value in values.items()}}],
                upsert=True))
        return updates

    @staticmethod
    def rollup_upserts(rollups: list) -> list[UpdateOne]:
        updates = []
        for reading in rollups:
            window = reading.tags[ROLLUP_TAG]
            try:
                stats = rollup_stats(reading)
            except EnvelopeError as exc:
                raise PermanentError(f"mongo: {exc}") from None
            tags = escape_document({k: v for k, v in reading.tags.items() if k != ROLLUP_TAG})
            for field, values in stats.items():
                updates.append(UpdateOne(
                    {"_id": rollup_id(reading.device, field, window, reading.ts)},
                    {"$set": {"device": reading.device, "field": field, "window": window,
                              "start": Int64(reading.ts), "time": _date(reading.ts), "tags": tags,
                              **values._asdict()}},
                    upsert=True))
        return updates

    @staticmethod
    def event_upserts(events: list) -> list[UpdateOne]:
        return [UpdateOne({"_id": event_id(device, ts, kind, body)},
                          {"$setOnInsert": {"device": device, "ts": Int64(ts), "time": _date(ts), "kind": kind,
                                            "body": escape_document(body)}},
                          upsert=True)
                for device, ts, kind, body in events]

    # ------------------------------------------------------------------ internals

    def _ensure_indexes(self) -> None:
        if self.indexed:
            return
        assert self.client is not None
        db = self.client[self.opts.database]
        collections = [LATEST, EVENTS, ROLLUPS, DEVICES] + ([READINGS] if self.opts.store_readings else [])
        try:
            for collection in collections:
                for keys in INDEXES[collection]:
                    db[collection].create_index(keys)
        except (AutoReconnect, ConnectionFailure) as exc:
            raise TransientError(f"mongo: {redact_url(self.opts.url)} unreachable: {_short(exc)}") from None
        except OperationFailure as exc:
            raise _classify_code(exc.code, f"creating indexes: {_short(exc)}", transient=True) from None
        self.indexed = True


def _classify_bulk(exc: BulkWriteError) -> Exception:
    errors = exc.details.get("writeErrors") or []
    codes = {e.get("code") for e in errors}
    first = errors[0].get("errmsg", "") if errors else str(exc)
    message = f"mongo: {len(errors)} write error(s), codes {sorted(c for c in codes if c is not None)}: {first[:300]}"
    if errors and not codes <= TRANSIENT_CODES:
        return PermanentError(message)
    return TransientError(message)


def _classify_code(code: int | None, message: str, transient: bool = False) -> Exception:
    """A command-level failure: the server's state or our configuration, so transient unless the code
    is known to be about the data (and even then transient for index creation)."""
    if transient or code is None or code in TRANSIENT_CODES:
        return TransientError(f"mongo: {message}")
    if code in DATA_CODES:
        return PermanentError(f"mongo: {message}")
    return TransientError(f"mongo: {message}")


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text[:300] + ("..." if len(text) > 300 else "")
