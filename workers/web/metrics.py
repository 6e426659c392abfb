"""/metrics (Prometheus text exposition) and /readyz, from the query worker's status.

The query worker gathers every worker's counters (``stats`` messages); this module only renames
them for Prometheus:

- ``sensorpipe_<counter>_total{worker,role}`` for every counter, ``sensorpipe_<gauge>{worker,role}``
  for the values that go up and down (``GAUGES``: connections, in-flight batches, journal bytes...);
- ``sensorpipe_worker_up{worker,role}``: 0 once its stats are older than 30 s;
- per sink: ``sensorpipe_sink_written_total``, ``_pending``, ``_spooled``, ``_dead_lettered_total``,
  ``_failing`` (1 while not ``ok``), ``_failing_seconds``;
- ``sensorpipe_stored_latency_seconds{sink}``: a histogram of the time from arrival to stored;
- ``sensorpipe_http_stream_clients`` and the HTTP worker's own counters.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from workers.core.config import Config
from workers.core.latency import BUCKETS_MS, PREFIX

if TYPE_CHECKING:
    from workers.web.backend import Backend

CONTENT_TYPE = CONTENT_TYPE_LATEST
NAMESPACE = "sensorpipe"
# Counters that are levels (now), not totals since the worker started.
GAUGES = {"connections", "inflight_batches", "journal_bytes", "paused_now", "replay_batches", "journal_torn_bytes",
          "pending_readings", "spool_readings", "spool_events", "spooled_batches", "spool_bytes", "spool_full_now",
          "spool_corrupt_files", "open_commands", "devices_known", "held_messages", "injects_in_flight", "connected",
          "state_bytes", "pending_emissions"}
PROBE_TIMEOUT_S = 0.5


def _name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


def _role(worker: str) -> str:
    return worker.split(":", 1)[0]


class StatusCollector:
    """Turns one status answer into metric families (prometheus_client's custom-collector shape)."""

    def __init__(self, status: dict | None, backend: "Backend") -> None:
        self.status, self.backend = status, backend

    def collect(self) -> Iterator[Metric]:
        status = self.status or {}
        workers: dict[str, dict] = status.get("workers", {})
        up = GaugeMetricFamily(f"{NAMESPACE}_worker_up", "1 while the worker's stats are fresh (under 30 s old)",
                               labels=["worker", "role"])
        families: dict[str, Metric] = {}
        for worker, counters in sorted(workers.items()):
            up.add_metric([worker, _role(worker)], 0.0 if counters.get("stale") else 1.0)
            for key, value in counters.items():
                if key == "stale" or key.startswith(PREFIX) or key.startswith("stored_latency_") \
                        or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                name = f"{NAMESPACE}_{_name(key)}"
                family = families.get(name)
                if family is None:
                    if key in GAUGES or key.endswith("_now"):
                        family = GaugeMetricFamily(name, f"{key} (now), as each worker reports it",
                                                   labels=["worker", "role"])
                    else:
                        family = CounterMetricFamily(name, f"{key}, counted by each worker since it started",
                                                     labels=["worker", "role"])
                    families[name] = family
                family.add_metric([worker, _role(worker)], float(value))
        yield up
        yield from families.values()
        yield from self._sinks(status, workers)
        yield GaugeMetricFamily(f"{NAMESPACE}_query_up", "1 if the query worker answered this scrape",
                                value=1.0 if self.status is not None else 0.0)
        yield GaugeMetricFamily(f"{NAMESPACE}_http_stream_clients", "live-stream clients connected now",
                                value=float(self.backend.hub.clients))
        for key, value in sorted(self.backend.hub.counters.items()):
            yield CounterMetricFamily(f"{NAMESPACE}_http_{_name(key)}", f"HTTP worker: {key}", value=float(value))

    def _sinks(self, status: dict, workers: dict[str, dict]) -> Iterator[Metric]:
        labels = ["sink"]
        written = CounterMetricFamily(f"{NAMESPACE}_sink_written", "readings the sink's server confirmed", labels=labels)
        pending = GaugeMetricFamily(f"{NAMESPACE}_sink_pending", "readings waiting in memory for the next flush",
                                    labels=labels)
        spooled = GaugeMetricFamily(f"{NAMESPACE}_sink_spooled", "readings and events in the spool on disk",
                                    labels=labels)
        dead = CounterMetricFamily(f"{NAMESPACE}_sink_dead_lettered", "items the server refused, set aside",
                                   labels=labels)
        failing = GaugeMetricFamily(f"{NAMESPACE}_sink_failing", "1 while the sink is not ok (spooling, blocked,"
                                    " or its stats are stale)", labels=labels)
        failing_for = GaugeMetricFamily(f"{NAMESPACE}_sink_failing_seconds", "how long the sink has been failing"
                                        " (as seen by this HTTP worker)", labels=labels)
        latency = HistogramMetricFamily(f"{NAMESPACE}_stored_latency_seconds", "time from arrival at the edge to"
                                        " stored in the sink (one observation per device per batch)", labels=labels)
        now = time.monotonic()
        for sink, summary in sorted(status.get("sinks", {}).items()):
            written.add_metric([sink], float(summary.get("written", 0)))
            pending.add_metric([sink], float(summary.get("pending", 0)))
            spooled.add_metric([sink], float(summary.get("spooled", 0)))
            dead.add_metric([sink], float(summary.get("dead_lettered", 0)))
            is_failing = summary.get("state") != "ok" or bool(summary.get("stale"))
            failing.add_metric([sink], 1.0 if is_failing else 0.0)
            since = self.backend.health.failing_since.get(sink)
            failing_for.add_metric([sink], now - since if is_failing and since is not None else 0.0)
            counters = workers.get(f"sink:{sink}", {})
            cumulative, buckets = 0, []
            for bound in BUCKETS_MS:
                cumulative += counters.get(f"{PREFIX}{bound}", 0)
                buckets.append((repr(bound / 1000), float(cumulative)))
            cumulative += counters.get(f"{PREFIX}inf", 0)
            buckets.append(("+Inf", float(cumulative)))
            latency.add_metric([sink], buckets, counters.get("stored_latency_sum_ms", 0) / 1000)
        yield from (written, pending, spooled, dead, failing, failing_for, latency)


def exposition(status: dict | None, backend: "Backend") -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status, backend))     # type: ignore[arg-type]
    return generate_latest(registry)


# --------------------------------------------------------------------------- readiness


async def _edge_accepts(cfg: Config) -> dict:
    """Each TCP listener takes a connection (opened and closed at once)."""
    failures = []
    for listener in cfg.listeners:
        host = "127.0.0.1" if listener.host in ("0.0.0.0", "", "::") else listener.host
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, listener.port), PROBE_TIMEOUT_S)
            writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            failures.append(f"{listener.name} {host}:{listener.port}: {exc or 'timed out'}")
    return {"ok": not failures, "detail": "; ".join(failures) or "every listener accepts"}


def _journal_writable(cfg: Config) -> dict:
    directory = Path(cfg.data_dir) / "journal"
    probe = directory / ".readyz-probe"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        return {"ok": False, "detail": f"cannot write in {directory}: {exc}"}
    return {"ok": True, "detail": str(directory)}


async def readiness(cfg: Config, backend: "Backend") -> dict[str, dict]:
    checks = {"edge": await _edge_accepts(cfg), "journal": _journal_writable(cfg)}
    status = backend.health.status
    if status is None:
        checks["sinks"] = {"ok": False, "detail": "no status from the query worker"}
        return checks
    paused = [w for w, c in status.get("workers", {}).items() if w.startswith("edge") and c.get("paused_now")]
    if paused:
        checks["edge"] = {"ok": False, "detail": "the edge has stopped reading devices (journal or in-flight bound)"}
    now, limit = time.monotonic(), cfg.http.sink_failing_for_s
    enabled = set(cfg.sinks.enabled())
    late = {sink: now - since for sink, since in backend.health.failing_since.items()
            if sink in enabled and now - since > limit}
    checks["sinks"] = {"ok": not late, "detail": "; ".join(f"{s} failing for {t:.0f} s" for s, t in sorted(late.items()))
                       or f"no enabled sink failing for over {limit:g} s"}
    return checks
