"""Time from arrival at the edge to stored in a sink: a histogram a sink keeps in its counters.

One observation per device per written batch: the arrival time of that device's newest frame in the
batch (its ``Seen``), against the clock when the sink's server confirmed the write. Buckets are kept
as plain counters (``stored_latency_le_<ms>``, not cumulative, plus ``_count`` and ``_sum_ms``) so
they travel in the ``stats`` message like any counter; /metrics turns them into a Prometheus histogram.
"""
from __future__ import annotations

import bisect
import collections
import functools
import time
from typing import Iterable

from workers.core.envelope import Seen

BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
PREFIX = "stored_latency_le_"


BUCKET_NAMES = tuple(f"{PREFIX}{b}" for b in BUCKETS_MS) + (f"{PREFIX}inf",)
_bucket = functools.partial(bisect.bisect_left, BUCKETS_MS)     # the first bucket with ms <= its bound


def observe_stored(counters: dict, seen: Iterable[Seen], now_ns: int | None = None) -> None:
    """The batch's observations counted together (a fleet's batch holds a Seen per reading)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    ms = [(now_ns - entry.ts) // 1_000_000 for entry in seen]
    if not ms:
        return
    if min(ms) < 0:                        # a clock that went back: counted as 0 ms
        ms = [max(0, m) for m in ms]
    for index, count in collections.Counter(map(_bucket, ms)).items():
        bucket = BUCKET_NAMES[index]
        counters[bucket] = counters.get(bucket, 0) + count
    counters["stored_latency_count"] = counters.get("stored_latency_count", 0) + len(ms)
    counters["stored_latency_sum_ms"] = counters.get("stored_latency_sum_ms", 0) + sum(ms)
