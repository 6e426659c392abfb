"""The dead-letter store: frames that could not be decoded and readings a sink refused as invalid.

One SQLite file, ``<data>/deadletters.db``, written by the parsers and the sinks (WAL, short
transactions). Each row keeps the raw bytes, where they came from, the reason and the time, so that
``sensorpipe deadletters`` can list them and ``sensorpipe replay`` can feed them through the pipeline
again after a configuration fix. A batch delivered twice adds nothing twice.
"""
from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Iterable, NamedTuple

from workers.core.runtime import open_wal_db

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
"""


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


class DeadLetterStore:
    def __init__(self, path: Path) -> None:
        self.db = open_wal_db(path, SCHEMA)

    def add(self, letters: Iterable[DeadLetter]) -> int:
        """Store dead letters in one transaction. The same frame again (a redelivered batch, or a
        replay that failed again) updates its row: new reason, one more attempt, not replayed."""
        now = int(time.time() * 1000)
        rows = [(now, d.recv_ts, d.source, d.listener, d.peer, d.device, d.reason, d.raw, _digest(d.raw))
                for d in letters]
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
        return len(rows)

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
