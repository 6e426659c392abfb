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
"""
from __future__ import annotations

import time

STAMP_STEP_NS = 256       # > the 255 records of a binary packet, each 1 ns apart at interval 0


class ArrivalClock:
    """Strictly increasing Unix ns, ``STAMP_STEP_NS`` apart at least, close to the wall clock."""

    def __init__(self) -> None:
        self.last = 0

    def stamps(self, count: int) -> range:
        """Stamps for ``count`` frames that arrived together, in one step."""
        now = time.time_ns()
        first = now if now >= self.last + STAMP_STEP_NS else self.last + STAMP_STEP_NS
        self.last = first + (count - 1) * STAMP_STEP_NS
        return range(first, self.last + 1, STAMP_STEP_NS)
