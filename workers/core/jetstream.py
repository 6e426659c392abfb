"""The journal on NATS JetStream (``[journal] backend = "jetstream"``): edges on several hosts, any host
delivers what another accepted (docs/scale-out.md).

Two halves, both run inside the edge process (which owns the NATS connection of its host):

- ``BatchPublisher``: the edge publishes each batch (the same record the file journal writes) to the
  stream, replicated on ``replicas`` servers, and answers the devices (``A``, ``injected``) only once
  JetStream has acknowledged the publish, which it does after a quorum of the replicas stored it. A
  publish that fails or times out is sent again under the same ``Nats-Msg-Id``, so JetStream's
  duplicate window keeps one copy. While the cluster does not answer, batches wait in the edge and
  device reads pause, as with a file journal that cannot be written.
- ``StreamFeeder``: on a host whose configuration enables sinks (or the rollup worker), the edge
  reads the stream in order, hands each batch to the local parsers over ZeroMQ with the stream
  sequence as its seq, and notes which consumer (``sqlite``, ``rollup``...) acknowledged which seq.
  Each consumer's floor (every batch up to it acknowledged) is written to a second replicated stream,
  ``<stream>_ACKS``, so any host can take over where this one stopped; what a sink does not
  acknowledge within ``ack_wait_s`` is sent again.

The stream keeps a batch until every consumer listed in ``[journal] consumers`` has it: the feeders
trim it below the lowest floor. A third replicated stream is the KV bucket ``<stream>_COUNTERS``: the
highest counter journaled per device for authenticated binary packets (``SharedCounters``, read and
written by the edges' guards and publishers; docs/scale-out.md "The keys hold across edges"). Every
edge creates the three at start (idempotent).

``nats`` (PyPI ``nats-py``, the ``cluster`` extra) is imported only when the backend is used.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from workers.core.inflight import InFlight, InFlightLedger
from workers.core.options import ConfigError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

MAX_EDGES = 16                    # edge_id 0..15: the arrival stamp's slot (workers.core.stamps)
DEFAULT_STREAM = "SENSORPIPE"
PUBLISH_CONCURRENCY = 32          # publishes in flight at once: one round trip to a quorum is ~1.7 ms here
PUBLISH_HIGH = 64                 # batches waiting for JetStream before the edge stops reading devices
PUBLISH_LOW = 16
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
PUBLISH_RETRY_MAX_S = 1.0         # a batch waits for a new stream leader no longer than this after it
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class JournalOptions:
    """``[journal]``: where the edge keeps accepted batches until every consumer has them."""
    backend: Literal["file", "jetstream"] = "file"     # file: <data>/journal on this host (docs/durability.md)
    servers: tuple[str, ...] = ()                 # nats://host:port of the cluster, this host's first
    stream: str = DEFAULT_STREAM
    replicas: int = 3                             # copies of each batch; a publish is confirmed by a quorum
    consumers: tuple[str, ...] = ()               # every consumer on every host (default: this host's)
    edge_id: int = 0                              # unique per edge, 0..15: keeps arrival stamps apart
    ack_wait_s: float = 30.0                      # a batch not acknowledged this long is delivered again
    max_ack_pending: int = 1000                   # batches a consumer may have unacknowledged
    max_bytes: int = 1024 * 1024 * 1024           # stream bound: past it publishes fail, devices wait
    publish_timeout_s: float = 5.0
    duplicate_window_s: float = 120.0             # a batch published twice in this window is kept once (an
                                                  # authenticated packet too, from any edge: docs/scale-out.md)

    @property
    def subject(self) -> str:
        return f"{self.stream}.batches"

    def check(self, key: str, local_consumers: list[str]) -> None:
        """Checked once at start; ``local_consumers``: the sinks and rollup worker this host runs."""
        if self.backend == "file":
            return
        if not self.servers:
            raise ConfigError(f"{key}.servers: list the NATS servers, e.g. [\"nats://127.0.0.1:4222\"]")
        for i, url in enumerate(self.servers):
            if not url.startswith(("nats://", "tls://")) or ":" not in url.split("//", 1)[1]:
                raise ConfigError(f"{key}.servers[{i}]: expected nats://host:port, got {url!r}")
        if not self.stream or any(c in self.stream for c in ". *>\t"):
            raise ConfigError(f"{key}.stream: a name without '.', '*', '>' or spaces, got {self.stream!r}")
        if self.replicas not in (1, 3, 5):
            raise ConfigError(f"{key}.replicas: 1, 3 or 5 (an odd number for a quorum; 3 survives a server),"
                              f" got {self.replicas}")
        if self.replicas > len(self.servers):
            raise ConfigError(f"{key}.replicas: {self.replicas} copies need at least as many servers, "
                              f"{key}.servers lists {len(self.servers)}")
        if not 0 <= self.edge_id < MAX_EDGES:
            raise ConfigError(f"{key}.edge_id: 0..{MAX_EDGES - 1}, different on every edge, got {self.edge_id}")
        missing = [name for name in local_consumers if name not in self.all_consumers(local_consumers)]
        if missing:
            raise ConfigError(f"{key}.consumers: this host runs {missing} but the list {list(self.consumers)}"
                              " leaves them out; list every sink and the rollup worker of every host")
        if not self.all_consumers(local_consumers):
            raise ConfigError(f"{key}.consumers: no consumer; list the sinks (and \"rollup\") of the host that"
                              " runs them, the same list on every host")
        for name in ("ack_wait_s", "publish_timeout_s", "duplicate_window_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be more than 0")
        if self.max_ack_pending < 1 or self.max_bytes < 1024 * 1024:
            raise ConfigError(f"{key}.max_ack_pending, max_bytes: at least 1 and 1 MiB")

    def all_consumers(self, local_consumers: list[str]) -> list[str]:
        return list(self.consumers) if self.consumers else list(local_consumers)


class StreamLink:
    """This host's connection to the cluster: connects (and keeps reconnecting), makes sure the stream
    and the floors stream exist, then sets ``ready``."""

    def __init__(self, opts: JournalOptions, consumers: list[str], name: str) -> None:
        self.opts = opts
        self.consumers = consumers
        self.name = name
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Connect and set up, retrying with backoff while no server answers; then return."""
        import nats
        delay = RETRY_MIN_S
        while True:
            try:
                if self.nc is None:
                    self.nc = await nats.connect(list(self.opts.servers), name=self.name, dont_randomize=True,
                                                 max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                                 connect_timeout=2, allow_reconnect=True,
                                                 error_cb=self._error, disconnected_cb=self._disconnected,
                                                 reconnected_cb=self._reconnected)
                    self.js = self.nc.jetstream(timeout=self.opts.publish_timeout_s)
                try:
                    await self.ensure()
                except Exception as exc:  # noqa: BLE001
                    # Creating needs the cluster's metadata leader, which a partition or a replaced
                    # server can leave without a quorum for a while; publishing needs only the stream's.
                    await self.js.stream_info(self.opts.stream)
                    await self.js.stream_info(f"{self.opts.stream}_ACKS")
                    await self.js.stream_info(f"KV_{self.opts.stream}_COUNTERS")
                    log.warning("jetstream: could not create or check the streams (%s: %s); they exist: using"
                                " them as they are", type(exc).__name__, exc)
                self.ready.set()
                log.info("jetstream: stream %s (%d replicas) and consumers %s ready on %s", self.opts.stream,
                         self.opts.replicas, self.consumers, self.nc.connected_url.netloc if self.nc.connected_url else "?")
                return
            except Exception as exc:  # noqa: BLE001  any failure to reach or set up the cluster: try again
                log.warning("jetstream: cluster not ready (%s: %s); trying again in %.1f s",
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def ensure(self) -> None:
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import BadRequestError
        assert self.js is not None
        opts = self.opts
        # Limits retention, trimmed by the feeders below every consumer's floor: a batch stays until
        # every consumer has it, and at max_bytes publishes fail (devices wait) rather than drop.
        batches = StreamConfig(name=opts.stream, subjects=[opts.subject], retention=RetentionPolicy.LIMITS,
                               discard=DiscardPolicy.NEW, max_bytes=opts.max_bytes, storage=StorageType.FILE,
                               num_replicas=opts.replicas, duplicate_window=opts.duplicate_window_s)
        acks = StreamConfig(name=f"{opts.stream}_ACKS", subjects=[f"{opts.stream}_ACKS.*"],
                            retention=RetentionPolicy.LIMITS, max_msgs_per_subject=1, storage=StorageType.FILE,
                            num_replicas=opts.replicas, discard=DiscardPolicy.OLD)
        counters = StreamConfig(name=f"KV_{opts.stream}_COUNTERS", subjects=[f"$KV.{opts.stream}_COUNTERS.>"],
                                retention=RetentionPolicy.LIMITS, max_msgs_per_subject=1, storage=StorageType.FILE,
                                num_replicas=opts.replicas, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True,
                                deny_delete=True, allow_direct=True)
        for config in (batches, acks, counters):
            try:
                await self.js.add_stream(config)
            except BadRequestError as exc:      # exists with another configuration: say so, use it as it is
                info = await self.js.stream_info(config.name)
                log.warning("jetstream: stream %s exists with another configuration (%s); using it: %d replicas",
                            config.name, exc.description, info.config.num_replicas or 1)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()      # the acks and publishes already written go out first
            except Exception:  # noqa: BLE001  closing anyway
                await self.nc.close()

    async def _error(self, exc: Exception) -> None:
        log.debug("jetstream: %s", exc)

    async def _disconnected(self) -> None:
        log.warning("jetstream: disconnected from the NATS server; reconnecting")

    async def _reconnected(self) -> None:
        assert self.nc is not None
        log.info("jetstream: reconnected to %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")


@dataclass
class Unpublished:
    msg_id: str
    record: bytes
    stored: Callable[[int], None]         # called with the stream sequence once JetStream has the batch
    retry: Callable[[], bytes | None]     # before another try: the record to publish now, or None
    mark: tuple[str, int, str] | None = None   # an authenticated packet: (device, counter, key tag), shared once stored
    tries: int = 0
    seq: int = 0                          # confirmed by JetStream (the counter still to be shared)


KV_KEY_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def kv_key(device: str) -> str:
    """A device id as a KV key (NATS subject tokens): other characters than [A-Za-z0-9_-] as ``=xx``
    (their UTF-8 bytes in hex), so that two devices never share a key."""
    if all(c in KV_KEY_SAFE for c in device):
        return device
    return "".join(c if c in KV_KEY_SAFE else "".join(f"={b:02x}" for b in c.encode()) for c in device)


class SharedCounters:
    """The known counters of authenticated binary packets, shared by every edge: a KV bucket
    ``<stream>_COUNTERS`` replicated like the stream, key the device (``kv_key``), value the highest
    counter journaled and the tag of the key it was sealed with (ASCII ``"<counter> <tag>"``: a device
    given a new token counts from the start, and the old key's counter does not hold it back). An edge reads a device's entry before the first packet of each
    connection (``get``) and writes it after JetStream confirmed a packet, before the ``A``
    (``advance``, coalesced per device per round of publishes).

    Written after the publish, never with it: written first, a publish that then failed (the edge died
    before a retry) would leave a counter known that no stream holds, and the board's resend would be
    answered and stored nowhere. A resend that comes while the entry lags behind the stream (the edge
    died between the two) is published again under the same message id and JetStream's duplicate
    window keeps one copy. ``advance`` is a compare-and-set (``update`` with the revision read) so the
    value only grows: two edges writing one device (a board that went to the other edge meanwhile)
    never turn it back, which would let a replay of the newer packet through."""

    def __init__(self, link: "StreamLink", counters: Any) -> None:
        self.link = link
        self.counters = counters
        self._kv: Any = None
        self.revisions: dict[str, tuple[int, str, int]] = {}   # key -> (counter, tag, revision) last seen

    @property
    def bucket(self) -> str:
        return f"{self.link.opts.stream}_COUNTERS"

    async def _store(self) -> Any:
        if self._kv is None:
            await self.link.ready.wait()
            assert self.link.js is not None
            self._kv = await self.link.js.key_value(self.bucket)
        return self._kv

    async def get(self, device: str, tag: str) -> int:
        """The highest counter journaled for ``device`` under the key ``tag`` by any edge (-1: none)."""
        from nats.js.errors import KeyNotFoundError
        kv = await self._store()
        key = kv_key(device)
        self.counters.add("counter_reads")
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            self.revisions.pop(key, None)
            return -1
        counter_text, _, known_tag = (entry.value or b"-1").decode().partition(" ")
        counter = int(counter_text)
        self.revisions[key] = (counter, known_tag, entry.revision or 0)
        return counter if known_tag == tag else -1

    async def advance(self, device: str, counter: int, tag: str) -> None:
        """Make the shared counter of ``device`` at least ``counter`` (under the key ``tag``; another
        key's is replaced). Raises when the cluster does not answer (the caller tries again)."""
        from nats.js.errors import KeyWrongLastSequenceError
        kv = await self._store()
        key = kv_key(device)
        value = f"{counter} {tag}".encode()
        for _ in range(8):
            known = self.revisions.get(key)
            if known is not None and known[1] == tag and known[0] >= counter:
                return
            try:
                if known is None:
                    revision = await kv.create(key, value)
                else:
                    revision = await kv.update(key, value, last=known[2])
                self.revisions[key] = (counter, tag, revision)
                self.counters.add("counter_writes")
                return
            except KeyWrongLastSequenceError:
                self.counters.add("counter_conflicts")       # another edge wrote it meanwhile: read, retry
                await self.get(device, tag)
        raise RuntimeError(f"the shared counter of {device!r} keeps changing under this edge")


class BatchPublisher:
    """The edge's side of the journal: batches in order, published with at most ``PUBLISH_CONCURRENCY``
    in flight, each answered (``stored``) once JetStream confirmed it."""

    def __init__(self, link: StreamLink, edge_id: int, counters: Any) -> None:
        self.link = link
        self.counters = counters
        # A message id names one batch of one edge run: a retry after a lost PubAck is a duplicate
        # JetStream drops; a new run of the edge starts other ids (its unanswered batches were never
        # acknowledged to anyone, so the devices send them again).
        self._prefix = f"e{edge_id}-{time.time_ns():x}-"
        self._count = 0
        self.queue: deque[Unpublished] = deque()
        self.wake = asyncio.Event()
        self.failing = False
        self.full = False
        self._last_log = -LOG_EVERY_S
        self.shared: SharedCounters | None = None     # authenticated packets: their counters shared

    def publish(self, record: bytes, stored: Callable[[int], None], retry: Callable[[], bytes | None],
                msg_id: str | None = None, mark: tuple[str, int, str] | None = None) -> None:
        """Queue a batch; ``stored(seq)`` once confirmed. After a failed try, ``retry()`` gives the record
        to publish instead (the same id: if the failed try did reach the stream, it is the one kept).
        ``msg_id``: an id of the caller's (an authenticated packet's key); ``mark``: (device, counter,
        key tag) advanced in the shared counters once the batch is confirmed, before ``stored``."""
        if msg_id is None:
            self._count += 1
            msg_id = f"{self._prefix}{self._count}"
        self.queue.append(Unpublished(msg_id, record, stored, retry, mark))
        self.wake.set()
        self.check_full()

    def packet_id(self, device: str, counter: int, tag: str) -> str:
        """The message id of an authenticated packet, the same on every edge."""
        return f"p-{tag}-{kv_key(device)}-{counter}"

    def check_full(self) -> bool:
        """Past ``PUBLISH_HIGH`` waiting (or while JetStream refuses), full until below ``PUBLISH_LOW``."""
        if self.failing or len(self.queue) >= PUBLISH_HIGH:
            self.full = True
        elif len(self.queue) <= PUBLISH_LOW:
            self.full = False
        return self.full

    async def run(self) -> None:
        await self.link.ready.wait()
        js = self.link.js
        assert js is not None
        subject = self.link.opts.subject
        delay = RETRY_MIN_S
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
            batch = [self.queue[i] for i in range(min(len(self.queue), PUBLISH_CONCURRENCY))]
            sending = [item for item in batch if not item.seq]      # (the others: stored, to be shared)
            results = await asyncio.gather(*(js.publish(subject, item.record, headers={"Nats-Msg-Id": item.msg_id})
                                             for item in sending), return_exceptions=True)
            failed: list[Unpublished] = []
            error: BaseException | None = None
            for item, result in zip(sending, results):
                if isinstance(result, BaseException):
                    item.tries += 1
                    failed.append(item)
                    error = error or result
                    continue
                if result.duplicate:
                    self.counters.add("publish_duplicates")
                self.counters.add("published")
                item.seq = result.seq
            confirmed = [item for item in batch if item.seq]
            marks: dict[str, tuple[int, str]] = {}
            for item in confirmed:                # coalesced: one write per device per round
                if item.mark is not None and item.mark[1] > marks.get(item.mark[0], (-1, ""))[0]:
                    marks[item.mark[0]] = item.mark[1:]
            if marks and self.shared is not None:
                shared = self.shared
                outcomes = await asyncio.gather(*(shared.advance(d, c, t) for d, (c, t) in marks.items()),
                                                return_exceptions=True)
                unshared = {d for d, outcome in zip(marks, outcomes) if isinstance(outcome, BaseException)}
                if unshared:          # stored, not yet shared: no A yet; the next round tries again
                    self.counters.add("counter_write_errors", len(unshared))
                    error = error or next(o for o in outcomes if isinstance(o, BaseException))
                    failed.extend(item for item in confirmed if item.mark is not None and item.mark[0] in unshared)
                    confirmed = [item for item in confirmed if item.mark is None or item.mark[0] not in unshared]
            for item in confirmed:
                self.queue.remove(item)
                item.stored(item.seq)
            if failed:
                self.counters.add("publish_errors", len(failed))
                now = time.monotonic()
                if not self.failing or now - self._last_log >= LOG_EVERY_S:
                    self._last_log = now
                    log.error("jetstream: %d batch(es) not confirmed (%r); holding them, acknowledging nothing,"
                              " device reads paused; trying again", len(failed), error)
                self.failing = True
                self.check_full()
                await asyncio.sleep(delay)
                delay = min(delay * 2, PUBLISH_RETRY_MAX_S)
                for item in failed:
                    if item.seq:                 # in the stream: its counter is shared before anything else
                        continue
                    record = item.retry()
                    if record is None:           # nothing left that anyone waits for
                        self.queue.remove(item)
                        self.counters.add("unpublished_batches_of_gone_boards")
                        item.stored(0)
                    else:
                        item.record = record
            else:
                if self.failing:
                    log.info("jetstream: publishing again")
                self.failing = False
                delay = RETRY_MIN_S
                self.check_full()

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for what is queued to be confirmed: at a graceful stop."""
        deadline = time.monotonic() + timeout_s
        while self.queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class StreamFeeder:
    """Reads the stream in order and feeds the local parsers (``push(seq, record, targets)``); keeps,
    per local consumer, which batches it has acknowledged, and writes each consumer's floor (every
    batch up to it acknowledged) to the replicated ``<stream>_ACKS`` stream about once a second.

    Why not JetStream's durable consumers: in the cluster test (tests/test_cluster.py) nats-server
    2.9's replicated consumer state broke after a server was replaced and another cut off: servers
    answered different ack floors for one consumer, and batches delivered to nobody counted as
    acknowledged (stored nowhere, never delivered again). The stream itself stayed consistent on every
    server. So the progress is kept as messages in a stream (one per consumer, the last one counts),
    read back at start: the floor can be older than the truth, never newer (it is written after the
    acks), so a restart or another host taking over only sends some batches again, which the stores
    absorb. Redelivery of what a sink does not acknowledge in ``ack_wait_s`` is the file journal's
    (``InFlightLedger``: backoff per batch, at once for a sink that comes back)."""

    def __init__(self, link: StreamLink, local: list[str],
                 push: Callable[[int, bytes, list[str] | None], None], room: Callable[[], bool],
                 counters: Any) -> None:
        self.link = link
        self.local = local
        self.push = push             # hands a batch to the parsers' queue; targets None = every local consumer
        self.room = room             # the parsers' queue has room for more
        self.counters = counters
        self.ledger = InFlightLedger(local, link.opts.ack_wait_s)
        self.floors: dict[str, int] = {}          # consumer -> every seq up to it acknowledged
        self.read_to = 0                          # the highest seq read from the stream
        self.written: dict[str, int] = {}         # the floors last written to the acks stream

    @property
    def acks_stream(self) -> str:
        return f"{self.link.opts.stream}_ACKS"

    async def run(self) -> None:
        await self.link.ready.wait()
        await self._load_floors()
        await asyncio.gather(self._read(), self._redeliver(), self._checkpoint())

    async def _load_floors(self) -> None:
        from nats.js.errors import NotFoundError
        js = self.link.js
        assert js is not None
        delay = RETRY_MIN_S
        while True:
            try:
                info = await js.stream_info(self.link.opts.stream)
                first = info.state.first_seq or 1
                for name in self.local:
                    try:
                        msg = await js.get_last_msg(self.acks_stream, f"{self.acks_stream}.{name}")
                        floor = int(msg.data or b"0")
                    except NotFoundError:
                        floor = 0
                    self.floors[name] = self.written[name] = max(floor, first - 1)
                break
            except Exception as exc:  # noqa: BLE001  the cluster is away or electing: try again
                log.warning("jetstream: cannot read the consumers' floors (%s: %s); trying again",
                            type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        self.read_to = min(self.floors.values())
        log.info("jetstream: feeding %s from the stream, acknowledged up to %s", self.local, self.floors)

    async def _get(self, seq: int) -> bytes | None:
        """The batch ``seq`` (None: there is none, yet or any more)."""
        from nats.js.errors import NotFoundError
        js = self.link.js
        assert js is not None
        try:
            return (await js.get_msg(self.link.opts.stream, seq)).data or b""
        except NotFoundError:
            return None

    async def _read(self) -> None:
        opts = self.link.opts
        delay = RETRY_MIN_S
        idle = 0.005
        while True:
            if not self.room() or len(self.ledger) >= opts.max_ack_pending:
                await asyncio.sleep(0.01)
                continue
            seq = self.read_to + 1
            try:
                record = await self._get(seq)
                if record is None:
                    info = await self.link.js.stream_info(opts.stream)  # type: ignore[union-attr]
                    if info.state.last_seq < seq:          # the end of the stream: wait for more
                        await asyncio.sleep(idle)
                        idle = min(idle * 2, 0.01)
                        continue
                    record = await self._get(seq)          # (published between the two requests?)
                if record is None:
                    # Trimmed (every consumer had it) or never there: nothing to deliver at this seq.
                    log.warning("jetstream: batch %d is not in the stream (first %d, last %d); going on",
                                seq, info.state.first_seq, info.state.last_seq)
                    self.counters.add("stream_gaps")
                    self.read_to = max(seq, (info.state.first_seq or seq) - 1)
                    continue
                delay, idle = RETRY_MIN_S, 0.005
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  the cluster is away or electing: try again
                log.warning("jetstream: cannot read batch %d (%s: %s); trying again in %.1f s", seq,
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.read_to = seq
            missing = {name for name in self.local if seq > self.floors[name]}
            if not missing:
                continue
            self.ledger[seq] = InFlight(None, missing, time.monotonic())  # type: ignore[arg-type]
            self.push(seq, record, None if missing == set(self.local) else sorted(missing))
            self.counters.add("fed_batches")

    async def _redeliver(self) -> None:
        """What a local consumer has not acknowledged in ``ack_wait_s`` goes to it again."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for seq, entry in list(self.ledger.due(now)):
                if not self.room():
                    break
                try:
                    record = await self._get(seq)
                except Exception:  # noqa: BLE001  the cluster is away: the next round tries again
                    break
                if record is None:                  # cannot be: nothing trims above a floor
                    log.error("jetstream: batch %d is gone from the stream before %s had it", seq,
                              sorted(entry.pending))
                    self.counters.add("stream_batches_lost")
                    self.ledger.forget(seq)
                    continue
                entry.attempts += 1
                entry.sent_at = now
                self.counters.add("redelivered")
                self.push(seq, record, sorted(entry.pending) if entry.pending != set(self.local) else None)

    def acknowledged(self, consumer: str, seqs: list[int]) -> None:
        """``consumer`` (a local sink, the rollup worker) made ``seqs`` durable."""
        if consumer in self.floors:
            self.ledger.acknowledged(consumer, seqs, time.monotonic())

    def floor(self, consumer: str) -> int:
        for seq, entry in self.ledger.items():      # oldest first
            if consumer in entry.pending:
                return seq - 1
        return self.read_to

    async def _checkpoint(self) -> None:
        """About once a second: each consumer's floor to the acks stream; then the stream is trimmed
        below the lowest floor of every consumer of every host (``[journal] consumers``)."""
        js = self.link.js
        assert js is not None
        trimmed = 0
        while True:
            await asyncio.sleep(1.0)
            try:
                for name in self.local:
                    floor = self.floor(name)
                    self.floors[name] = max(self.floors[name], floor)
                    if floor > self.written.get(name, 0):
                        await js.publish(f"{self.acks_stream}.{name}", str(floor).encode())
                        self.written[name] = floor
                lowest = min([await self._written_floor(name) for name in self.link.consumers])
                if lowest > trimmed:
                    await js.purge_stream(self.link.opts.stream, seq=lowest + 1)   # below lowest + 1
                    trimmed = lowest
                    self.counters["stream_trimmed_to"] = lowest
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  the next round writes it (a stale floor: more redelivery)
                log.debug("jetstream: checkpoint not written (%s)", exc)

    async def _written_floor(self, name: str) -> int:
        if name in self.written:
            return self.written[name]
        from nats.js.errors import NotFoundError
        try:
            msg = await self.link.js.get_last_msg(self.acks_stream, f"{self.acks_stream}.{name}")  # type: ignore[union-attr]
        except NotFoundError:
            return 0                 # a consumer that never acknowledged anything: trim nothing
        return int(msg.data or b"0")


async def status(opts: JournalOptions, consumers: list[str], timeout_s: float = 3.0) -> dict[str, Any]:
    """The stream, each consumer's lag and the cluster's health, from JetStream's API: for
    ``sensorpipe status``. Raises on a cluster that does not answer."""
    import nats
    nc = await nats.connect(list(opts.servers), connect_timeout=timeout_s, max_reconnect_attempts=1,
                            allow_reconnect=False, name="sensorpipe-status")
    try:
        js = nc.jetstream(timeout=timeout_s)
        info = await js.stream_info(opts.stream)
        cluster = info.cluster
        out: dict[str, Any] = {
            "stream": opts.stream, "messages": info.state.messages, "bytes": info.state.bytes,
            "first_seq": info.state.first_seq, "last_seq": info.state.last_seq,
            "replicas": info.config.num_replicas or 1,
            "leader": cluster.leader if cluster else "",
            "peers": [{"name": p.name, "current": bool(p.current), "offline": bool(p.offline),
                       "lag": p.lag or 0} for p in ((cluster.replicas or []) if cluster else [])],
            "consumers": {},
        }
        from nats.js.errors import NotFoundError
        for name in consumers:
            try:
                floor = int((await js.get_last_msg(f"{opts.stream}_ACKS", f"{opts.stream}_ACKS.{name}")).data or b"0")
            except NotFoundError:
                floor = 0
            except Exception as exc:  # noqa: BLE001  one unreadable floor is worth a line, not a crash
                out["consumers"][name] = {"error": str(exc) or type(exc).__name__}
                continue
            out["consumers"][name] = {"acked_to": floor, "pending": max(0, info.state.last_seq - floor)}
        return out
    finally:
        await nc.close()


def run_status(opts: JournalOptions, consumers: list[str]) -> dict[str, Any]:
    return asyncio.run(status(opts, consumers))



def status_or_error(cfg: Any) -> dict[str, Any] | None:
    """``status`` for ``sensorpipe status``: None with the file journal, ``{"error": ...}`` when the
    cluster does not answer (the status of the rest is still worth printing)."""
    opts: JournalOptions = cfg.journal
    if opts.backend != "jetstream":
        return None
    try:
        return run_status(opts, opts.all_consumers(list(cfg.consumers())))
    except Exception as exc:  # noqa: BLE001  no server, no stream: said, not raised
        return {"stream": opts.stream, "error": f"{type(exc).__name__}: {exc}"}


def status_lines(journal: dict[str, Any]) -> list[str]:
    """The journal part of ``sensorpipe status``, for people."""
    if "error" in journal:
        return [f"journal: jetstream stream {journal['stream']}: NOT REACHABLE ({journal['error']})"]
    peers = journal["peers"]
    healthy = sum(1 for p in peers if p["current"] and not p["offline"]) + (1 if journal["leader"] else 0)
    quorum = journal["replicas"] // 2 + 1
    lines = [f"journal: jetstream stream {journal['stream']}: {journal['messages']} batches "
             f"({journal['bytes']} bytes) waiting for some consumer; replicas {journal['replicas']}, "
             f"{healthy} current (quorum {quorum}){'' if healthy >= quorum else ': NO QUORUM, edges cannot accept'}",
             f"  leader {journal['leader'] or 'NONE'}; "
             + ", ".join(f"{p['name']} {'offline' if p['offline'] else 'current' if p['current'] else 'behind'}"
                         + (f" (lag {p['lag']})" if p["lag"] else "") for p in peers)]
    for name, c in journal["consumers"].items():
        if "error" in c:
            lines.append(f"  consumer {name:10} UNKNOWN ({c['error']})")
        else:
            lines.append(f"  consumer {name:10} lag {c['pending']} batches (acknowledged up to {c['acked_to']},"
                         f" checkpointed each second)")
    return lines


async def forget_server(opts: JournalOptions, server: str, timeout_s: float = 5.0) -> str:
    """Move the stream's replica (and its consumers') off ``server``, a NATS server whose disk was lost:
    JetStream places it on another server and copies it there. A server that lost its store must come
    back under a new ``server_name``: under its old one it would vote in the stream's elections with an
    empty log, and a quorum of it and one other could lose what the third had confirmed."""
    import json

    import nats
    nc = await nats.connect(list(opts.servers), connect_timeout=timeout_s, max_reconnect_attempts=1,
                            allow_reconnect=False, name="sensorpipe-forget-server")
    said: list[str] = []
    try:
        # the batches, the consumers' floors and the shared counters (KV bucket): each has a replica
        for stream in (opts.stream, f"{opts.stream}_ACKS", f"KV_{opts.stream}_COUNTERS"):
            reply = await nc.request(f"$JS.API.STREAM.PEER.REMOVE.{stream}", json.dumps({"peer": server}).encode(),
                                     timeout=timeout_s)
            answer = json.loads(reply.data)
            error = answer.get("error")
            if error and "not a member" in str(error.get("description", "")):
                # JetStream already placed the replica elsewhere (it does once a new server has joined)
                said.append(f"stream {stream}: no replica on {server} (moved already)")
            elif error and answer.get("error", {}).get("err_code") == 10059 and stream != opts.stream:
                said.append(f"stream {stream}: none (made by the first edge that starts)")   # not found
            elif error:
                raise RuntimeError(f"stream {stream}: {error.get('description', str(error))}")
            else:
                said.append(f"stream {stream}: replica moved off {server}")
        return "\n".join(said)
    finally:
        await nc.close()
