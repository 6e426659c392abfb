"""What the HTTP worker asks the other workers, and what it hears from them.

Sockets (one zmq.asyncio context, owned by ``Backend``):
    query   DEALER  connect -> query ROUTER     JSON requests (docs/query-protocol.md), answers in order
    stream  SUB     connect -> query PUB        ``readings`` as the query worker takes them (live streams)
    command REQ     connect -> commands ROUTER  one fresh socket per request (docs/commands.md)

No logic of those workers is copied here: latest values, presence, history and status are the query
worker's answers; commands are the commands worker's.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Callable

import orjson
import zmq
import zmq.asyncio

from workers.core import envelope, runtime
from workers.core.config import Config

log = logging.getLogger(__name__)

ALL = "*"                                  # the live-stream topic of every device
STATUS_INTERVAL_S = 1.0                    # how often sink health is looked at for /readyz


class Unavailable(Exception):
    """A worker the request needs did not answer in time."""

    def __init__(self, worker: str, endpoint: str, timeout_s: float) -> None:
        super().__init__(f"the {worker} did not answer at {endpoint} within {timeout_s:g} s;"
                         " is the pipeline running? (`sensorpipe ctl status`)")
        self.worker = worker


class QueryClient:
    """Many concurrent requests over one DEALER socket. The query worker answers each connection's
    requests one by one, in the order they came, so answers are matched to waiting requests by order.
    A request that times out breaks that matching (its answer may still come): the socket is then
    replaced and every request still waiting fails, as a Lazy Pirate client drops its REQ socket."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, timeout_s: float) -> None:
        self.ctx, self.endpoint, self.timeout_s = ctx, endpoint, timeout_s
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.sock: zmq.asyncio.Socket | None = None
        self.reader: asyncio.Task | None = None

    def _open(self) -> zmq.asyncio.Socket:
        if self.sock is None:
            self.sock = runtime.socket(self.ctx, zmq.DEALER, connect=self.endpoint)
            self.reader = asyncio.get_running_loop().create_task(self._read(self.sock))
        return self.sock

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            if not self.waiting:
                continue                                  # an answer to a request given up on
            future = self.waiting.popleft()
            if not future.done():
                try:
                    future.set_result(orjson.loads(frames[-1]))
                except orjson.JSONDecodeError as exc:
                    future.set_exception(exc)

    def _reset(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock, self.reader = None, None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(Unavailable("query worker", self.endpoint, self.timeout_s))

    async def ask(self, message: dict) -> dict:
        sock = self._open()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        await sock.send_multipart([b"", orjson.dumps(message)])
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            if self.sock is sock:
                self._reset()
            raise Unavailable("query worker", self.endpoint, self.timeout_s) from None

    def close(self) -> None:
        self._reset()


class Subscriber:
    """One live-stream client: chunks of Server-Sent Events wait in a list until its stream takes them
    all in one write. Offering a chunk is an append and a flag, whatever the client's pace; a client
    that lets ``bound`` chunks pile up is cut off (counted) rather than slowing everyone else."""

    def __init__(self, topic: str, bound: int) -> None:
        self.topic = topic
        self.bound = bound
        self.pending: list[bytes] = []
        self.ready = asyncio.Event()
        self.cut = False

    def offer(self, chunk: bytes) -> bool:
        if len(self.pending) >= self.bound:
            return False
        self.pending.append(chunk)
        self.ready.set()
        return True

    def cut_off(self) -> None:
        self.cut = True
        self.pending.clear()
        self.ready.set()

    async def take(self, timeout_s: float) -> bytes | None:
        """What is waiting, in one piece; ``b""`` after ``timeout_s`` of nothing; None once cut off."""
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), timeout_s)
            except asyncio.TimeoutError:
                return b""
        if self.cut:
            return None
        chunks, self.pending = self.pending, []
        self.ready.clear()
        return b"".join(chunks)


class LiveHub:
    """Fans the query worker's ``readings`` out to live-stream clients, by device and for all devices.
    Each message is turned into text once per topic, however many clients listen to it."""

    def __init__(self, bound: int, watched: Callable[[bool], None] = lambda on: None) -> None:
        self.bound = bound
        self.topics: dict[str, set[Subscriber]] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.watched = watched              # told when the first client comes and the last one goes

    def subscribe(self, topic: str) -> Subscriber:
        subscriber = Subscriber(topic, self.bound)
        if not self.topics:
            self.watched(True)
        self.topics.setdefault(topic, set()).add(subscriber)
        self.counters["stream_clients_opened"] += 1
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        listeners = self.topics.get(subscriber.topic)
        if listeners is not None:
            listeners.discard(subscriber)
            if not listeners:
                del self.topics[subscriber.topic]
                if not self.topics:
                    self.watched(False)

    @property
    def clients(self) -> int:
        return sum(len(s) for s in self.topics.values())

    def publish(self, header: bytes, body: bytes) -> None:
        if not self.topics:
            return
        _, readings, events = envelope.parse_readings_rows(header, body)
        seen = envelope.parse_seen(header)
        by_device: dict[str, list[bytes]] = {}
        for device, ts, fields, tags in readings:
            if envelope.ROLLUP_TAG in tags:
                continue
            by_device.setdefault(device, []).append(sse("reading", {"device": device, "ts": ts // 1_000_000,
                                                                    "fields": fields}))
        for device, ts, kind, event_body in events:
            by_device.setdefault(device, []).append(sse("event", {"device": device, "ts": ts // 1_000_000,
                                                                  "kind": kind, "body": event_body}))
        for entry in seen:
            by_device.setdefault(entry.device, []).append(sse("seen", {"device": entry.device,
                                                                       "last_seen": entry.ts // 1_000_000,
                                                                       "via": entry.listener}))
        self.counters["stream_messages"] += 1
        everyone = self.topics.get(ALL)
        if everyone:
            self._offer(everyone, b"".join(chunk for chunks in by_device.values() for chunk in chunks))
        for device, chunks in by_device.items():
            listeners = self.topics.get(device)
            if listeners:
                self._offer(listeners, b"".join(chunks))

    def _offer(self, listeners: set[Subscriber], chunk: bytes) -> None:
        for subscriber in list(listeners):
            if not subscriber.offer(chunk):
                self.counters["stream_clients_too_slow"] += 1
                subscriber.cut_off()                     # its stream ends at its next take
                self.unsubscribe(subscriber)


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class SinkHealth:
    """When each enabled sink started failing (not ``ok``, or its stats stale), from the query
    worker's status, for /readyz: a sink failing for longer than ``sink_failing_for_s`` is not ready."""

    def __init__(self) -> None:
        self.failing_since: dict[str, float] = {}
        self.status: dict | None = None
        self.status_at = 0.0

    def update(self, status: dict, now: float, enabled: set[str]) -> None:
        """``enabled``: the sinks the configuration enables; one that has never reported is failing too."""
        self.status, self.status_at = status, now
        sinks = status.get("sinks", {})
        for name in enabled | set(sinks):
            summary = sinks.get(name)
            if summary is not None and summary.get("state") == "ok" and not summary.get("stale"):
                self.failing_since.pop(name, None)
            else:
                self.failing_since.setdefault(name, now)


class Backend:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ctx = zmq.asyncio.Context()
        self.query = QueryClient(self.ctx, cfg.endpoints.query, cfg.http.request_timeout_s)
        self.hub = LiveHub(cfg.http.stream_queue, self._watched)
        self.stream_sock: zmq.asyncio.Socket | None = None
        self.health = SinkHealth()
        self.started = time.monotonic()
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._stream()), loop.create_task(self._watch_status())]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.query.close()
        self.ctx.term()

    async def ask(self, message: dict) -> dict:
        return await self.query.ask(message)

    async def command(self, message: dict, timeout_s: float) -> dict:
        """One request to the commands worker on a fresh REQ socket (a send may be held for ``wait_s``,
        so its answers do not come in order)."""
        endpoint = self.cfg.endpoints.command
        sock = runtime.socket(self.ctx, zmq.REQ, connect=endpoint)
        try:
            await sock.send(orjson.dumps(message))
            if not await sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                raise Unavailable("commands worker", endpoint, timeout_s)
            return orjson.loads(await sock.recv())
        finally:
            sock.close(linger=0)

    def _watched(self, on: bool) -> None:
        """Readings come from the query worker only while someone watches a stream: a PUB sends
        nothing to a SUB that has no subscription, so with no stream open the pipeline does no work
        for the HTTP worker at all."""
        if self.stream_sock is not None:
            self.stream_sock.setsockopt(zmq.SUBSCRIBE if on else zmq.UNSUBSCRIBE, envelope.READINGS)

    async def _stream(self) -> None:
        sock = self.stream_sock = runtime.socket(self.ctx, zmq.SUB, connect=self.cfg.endpoints.stream, hwm=1000)
        if self.hub.topics:
            sock.setsockopt(zmq.SUBSCRIBE, envelope.READINGS)
        try:
            while True:
                message = await sock.recv_multipart()
                try:
                    self.hub.publish(message[1], message[2])
                except (envelope.EnvelopeError, IndexError, ValueError) as exc:
                    self.hub.counters["bad_messages"] += 1
                    log.warning("ignoring a bad live message: %s", exc)
        finally:
            self.stream_sock = None
            sock.close(linger=0)

    async def _watch_status(self) -> None:
        while True:
            try:
                self.health.update(await self.ask({"op": "status"}), time.monotonic(), set(self.cfg.sinks.enabled()))
            except Unavailable:
                self.health.status = None
            except Exception:                                 # never let the watcher die
                log.exception("status watch failed")
            await asyncio.sleep(STATUS_INTERVAL_S)
