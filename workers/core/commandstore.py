"""The commands worker's command store (``<data>/commands.db``): open commands and finished ones for a
while, and the devices met and where they were reached. Pure state: no sockets (tests/test_commandstore.py);
the worker (``workers.processes.commands``) decides what to send and when.
"""
from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import orjson

QUEUED, DELIVERED, ACKED, FAILED, EXPIRED, CANCELLED = "queued", "delivered", "acked", "failed", "expired", "cancelled"

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, payload TEXT NOT NULL, created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL, delivered_ms INTEGER,
    via TEXT, error TEXT, done_ms INTEGER
);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device, created_ms);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, last_seen INTEGER NOT NULL, listener TEXT, conn_id INTEGER, peer TEXT,
    acks INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""


@dataclass
class Command:
    id: str
    device: str
    payload: bytes                    # the JSON object the device gets, "id" first
    created_ms: int
    expires_ms: int
    state: str = QUEUED
    attempts: int = 0
    delivered_ms: int | None = None
    via: str = ""
    error: str | None = None
    done_ms: int | None = None
    delivered_on: tuple[str, int] | None = None   # (listener, conn_id) of the last delivery
    inflight: int = 0                             # ref of a delivery under way

    def row(self) -> tuple:
        return (self.id, self.device, self.payload.decode(), self.created_ms, self.expires_ms, self.state,
                self.attempts, self.delivered_ms, self.via, self.error, self.done_ms)

    def describe(self) -> dict:
        return {"id": self.id, "device": self.device, "command": orjson.loads(self.payload), "status": self.state,
                "created": self.created_ms, "expires": self.expires_ms, "attempts": self.attempts,
                "delivered": self.delivered_ms, "via": self.via, "error": self.error}


@dataclass
class Route:
    listener: str
    conn_id: int
    peer: str

    @property
    def mqtt(self) -> bool:
        return self.listener.startswith("mqtt:")

    def describe(self) -> str:
        return f"{self.listener} {self.peer}"


@dataclass
class DeviceState:
    last_seen: int                     # arrival of its newest frame, Unix ns
    route: Route | None = None         # None: only seen where commands cannot go (a binary port)
    acks: bool = False                 # it has acknowledged a command: it gets unacknowledged ones again
    dirty: bool = False
    saved_seen: int = field(default=0, compare=False)   # the last_seen the store holds


SELECT_COMMANDS = ("SELECT id, device, payload, created_ms, expires_ms, state, attempts, delivered_ms, via, error,"
                   " done_ms FROM commands")


def _command(row: tuple) -> Command:
    return Command(row[0], row[1], row[2].encode(), *row[3:])


class CommandStore:
    """``<data>/commands.db``: open commands and finished ones for a while, and the devices met."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Many saves in one transaction (an update queues a command per chunk: one commit, not 160)."""
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")     # what was queued before a failure is in memory too: keep it

    def save(self, command: Command) -> None:
        self.db.execute("INSERT OR REPLACE INTO commands VALUES (?,?,?,?,?,?,?,?,?,?,?)", command.row())

    def open_commands(self) -> list[Command]:
        rows = self.db.execute(SELECT_COMMANDS + " WHERE state IN (?, ?) AND done_ms IS NULL ORDER BY created_ms",
                               (QUEUED, DELIVERED)).fetchall()
        return [_command(r) for r in rows]

    def get(self, command_id: str) -> Command | None:
        row = self.db.execute(SELECT_COMMANDS + " WHERE id = ?", (command_id,)).fetchone()
        return _command(row) if row else None

    def listing(self, device: str | None, limit: int) -> list[Command]:
        if device:
            rows = self.db.execute(SELECT_COMMANDS + " WHERE device = ? ORDER BY created_ms DESC LIMIT ?",
                                   (device, limit)).fetchall()
        else:
            rows = self.db.execute(SELECT_COMMANDS + " ORDER BY created_ms DESC LIMIT ?", (limit,)).fetchall()
        return [_command(r) for r in rows]

    def save_devices(self, devices: dict[str, DeviceState]) -> None:
        rows = [(d, s.last_seen, s.route.listener if s.route else None, s.route.conn_id if s.route else None,
                 s.route.peer if s.route else None, int(s.acks)) for d, s in devices.items()]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO devices VALUES (?,?,?,?,?,?)", rows)

    def devices(self) -> dict[str, DeviceState]:
        out = {}
        for device, last_seen, listener, conn_id, peer, acks in self.db.execute("SELECT * FROM devices"):
            route = Route(listener, conn_id, peer) if listener else None
            out[device] = DeviceState(last_seen, route, bool(acks), saved_seen=last_seen)
        return out

    def prune(self, before_ms: int) -> int:
        return self.db.execute("DELETE FROM commands WHERE done_ms IS NOT NULL AND done_ms < ?", (before_ms,)).rowcount

    def close(self) -> None:
        self.db.close()
