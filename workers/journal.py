"""The edge's journal: every batch of frames is written here before any device is acknowledged.

Segments are append-only files ``<first seq>.jnl`` in ``<data>/journal``. A record is
``<IQI`` (payload length, seq, CRC-32 of the payload) and the payload. ``write()`` reaches the kernel
before it returns, so a SIGKILL of any process loses nothing that was acknowledged; ``fsync`` (per batch,
per interval, or never) is what protects against power loss, at a measured cost (docs/operations.md).

A segment is deleted once every batch in it has been acknowledged by every sink. On start, every record
still in the journal is replayed; a torn record at the end (a crash mid-write) is cut off.
"""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

RECORD = struct.Struct("<IQI")
SUFFIX = ".jnl"


@dataclass
class Segment:
    first_seq: int
    path: Path
    size: int = 0
    open_seqs: set[int] = field(default_factory=set)   # written, not yet acknowledged by every sink


@dataclass(frozen=True)
class Location:
    segment: int        # first_seq of the segment
    offset: int
    length: int


class JournalError(RuntimeError):
    pass


class Journal:
    def __init__(self, directory: Path, segment_bytes: int, fsync: str = "interval",
                 fsync_interval_s: float = 0.2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync_policy = fsync
        self.fsync_interval_s = fsync_interval_s
        self.segments: dict[int, Segment] = {}
        self.current: Segment | None = None
        self._fd = -1
        self._dirty = False
        self._last_fsync = time.monotonic()
        self.next_seq = 1
        self.fsyncs = 0

    # ------------------------------------------------------------------ start

    def recover(self) -> Iterator[tuple[int, bytes, Location]]:
        """Open the journal; yield (seq, payload, location) of every record left to replay."""
        paths = sorted(self.directory.glob("*" + SUFFIX))
        for path in paths:
            try:
                first = int(path.stem)
            except ValueError:
                log.warning("journal: ignoring stray file %s", path)
                continue
            seg = Segment(first, path)
            self.segments[first] = seg
            self.next_seq = max(self.next_seq, first)
            good = 0
            with open(path, "rb") as fh:
                data = fh.read()
            while good + RECORD.size <= len(data):
                length, seq, crc = RECORD.unpack_from(data, good)
                start = good + RECORD.size
                payload = data[start:start + length]
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break
                seg.open_seqs.add(seq)
                self.next_seq = max(self.next_seq, seq + 1)
                yield seq, payload, Location(first, good, RECORD.size + length)
                good = start + length
            if good < len(data):
                log.warning("journal: %s: cutting %d bytes of a torn record at offset %d",
                            path.name, len(data) - good, good)
                os.truncate(path, good)
            seg.size = good
        self._roll()

    # ------------------------------------------------------------------ writing

    def append(self, payload: bytes) -> tuple[int, Location]:
        """Write one record; return its seq and where it is. Reaches the kernel before returning."""
        assert self.current is not None, "call recover() first"
        if self.current.size >= self.segment_bytes:
            self._roll()
        seg = self.current
        seq = self.next_seq
        self.next_seq += 1
        record = RECORD.pack(len(payload), seq, zlib.crc32(payload)) + payload
        offset = seg.size
        written = os.write(self._fd, record)
        while written < len(record):                      # os.write may be partial on some filesystems
            written += os.write(self._fd, record[written:])
        seg.size += len(record)
        seg.open_seqs.add(seq)
        self._dirty = True
        if self.fsync_policy == "batch":
            self.sync()
        return seq, Location(seg.first_seq, offset, len(record))

    def sync(self) -> None:
        if self._dirty and self._fd >= 0:
            os.fdatasync(self._fd)
            self.fsyncs += 1
            self._dirty = False
        self._last_fsync = time.monotonic()

    def tick(self) -> None:
        """Called from the edge's loop: fsync on the interval policy."""
        if self.fsync_policy == "interval" and self._dirty \
                and time.monotonic() - self._last_fsync >= self.fsync_interval_s:
            self.sync()

    def read(self, location: Location) -> tuple[int, bytes]:
        seg = self.segments[location.segment]
        with open(seg.path, "rb") as fh:
            fh.seek(location.offset)
            data = fh.read(location.length)
        length, seq, crc = RECORD.unpack_from(data, 0)
        payload = data[RECORD.size:RECORD.size + length]
        if zlib.crc32(payload) != crc:
            raise JournalError(f"journal record {seq} in {seg.path.name} is corrupt")
        return seq, payload

    # ------------------------------------------------------------------ trimming

    def done(self, location: Location, seq: int) -> None:
        """Every sink has this batch: its segment may go once nothing in it is open."""
        seg = self.segments.get(location.segment)
        if seg is None:
            return
        seg.open_seqs.discard(seq)
        if not seg.open_seqs:
            if seg is self.current:
                if seg.size >= self.segment_bytes // 4:
                    self._roll()                           # start afresh so the old one can go
                else:
                    return
            self._delete(seg)

    @property
    def size(self) -> int:
        return sum(seg.size for seg in self.segments.values())

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def _roll(self) -> None:
        old = self.current
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
        first = self.next_seq
        path = self.directory / f"{first:016d}{SUFFIX}"
        if first in self.segments:            # reopening the (empty or partial) last segment
            seg = self.segments[first]
        else:
            seg = Segment(first, path)
            self.segments[first] = seg
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.current = seg
        self._fsync_dir()
        if old is not None and old is not seg and not old.open_seqs:
            self._delete(old)

    def _delete(self, seg: Segment) -> None:
        if seg is self.current:
            return
        self.segments.pop(seg.first_seq, None)
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
