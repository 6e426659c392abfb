"""The devices the pipeline takes readings from: at most ``[limits] max_devices`` of them.

Every device id a frame names costs something in every store (a row in ``latest`` and ``devices``, a
series in InfluxDB, a document in MongoDB), and a device id is whatever a sender writes. So the set
of devices is bounded: the parsers share ``<data>/knowndevices.db``, and a frame naming a device
beyond the bound is set aside as a dead letter (replay it after raising the bound), counted as
``devices_over_cap``. Devices already known are never refused.
"""
from __future__ import annotations

import time
from pathlib import Path

from workers.core.runtime import open_wal_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS known_devices (device TEXT PRIMARY KEY, first_ms INTEGER NOT NULL) WITHOUT ROWID;
"""
FULL_RECHECK_S = 5.0          # once full, new ids are refused without counting the table for this long


class KnownDevices:
    def __init__(self, path: Path, limit: int) -> None:
        self.db = open_wal_db(path, SCHEMA)
        self.limit = limit
        self.known: set[str] = set()             # admitted, cached (at most ``limit``)
        self._full_until = 0.0

    def admit(self, device: str) -> bool:
        """True if ``device`` is known, or is new and within the bound (then it is known from now on)."""
        if device in self.known:
            return True
        if self.db.execute("SELECT 1 FROM known_devices WHERE device = ?", (device,)).fetchone():
            self.known.add(device)
            return True
        if time.monotonic() < self._full_until:
            return False
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")         # parsers admit at once: the count must hold for all
            admitted = self.db.execute(
                "INSERT OR IGNORE INTO known_devices SELECT ?, ? WHERE (SELECT count(*) FROM known_devices) < ?",
                (device, int(time.time() * 1000), self.limit)).rowcount
        if not admitted and not self.db.execute("SELECT 1 FROM known_devices WHERE device = ?", (device,)).fetchone():
            self._full_until = time.monotonic() + FULL_RECHECK_S
            return False
        self.known.add(device)
        return True

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM known_devices").fetchone()[0]

    def close(self) -> None:
        self.db.close()
