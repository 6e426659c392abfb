"""Arrival stamps: the time the edge gives a frame that carries none of its own.

A reading without its own timestamp is stored under (device, field, arrival stamp), so two frames
must never share a stamp, whatever connections they came on: two connections of one device (a
reconnect that overlaps the old one), boards that send under one binary device number, boards behind
one NAT. So stamps are strictly increasing across the whole edge, not per connection.

They are ``STAMP_STEP_NS`` apart at least. That spacing cannot run ahead of the clock under load: it
would take 4 million frames a second, several times what the edge can read. It also leaves room
below each stamp for the records of a binary packet whose board reports a measure interval of 0:
they are stamped 1 ns apart going back from the packet's stamp (at most 255 records), so they can
never reach the stamp of an earlier frame.

A stamp is written to the journal with its frame, so a redelivered or replayed batch decodes to the
same timestamps and lands once.

Several edges (``[journal] backend = "jetstream"``, docs/scale-out.md) must not give two frames one
stamp either: each edge has a slot (``[journal] edge_id``) and stamps only in it. The time line is cut
in cycles of ``cycle`` ns (the smallest prime at least ``STAMP_STEP_NS * slots``: 4099 for 16 slots);
slot ``k`` owns the 256 ns ``[256 k, 256 k + 255]`` of every cycle and stamps at its top, so a stamp
and the 255 ns below it (a binary packet's records) belong to one edge. The cycle is prime so that no
measure interval in whole seconds (below 4099 s) is a multiple of it: the records of two packets of one
board, stamped back from their arrivals by that interval, can then never meet, though the arrivals are
a whole number of cycles apart. An edge still stamps 240,000 frames a second before its stamps run
ahead of the clock.
"""
from __future__ import annotations

import time

STAMP_STEP_NS = 256       # > the 255 records of a binary packet, each 1 ns apart at interval 0


def cycle_ns(slots: int) -> int:
    """The smallest prime that is at least ``STAMP_STEP_NS * slots`` (slots > 1)."""
    n = STAMP_STEP_NS * slots
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


class ArrivalClock:
    """Strictly increasing Unix ns, ``STAMP_STEP_NS`` apart at least, close to the wall clock; with
    ``slots`` > 1, only stamps of this edge's ``slot`` (none another edge can give)."""

    def __init__(self, slot: int = 0, slots: int = 1) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} is not in 0..{slots - 1}")
        self.last = 0
        self.step = STAMP_STEP_NS if slots == 1 else cycle_ns(slots)
        self.offset = STAMP_STEP_NS * slot + STAMP_STEP_NS - 1     # the top of this slot's 256 ns
        self.slots = slots

    def stamp(self) -> int:
        """One stamp (``stamps(1)``'s, without the range): a fleet's every read takes one."""
        step = self.step
        now = time.time_ns()
        if self.slots > 1:
            now += (self.offset - now) % step
        last = self.last + step
        if now < last:
            now = last
        self.last = now
        return now

    def stamps(self, count: int) -> range:
        """Stamps for ``count`` frames that arrived together, in one step."""
        step = self.step
        now = time.time_ns()
        if self.slots > 1:        # on to the next stamp of this slot
            now += (self.offset - now) % step
        first = now if now >= self.last + step else self.last + step
        self.last = first + (count - 1) * step
        return range(first, self.last + 1, step)
