"""The TCP edge: holds the device connections, cuts frames, journals them, pushes them to parsers.

Sockets:
    frames    PUSH    bind    -> parsers PULL          batches of frames (envelope ``frames``)
    acks      PULL    bind    <- sinks PUSH            ``ack``: batches durable in a sink
    inject    ROUTER  bind    <- MQTT DEALER, replay REQ  ``inject``: frames to journal like device frames;
                                                       answered ``injected`` once journaled
    downlink  DEALER  connect <-> commands ROUTER      ``deliver``: a line to write to a device's
                                                       connection; answered ``delivered``
    live      PUB     connect -> query SUB             ``stats``
Plus one TCP listener per configured listener (asyncio, one process for thousands of connections).
Connection ids start from the clock (microseconds) at each start, so an id the commands worker still
holds from before a restart never names another device's new connection.

A batch is journaled before any device is acknowledged (the binary ``A``) and before it is pushed.
It stays in flight until every enabled sink (and the rollup worker) has acknowledged it; one that is not acknowledged in time
(a parser or sink died holding it) is sent again to the sinks that miss it, less often the longer
they stay silent, and at once when they come back. On start, what the journal holds that some sink
has not acknowledged is replayed to those sinks. When parsers cannot keep up, the journal reaches its
bound or cannot be written, the edge stops reading device sockets and injected frames: devices wait,
nothing is dropped and memory stays bounded. The full design is in docs/durability.md.

With ``[journal] backend = "jetstream"`` the journal is a stream replicated on NATS servers instead
(``workers.core.jetstream``, docs/scale-out.md): a batch is answered once JetStream confirmed it, and
on a host that runs sinks the edge feeds its parsers from the stream (the stream's sequence is the
seq), notes the sinks' acks, keeps each sink's floor in JetStream and sends again what is not acked.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from itertools import repeat
from pathlib import Path
from typing import Callable, cast

import zmq
import zmq.asyncio

from workers.core import envelope, runtime, worker
from workers.core.stamps import ArrivalClock
from workers.core.config import Config, Listener
from workers.core.envelope import Conn
from workers.core.credentials import PACKET_TRAILER
from workers.core.framing import make_framer
from workers.core.guard import Guard, Owed, Session
from workers.core.inflight import InFlight, InFlightLedger
from workers.core.journal import Journal, JournalError
from workers.core.jetstream import MAX_EDGES, BatchPublisher, SharedCounters, StreamFeeder, StreamLink

log = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim      # glibc only; elsewhere the heap is left as is
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()

OUTQ_HIGH = 64            # batches waiting for a parser before the edge stops reading devices
OUTQ_LOW = 16
FRAMES_HWM = 8            # batches ZeroMQ may queue per parser: the backlog waits in outq, where it is
                          # counted, bounded and not yet on the redelivery clock
SWEEP_INTERVAL_S = 5.0
REDELIVER_PER_TICK = 256
CHECKPOINT_INTERVAL_S = 1.0        # how often acknowledgements are checkpointed (less replay after a restart)
LOG_EVERY_S = 10.0
BINARY_ACK = b"A"
BATCH_MAX_BYTES = 8 * 1024 * 1024  # a batch is cut at this many frame bytes too (runtime.BATCH_MESSAGE_BYTES)
DOWNLINK_BUFFER_MAX = 64 * 1024    # lines waiting for a device that does not read: refuse more
TRIM_AFTER_BYTES = 4 * 1024 * 1024

NAP_S = 0.002                      # the loop's nap after a turn that read few devices (Edge.nap)
NAP_READS = 32                     # fewer reads than this in a turn: a nap follows it

_monotonic = time.monotonic


class DeviceConnection(asyncio.Protocol):
    # Slots: a fleet's 10,000 connections are each read once a second, with caches long cold by then;
    # fewer, smaller objects per read are most of what that read costs the edge's Python.
    __slots__ = ("edge", "listener", "binary", "framer", "lines", "session", "unscreened", "transport", "conn",
                 "last_progress", "closed", "finished", "held", "acks_owed", "last_owed", "close_when_answered")

    def __init__(self, edge: "Edge", listener: Listener) -> None:
        self.edge = edge
        self.listener = listener
        self.binary = listener.framing == "binary"
        self.framer = make_framer(listener.framing, listener.max_frame_bytes,
                                  PACKET_TRAILER if self.binary and listener.auth == "required" else 0)
        self.lines = self.framer.lines          # once the device writes lines: a read's short path
        self.session: Session | None = None     # the guard's: limits, TLS, who it authenticated as
        self.unscreened = False                 # the guard passes every frame on as it is (set on admit)
        self.transport: asyncio.Transport | None = None
        self.conn: Conn | None = None
        # idle_timeout_s is measured from the last frame cut, not the last byte read: a byte every few
        # seconds is no progress and must not hold a connection (and its partial frame) forever.
        self.last_progress = time.monotonic()
        self.closed = False
        self.finished = False          # the framer's finish() has run (hang-up, or the edge cut it off)
        self.held = 0                  # bytes of an unfinished frame the framer keeps (edge-wide budget)
        self.acks_owed = 0             # binary packets read, not yet journaled and answered with an A
        self.last_owed: Owed | None = None   # the newest of them (a resend's A goes out behind it)
        self.close_when_answered = False   # the board half-closed, or a bad header ended its stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's TCP transports have the Transport methods without subclassing asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.conn = Conn(self.edge.next_conn_id(), self.listener.name, f"{peer[0]}:{peer[1]}")
        self.edge.opened(self)

    def data_received(self, data: bytes) -> None:
        edge = self.edge
        edge.turn_reads += 1
        if edge.nap_handle is None:
            edge.nap_handle = edge.loop.call_soon(edge.nap)   # type: ignore[union-attr]   # (set once one connected)
        lines = self.lines
        if lines is not None:
            # A board's write: whole lines, nothing held before or after them, nothing rejected.
            frames = lines.whole_lines(data)
            if frames is not None:
                if not frames:
                    return                   # a blank line: no frame, no progress
                if self.unscreened:
                    self.last_progress = _monotonic()
                    edge.take_lines(self, frames)
                    return
                frames, rejects = edge.guard.screen(self, frames, [])
                if frames or rejects:
                    self.last_progress = _monotonic()
                    edge.accept(self, frames, rejects)
                return
        framer = self.framer
        rejected = framer.rejected_bytes
        frames, rejects = edge.guard.screen(self, *framer.feed(data))
        if frames or rejects:
            self.last_progress = _monotonic()
            edge.accept(self, frames, rejects)
        if framer.rejected_bytes != rejected:
            edge.counters.add("rejected_bytes", framer.rejected_bytes - rejected)
        edge.hold(self, framer.held_bytes)
        if framer.fatal:
            edge.counters.add("closed_fatal")
            log.info("closing %s: %s", self.conn and self.conn.peer, framer.fatal)
            self.close_after_answers()
        elif lines is None:
            self.lines = framer.lines

    def eof_received(self) -> bool:
        self._finish()
        if self.edge.guard.hold_after_eof(self):   # a hello still being checked: answer it first
            return True
        if self.acks_owed:           # the board half-closed right after sending: its A still goes out
            self.close_after_answers()
            return True              # keep our write side open until then
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._finish()
        elif not self.finished and self.held:  # reset: the device did not end its last frame, nor was it answered
            self.finished = True
            self.edge.counters.add("dropped_partial_bytes", self.held)
        self.closed = True
        self.edge.closed(self)

    def _finish(self) -> None:
        if self.finished or self.closed:
            return
        self.finished = True
        rejected = self.framer.rejected_bytes
        frames, rejects = self.edge.guard.screen(self, *self.framer.finish())
        if frames or rejects:
            self.edge.accept(self, frames, rejects)
        if self.framer.rejected_bytes != rejected:
            self.edge.counters.add("rejected_bytes", self.framer.rejected_bytes - rejected)
        self.edge.hold(self, 0)

    def cut_off(self, counter: str) -> None:
        """The edge closes the connection (idle, memory): an unfinished frame is not a frame, the device
        did not end it. Its bytes are counted as dropped; nothing was acknowledged for them."""
        if not self.finished and not self.closed:
            self.finished = True
            if self.held:
                self.edge.counters.add("dropped_partial_bytes", self.held)
            self.edge.hold(self, 0)
        self.edge.counters.add(counter)
        self.close_after_answers()

    def close_after_answers(self) -> None:
        """Close once every packet read is journaled and its A written: a board must never have to send
        again what was stored. Nothing more is read meanwhile."""
        transport = self.transport
        if self.acks_owed and transport is not None and not transport.is_closing():
            self.close_when_answered = True
            transport.pause_reading()
        else:
            self.close()

    def next_ts(self) -> int:
        """Arrival time in ns, strictly increasing across the whole edge (``workers.core.stamps``), so
        that two frames never share the (device, field, timestamp) key readings are stored by."""
        return self.edge.arrivals.stamp()

    def next_stamps(self, count: int) -> range:
        """``next_ts`` for ``count`` frames that arrived in one read, in one step."""
        return self.edge.arrivals.stamps(count)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Edge:
    def __init__(self, cfg: Config, ctx: zmq.asyncio.Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.sinks = set(cfg.consumers())          # the enabled sinks and the rollup worker
        self.counters = runtime.Counters("edge")
        streamed = cfg.journal.backend == "jetstream"
        # one clock for every connection; with several edges, in this edge's own slot
        self.arrivals = ArrivalClock(cfg.journal.edge_id, MAX_EDGES) if streamed else ArrivalClock()
        self.guard = Guard(cfg, self.counters)
        self.journal = Journal(Path(cfg.data_dir) / "journal", cfg.edge.journal_segment_bytes,
                               cfg.edge.fsync, cfg.edge.fsync_interval_ms / 1000)
        if not streamed:
            self.guard.keep_counters_beside(self.journal.directory)
            self.journal.companion = self.guard.sync_counter_log
        self.connections: set[DeviceConnection] = set()
        self.per_listener: dict[str, int] = {}
        self.inflight = InFlightLedger(self.sinks, cfg.edge.redeliver_after_s)
        self.outq: asyncio.Queue[tuple[int, list[bytes]]] = asyncio.Queue()   # (seq, frames message)
        self.paused = False
        self.reading = asyncio.Event()          # set while not paused: the inject loop waits on it
        self.reading.set()
        self.journal_failing = False            # the last append failed (disk full, I/O error)
        self.failed = False                     # a task died: exit non-zero so supervisord restarts us
        self.last_ack = self.inflight.last_ack  # sink -> monotonic time of its last ack
        self._last_redeliver_log = 0.0
        self.stop = asyncio.Event()
        self._conn_ids = time.time_ns() // 1000
        self.by_id: dict[int, DeviceConnection] = {}
        self._inject_replies: list[tuple[list[bytes], int]] = []   # (route, ref) answered at the next flush
        self._inject_sock: zmq.asyncio.Socket | None = None
        self._pending: list[tuple[bytes, int, int]] = []
        self._pending_bytes = 0
        self.held_total = 0                     # unfinished frames held over all connections
        self.max_partial_bytes = cfg.edge.max_partial_bytes
        self._freed_since_trim = 0
        self._shedding = False
        self._last_shed_log = -LOG_EVERY_S
        self.sweep_interval = min([SWEEP_INTERVAL_S, *(lst.idle_timeout_s / 4 for lst in cfg.listeners)])
        self._batch_conns: dict[int, int] = {}
        self._batch_max_frames = cfg.edge.batch_max_frames
        self.frames_read = 0                    # frames read from devices (the counter "frames", kept
                                                # here and folded in before stats: a read costs less)
        self._batch_conn_list: list[Conn] = []
        self._binary_acks: list[Owed] = []      # the binary packets of the pending batch, in order
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_urgent = False              # the timer is due at ack_max_delay_ms
        self._batch_started = 0.0               # loop time of the pending batch's first frame
        self.servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.turn_reads = 0                     # device reads since the last nap
        self.nap_handle: asyncio.Handle | None = None
        self.link: StreamLink | None = None       # [journal] backend = "jetstream": the cluster
        self.publisher: BatchPublisher | None = None
        self.feeder: StreamFeeder | None = None   # on a host with sinks: feeds them from the stream
        if streamed:
            local = list(cfg.consumers())
            self.link = StreamLink(cfg.journal, cfg.journal.all_consumers(local),
                                   f"sensorpipe-edge-{cfg.journal.edge_id}")
            self.publisher = BatchPublisher(self.link, cfg.journal.edge_id, self.counters)
            if self.guard.store is not None:     # authenticated packets: their counters shared by every edge
                self.guard.shared = self.publisher.shared = SharedCounters(self.link, self.counters)
            if local:
                self.feeder = StreamFeeder(self.link, local, self._feed, lambda: self.outq.qsize() < OUTQ_LOW,
                                           self.counters)

    # ------------------------------------------------------------------ connections

    def next_conn_id(self) -> int:
        self._conn_ids += 1
        return self._conn_ids

    def opened(self, conn: DeviceConnection) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        name = conn.listener.name
        if self.per_listener.get(name, 0) >= conn.listener.max_connections or self.stop.is_set():
            self.counters.add("refused_connections")
            conn.close()
            return
        if not self.guard.admit(conn):
            return
        self.connections.add(conn)
        self.per_listener[name] = self.per_listener.get(name, 0) + 1
        if conn.conn is not None:
            self.by_id[conn.conn.conn_id] = conn
        self.counters.add("connections_opened")
        if self.paused and conn.transport is not None:
            conn.transport.pause_reading()

    def closed(self, conn: DeviceConnection) -> None:
        self.hold(conn, 0)
        if conn in self.connections:
            self.connections.discard(conn)
            self.per_listener[conn.listener.name] -= 1
        if conn.conn is not None:
            self.by_id.pop(conn.conn.conn_id, None)
        self.guard.release(conn)

    def write_downlink(self, downlink: envelope.Downlink) -> str | None:
        """Write a command or reply line to the device's connection; the error, or None once written."""
        conn = self.by_id.get(downlink.conn_id)
        if conn is None or conn.closed or conn.transport is None or conn.transport.is_closing():
            return "not connected"
        if conn.listener.name != downlink.listener:
            return f"connection {downlink.conn_id} is on listener {conn.listener.name}, not {downlink.listener}"
        if conn.binary:
            return "a binary connection takes no commands"
        if not self.guard.may_command(conn, downlink.device):
            self.counters.add("downlink_refused")
            return f"connection {downlink.conn_id} did not authenticate as {downlink.device}"
        if conn.transport.get_write_buffer_size() > DOWNLINK_BUFFER_MAX:
            self.counters.add("downlink_refused_unread")
            return (f"the device is not reading its connection ({conn.transport.get_write_buffer_size()}"
                    " bytes of earlier lines still waiting)")
        conn.transport.write(downlink.payload + b"\n")
        self.counters.add("downlink_lines")
        return None

    def hold(self, conn: DeviceConnection, held: int) -> None:
        """Account for the unfinished frame ``conn``'s framer keeps. Past ``max_partial_bytes`` over all
        connections, the connections that hold some and made progress least recently are cut off until
        a quarter of the budget is free again: a crowd of half-sent frames cannot grow the edge without
        bound, and a device that finishes its frames in time is not the one closed."""
        if held == conn.held:
            return
        if held < conn.held:
            self._freed_since_trim += conn.held - held
        self.held_total += held - conn.held
        conn.held = held
        if self.held_total <= self.max_partial_bytes or self._shedding:
            return
        holders = sorted((c for c in self.connections if c.held and not c.finished), key=lambda c: c.last_progress)
        target = self.max_partial_bytes * 3 // 4
        closed = 0
        self._shedding = True
        try:
            for holder in holders:
                if self.held_total <= target:
                    break
                holder.cut_off("closed_memory")
                closed += 1
        finally:
            self._shedding = False
        now = time.monotonic()
        if now - self._last_shed_log >= LOG_EVERY_S:
            self._last_shed_log = now
            log.warning("unfinished frames over [edge] max_partial_bytes (%d): closed %d connection(s) that"
                        " held them longest without progress (counter closed_memory)", self.max_partial_bytes,
                        closed)

    def release_memory(self) -> None:
        """Give the heap freed by many unfinished frames back to the system at the next sweep: glibc
        keeps freed blocks below its mmap threshold (64 KiB lines are) for reuse. Measured with 1,000
        connections holding 64,000 bytes each under the 16 MiB cap: 45 MiB RSS with it, 66 without
        (benchmarks/partial_frames.py)."""
        if self._freed_since_trim < TRIM_AFTER_BYTES:
            return
        self._freed_since_trim = 0
        if _malloc_trim is not None:
            _malloc_trim(0)
            self.counters.add("memory_trims")

    def nap(self) -> None:
        """Called once per turn of the event loop that read devices. A turn that read only a few (a fleet:
        thousands of boards each writing now and then) is followed by a short sleep, so that the next
        poll finds a few dozen sockets ready instead of one or two: fewer wake-ups and polls per read.
        A busy loop (boards at full speed: many reads a turn) never sleeps."""
        self.nap_handle = None
        reads, self.turn_reads = self.turn_reads, 0
        if reads < NAP_READS:
            time.sleep(NAP_S)

    # ------------------------------------------------------------------ batching

    def take_lines(self, conn: DeviceConnection, frames: list[bytes]) -> None:
        """``accept`` of frames from a connection the guard does not screen: a board's write, which in
        a fleet is nearly every read the edge makes, so it is kept to a few steps."""
        conn_id = conn.conn.conn_id   # type: ignore[union-attr]   # (set once connected)
        index = self._batch_conns.get(conn_id)
        if index is None:
            index = self._batch_conns[conn_id] = len(self._batch_conn_list)
            self._batch_conn_list.append(conn.conn)   # type: ignore[arg-type]
        pending = self._pending
        if len(frames) == 1:
            frame = frames[0]
            pending.append((frame, self.arrivals.stamp(), index))
            self._pending_bytes += len(frame)
            self.frames_read += 1
        else:
            pending.extend(zip(frames, self.arrivals.stamps(len(frames)), repeat(index)))
            self._pending_bytes += sum(map(len, frames))
            self.frames_read += len(frames)
        if self._flush_timer is None or len(pending) >= self._batch_max_frames \
                or self._pending_bytes >= BATCH_MAX_BYTES:
            self._schedule()

    def accept(self, conn: DeviceConnection, frames: list[bytes], rejects: list[tuple[str, bytes]]) -> None:
        assert conn.conn is not None
        index = self._batch_conns.get(conn.conn.conn_id)
        if index is None:
            index = self._batch_conns[conn.conn.conn_id] = len(self._batch_conn_list)
            self._batch_conn_list.append(conn.conn)
        pending = self._pending
        start = len(pending)
        if len(frames) == 1:
            frame = frames[0]
            self._pending_bytes += len(frame)
            pending.append((frame, self.arrivals.stamp(), index))
        elif frames:
            self._pending_bytes += sum(map(len, frames))
            pending.extend(zip(frames, conn.next_stamps(len(frames)), repeat(index)))
        for reason, raw in rejects:
            pending.append(envelope.reject_frame(reason, raw, conn.next_ts(), index))
        if rejects:
            self.counters.add("rejected_frames", len(rejects))
            log.info("rejected %d frame(s) from %s: %s; first bytes %r", len(rejects), conn.conn.peer,
                     rejects[0][0], rejects[0][1][:60])
        self.frames_read += len(frames)
        if conn.binary and frames:
            session = conn.session
            owed: list[Owed] = []
            if session is not None and session.owed:      # authenticated: the guard's, with their keys
                owed, session.owed = session.owed, []
            if len(owed) != len(frames):
                owed = [Owed(conn) for _ in frames]
            for pos, item in enumerate(owed, start):
                item.pos = pos
            self._binary_acks.extend(owed)
            conn.acks_owed += len(frames)
            conn.last_owed = owed[-1]
        self._schedule(urgent=conn.binary and bool(frames))

    def answer_resent(self, conn: DeviceConnection) -> None:
        """A packet journaled before (its ``A`` was lost) came again: ``A``, in order behind what the
        connection still waits for, and nothing stored."""
        if conn.acks_owed and conn.last_owed is not None:
            self.wait_for(conn, conn.last_owed)
        elif conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(BINARY_ACK)
            self.counters.add("binary_acks")

    def wait_for(self, conn: DeviceConnection, owed: Owed) -> None:
        """``conn`` gets an ``A`` when ``owed`` is journaled (and keeps it from being left out)."""
        owed.conns.append(conn)
        conn.acks_owed += 1
        conn.last_owed = owed

    def inject(self, conns: list[Conn], body: bytes, route: list[bytes] | None = None, ref: int = 0) -> None:
        """Frames from another worker (replay, MQTT): journaled and pushed like device frames. The
        injector is answered on ``route`` once they are journaled (at the next flush)."""
        frames = list(envelope.iter_frames(body, conns))       # all checked before any is taken
        index_of = {}
        for frame in frames:
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
        self.counters.add("injected_frames", len(frames))
        self._pending_bytes += len(body)
        if route is not None:
            self._inject_replies.append((route, ref))
        if not self._pending:                     # an empty inject: nothing to journal, answer now
            self._answer_injectors(0)
        self._schedule(urgent=route is not None)

    def _schedule(self, urgent: bool = False) -> None:
        """Flush when the batch is full, else at most ``batch_max_delay_ms`` after its first frame, or
        ``ack_max_delay_ms`` once it holds frames someone waits on (``urgent``: a binary board's A, an
        injector's answer). Text lines wait longer: a fleet of boards sending now and then gives
        fewer, larger batches, and every hop's cost per message is paid less often."""
        edge = self.cfg.edge
        if len(self._pending) >= edge.batch_max_frames or self._pending_bytes >= BATCH_MAX_BYTES:
            self.flush()
            return
        if not self._pending:
            return
        timer = self._flush_timer
        if timer is not None and (not urgent or self._flush_urgent):
            return
        loop = asyncio.get_running_loop()
        if timer is None:
            self._batch_started = loop.time()
        delay = min(edge.ack_max_delay_ms, edge.batch_max_delay_ms) if urgent else edge.batch_max_delay_ms
        due = self._batch_started + delay / 1000
        if timer is not None:
            if due >= timer.when():
                self._flush_urgent = True
                return
            timer.cancel()
        self._flush_timer = loop.call_at(due, self.flush)
        self._flush_urgent = urgent

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        if self.publisher is not None:
            self._publish()
            return
        record = envelope.journal_record(self._batch_conn_list, envelope.pack_frames(self._pending))
        try:
            seq, location = self.journal.append(record)
        except OSError as exc:
            # Nothing is acknowledged and nothing pushed; the frames stay pending and device reads stop
            # until a retry (every housekeeping tick) succeeds.
            self.counters.add("journal_errors")
            if not self.journal_failing:
                log.error("journal write failed (%s): holding %d frames, acknowledging nothing, device reads"
                          " paused until it works again", exc, len(self._pending))
            self.journal_failing = True
            self._check_pressure()
            return
        if self.journal_failing:
            log.info("journal writable again")
            self.journal_failing = False
        self.guard.journaled(self._binary_acks)   # the counters known (and written beside) before any A
        self._answer_boards(self._binary_acks)    # journaled: now the boards may clear their buffers
        self._answer_injectors(seq)
        self.inflight[seq] = InFlight(location, set(self.sinks), time.monotonic())
        self.outq.put_nowait((seq, envelope.frames_message_of_record(seq, record)))
        self.counters.add("batches")
        self._pending, self._batch_conns, self._batch_conn_list, self._binary_acks = [], {}, [], []
        self._pending_bytes = 0
        self._check_pressure()

    def _publish(self) -> None:
        """The batch to JetStream; its boards and injectors are answered once JetStream confirmed it.

        An authenticated packet goes as a batch of its own, under the message id of its idempotency key
        (``p-<key tag>-<device>-<counter>``): when a board sent it again to another edge because the
        ``A`` did not come (this edge slow, cut off, dead after publishing), JetStream's duplicate window
        keeps one copy whichever edge publishes first, and the other is answered as stored. Its counter
        then goes to the shared counters (``SharedCounters``) before the ``A``, for resends after the
        window."""
        assert self.publisher is not None
        boards, replies = self._binary_acks, self._inject_replies
        conns, frames, index_of = self._batch_conn_list, self._pending, self._batch_conns
        self._inject_replies = []
        keyed = [owed for owed in boards if owed.device]
        if keyed:
            alone = {owed.pos for owed in keyed}
            for owed in keyed:
                self._publish_packet(owed, conns, frames[owed.pos])
            boards = [owed for owed in boards if not owed.device]
            frames = [frame for pos, frame in enumerate(frames) if pos not in alone]
        if frames:
            record = envelope.journal_record(conns, envelope.pack_frames(frames))
            self._publish_rest(record, boards, replies, conns, frames, index_of)
        elif replies:
            self._answer_injectors(0, replies)
        self.counters.add("batches")
        self._pending, self._batch_conns, self._batch_conn_list, self._binary_acks = [], {}, [], []
        self._pending_bytes = 0
        self._check_pressure()

    def _publish_packet(self, owed: Owed, conns: list[Conn], frame: tuple[bytes, int, int]) -> None:
        assert self.publisher is not None
        record = envelope.journal_record([conns[frame[2]]], envelope.pack_frames([(frame[0], frame[1], 0)]))

        def still_wanted() -> bytes | None:
            if owed.gone():
                self.counters.add("unpublished_frames_of_gone_boards")
                return None
            return record

        def stored(seq: int) -> None:
            if seq:
                self.guard.journaled([owed])
            else:
                self.guard.not_journaled(owed)
            self._answer_boards([owed])
            if self.paused:
                self._check_pressure()

        self.publisher.publish(record, stored, still_wanted,
                               msg_id=self.publisher.packet_id(owed.device, owed.counter, owed.tag),
                               mark=(owed.device, owed.counter, owed.tag))

    def _publish_rest(self, record: bytes, boards: list[Owed], replies: list[tuple[list[bytes], int]],
                      conns: list[Conn], frames: list[tuple[bytes, int, int]], index_of: dict[int, int]) -> None:
        assert self.publisher is not None

        def without_gone_boards() -> bytes | None:
            """Before a publish is tried again: the packets of boards that gave up waiting for their A
            (closed) are left out; they send them again, to this edge or another, and would otherwise
            be stored twice, at two arrival stamps. None: nothing is left to publish."""
            gone_conns = {index_of[c.conn.conn_id] for owed in boards for c in owed.conns
                          if owed.gone() and c.conn is not None and c.conn.conn_id in index_of}
            if not gone_conns:
                return record
            kept = [frame for frame in frames if frame[2] & ~envelope.REJECTED not in gone_conns]
            self.counters.add("unpublished_frames_of_gone_boards", len(frames) - len(kept))
            return envelope.journal_record(conns, envelope.pack_frames(kept)) if kept else None

        def stored(seq: int) -> None:
            self._answer_boards(boards)
            self._answer_injectors(seq, replies)
            if self.paused:
                self._check_pressure()

        self.publisher.publish(record, stored, without_gone_boards)

    def _feed(self, seq: int, record: bytes, targets: list[str] | None) -> None:
        """A batch from the stream to this host's parsers (``StreamFeeder``)."""
        try:
            conns, body = envelope.parse_journal_record(record)
        except (envelope.EnvelopeError, ValueError) as exc:
            # Not ours to decode (another program published on the subject): it can never be stored.
            log.error("stream message %d is not a batch (%s); acknowledging it so that it goes", seq, exc)
            self.counters.add("bad_stream_messages")
            if self.feeder is not None:
                for name in targets or self.sinks:
                    self.feeder.acknowledged(name, [seq])
            return
        self.outq.put_nowait((seq, envelope.frames_message(seq, conns, body, targets)))

    def _answer_boards(self, boards: list[Owed]) -> None:
        for owed in boards:
            for conn in owed.conns:
                if not conn.closed and conn.transport is not None:
                    conn.transport.write(BINARY_ACK)
                    self.counters.add("binary_acks")
                conn.acks_owed -= 1
                if conn.last_owed is owed and not conn.acks_owed:
                    conn.last_owed = None
                if conn.close_when_answered and not conn.acks_owed:
                    conn.close()                  # after the A: close() sends what is buffered first

    def _answer_injectors(self, seq: int, replies: list[tuple[list[bytes], int]] | None = None) -> None:
        if replies is None:
            replies, self._inject_replies = self._inject_replies, []
        if self._inject_sock is None:
            return
        for route, ref in replies:
            try:   # a ROUTER never blocks: a reply to a peer that is gone is dropped (it sends again)
                self._inject_sock.send_multipart(envelope.injected_message(route, ref, seq), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                self.counters.add("inject_replies_lost")

    def count_frames(self) -> None:
        """The frames read since the last time into the counters (``frames``)."""
        self.counters.add("frames", self.frames_read)
        self.frames_read = 0

    # ------------------------------------------------------------------ backpressure

    def _check_pressure(self) -> None:
        full = (self.outq.qsize() >= OUTQ_HIGH
                or len(self.inflight) >= self.cfg.edge.max_inflight_batches
                or self.journal.size >= self.cfg.edge.journal_max_bytes
                or self.journal_failing
                or (self.publisher is not None and self.publisher.check_full()))
        if full and not self.paused:
            self.paused = True
            self.reading.clear()
            self.counters.add("paused")
            log.warning("pausing device reads: %d batches queued for parsers, %d in flight, journal %d bytes%s",
                        self.outq.qsize(), len(self.inflight), self.journal.size,
                        ", journal not writable" if self.journal_failing else
                        "" if self.publisher is None else f", {len(self.publisher.queue)} batches waiting for"
                        f" jetstream{' (not confirming)' if self.publisher.failing else ''}")
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.pause_reading()
        elif self.paused and not full and self.outq.qsize() <= OUTQ_LOW \
                and len(self.inflight) < self.cfg.edge.max_inflight_batches * 0.8 \
                and self.journal.size < self.cfg.edge.journal_max_bytes * 0.8:
            self.paused = False
            self.reading.set()
            log.info("resuming device reads")
            for conn in self.connections:
                if conn.transport is not None and not conn.transport.is_closing() and not conn.close_when_answered \
                        and self.guard.may_resume(conn):
                    conn.transport.resume_reading()

    # ------------------------------------------------------------------ acknowledgements

    def acknowledged(self, sink: str, seqs: list[int]) -> None:
        if self.feeder is not None:               # the feeder keeps what each consumer acknowledged
            self.feeder.acknowledged(sink, seqs)
            return
        for seq, entry in self.inflight.acknowledged(sink, seqs, time.monotonic()):
            self.journal.done(entry.location, seq)
            self.counters.add("batches_done")
        self._check_pressure()

    def redeliver(self, now: float) -> None:
        """Send again what a sink has not acknowledged in time, to the sinks that miss it.

        When a batch is due: ``InFlightLedger.due``. The queue to the parsers is bounded, so a long
        backlog goes out as fast as parsers take it."""
        if self.outq.qsize() >= OUTQ_HIGH:       # not a batch would go: no need to look for due ones
            return
        budget = REDELIVER_PER_TICK
        sent: dict[tuple[str, ...], int] = {}
        lost: list[int] = []
        for seq, entry in self.inflight.due(now):
            if budget <= 0 or self.outq.qsize() >= OUTQ_HIGH:
                break
            try:
                _, record = self.journal.read(entry.location)
                conns, body = envelope.parse_journal_record(record)
            except (JournalError, OSError, ValueError) as exc:
                # The disk gave back something else than what was written: nobody can have this batch.
                log.error("batch %d cannot be read back from the journal (%s): it is LOST for sinks %s",
                          seq, exc, sorted(entry.pending))
                self.counters.add("journal_unreadable_batches")
                lost.append(seq)
                continue
            everyone = entry.pending == self.sinks
            self.outq.put_nowait((seq, envelope.frames_message(seq, conns, body,
                                                               None if everyone else sorted(entry.pending))))
            if entry.sent_at:
                entry.attempts += 1
                self.counters.add("redelivered")
                key = tuple(sorted(entry.pending))
                sent[key] = sent.get(key, 0) + 1
            else:
                self.counters.add("replayed")
            entry.sent_at = now
            budget -= 1
        for seq in lost:
            entry = self.inflight.forget(seq)
            self.journal.done(entry.location, seq)
        if sent and now - self._last_redeliver_log >= LOG_EVERY_S:
            self._last_redeliver_log = now
            log.warning("sending batches again that were not acknowledged in time: %s",
                        ", ".join(f"{n} to {'+'.join(k)}" for k, n in sorted(sent.items())))

    def checkpoint(self) -> None:
        """Write down which batches still miss which sinks, so a restart replays only those."""
        if not self.inflight.changed:
            return
        try:
            self.journal.checkpoint(self.inflight.checkpoint_rows())
        except OSError as exc:
            log.warning("could not checkpoint acknowledgements (%s); a restart replays more", exc)
            return
        self.inflight.changed = False
        self.counters.add("checkpoints")

    def sweep_idle(self, now: float) -> None:
        for conn in list(self.connections):
            if now - conn.last_progress > conn.listener.idle_timeout_s and not conn.close_when_answered:
                conn.cut_off("closed_idle")
        self.release_memory()

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        ctx = self.ctx
        frames = runtime.socket(ctx, zmq.PUSH, bind=self.cfg.endpoints.frames, hwm=FRAMES_HWM)
        # an ack lists every batch a sink made durable at once: after an outage, tens of thousands
        acks = runtime.socket(ctx, zmq.PULL, bind=self.cfg.endpoints.acks, max_message=runtime.BATCH_MESSAGE_BYTES)
        inject = runtime.socket(ctx, zmq.ROUTER, bind=self.cfg.endpoints.inject, hwm=1000,
                                max_message=runtime.BATCH_MESSAGE_BYTES)
        self._inject_sock = inject
        downlink = runtime.socket(ctx, zmq.DEALER, hwm=1000, address=self.cfg.endpoints.downlink)
        downlink.setsockopt(zmq.ROUTING_ID, b"edge")
        downlink.connect(self.cfg.endpoints.downlink)
        live = runtime.socket(ctx, zmq.PUB, connect=self.cfg.endpoints.live)
        tasks: list[asyncio.Task] = []
        try:
            if self.link is not None:
                await self._run_streamed(frames, acks, inject, downlink, live)
                return
            replay = self.journal.recover(self.sinks)
            for seq, location, missing in replay:
                self.inflight[seq] = InFlight(location, set(missing), 0.0)
            if replay or self.journal.skipped_on_recovery:
                log.info("journal: %d batches to replay from the last run (%d to every sink); %d already"
                         " acknowledged by every sink skipped; next seq %d", len(replay),
                         sum(1 for r in replay if r.missing == self.sinks), self.journal.skipped_on_recovery,
                         self.journal.next_seq)
            self.counters["replay_batches"] = len(replay)
            self.counters["journal_torn_bytes"] = self.journal.torn_bytes
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
                     asyncio.create_task(self._downlink_loop(downlink)),
                     asyncio.create_task(self._housekeeping(live))]
            for task in tasks:
                task.add_done_callback(self._task_done)
            await self.stop.wait()
            log.info("stopping: closing listeners and flushing")
            for server in self.servers:
                server.close()
            # Journal what is complete first, so binary boards get their A before the socket closes.
            # A partial frame is not finished: the device did not hang up, the edge cut it off.
            self.flush()
            await self._close_devices(wait_s=5)
        finally:
            await _cancel(tasks)
            self.checkpoint()
            self.journal.close()
            self.guard.close()
            self._inject_sock = None
            for sock in (frames, acks, inject, downlink, live):
                sock.close(linger=0)
            log.info("stopped: %d batches still in flight stay in the journal", len(self.inflight))

    async def _run_streamed(self, frames: zmq.asyncio.Socket, acks: zmq.asyncio.Socket,
                            inject: zmq.asyncio.Socket, downlink: zmq.asyncio.Socket,
                            live: zmq.asyncio.Socket) -> None:
        """``run`` with the journal in JetStream: nothing to replay here (the stream redelivers)."""
        assert self.link is not None and self.publisher is not None
        loop = asyncio.get_running_loop()
        for listener in self.cfg.listeners:
            server = await loop.create_server(lambda lst=listener: DeviceConnection(self, lst),
                                              listener.host, listener.port, reuse_address=True, backlog=4096)
            self.servers.append(server)
            log.info("listening on %s (%s framing, %s decoder); journal: jetstream stream %s, edge %d",
                     listener.bind, listener.framing, listener.decoder, self.cfg.journal.stream,
                     self.cfg.journal.edge_id)
        tasks = [asyncio.create_task(self.link.run()),
                 asyncio.create_task(self.publisher.run()),
                 asyncio.create_task(self._send_loop(frames)),
                 asyncio.create_task(self._ack_loop(acks)),
                 asyncio.create_task(self._inject_loop(inject)),
                 asyncio.create_task(self._downlink_loop(downlink)),
                 asyncio.create_task(self._housekeeping(live))]
        if self.feeder is not None:
            tasks.append(asyncio.create_task(self.feeder.run()))
        for task in tasks[1:]:               # (the link's task ends once connected)
            task.add_done_callback(self._task_done)
        try:
            await self.stop.wait()
            log.info("stopping: closing listeners, publishing what is pending")
            for server in self.servers:
                server.close()
            self.flush()
            await self.publisher.drain(5.0)          # so that the boards get their A before we close
            await self._close_devices(wait_s=2)
        finally:
            await _cancel(tasks)
            await self.link.close()

    async def _close_devices(self, wait_s: float) -> None:
        """Every device connection closed, then up to ``wait_s`` for the queue to the parsers to empty."""
        for conn in list(self.connections):
            conn.closed = True
            conn.close()
        deadline = time.monotonic() + wait_s
        while not self.outq.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or self.stop.is_set():
            return
        log.error("edge task %s died: %r; stopping so that supervisord restarts the edge (the journal"
                  " keeps everything)", task.get_coro().__name__, task.exception())
        self.failed = True
        self.stop.set()

    async def _send_loop(self, frames: zmq.asyncio.Socket) -> None:
        while True:
            seq, message = await self.outq.get()
            await frames.send_multipart(message, copy=False)
            entry = self.inflight.get(seq)
            if entry is not None:      # the redelivery clock starts when a parser can have it, not when queued
                entry.sent_at = time.monotonic()
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
            await self.reading.wait()         # paused: injectors wait in their queues like devices do
            message = await inject.recv_multipart()
            try:
                route, ref, conns, body = envelope.parse_inject(message)
            except envelope.EnvelopeError as exc:
                self.counters.add("bad_messages")
                log.warning("ignoring a bad inject message: %s", exc)
                continue
            try:
                self.inject(conns, body, route, ref)
            except envelope.EnvelopeError as exc:
                self.counters.add("bad_messages")
                log.warning("refusing a bad inject message: %s", exc)
                await inject.send_multipart(envelope.injected_message(route, ref, None, str(exc)))

    async def _downlink_loop(self, downlink: zmq.asyncio.Socket) -> None:
        while True:
            message = await downlink.recv_multipart()
            try:
                ref, line = envelope.parse_deliver(message)
            except envelope.EnvelopeError as exc:
                self.counters.add("bad_messages")
                log.warning("ignoring a bad deliver message: %s", exc)
                continue
            error = self.write_downlink(line)
            await downlink.send_multipart(envelope.delivered_message(ref, error))

    async def _housekeeping(self, live: zmq.asyncio.Socket) -> None:
        next_redeliver = next_sweep = next_stats = next_checkpoint = 0.0
        stats_sent = 0
        while True:
            await asyncio.sleep(runtime.POLL_MS / 1000)
            now = time.monotonic()
            self.journal.tick()
            self.guard.tick(now)
            if self.journal_failing:
                self.flush()
            if now >= next_redeliver:
                next_redeliver = now + 1.0
                self.redeliver(now)
            if now >= next_checkpoint:
                next_checkpoint = now + CHECKPOINT_INTERVAL_S
                self.checkpoint()
            if now >= next_sweep:
                next_sweep = now + self.sweep_interval
                self.sweep_idle(now)
            self._check_pressure()
            if now < next_stats:
                continue
            stats_sent += 1
            next_stats = now + (runtime.STARTUP_STATS_S if stats_sent < runtime.STARTUP_STATS else runtime.STATS_INTERVAL_S)
            self.count_frames()
            self.counters["connections"] = len(self.connections)
            self.counters["partial_bytes"] = self.held_total
            self.counters["inflight_batches"] = len(self.inflight)
            self.counters["journal_bytes"] = self.journal.size
            self.counters["paused_now"] = int(self.paused)
            self.counters["fsyncs"] = self.journal.fsyncs
            try:
                await live.send_multipart(envelope.stats_message("edge", self.counters.snapshot()), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass


def main(cfg: Config) -> int:
    return worker.serve_async(lambda ctx: _main(cfg, ctx), _loop_factory(cfg))


def _loop_factory(cfg: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: with a board's every reading its own segment, the event loop's own
    work per ``data_received`` is most of the edge's CPU, and uvloop's is a fraction of asyncio's.
    Not when a listener speaks TLS: the guard upgrades a connection with ``loop.start_tls`` after its
    limits are checked, and under uvloop that upgrade answered clients in plain text (tests/test_security.py)."""
    if any(listener.tls for listener in cfg.listeners):
        return None
    try:
        import uvloop
    except ImportError:                    # a platform without it: the default loop works the same
        return None
    return uvloop.new_event_loop


async def _main(cfg: Config, ctx: zmq.asyncio.Context) -> int:
    edge = Edge(cfg, ctx)
    worker.stop_on_signals(edge.stop.set)
    await edge.run()
    return runtime.EXIT_FAILURE if edge.failed else runtime.EXIT_OK
