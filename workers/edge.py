"""The TCP edge: holds the device connections, cuts frames, journals them, pushes them to parsers.

Sockets:
    frames  PUSH  bind    -> parsers PULL          batches of frames (envelope ``frames``)
    acks    PULL  bind    <- sinks PUSH            ``ack``: batches durable in a sink
    inject  PULL  bind    <- replay, MQTT PUSH     ``inject``: frames to journal like device frames
    live    PUB   connect -> query SUB             ``stats``
Plus one TCP listener per configured listener (asyncio, one process for thousands of connections).

A batch is journaled before any device is acknowledged (the binary ``A``) and before it is pushed.
It stays in flight until every enabled sink has acknowledged it; one that is not acknowledged in time
(a parser or sink died holding it) is sent again to the sinks that miss it. On start, whatever is
still in the journal is replayed. When parsers cannot keep up, or the journal reaches its bound, the
edge stops reading device sockets: devices wait, nothing is dropped and memory stays bounded.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import zmq
import zmq.asyncio

from workers import envelope, runtime
from workers.config import Config, Listener
from workers.envelope import Conn
from workers.framing import make_framer
from workers.journal import Journal, Location

log = logging.getLogger(__name__)

OUTQ_HIGH = 64            # batches waiting for a parser before the edge stops reading devices
OUTQ_LOW = 16
SWEEP_INTERVAL_S = 5.0
REDELIVER_PER_TICK = 256
BINARY_ACK = b"A"


@dataclass
class InFlight:
    location: Location
    pending: set[str]          # sinks that have not acknowledged yet
    sent_at: float             # monotonic; 0 = never sent (replayed from the journal)
    attempts: int = 0


class DeviceConnection(asyncio.Protocol):
    def __init__(self, edge: "Edge", listener: Listener) -> None:
        self.edge = edge
        self.listener = listener
        self.framer = make_framer(listener.framing, listener.max_frame_bytes)
        self.binary = listener.framing == "binary"
        self.transport: asyncio.Transport | None = None
        self.conn: Conn | None = None
        self.last_active = time.monotonic()
        self.last_ts_ms = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.conn = Conn(self.edge.next_conn_id(), self.listener.name, f"{peer[0]}:{peer[1]}")
        self.edge.opened(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        frames, rejects = self.framer.feed(data)
        if frames or rejects:
            self.edge.accept(self, frames, rejects)
        if self.framer.fatal:
            self.edge.counters.add("closed_fatal")
            log.info("closing %s: %s", self.conn and self.conn.peer, self.framer.fatal)
            self.close()

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        self.closed = True
        self.edge.closed(self)

    def _finish(self) -> None:
        if not self.closed:
            frames, rejects = self.framer.finish()
            if frames or rejects:
                self.edge.accept(self, frames, rejects)

    def next_ts(self) -> int:
        """Arrival time in ns, strictly increasing per connection (1 ms apart at least), so that two
        frames of one device never share the (device, field, timestamp) key readings are stored by."""
        return self.next_stamps(1)[0]

    def next_stamps(self, count: int) -> range:
        """``next_ts`` for ``count`` frames that arrived in one read, in one step."""
        now_ms = time.time_ns() // 1_000_000
        first = now_ms if now_ms > self.last_ts_ms else self.last_ts_ms + 1
        self.last_ts_ms = first + count - 1
        return range(first * 1_000_000, (first + count) * 1_000_000, 1_000_000)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Edge:
    def __init__(self, cfg: Config, ctx: zmq.asyncio.Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.sinks = set(cfg.sinks.enabled())
        self.counters = runtime.Counters("edge")
        self.journal = Journal(Path(cfg.data_dir) / "journal", cfg.edge.journal_segment_bytes,
                               cfg.edge.fsync, cfg.edge.fsync_interval_ms / 1000)
        self.connections: set[DeviceConnection] = set()
        self.per_listener: dict[str, int] = {}
        self.inflight: OrderedDict[int, InFlight] = OrderedDict()
        self.outq: asyncio.Queue[list[bytes]] = asyncio.Queue()
        self.paused = False
        self.stop = asyncio.Event()
        self._conn_ids = 0
        self._pending: list[tuple[bytes, int, int]] = []
        self._batch_conns: dict[int, int] = {}
        self._batch_conn_list: list[Conn] = []
        self._binary_acks: list[DeviceConnection] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self.servers: list[asyncio.AbstractServer] = []

    # ------------------------------------------------------------------ connections

    def next_conn_id(self) -> int:
        self._conn_ids += 1
        return self._conn_ids

    def opened(self, conn: DeviceConnection) -> None:
        name = conn.listener.name
        if self.per_listener.get(name, 0) >= conn.listener.max_connections or self.stop.is_set():
            self.counters.add("refused_connections")
            conn.close()
            return
        self.connections.add(conn)
        self.per_listener[name] = self.per_listener.get(name, 0) + 1
        self.counters.add("connections_opened")
        if self.paused and conn.transport is not None:
            conn.transport.pause_reading()

    def closed(self, conn: DeviceConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.per_listener[conn.listener.name] -= 1

    # ------------------------------------------------------------------ batching

    def accept(self, conn: DeviceConnection, frames: list[bytes], rejects: list[tuple[str, bytes]]) -> None:
        assert conn.conn is not None
        index = self._batch_conns.get(conn.conn.conn_id)
        if index is None:
            index = self._batch_conns[conn.conn.conn_id] = len(self._batch_conn_list)
            self._batch_conn_list.append(conn.conn)
        pending = self._pending
        if frames:
            pending.extend(zip(frames, conn.next_stamps(len(frames)), repeat(index)))
        for reason, raw in rejects:
            pending.append(envelope.reject_frame(reason, raw, conn.next_ts(), index))
        if rejects:
            self.counters.add("rejected_frames", len(rejects))
            log.info("rejected %d frame(s) from %s: %s; first bytes %r", len(rejects), conn.conn.peer,
                     rejects[0][0], rejects[0][1][:60])
        self.counters.add("frames", len(frames))
        if conn.binary and frames:
            self._binary_acks.extend([conn] * len(frames))
        self._schedule()

    def inject(self, conns: list[Conn], body: bytes) -> None:
        """Frames from another worker (replay, MQTT): journaled and pushed like device frames."""
        index_of = {}
        for frame in envelope.iter_frames(body, conns):
            key = (frame.conn.conn_id, frame.conn.listener, frame.conn.peer)
            if key not in index_of:
                index_of[key] = len(self._batch_conn_list)
                self._batch_conn_list.append(frame.conn)
            ci = index_of[key]
            if frame.reject is not None:
                self._pending.append(envelope.reject_frame(frame.reject, frame.payload, frame.recv_ts, ci))
            else:
                self._pending.append((frame.payload, frame.recv_ts, ci))
        self.counters.add("injected")
        self._schedule()

    def _schedule(self) -> None:
        if len(self._pending) >= self.cfg.edge.batch_max_frames:
            self.flush()
        elif self._flush_timer is None and self._pending:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(self.cfg.edge.batch_max_delay_ms / 1000, self.flush)

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        conns, body = self._batch_conn_list, envelope.pack_frames(self._pending)
        seq, location = self.journal.append(envelope.journal_record(conns, body))
        for conn in self._binary_acks:            # journaled: now the board may clear its buffer
            if not conn.closed and conn.transport is not None:
                conn.transport.write(BINARY_ACK)
                self.counters.add("binary_acks")
        self.inflight[seq] = InFlight(location, set(self.sinks), time.monotonic())
        self.outq.put_nowait(envelope.frames_message(seq, conns, body))
        self.counters.add("batches")
        self._pending, self._batch_conns, self._batch_conn_list, self._binary_acks = [], {}, [], []
        self._check_pressure()

    # ------------------------------------------------------------------ backpressure

    def _check_pressure(self) -> None:
        full = (self.outq.qsize() >= OUTQ_HIGH
                or len(self.inflight) >= self.cfg.edge.max_inflight_batches
                or self.journal.size >= self.cfg.edge.journal_max_bytes)
        if full and not self.paused:
            self.paused = True
            self.counters.add("paused")
            log.warning("pausing device reads: %d batches queued for parsers, %d in flight, journal %d bytes",
                        self.outq.qsize(), len(self.inflight), self.journal.size)
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.pause_reading()
        elif self.paused and not full and self.outq.qsize() <= OUTQ_LOW \
                and len(self.inflight) < self.cfg.edge.max_inflight_batches * 0.8 \
                and self.journal.size < self.cfg.edge.journal_max_bytes * 0.8:
            self.paused = False
            log.info("resuming device reads")
            for conn in self.connections:
                if conn.transport is not None and not conn.transport.is_closing():
                    conn.transport.resume_reading()

    # ------------------------------------------------------------------ acknowledgements

    def acknowledged(self, sink: str, seqs: list[int]) -> None:
        for seq in seqs:
            entry = self.inflight.get(seq)
            if entry is None:
                continue
            entry.pending.discard(sink)
            if not entry.pending:
                del self.inflight[seq]
                self.journal.done(entry.location, seq)
                self.counters.add("batches_done")
        self._check_pressure()

    def redeliver(self, now: float) -> None:
        """Send again what a sink has not acknowledged in time, to the sinks that miss it."""
        budget = REDELIVER_PER_TICK
        timeout = self.cfg.edge.redeliver_after_s
        for seq, entry in self.inflight.items():
            if budget <= 0 or self.outq.qsize() >= OUTQ_HIGH:
                break
            if entry.sent_at and now - entry.sent_at < timeout * (2 ** min(entry.attempts, 4)):
                continue
            _, record = self.journal.read(entry.location)
            conns, body = envelope.parse_journal_record(record)
            targets = None if entry.sent_at == 0 else sorted(entry.pending)
            self.outq.put_nowait(envelope.frames_message(seq, conns, body, targets))
            if entry.sent_at:
                entry.attempts += 1
                self.counters.add("redelivered")
                if entry.attempts == 1:
                    log.warning("batch %d not acknowledged by %s after %.0f s: sending it again",
                                seq, sorted(entry.pending), timeout)
            else:
                self.counters.add("replayed")
            entry.sent_at = now
            budget -= 1

    def sweep_idle(self, now: float) -> None:
        for conn in list(self.connections):
            if now - conn.last_active > conn.listener.idle_timeout_s:
                self.counters.add("closed_idle")
                conn.close()

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        ctx = self.ctx
        frames = runtime.socket(ctx, zmq.PUSH, bind=self.cfg.endpoints.frames, hwm=1000)
        acks = runtime.socket(ctx, zmq.PULL, bind=self.cfg.endpoints.acks)
        inject = runtime.socket(ctx, zmq.PULL, bind=self.cfg.endpoints.inject, hwm=1000)
        live = runtime.socket(ctx, zmq.PUB, connect=self.cfg.endpoints.live)
        tasks: list[asyncio.Task] = []
        try:
            replayed = 0
            for seq, _, location in self.journal.recover():
                self.inflight[seq] = InFlight(location, set(self.sinks), 0.0)
                replayed += 1
            if replayed:
                log.info("journal: %d batches to replay from the last run", replayed)
            loop = asyncio.get_running_loop()
            for listener in self.cfg.listeners:
                server = await loop.create_server(lambda lst=listener: DeviceConnection(self, lst),
                                                  listener.host, listener.port, reuse_address=True,
                                                  backlog=4096)
                self.servers.append(server)
                log.info("listening on %s (%s framing, %s decoder)", listener.bind, listener.framing,
                         listener.decoder)
            tasks = [asyncio.create_task(self._send_loop(frames)),
                     asyncio.create_task(self._ack_loop(acks)),
                     asyncio.create_task(self._inject_loop(inject)),
                     asyncio.create_task(self._housekeeping(live))]
            await self.stop.wait()
            log.info("stopping: closing listeners and flushing")
            for server in self.servers:
                server.close()
            for conn in list(self.connections):
                conn._finish()
                conn.closed = True
                conn.close()
            self.flush()
            deadline = time.monotonic() + 5
            while not self.outq.empty() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.journal.close()
            for sock in (frames, acks, inject, live):
                sock.close(linger=0)
            log.info("stopped: %d batches still in flight stay in the journal", len(self.inflight))

    async def _send_loop(self, frames: zmq.asyncio.Socket) -> None:
        while True:
            message = await self.outq.get()
            await frames.send_multipart(message, copy=False)
            if self.paused:
                self._check_pressure()

    async def _ack_loop(self, acks: zmq.asyncio.Socket) -> None:
        while True:
            message = await acks.recv_multipart()
            try:
                sink, seqs = envelope.parse_ack(message)
            except envelope.EnvelopeError as exc:
                self.counters.add("bad_messages")
                log.warning("ignoring a bad ack: %s", exc)
                continue
            self.acknowledged(sink, seqs)

    async def _inject_loop(self, inject: zmq.asyncio.Socket) -> None:
        while True:
            message = await inject.recv_multipart()
            try:
                if len(message) != 3 or message[0] != envelope.INJECT:
                    raise envelope.EnvelopeError(f"expected an inject message, got {message[:1]!r}")
                _, _, conns = envelope.parse_frames_header(message[1])
                self.inject(conns, message[2])
            except envelope.EnvelopeError as exc:
                self.counters.add("bad_messages")
                log.warning("ignoring a bad inject message: %s", exc)

    async def _housekeeping(self, live: zmq.asyncio.Socket) -> None:
        next_redeliver = next_sweep = next_stats = 0.0
        while True:
            await asyncio.sleep(runtime.POLL_MS / 1000)
            now = time.monotonic()
            self.journal.tick()
            if now >= next_redeliver:
                next_redeliver = now + 1.0
                self.redeliver(now)
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL_S
                self.sweep_idle(now)
            self._check_pressure()
            if now < next_stats:
                continue
            next_stats = now + runtime.STATS_INTERVAL_S
            self.counters["connections"] = len(self.connections)
            self.counters["inflight_batches"] = len(self.inflight)
            self.counters["journal_bytes"] = self.journal.size
            self.counters["paused_now"] = int(self.paused)
            self.counters["fsyncs"] = self.journal.fsyncs
            try:
                await live.send_multipart(envelope.stats_message("edge", dict(self.counters)), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass


def main(cfg: Config) -> int:
    ctx = zmq.asyncio.Context()
    try:
        return asyncio.run(_main(cfg, ctx))
    finally:
        ctx.term()


async def _main(cfg: Config, ctx: zmq.asyncio.Context) -> int:
    import signal

    edge = Edge(cfg, ctx)
    loop = asyncio.get_running_loop()
    stops = 0

    def on_signal() -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            import os
            os._exit(1)
        edge.stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    await edge.run()
    return runtime.EXIT_OK
