"""The edge's in-flight ledger: which journaled batches still wait for which sinks, when each is due to
be sent again (backoff per batch) and what a checkpoint writes down. Pure state: no sockets, no
journal; the edge (``workers.processes.edge``) tells the journal what the ledger finishes, and sends
what it says is due. Tested alone in tests/test_inflight.py.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator

from workers.core.journal import Location

REDELIVER_MAX_BACKOFF = 4          # a silent sink is sent a batch again at most every 2**4 * redeliver_after_s

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    location: Location
    pending: set[str]          # sinks that have not acknowledged yet
    sent_at: float             # monotonic; 0 = never sent (replayed from the journal)
    attempts: int = 0


class InFlightLedger(OrderedDict[int, InFlight]):
    """Batch seq -> ``InFlight``, oldest first, with the acknowledgement bookkeeping around it.

    ``changed`` says the acknowledgements moved since the last checkpoint; ``last_ack`` holds when each
    sink was last heard from (monotonic), so a sink back from a silence gets its backlog at once."""

    def __init__(self, sinks: Iterable[str], redeliver_after_s: float) -> None:
        super().__init__()
        self.sinks = set(sinks)                 # the consumers every batch goes to
        self.redeliver_after_s = redeliver_after_s
        self.last_ack: dict[str, float] = {}    # sink -> monotonic time of its last ack
        self.changed = False

    def sent(self, seq: int, now: float) -> None:
        """A parser can have the batch from ``now``: the redelivery clock starts then, not when queued."""
        entry = self.get(seq)
        if entry is not None:
            entry.sent_at = now

    def acknowledged(self, sink: str, seqs: list[int], now: float) -> list[tuple[int, InFlight]]:
        """``sink`` made ``seqs`` durable. Returns the batches every sink now has (the journal may let
        them go)."""
        last = self.last_ack.get(sink)
        self.last_ack[sink] = now
        if last is not None and now - last > self.redeliver_after_s:
            self.sink_back(sink)
        self.changed = True
        done = []
        for seq in seqs:
            entry = self.get(seq)
            if entry is None:
                continue
            entry.pending.discard(sink)
            if not entry.pending:
                del self[seq]
                done.append((seq, entry))
        return done

    def sink_back(self, sink: str) -> None:
        """A sink acknowledges again after a silence: what it misses goes to it now, not after backoff."""
        count = 0
        for entry in self.values():
            if entry.attempts and sink in entry.pending:
                entry.attempts = 0
                count += 1
        if count:
            log.info("sink %s acknowledges again: sending it its %d missing batches now", sink, count)

    def due(self, now: float) -> Iterator[tuple[int, InFlight]]:
        """The batches to send again at ``now``, oldest first. Replayed batches (``sent_at == 0``) are
        due at once. The rest wait ``redeliver_after_s``, doubled with each attempt up to 16 times
        that, so a sink that is down for long is not flooded. Do not add or remove batches while
        iterating (``forget`` after)."""
        timeout = self.redeliver_after_s
        for seq, entry in self.items():
            if entry.sent_at and now - entry.sent_at < timeout * (2 ** min(entry.attempts, REDELIVER_MAX_BACKOFF)):
                continue
            yield seq, entry

    def forget(self, seq: int) -> InFlight:
        """A batch no sink can ever get (unreadable in the journal): out of the ledger."""
        entry = self.pop(seq)
        self.changed = True
        return entry

    def checkpoint_rows(self) -> Iterator[tuple[int, set[str]]]:
        """What a checkpoint writes: each batch still in flight and the sinks it misses."""
        return ((seq, entry.pending) for seq, entry in self.items())
