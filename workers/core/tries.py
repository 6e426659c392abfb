"""The poison-batch rule: how often workers began a batch and did not finish it, kept on disk.

A batch some worker cannot get through (a bug the data triggers, a value a library chokes on) must
not stop the pipeline: the edge would send it again forever, and the good readings that share it
would never be stored. So a worker notes each try before it starts (``begin``) and clears the note
when the batch is through (``done``). The notes are files under ``<data>/tries/<role>/``, so a try
that killed the process still counts after supervisord restarts it, and a batch that the edge
redelivers to another parser counts on. After ``[limits] batch_tries`` tries the worker narrows the
batch down to the frames or readings at fault and sets those aside as dead letters with the error;
what it cannot narrow (the worker died even while narrowing) is set aside whole. Either way it is
counted and acknowledged, and the pipeline moves on.

A note is a file whose name is the batch's key (its seq) and whose content is the count. Notes left
by batches that later went through another way (a parser died, another finished the batch) are
removed when they are older than ``STALE_AFTER_S``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

STALE_AFTER_S = 24 * 3600.0
SWEEP_EVERY_S = 600.0


class BatchTries:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir = str(directory)
        self._sweep_at = 0.0

    @classmethod
    def for_role(cls, data_dir: str | Path, role: str) -> "BatchTries":
        return cls(Path(data_dir) / "tries" / role)

    def _path(self, key: int | str) -> str:
        return os.path.join(self._dir, str(key))      # os calls, not pathlib: every batch of every worker

    def count(self, key: int | str) -> int:
        """Tries noted for ``key`` and not finished."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError:
            return 0
        try:
            return int(os.read(fd, 32) or 0)
        except (OSError, ValueError):
            return 0
        finally:
            os.close(fd)

    def begin(self, keys: Iterable[int | str]) -> int:
        """Note one more try of the batch made of ``keys``; returns the most tries any of them has had,
        this one included."""
        most = 0
        for key in keys:
            tries = self.count(key) + 1
            path = self._path(key)
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, str(tries).encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)           # a kill mid-write leaves the old count, never a torn one
            most = max(most, tries)
        now = time.monotonic()
        if now >= self._sweep_at:
            self._sweep_at = now + SWEEP_EVERY_S
            self.sweep()
        return most

    def done(self, keys: Iterable[int | str]) -> None:
        for key in keys:
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass

    def sweep(self, older_than_s: float = STALE_AFTER_S) -> int:
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.directory.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
