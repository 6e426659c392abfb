"""Batching, spooling and retries for every sink: the one place they live.

Readings are gathered into a batch and written when the batch is full (``batch_size``) or old enough
(``flush_interval_ms``). What happens to a batch:

- written: the batch's seqs are acknowledged to the edge;
- the server is away (``TransientError``): the batch goes to this sink's spool on disk and is
  acknowledged (the spool is durable); the spool is written back in order, oldest first, with
  exponential backoff and jitter, honouring the server's Retry-After. While the spool holds anything,
  new batches queue behind it so order is kept;
- refused as invalid (``PermanentError``): split in halves until the bad readings are isolated; those
  go to the dead-letter store (``source = sink:<name>``), the rest is written. If the server goes away
  half way, only what is neither written nor set aside is spooled, so nothing is written or set aside
  twice;
- too large (``BatchTooLarge``): split in halves and written;
- failing in a way the sink does not classify (a bug, a value a library chokes on): not acknowledged,
  so the edge sends it again; each try is noted on disk (``workers.core.tries``, so a try that killed
  the worker counts too). The ``[limits] batch_tries``-th try splits it like a refused batch, and what
  is at fault is set aside as dead letters with the error; if even that try killed the worker, the
  next sets the batch aside whole. A spooled batch that fails so is retried like an outage, and its
  last try is the careful one too;
- still failing after ``max_attempts`` tries (when set; the webhook sink sets 10): set aside whole
  as dead letters (``source = sink:<name>``, reason ``gave up after N attempts: <last error>``), so one
  endpoint that never comes back does not hold everything behind it. Attempts are counted from this
  process's start: a restart gives a spooled batch its full count again.

The spool is bounded (``spool_max_bytes``). At the bound, ``spool_full = "block"`` (the default) stops
acknowledging and stops taking input, so the edge holds the data in its journal and, at its own bound,
stops reading devices; ``"drop-oldest"`` deletes the oldest spooled batch, logs it and counts it in
``spool_dropped``. Either way nothing is lost without a log line and a counter.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import orjson

from workers.core import starts
from workers.core.config import DEFAULT_BATCH_TRIES, SinkCommon
from workers.core.deadletters import DeadLetter, DeadLetterStore
from workers.core.envelope import Event, Reading, Seen
from workers.core.latency import observe_stored
from workers.core.runtime import Counters
from workers.core.tries import BatchTries
from workers.core.worker import Backoff
from workers.sinks import Batch, BatchTooLarge, PermanentError, Sink, SinkError, TransientError

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".batch"
DRAIN_BUDGET_S = 0.5         # time a tick may spend writing spooled batches back


def encode_batch(batch: Batch) -> bytes:
    parts = [[tuple(r) for r in batch.readings], [tuple(e) for e in batch.events]]
    if batch.seen:
        parts.append([tuple(s) for s in batch.seen])
    return orjson.dumps(parts)


def decode_batch(data: bytes) -> Batch:
    readings, events, *rest = orjson.loads(data)
    seen = [Seen(*s) for s in rest[0]] if rest else []
    return Batch([Reading(*r) for r in readings], [Event(*e) for e in events], seen)


class Spool:
    """Batches a sink could not write yet, one file each, in order; survives restarts.

    A file is named ``<number>.<readings>.<events>.batch``: the number keeps the order, the counts let
    ``status`` say how much waits here without reading the files back.
    """

    def __init__(self, directory: Path, fsync: bool = True) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        for stale in self.directory.glob("*.tmp"):        # a write cut short by a kill
            stale.unlink()
        self.files = sorted(self.directory.glob("*" + SPOOL_SUFFIX))
        self.bytes = sum(f.stat().st_size for f in self.files)
        self.readings = 0                                 # readings spooled since start (a counter)
        self.corrupt = 0                                  # spool files that could not be read back
        self.waiting = {f: _counted(f) for f in self.files}   # file -> (readings, events) in it
        self.waiting_readings = sum(r for r, _ in self.waiting.values())
        self.waiting_events = sum(e for _, e in self.waiting.values())
        self._next = _number(self.files[-1]) + 1 if self.files else 1

    def __len__(self) -> int:
        return len(self.files)

    def append(self, batch: Batch) -> Path:
        data = encode_batch(batch)
        counts = (len(batch.readings), len(batch.events))
        path = self.directory / f"{self._next:016d}.{counts[0]}.{counts[1]}{SPOOL_SUFFIX}"
        self._next += 1
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)          # a kill before this leaves a .tmp, removed on start, never acked
        if self.fsync:                 # the rename itself must survive a power loss before the ack
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.files.append(path)
        self.waiting[path] = counts
        self.waiting_readings += counts[0]
        self.waiting_events += counts[1]
        self.bytes += len(data)
        self.readings += len(batch.readings)
        return path

    def oldest(self) -> tuple[Path, Batch] | None:
        """The oldest spooled batch. One that cannot be read back (a disk fault, or a power loss with
        ``fsync = false``) is renamed ``*.corrupt``, logged and counted, and the next one returned."""
        while self.files:
            path = self.files[0]
            try:
                return path, decode_batch(path.read_bytes())
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                self.corrupt += 1
                log.error("spool: %s cannot be read back (%s): moved aside as %s; its readings are NOT"
                          " written", path, exc, path.with_suffix(".corrupt").name)
                self.bytes -= path.stat().st_size
                path.rename(path.with_suffix(".corrupt"))
                self.files.pop(0)
                readings, events = self.waiting.pop(path, (0, 0))
                self.waiting_readings -= readings
                self.waiting_events -= events
        return None

    def replace(self, path: Path, batch: Batch) -> None:
        """What is left of a spooled batch after part of it was written or set aside."""
        data = encode_batch(batch)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        old = path.stat().st_size
        os.replace(tmp, path)
        self.bytes += len(data) - old

    def remove(self, path: Path) -> None:
        self.bytes -= path.stat().st_size
        path.unlink()
        self.files.remove(path)
        readings, events = self.waiting.pop(path, (0, 0))
        self.waiting_readings -= readings
        self.waiting_events -= events


def _number(path: Path) -> int:
    return int(path.name.split(".", 1)[0])


def _counted(path: Path) -> tuple[int, int]:
    """(readings, events) in a spool file, from its name (read back for files named without them)."""
    parts = path.name.split(".")
    if len(parts) == 4:
        return int(parts[1]), int(parts[2])
    try:
        batch = decode_batch(path.read_bytes())
    except (OSError, ValueError, TypeError):
        return 0, 0
    return len(batch.readings), len(batch.events)


class Outbox:
    def __init__(self, sink: Sink, opts: SinkCommon, spool_dir: Path, deadletters: DeadLetterStore,
                 ack: Callable[[list[int]], None], counters: Counters, tries: BatchTries | None = None,
                 batch_tries: int = DEFAULT_BATCH_TRIES) -> None:
        self.sink = sink
        self.tries = tries                    # the poison-batch rule (workers.core.tries), by seq
        self.batch_tries = batch_tries
        self.opts = opts
        self.spool = Spool(spool_dir, opts.fsync)
        self.deadletters = deadletters
        self.ack = ack
        self.counters = counters
        self.readings: list[Reading] = []
        self.events: list[Event] = []
        self.seen: list[Seen] = []
        self.seqs: list[int] = []
        self.attempts: dict[Path, int] = {}  # spooled batch -> failed writes (max_attempts)
        self.first_added = 0.0
        self.retry_at = 0.0
        self.backoff = Backoff(opts.retry_initial_s, opts.retry_max_s)
        self.blocked = False                  # spool full with spool_full = "block"
        if len(self.spool):
            log.info("%s: %d spooled batches (%d bytes) from the last run will be written first",
                     sink.name, len(self.spool), self.spool.bytes)

    # ------------------------------------------------------------------ input

    @property
    def accepting(self) -> bool:
        return not self.blocked

    @property
    def pending(self) -> int:
        return len(self.readings) + len(self.events)

    def add(self, seqs: list[int], readings: list[Reading], events: list[Event], seen: list[Seen] = ()) -> None:
        if not self.seqs and not self.readings and not self.events and not self.seen:
            self.first_added = time.monotonic()
        self.seqs.extend(seqs)
        self.readings.extend(readings)
        self.events.extend(events)
        self.seen.extend(seen)

    def due(self, now: float) -> bool:
        if self.pending >= self.opts.batch_size:
            return True
        return bool(self.seqs or self.pending) and now - self.first_added >= self.opts.flush_interval_ms / 1000

    def next_due_in(self, now: float) -> float:
        """Seconds until the current batch is due (for the poll timeout)."""
        if not (self.seqs or self.pending):
            return 1.0
        return max(0.0, self.first_added + self.opts.flush_interval_ms / 1000 - now)

    def report(self, counters: Counters) -> None:
        """The outbox's state as counters (``sink_summary`` turns them into what ``status`` shows)."""
        counters["pending_readings"] = self.pending
        counters["spooled_batches"] = len(self.spool)
        counters["spool_readings"] = self.spool.waiting_readings
        counters["spool_events"] = self.spool.waiting_events
        counters["spool_bytes"] = self.spool.bytes
        counters["spool_corrupt_files"] = self.spool.corrupt
        counters["spool_full_now"] = int(self.blocked)

    # ------------------------------------------------------------------ writing

    def flush(self) -> None:
        """Write (or spool) the current batch, then acknowledge its seqs."""
        if not (self.seqs or self.pending):
            return
        batch = Batch(self.readings, self.events, self.seen)
        seqs = self.seqs
        if self.blocked:
            return
        tries = self.tries.begin(seqs) if self.tries is not None and seqs and len(batch) else 0
        if tries > self.batch_tries:          # the worker died even while narrowing it down
            self._set_aside(batch, f"{self.sink.name} failed {tries - 1} times on the batch holding this and"
                                   " could not tell what was at fault; set aside with the whole batch")
            self.counters.add("poison_batches")
        elif len(batch):
            if len(self.spool):
                if not self._spool(batch):
                    return
            else:
                try:
                    self._write(batch, careful=tries == self.batch_tries)
                except _Failed as failed:         # not acknowledged: the edge sends it again, the try counts
                    if self.tries is None:        # no notes kept (the rollup worker's own outboxes)
                        raise failed.cause from None
                    log.error("%s: failed on a batch (try %d of %d; then what is at fault is set aside): %s",
                              self.sink.name, tries, self.batch_tries, failed.cause, exc_info=failed.cause)
                    self.counters.add("failed_batches")
                    self.readings, self.events, self.seen, self.seqs = [], [], [], []
                    return
                except TransientError as exc:
                    self._failed(exc)
                    left = _remaining(exc, batch)
                    if self.opts.max_attempts == 1:
                        self._give_up(left, 1, exc)
                    elif not self._spool(left, attempts=1):
                        self.readings, self.events, self.seen = list(left.readings), list(left.events), list(left.seen)
                        return
        self.readings, self.events, self.seen, self.seqs = [], [], [], []
        if seqs:
            if tries:
                self.tries.done(seqs)      # type: ignore[union-attr]
            self.ack(seqs)

    def tick(self, now: float) -> None:
        """Write spooled batches back once the backoff has passed."""
        if not len(self.spool) or now < self.retry_at:
            return
        deadline = now + DRAIN_BUDGET_S
        while len(self.spool) and time.monotonic() < deadline:
            oldest = self.spool.oldest()
            if oldest is None:
                break
            path, batch = oldest
            try:
                try:
                    self._write(batch, careful=self.attempts.get(path, 0) + 1 >= self.batch_tries)
                except _Failed as failed:    # a spooled batch is acknowledged already: retry it like an outage
                    raise TransientError(f"failed on a spooled batch: {failed.cause}") from None
            except TransientError as exc:
                self._failed(exc)
                left = _remaining(exc, batch)
                attempts = self.attempts[path] = self.attempts.get(path, 0) + 1
                if not self.opts.max_attempts or attempts < self.opts.max_attempts:
                    if left is not batch:
                        self.spool.replace(path, left)
                    return
                self._give_up(left, attempts, exc)
            self.spool.remove(path)
            self.attempts.pop(path, None)
            self.counters.add("unspooled_readings", len(batch.readings))
        if not len(self.spool):
            log.info("%s: spool written back; the server is keeping up again", self.sink.name)
            self.backoff.reset()
        if self.blocked and self.spool.bytes < self.opts.spool_max_bytes:
            self.blocked = False
            self.flush()

    def close(self) -> None:
        """Final flush on stop: write or spool what is pending."""
        self.blocked = False
        if len(self.spool):
            self.tick(float("inf"))
        self.flush()

    # ------------------------------------------------------------------ internals

    def _write(self, batch: Batch, careful: bool = False) -> None:
        """Write, splitting what the server refuses as invalid or too large. Raises TransientError, or
        ``_Failed`` when the sink failed in a way it did not classify (a bug, a value a library chokes
        on). ``careful`` (the last try of the poison-batch rule): such a failure is taken as a refusal
        of the batch, so the split narrows it down to what is at fault, which is set aside."""
        try:
            try:
                self.sink.write(batch)
            except (SinkError, _Failed):
                raise
            except Exception as exc:  # noqa: BLE001
                if not careful:
                    raise _Failed(exc) from None
                raise PermanentError(f"{self.sink.name} failed on it {self.batch_tries} times: {exc}") from None
        except (PermanentError, BatchTooLarge) as exc:
            if len(batch) <= 1:
                if isinstance(exc, BatchTooLarge):
                    self._set_aside(batch, f"too large for the server: {exc}")
                else:
                    self._set_aside(batch, str(exc))
                return
            self.counters.add("split_batches")
            halves = _halves(batch)
            for i, half in enumerate(halves):
                try:
                    self._write(half, careful)
                except TransientError as away:      # keep only what is neither written nor set aside
                    away.remaining = _merge([_remaining(away, half), *halves[i + 1:]])
                    raise
            return
        self.counters.add("written_readings", len(batch.readings))
        self.counters.add("written_events", len(batch.events))
        observe_stored(self.counters, batch.seen)
        self.backoff.reset()

    def _failed(self, exc: TransientError) -> None:
        first = self.backoff.fresh
        delay = self.backoff.failed()
        if exc.retry_after is not None:
            delay = exc.retry_after
        self.retry_at = time.monotonic() + delay
        if first:
            log.warning("%s: write failed (%s); spooling and retrying with backoff", self.sink.name, exc)
        else:
            log.info("%s: still failing (%s); next try in %.1f s", self.sink.name, exc, delay)
        self.counters.add("write_failures")

    def _give_up(self, batch: Batch, attempts: int, exc: TransientError) -> None:
        self.counters.add("gave_up_batches")
        self._set_aside(batch, f"gave up after {attempts} attempts: {exc}")

    def _spool(self, batch: Batch, attempts: int = 0) -> bool:
        """Put the batch in the spool; False if the spool is full and the policy is to block."""
        while self.spool.bytes >= self.opts.spool_max_bytes and len(self.spool):
            if self.opts.spool_full == "block":
                if not self.blocked:
                    log.warning("%s: spool full (%d bytes): no longer taking readings until it drains;"
                                " the edge keeps them in its journal", self.sink.name, self.spool.bytes)
                    self.counters.add("spool_full")
                self.blocked = True
                return False
            oldest = self.spool.oldest()
            if oldest is None:
                break
            path, dropped = oldest
            self.spool.remove(path)
            self.counters.add("spool_dropped_readings", len(dropped.readings))
            log.error("%s: spool full: DROPPED the oldest spooled batch (%d readings) as spool_full ="
                      " 'drop-oldest' says", self.sink.name, len(dropped.readings))
        path = self.spool.append(batch)
        if attempts:
            self.attempts[path] = attempts
        self.counters.add("spooled_readings", len(batch.readings))
        self.counters.add("spooled_events", len(batch.events))
        return True

    def _set_aside(self, batch: Batch, reason: str) -> None:
        letters = []
        for r in batch.readings:
            raw = _json({"device": r.device, "ts": r.ts, **r.fields})
            letters.append(DeadLetter(r.ts, f"sink:{self.sink.name}", "replay", "", r.device, reason[:500], raw))
        for e in batch.events:
            raw = _json({"device": e.device, "ts": e.ts, **e.body})
            letters.append(DeadLetter(e.ts, f"sink:{self.sink.name}", "replay", "", e.device, reason[:500], raw))
        if not letters:                   # presence only: nothing a replay could bring back
            return
        self.deadletters.add(letters)
        self.counters.add("dead_letters", len(letters))
        log.warning("%s: %d item(s) set aside as dead letters: %s", self.sink.name, len(letters), reason[:200])


class _Failed(Exception):
    """The sink failed on a batch in a way it did not classify; ``cause`` is what it raised."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _remaining(exc: TransientError, batch: Batch) -> Batch:
    """What of ``batch`` is still to be written after ``exc`` (all of it unless a split got half way)."""
    return getattr(exc, "remaining", None) or batch


def _merge(batches: list[Batch]) -> Batch:
    return Batch([r for b in batches for r in b.readings], [e for b in batches for e in b.events],
                 [s for b in batches for s in b.seen])


def _json(document: dict) -> bytes:
    """A dead letter's raw JSON. What orjson refuses (an integer beyond 64 bits) the slower json takes."""
    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document, default=str).encode()


def _halves(batch: Batch) -> list[Batch]:
    items: list = [*batch.readings, *batch.events, *batch.seen]
    middle = len(items) // 2
    out = []
    for part in (items[:middle], items[middle:]):
        out.append(Batch([i for i in part if isinstance(i, Reading)], [i for i in part if isinstance(i, Event)],
                         [i for i in part if isinstance(i, Seen)]))
    return out


def sink_summary(counters: dict) -> dict:
    """Per sink, what ``sensorpipe status`` shows, from the counters its worker publishes:

    - ``written``: readings (and ``events``) the server confirmed, since the worker started;
    - ``pending``: taken in, waiting in memory for the next flush (at most ``flush_interval_ms``);
    - ``spooled``: readings and events waiting in the spool on disk for the server (now);
    - ``dead_lettered``: refused by the server as invalid, set aside (``sensorpipe deadletters``);
    - ``dropped``: deleted from a full spool (``spool_full = "drop-oldest"``), never written;
    - ``state``: ok | spooling (the server is away or behind) | blocked (spool full, input stopped).
    """
    spooled = counters.get("spool_readings", 0) + counters.get("spool_events", 0)
    looping = starts.crash_loop(counters)
    if looping:
        state = looping
    elif counters.get("spool_full_now"):
        state = "blocked: spool full"
    elif spooled or counters.get("spooled_batches"):
        state = "spooling: server away or behind"
    else:
        state = "ok"
    return {
        "written": counters.get("written_readings", 0),
        "events": counters.get("written_events", 0),
        "pending": counters.get("pending_readings", 0),
        "spooled": spooled,
        "dead_lettered": counters.get("dead_letters", 0),
        "dropped": counters.get("spool_dropped_readings", 0),
        "write_failures": counters.get("write_failures", 0),
        "state": state,
    }
