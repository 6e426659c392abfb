"""The edge's journal: every batch of frames is written here before any device is acknowledged.

Segments are append-only files ``<first seq>.jnl`` in ``<data>/journal``. A record is
``<IQI`` (payload length, seq, CRC-32 of the payload) and the payload. ``append()`` reaches the kernel
before it returns, so a SIGKILL of any process loses nothing that was acknowledged; ``fsync`` (per batch,
per interval, or never) is what protects against power loss, at a measured cost (docs/durability.md).

A segment is deleted once every batch in it has been acknowledged by every sink. Which batches are
still waiting for which sinks is checkpointed to ``acked.json`` (``checkpoint()``, about once a
second), so that a restart replays only what some sink is still missing, and only to those sinks.
The checkpoint may be older than the truth, never newer: an old one only means more replay, and
sinks write idempotently. On start, a torn record at the end of a segment (a crash mid-write) is cut
off, and seqs continue after the highest one ever written or checkpointed, so a seq always names the
same batch (late acks from before a restart stay right).
"""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, NamedTuple

import orjson

log = logging.getLogger(__name__)

RECORD = struct.Struct("<IQI")
SUFFIX = ".jnl"
CHECKPOINT = "acked.json"


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


class Replay(NamedTuple):
    """A batch found in the journal on start that some sinks have not acknowledged."""
    seq: int
    location: Location
    missing: frozenset[str]     # the sinks that still need it


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
        self.torn_bytes = 0              # cut off on recovery (a record a crash left half-written)
        self.skipped_on_recovery = 0     # records the checkpoint showed acknowledged by every sink
        # a file written along with the journal (the guard's known counters): fsynced with it
        self.companion: Callable[[], None] | None = None

    # ------------------------------------------------------------------ start

    def recover(self, sinks: Collection[str]) -> list[Replay]:
        """Open the journal; return the batches some of ``sinks`` still miss, in seq order."""
        everyone = frozenset(sinks)
        saved_next, saved_pending = self._load_checkpoint()
        replay: list[Replay] = []
        for path in sorted(self.directory.glob("*" + SUFFIX)):
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
                self.next_seq = max(self.next_seq, seq + 1)
                if seq < saved_next:
                    missing = saved_pending.get(seq, frozenset()) & everyone
                else:
                    missing = everyone          # written after the checkpoint: nobody has acknowledged it
                if missing:
                    seg.open_seqs.add(seq)
                    replay.append(Replay(seq, Location(first, good, RECORD.size + length), missing))
                else:
                    self.skipped_on_recovery += 1
                good = start + length
            if good < len(data):
                log.warning("journal: %s: cutting %d bytes of a torn record at offset %d (a write cut short"
                            " by a crash; it was never acknowledged to anyone)", path.name, len(data) - good, good)
                os.truncate(path, good)
                self.torn_bytes += len(data) - good
            seg.size = good
        self.next_seq = max(self.next_seq, saved_next)
        self._roll()
        for seg in list(self.segments.values()):       # nothing left to replay in it: it can go
            if not seg.open_seqs:
                self._delete(seg)
        replay.sort()
        return replay

    def _load_checkpoint(self) -> tuple[int, dict[int, frozenset[str]]]:
        """(next seq when it was written, seq -> sinks missing it); (0, {}) when there is none."""
        path = self.directory / CHECKPOINT
        try:
            state = orjson.loads(path.read_bytes())
            pending: dict[int, frozenset[str]] = {}
            for first, last, sinks in state["pending"]:
                names = frozenset(str(s) for s in sinks)
                for seq in range(int(first), int(last) + 1):
                    pending[seq] = names
            return int(state["next_seq"]), pending
        except FileNotFoundError:
            return 0, {}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("journal: ignoring an unreadable %s (%s): replaying every batch to every sink", path, exc)
            return 0, {}

    # ------------------------------------------------------------------ writing

    def append(self, payload: bytes) -> tuple[int, Location]:
        """Write one record; return its seq and where it is. Reaches the kernel before returning.

        On a failed write (disk full, I/O error) the segment is cut back to where it was and the error
        raised: the journal never keeps half a record in front of good ones."""
        assert self.current is not None, "call recover() first"
        if self.current.size >= self.segment_bytes:
            self._roll()
        seg = self.current
        seq = self.next_seq
        record = RECORD.pack(len(payload), seq, zlib.crc32(payload)) + payload
        offset = seg.size
        try:
            written = os.write(self._fd, record)
            while written < len(record):                  # os.write may be partial on some filesystems
                written += os.write(self._fd, record[written:])
        except OSError:
            try:
                os.ftruncate(self._fd, offset)
            except OSError:
                log.exception("journal: could not cut %s back to %d bytes", seg.path.name, offset)
            raise
        self.next_seq += 1
        seg.size += len(record)
        seg.open_seqs.add(seq)
        self._dirty = True
        if self.fsync_policy == "batch":
            self.sync()
        return seq, Location(seg.first_seq, offset, len(record))

    def sync(self) -> None:
        if self._dirty and self._fd >= 0:
            os.fdatasync(self._fd)
            if self.companion is not None:
                self.companion()
            self.fsyncs += 1
            self._dirty = False
        self._last_fsync = time.monotonic()

    def tick(self) -> None:
        """Called from the edge's loop: fsync on the interval policy."""
        if self.fsync_policy == "interval" and self._dirty \
                and time.monotonic() - self._last_fsync >= self.fsync_interval_s:
            self.sync()

    def read(self, location: Location) -> tuple[int, bytes]:
        seg = self.segments.get(location.segment)
        if seg is None:
            raise JournalError(f"journal segment {location.segment} is gone")
        with open(seg.path, "rb") as fh:
            fh.seek(location.offset)
            data = fh.read(location.length)
        if len(data) < RECORD.size:
            raise JournalError(f"journal record at {seg.path.name}:{location.offset} is cut short")
        length, seq, crc = RECORD.unpack_from(data, 0)
        payload = data[RECORD.size:RECORD.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise JournalError(f"journal record {seq} in {seg.path.name} is corrupt")
        return seq, payload

    # ------------------------------------------------------------------ acknowledgements and trimming

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

    def checkpoint(self, pending: Iterable[tuple[int, Collection[str]]]) -> None:
        """Record which batches are unacknowledged, and by which sinks: every (seq, sinks missing it).

        Every seq below ``next_seq`` that is not listed counts as acknowledged by every sink, so pass
        all of them. Consecutive seqs missing the same sinks are stored as one run."""
        runs: list[list] = []
        for seq, sinks in pending:
            if runs and runs[-1][1] == seq - 1 and runs[-1][2] == sinks:
                runs[-1][1] = seq
            else:
                runs.append([seq, seq, sinks])
        data = orjson.dumps({"next_seq": self.next_seq,
                             "pending": [[first, last, sorted(sinks)] for first, last, sinks in runs]})
        path = self.directory / CHECKPOINT
        tmp = path.with_name(CHECKPOINT + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)      # a reader sees the old file or the new one, never half of one

    @property
    def size(self) -> int:
        return sum(seg.size for seg in self.segments.values())

    def close(self) -> None:
        if self._fd >= 0:
            if self.fsync_policy != "never":
                self.sync()
            os.close(self._fd)
            self._fd = -1

    def _roll(self) -> None:
        old = self.current
        if self._fd >= 0:
            if self.fsync_policy != "never":
                self.sync()
            os.close(self._fd)
            self._fd = -1
        first = self.next_seq
        path = self.directory / f"{first:016d}{SUFFIX}"
        if first in self.segments:            # reopening the (empty or partial) last segment
            seg = self.segments[first]
        else:
            seg = Segment(first, path)
            self.segments[first] = seg
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.current = seg
        if self.fsync_policy != "never":
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
