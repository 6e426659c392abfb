"""Sinks write batches of readings to a store. They only connect, write and close.

Batching, the disk spool, retries with backoff and splitting refused batches all live in one place,
``workers.core.outbox``, so every sink behaves the same when its server is away or refuses data. A sink tells
the outbox what kind of failure it met by the exception it raises:

- ``TransientError``: the server is away, slow or throttling; keep the batch and retry (``retry_after``
  in seconds when the server said so).
- ``PermanentError``: the server refused the batch as invalid; the outbox splits it to isolate the bad
  readings, which go to the dead-letter store, and writes the rest.
- ``BatchTooLarge``: the server refused the batch for its size (413); the outbox splits it.

Writes must be idempotent, keyed by (device, field, timestamp): a batch may arrive twice after a
worker is killed, and must not be stored twice.

A sink that keeps only time series says ``takes_events = False`` (InfluxDB): its worker then hands it
no events, counts them as ``events_not_for_this_sink``, and its spool holds only readings.

A sink that stores rollups (window aggregates, ``envelope.rollup_window()``; docs/rollups.md) says so
with ``takes_rollups = True``; the rollup worker writes rollups only to those. A rollup is upserted on
(device, field, window, start): a corrected window is sent again and replaces the first one.

``Batch.seen`` is each device's presence (``envelope.Seen``: when its newest frame arrived, by which
listener and peer); a store that keeps devices upserts ``last_seen`` with the newer value (SQLite: the
``devices`` table). A sink that only wants events (the webhook) says ``takes_readings = False``: it is
then handed no readings and no presence, and its spool holds only events.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol

from workers.core.envelope import Event, Reading, Seen

if TYPE_CHECKING:
    from workers.core.config import Config


class Batch(NamedTuple):
    readings: list[Reading]
    events: list[Event]
    seen: list[Seen] = []             # never mutated: a shared empty default is safe

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.readings) + len(self.events) + len(self.seen)


class SinkError(Exception):
    pass


class TransientError(SinkError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(SinkError):
    pass


class BatchTooLarge(SinkError):
    pass


class Sink(Protocol):
    name: str
    takes_events: bool            # optional (default True)
    takes_rollups: bool           # optional (default False): it stores rollup readings apart
    takes_readings: bool          # optional (default True): False for a sink that only takes events

    def connect(self) -> None: ...

    def write(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


def make_sink(name: str, cfg: "Config") -> Sink:
    """The sink called ``name`` in ``[sinks.<name>]``."""
    factories: dict[str, Callable[["Config"], Sink]] = {}
    from workers.sinks import sqlite
    factories["sqlite"] = sqlite.SqliteSink.from_config
    try:
        from workers.sinks import influx
        factories["influx"] = influx.InfluxSink.from_config
    except ImportError:
        pass
    try:
        from workers.sinks import mongo
        factories["mongo"] = mongo.MongoSink.from_config
    except ImportError:
        pass
    from workers.sinks import webhook
    factories["webhook"] = webhook.WebhookSink.from_config
    if name not in factories:
        raise KeyError(f"no sink called {name!r}; known: {sorted(factories)}")
    return factories[name](cfg)
