"""Time from arrival at the edge to stored in a sink: a histogram a sink keeps in its counters.

One observation per device per written batch: the arrival time of that device's newest frame in the
batch (its ``Seen``), against the clock when the sink's server confirmed the write. Buckets are kept
as plain counters (``stored_latency_le_<ms>``, not cumulative, plus ``_count`` and ``_sum_ms``) so
they travel in the ``stats`` message like any counter; /metrics turns them into a Prometheus histogram.
"""
from __future__ import annotations

import time
from typing import Iterable

from workers.core.envelope import Seen

BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
PREFIX = "stored_latency_le_"


def observe_stored(counters: dict, seen: Iterable[Seen], now_ns: int | None = None) -> None:
    now_ns = time.time_ns() if now_ns is None else now_ns
    for entry in seen:
        ms = max(0, now_ns - entry.ts) // 1_000_000
        bucket = next((f"{PREFIX}{b}" for b in BUCKETS_MS if ms <= b), f"{PREFIX}inf")
        counters[bucket] = counters.get(bucket, 0) + 1
        counters["stored_latency_count"] = counters.get("stored_latency_count", 0) + 1
        counters["stored_latency_sum_ms"] = counters.get("stored_latency_sum_ms", 0) + ms
