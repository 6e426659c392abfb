"""The dead-letter store: frames that could not be decoded and readings a sink refused as invalid.

One SQLite file, ``<data>/deadletters.db``, written by the parsers and the sinks (WAL, short
transactions). Each row keeps the raw bytes, where they came from, the reason and the time, so that
``sensorpipe deadletters`` can list them and ``sensorpipe replay`` can feed them through the pipeline
again after a configuration fix. A batch delivered twice adds nothing twice. The store is bounded in
size and age (``[deadletters]``); what the bounds delete is counted, never silent.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple

from workers.core.runtime import open_wal_db
from workers.core.storable import clamp_ts

if TYPE_CHECKING:
    from workers.core.config import Config

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS deadletters (
    id          INTEGER PRIMARY KEY,
    created_ms  INTEGER NOT NULL,
    recv_ts     INTEGER NOT NULL,          -- arrival time of the frame, Unix ns
    source      TEXT NOT NULL,             -- 'edge' (framing), 'parser' (decoding), 'sink:<name>'
    listener    TEXT NOT NULL,
    peer        TEXT NOT NULL,
    device      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    raw         BLOB NOT NULL,
    digest      INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 1,
    replayed_ms INTEGER,
    UNIQUE (source, listener, peer, recv_ts, digest)
);
CREATE INDEX IF NOT EXISTS deadletters_created ON deadletters (created_ms);
CREATE TABLE IF NOT EXISTS dropped (         -- letters deleted by the bounds, counted forever
    why     TEXT PRIMARY KEY,                -- 'age' or 'size'
    letters INTEGER NOT NULL,
    bytes   INTEGER NOT NULL
);
"""

MAX_REASON_CHARS = 500
PRUNE_EVERY_S = 30.0               # how often a writer checks the bounds (and at its first write)
PRUNE_EVERY_LETTERS = 1000         # ... or after this many letters, whichever comes first


class DeadLetter(NamedTuple):
    recv_ts: int
    source: str
    listener: str
    peer: str
    device: str
    reason: str
    raw: bytes


class StoredDeadLetter(NamedTuple):
    id: int
    created_ms: int
    recv_ts: int
    source: str
    listener: str
    peer: str
    device: str
    reason: str
    raw: bytes
    attempts: int
    replayed_ms: int | None


def _digest(raw: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


def _row(now: int, d: DeadLetter) -> tuple:
    """A letter as a row that always fits its columns, whatever came in: a dead letter is where bad
    data goes, so writing one must never fail on it (a timestamp past 64 bits, a reason that is not
    text, raw that is text)."""
    raw = d.raw if isinstance(d.raw, bytes) else bytes(d.raw) if isinstance(d.raw, (bytearray, memoryview)) \
        else str(d.raw).encode("utf-8", "backslashreplace")
    recv_ts = clamp_ts(d.recv_ts) if type(d.recv_ts) is int else 0
    return (now, recv_ts, str(d.source), str(d.listener), str(d.peer), _text(d.device), _text(d.reason)[:MAX_REASON_CHARS],
            raw, _digest(raw))


def _text(value: object) -> str:
    text = value if type(value) is str else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")     # a lone surrogate cannot be stored


class DeadLetterStore:
    """``max_bytes`` and ``max_age_s`` bound the store: past either, the oldest letters are deleted and
    counted in the ``dropped`` table (``dropped()``, shown by ``sensorpipe status``)."""

    def __init__(self, path: Path, max_bytes: int | None = None, max_age_s: float | None = None) -> None:
        self.db = open_wal_db(path, SCHEMA)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._prune_at = 0.0
        self._since_prune = 0

    @classmethod
    def for_config(cls, cfg: "Config") -> "DeadLetterStore":
        return cls(Path(cfg.data_dir) / "deadletters.db", cfg.deadletters.max_bytes,
                   cfg.deadletters.max_age_days * 86400)

    def add(self, letters: Iterable[DeadLetter]) -> int:
        """Store dead letters in one transaction. The same frame again (a redelivered batch, or a
        replay that failed again) updates its row: new reason, one more attempt, not replayed."""
        now = int(time.time() * 1000)
        rows = [_row(now, d) for d in letters]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO deadletters (created_ms, recv_ts, source, listener, peer, device, reason, raw, digest)"
                " VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (source, listener, peer, recv_ts, digest) DO UPDATE SET"
                " reason = excluded.reason,"
                " attempts = attempts + (replayed_ms IS NOT NULL),"
                " replayed_ms = NULL",
                rows)
        self._since_prune += len(rows)
        if self._since_prune >= PRUNE_EVERY_LETTERS or time.monotonic() >= self._prune_at:
            self.prune()
        return len(rows)

    def prune(self, now_ms: int | None = None) -> tuple[int, int]:
        """Delete what is past the bounds, oldest first, and count it: (by age, by size)."""
        self._since_prune, self._prune_at = 0, time.monotonic() + PRUNE_EVERY_S
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        aged = sized = 0
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self.max_age_s is not None:
                cutoff = now_ms - int(self.max_age_s * 1000)
                letters, size = self.db.execute("SELECT count(*), coalesce(sum(length(raw)), 0) FROM deadletters"
                                                " WHERE created_ms < ?", (cutoff,)).fetchone()
                if letters:
                    self.db.execute("DELETE FROM deadletters WHERE created_ms < ?", (cutoff,))
                    self._count_drop("age", letters, size)
                    aged = letters
            if self.max_bytes is not None:
                total = self.db.execute("SELECT coalesce(sum(length(raw)), 0) FROM deadletters").fetchone()[0]
                if total > self.max_bytes:
                    # Oldest first, down to 90 % of the bound so that the next letters do not prune again.
                    excess, letters, size = total - self.max_bytes * 9 // 10, 0, 0
                    last_id = None
                    for row_id, length in self.db.execute("SELECT id, length(raw) FROM deadletters ORDER BY id"):
                        letters, size, last_id = letters + 1, size + length, row_id
                        if size >= excess:
                            break
                    self.db.execute("DELETE FROM deadletters WHERE id <= ?", (last_id,))
                    self._count_drop("size", letters, size)
                    sized = letters
        if aged or sized:
            log.warning("dead letters: deleted %d older than %.3g days and %d past the %s-byte bound"
                        " ([deadletters] in the configuration)", aged, (self.max_age_s or 0) / 86400, sized,
                        self.max_bytes)
        return aged, sized

    def _count_drop(self, why: str, letters: int, size: int) -> None:
        self.db.execute("INSERT INTO dropped VALUES (?, ?, ?) ON CONFLICT (why) DO UPDATE SET"
                        " letters = letters + excluded.letters, bytes = bytes + excluded.bytes", (why, letters, size))

    def dropped(self) -> dict[str, int]:
        """Letters deleted by the bounds since the store was made: {'age': n, 'size': n}."""
        return {why: letters for why, letters in self.db.execute("SELECT why, letters FROM dropped")}

    def stored_bytes(self) -> int:
        return self.db.execute("SELECT coalesce(sum(length(raw)), 0) FROM deadletters").fetchone()[0]

    def list(self, limit: int = 100, include_replayed: bool = False, ids: list[int] | None = None,
             source: str | None = None) -> list[StoredDeadLetter]:
        where, args = [], []
        if not include_replayed:
            where.append("replayed_ms IS NULL")
        if ids:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if source:
            where.append("source = ?")
            args.append(source)
        sql = ("SELECT id, created_ms, recv_ts, source, listener, peer, device, reason, raw, attempts, replayed_ms"
               " FROM deadletters" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id LIMIT ?")
        return [StoredDeadLetter(*row) for row in self.db.execute(sql, (*args, limit))]

    def count(self, include_replayed: bool = False) -> int:
        sql = "SELECT count(*) FROM deadletters" + ("" if include_replayed else " WHERE replayed_ms IS NULL")
        return self.db.execute(sql).fetchone()[0]

    def mark_replayed(self, ids: list[int]) -> None:
        now = int(time.time() * 1000)
        with self.db:
            self.db.executemany("UPDATE deadletters SET replayed_ms = ? WHERE id = ?", [(now, i) for i in ids])

    def close(self) -> None:
        self.db.close()


class ReplayError(Exception):
    """The edge did not take the replayed frames; nothing was marked replayed."""


def replay(store: DeadLetterStore, letters: list[StoredDeadLetter], inject_endpoint: str, timeout_s: float) -> None:
    """Feed ``letters`` through the pipeline again through the edge's inject endpoint, with their own
    arrival times, and mark them replayed once the edge says they are in its journal."""
    import zmq

    from workers.core import envelope, runtime

    conns: list[envelope.Conn] = []
    index: dict[tuple[str, str], int] = {}
    frames = []
    for d in letters:
        key = (d.listener, d.peer)
        if key not in index:
            index[key] = len(conns)
            conns.append(envelope.Conn(0, d.listener, d.peer))
        frames.append((d.raw, d.recv_ts, index[key]))
    ctx = zmq.Context()
    try:
        # REQ to the edge's inject ROUTER: the answer comes once the frames are in the journal
        sock = runtime.socket(ctx, zmq.REQ, connect=inject_endpoint)
        try:
            sock.send_multipart(envelope.inject_message(conns, envelope.pack_frames(frames), ref=1))
            if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                raise ReplayError(f"the edge does not answer at {inject_endpoint}: is the pipeline"
                                  " running? Nothing was marked replayed")
            _, seq, error = envelope.parse_injected(sock.recv_multipart())
        finally:
            sock.close(linger=0)
    finally:
        ctx.term()
    if error is not None:
        raise ReplayError(f"the edge refused the replay: {error}")
    store.mark_replayed([d.id for d in letters])
