"""``sensorpipe simulate``: play N boards against a pipeline, each on its own connection.

    sensorpipe simulate --devices 1000 --total 300000 --format json
    sensorpipe simulate --devices 100 --rate 20000 --duration 30 --format binary --target 127.0.0.1:7002

Every board sends readings with its own explicit, strictly increasing timestamps (``start_ms +
i * step_ms``), so each (device, timestamp) is unique and a store can be counted exactly once.
Values are plausible (a slow daily temperature wave per board, humidity, signal strength).

Formats, one reading each::

    json    {"device":"sim-0001","ts":1732260000123,"temp":21.37,"humi":48.2,"rssi":-67}\\n
    kv      temp: 21.37; humi: 48.2; rssi: -67; ts: 1732260000123; from sim-0001\\r\\n
    line    sim,device=sim-0001 temp=21.37,humi=48.2,rssi=-67i 1732260000123000000\\n
    binary  the battery boards' packet (decoders/binary.py) with the balcony layout (light, humidity,
            temperature); board k is device number k (1..255): the edge stamps the time, and
            answers each packet with ``A`` once journaled (counted as acks)
    mqtt    MQTT 3.1.1 PUBLISH of the json payload to ``sensorpipe/<device>/up`` on a broker;
            with ``--qos 1`` each PUBACK is counted as an ack

So that the simulator measures the pipeline and not itself, every payload is built before the clock
starts and the boards are spread over several processes (one per core by default); sending is then
only ``sendall`` of prebuilt bytes, several readings per call (``--chunk``). MQTT packets are encoded
here (a few lines of the 3.1.1 spec) for the same reason: a client library's per-message cost would
make the simulator the bottleneck.

A progress bar (sent, rate, acks, errors) is drawn on stderr when it is a terminal; a summary is printed
at the end (``--json`` for machines). SIGTERM or Ctrl-C stops sending early and still prints it.
Exit status 0 when everything was sent (and acknowledged, where the format has acks), 1 otherwise.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import math
import multiprocessing as mp
import os
import random
import resource
import select
import selectors
import signal
import socket
import struct
import sys
import termios
import time
from dataclasses import asdict, dataclass
from typing import Callable

from workers.core.packet import HEADER as BINARY_HEADER  # the one definition of the binary header

FORMATS = ("json", "kv", "line", "binary", "mqtt")
DEFAULT_PREFIX = "sim"
DEFAULT_MEASUREMENT = "sim"
DEFAULT_MQTT_PORT = 1883
DEFAULT_CONNECT_RATE = 2000.0   # boards coming online a second
MAX_CHUNK = 32                  # readings per sendall at full speed
CONNECT_TIMEOUT_S = 30.0
MAX_RECONNECTS = 5              # in a row, before a board gives up
RECONNECT_PAUSE_S = 0.5         # times the failures in a row
PROGRESS_EVERY_S = 0.25
BAR_WIDTH = 24
BINARY_MAX_DEVICES = 255
FD_MARGIN = 64

# Binary boards: the balcony layout of deploy/sensorpipe.toml (three u16: light, humidity, temperature).
BINARY_RECORD = struct.Struct("<HHH")
BINARY_WAKE_S = 600
BINARY_MEASURE_S = 60

MQTT_TOPIC = "sensorpipe/{device}/up"
MQTT_CONNACK = 4
MQTT_PUBACK = 4

# Shared counters, one row of SLOTS per worker process.
SENT, BYTES, ACKS, ERRORS, CONNECTED, FIRST_NS, LAST_NS, STATE, RECONNECTS = range(9)
SLOTS = 9
READY, RUNNING, DONE = 1, 2, 3


class SimulateError(Exception):
    """Printed as ``sensorpipe: <message>``."""


@dataclass(frozen=True)
class Plan:
    devices: int
    total: int                  # readings in all
    rate: float                 # readings/s in all; 0 = as fast as the target takes them
    fmt: str
    host: str
    port: int
    procs: int
    prefix: str
    measurement: str
    start_ms: int               # timestamp of every board's first reading
    step_ms: int                # between one board's readings
    chunk: int                  # readings per send
    qos: int
    hold_s: float               # keep the connections open this long after the last send
    connect_rate: float         # new connections a second in all while connecting; 0 = all at once
    ack_timeout_s: float
    seed: int

    def device_name(self, index: int) -> str:
        return f"{self.prefix}-{index + 1:0{max(4, len(str(self.devices)))}d}"

    def readings_of(self, index: int) -> int:
        base, extra = divmod(self.total, self.devices)
        return base + (1 if index < extra else 0)

    @property
    def acked(self) -> bool:
        return self.fmt == "binary" or (self.fmt == "mqtt" and self.qos == 1)


# --------------------------------------------------------------------------- payloads


class Board:
    """One simulated device: a name, its readings' values, and the bytes that carry them."""

    def __init__(self, plan: Plan, index: int, noise: list[float]) -> None:
        self.plan = plan
        self.index = index
        self.name = plan.device_name(index)
        rng = random.Random(plan.seed * 1_000_003 + index)
        self.base_temp = rng.uniform(17.0, 25.0)
        self.base_humi = rng.uniform(35.0, 65.0)
        self.base_rssi = rng.randint(-85, -45)
        self.phase = rng.uniform(0, 2 * math.pi)
        self.noise = noise
        self.offset = rng.randrange(len(noise))

    def values(self, i: int, ts_ms: int) -> tuple[float, float, int]:
        noise = self.noise[(self.offset + i) % len(self.noise)]
        wave = math.sin(2 * math.pi * ts_ms / 86_400_000 + self.phase)
        temp = self.base_temp + 4.0 * wave + noise
        humi = self.base_humi - 8.0 * wave + 3 * noise
        rssi = self.base_rssi + int(noise * 10)
        return temp, humi, rssi

    def encoder(self) -> Callable[[int, int], bytes]:
        """A function (reading number, ts_ms) -> the bytes of that reading in the plan's format."""
        name, fmt = self.name, self.plan.fmt
        if fmt == "json" or fmt == "mqtt":
            head = '{"device":"%s","ts":' % name
            body = head + '%d,"temp":%.2f,"humi":%.1f,"rssi":%d}'
            if fmt == "json":
                template = (body + "\n").encode()
                return lambda i, ts: template % ((ts,) + self.values(i, ts))
            return self._mqtt_encoder(body.encode())
        if fmt == "kv":
            template = ("temp: %%.2f; humi: %%.1f; rssi: %%d; ts: %%d; from %s\r\n" % name).encode()
            return lambda i, ts: template % (self.values(i, ts) + (ts,))
        if fmt == "line":
            template = ("%s,device=%s temp=%%.2f,humi=%%.1f,rssi=%%di %%d000000\n"
                        % (self.plan.measurement, name)).encode()
            return lambda i, ts: template % (self.values(i, ts) + (ts,))
        if fmt == "binary":
            number = self.index + 1
            header = BINARY_HEADER.pack(BINARY_RECORD.size, BINARY_WAKE_S, BINARY_MEASURE_S,
                                        BINARY_RECORD.size, number, 1)

            def packet(i: int, ts: int) -> bytes:
                temp, humi, rssi = self.values(i, ts)
                light = max(0, min(65535, 300 + rssi * 2 + i % 50))
                raw_humi = max(0, min(65535, int((humi + 6.0) / 125.0 * 65536)))
                raw_temp = max(0, min(65535, int((temp + 46.85) / 175.72 * 65536)))
                return header + BINARY_RECORD.pack(light, raw_humi, raw_temp)
            return packet
        raise SimulateError(f"unknown format {fmt!r}")

    def _mqtt_encoder(self, body_template: bytes) -> Callable[[int, int], bytes]:
        topic = MQTT_TOPIC.format(device=self.name).encode()
        qos = self.plan.qos

        def publish(i: int, ts: int) -> bytes:
            payload = body_template % ((ts,) + self.values(i, ts))
            variable = struct.pack(">H", len(topic)) + topic
            if qos:
                variable += struct.pack(">H", i % 65535 + 1)
            return bytes([0x30 | (qos << 1)]) + _mqtt_length(len(variable) + len(payload)) + variable + payload
        return publish

    def chunks(self) -> list[tuple[bytes, int]]:
        """All this board's readings as (bytes, readings) pieces of at most ``plan.chunk`` readings."""
        plan = self.plan
        count = plan.readings_of(self.index)
        encode = self.encoder()
        start, step, size = plan.start_ms, plan.step_ms, plan.chunk
        out = []
        for first in range(0, count, size):
            last = min(count, first + size)
            out.append((b"".join([encode(i, start + i * step) for i in range(first, last)]), last - first))
        return out

    def handshake(self) -> bytes:
        if self.plan.fmt != "mqtt":
            return b""
        client_id = f"sensorpipe-sim-{self.name}-{os.getpid()}".encode()
        variable = b"\x00\x04MQTT\x04\x02\x00\x00"         # MQTT 3.1.1, clean session, no keepalive
        payload = struct.pack(">H", len(client_id)) + client_id
        return b"\x10" + _mqtt_length(len(variable) + len(payload)) + variable + payload

    def goodbye(self) -> bytes:
        return b"\xe0\x00" if self.plan.fmt == "mqtt" else b""


def _mqtt_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --------------------------------------------------------------------------- one sending process


class Link:
    """A board's connection and what it still has to send."""

    __slots__ = ("board", "sock", "chunks", "next", "acks", "open", "failures", "retry_at")

    def __init__(self, board: Board, sock: socket.socket, chunks: list[tuple[bytes, int]]) -> None:
        self.board = board
        self.sock = sock
        self.chunks = chunks
        self.next = 0
        self.acks = 0                 # ack bytes received (binary: 1 per packet; mqtt: 4 per PUBACK)
        self.open = True
        self.failures = 0             # reconnects in a row that did not get the next chunk through
        self.retry_at = 0.0


def _worker(plan: Plan, slot: int, indexes: list[int], counters, go, stop) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    row = slot * SLOTS
    rng = random.Random(plan.seed + 7)
    noise = [rng.gauss(0.0, 0.15) for _ in range(1009)]
    boards = [Board(plan, i, noise) for i in indexes]
    chunks = {board.index: board.chunks() for board in boards}
    links = _connect_all(plan, boards, chunks, counters, row, stop)
    counters[row + STATE] = READY
    go.wait()
    counters[row + STATE] = RUNNING
    try:
        _send_all(plan, links, counters, row, stop)
        if plan.acked:
            _collect_acks(plan, links, counters, row, stop)
        _drain(plan, links, stop)
        deadline = time.monotonic() + plan.hold_s
        while time.monotonic() < deadline and not stop.is_set():
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        for link in links:
            if link.open:
                try:
                    link.sock.sendall(link.board.goodbye())
                except OSError:
                    pass
            link.sock.close()
        counters[row + STATE] = DONE


def _connect_all(plan: Plan, boards: list[Board], chunks: dict[int, list[tuple[bytes, int]]], counters, row: int,
                 stop) -> list[Link]:
    """Connect the boards, independently of each other (a slow handshake does not hold up the next
    board), at most ``plan.connect_rate`` new connections a second in all: boards come online spread out
    as they do in the field, not in one instant (0 = all at once: a fleet back after an outage)."""
    family, kind, proto, _, address = socket.getaddrinfo(plan.host, plan.port, type=socket.SOCK_STREAM)[0]
    selector = selectors.DefaultSelector()
    per_second = plan.connect_rate / plan.procs if plan.connect_rate else 0.0
    waiting = list(reversed(boards))
    links: list[Link] = []
    started = time.monotonic()
    begun = 0
    try:
        while (waiting or selector.get_map()) and not stop.is_set():
            now = time.monotonic()
            allowed = len(boards) if not per_second else int((now - started) * per_second) + 1
            while waiting and begun < allowed:
                board = waiting.pop()
                begun += 1
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                    counters[row + ERRORS] += 1
                    sock.close()
                    continue
                selector.register(sock, selectors.EVENT_WRITE, (board, now + CONNECT_TIMEOUT_S))
            if not selector.get_map():
                time.sleep(0.001)
                continue
            for key, _ in selector.select(0.001 if waiting else 0.2):
                sock, (board, _) = key.fileobj, key.data
                selector.unregister(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    counters[row + ERRORS] += 1
                    sock.close()
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                link = Link(board, sock, chunks[board.index])
                if plan.fmt == "mqtt" and not _mqtt_connect(link):
                    counters[row + ERRORS] += 1
                    sock.close()
                    continue
                links.append(link)
                counters[row + CONNECTED] += 1
            for key in [k for k in selector.get_map().values() if k.data[1] < now]:
                counters[row + ERRORS] += 1                      # never connected in time
                selector.unregister(key.fileobj)
                key.fileobj.close()
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return links


def _mqtt_connect(link: Link) -> bool:
    link.sock.settimeout(CONNECT_TIMEOUT_S)
    try:
        link.sock.sendall(link.board.handshake())
        reply = b""
        while len(reply) < MQTT_CONNACK:
            part = link.sock.recv(MQTT_CONNACK - len(reply))
            if not part:
                return False
            reply += part
        return reply[0] == 0x20 and reply[3] == 0
    except OSError:
        return False
    finally:
        link.sock.setblocking(False)


def _send_all(plan: Plan, links: list[Link], counters, row: int, stop) -> None:
    """Round-robin over the boards, one chunk each per round, paced to the plan's rate if it has one.

    A board whose connection drops (reset, refused) does what a robust board does: it connects again
    after a pause and sends the chunk that failed once more (so the target may see part of it twice);
    after ``MAX_RECONNECTS`` failures in a row it gives up and counts an error.
    """
    per_proc_rate = plan.rate / plan.procs if plan.rate else 0.0
    acked = plan.acked
    started = time.monotonic()
    counters[row + FIRST_NS] = time.time_ns()
    sent = sent_bytes = 0
    active = list(links)
    while active and not stop.is_set():
        still = []
        progressed = False
        for link in active:
            if not link.open:
                if time.monotonic() < link.retry_at or not _reconnect(plan, link, counters, row):
                    if link.failures > MAX_RECONNECTS:
                        counters[row + ERRORS] += 1            # given up: its readings stay unsent
                    else:
                        still.append(link)
                    continue
            data, n = link.chunks[link.next]
            if not _send(link, data, stop):
                if stop.is_set():
                    break                                      # stopped mid-chunk: it counts as not sent
                _failed(link)
                still.append(link)
                continue
            progressed = True
            link.failures = 0
            link.next += 1
            sent += n
            sent_bytes += len(data)
            if acked and not _read_acks(link, counters, row):
                _failed(link)
            if link.next < len(link.chunks):
                still.append(link)
            if per_proc_rate:
                ahead = sent / per_proc_rate - (time.monotonic() - started)
                if ahead > 0.001:
                    counters[row + SENT] = sent
                    counters[row + BYTES] = sent_bytes
                    time.sleep(ahead)
            if stop.is_set():
                break
        active = still
        counters[row + SENT] = sent
        counters[row + BYTES] = sent_bytes
        counters[row + LAST_NS] = time.time_ns()
        if not progressed and active:
            time.sleep(0.05)                                   # every board left is waiting to reconnect
    counters[row + SENT] = sent
    counters[row + BYTES] = sent_bytes
    counters[row + LAST_NS] = time.time_ns()


def _failed(link: Link) -> None:
    link.open = False
    link.failures += 1
    link.retry_at = time.monotonic() + RECONNECT_PAUSE_S * link.failures
    link.sock.close()


def _reconnect(plan: Plan, link: Link, counters, row: int) -> bool:
    try:
        sock = socket.create_connection((plan.host, plan.port), timeout=CONNECT_TIMEOUT_S)
    except OSError:
        link.failures += 1
        link.retry_at = time.monotonic() + RECONNECT_PAUSE_S * link.failures
        return False
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link.sock, link.open = sock, True
    if plan.fmt == "mqtt" and not _mqtt_connect(link):
        _failed(link)
        return False
    sock.setblocking(False)
    counters[row + RECONNECTS] += 1
    return True


def _send(link: Link, data: bytes, stop) -> bool:
    """All of ``data``, or False: the connection failed or a stop came."""
    view = memoryview(data)
    sock = link.sock
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            if stop.is_set():
                return False
            _wait(sock, select.POLLOUT, 0.2)
        except OSError:
            return False
    return True


def _wait(sock: socket.socket, events: int, timeout_s: float) -> None:
    poller = select.poll()                 # not select(): descriptors go past 1024 with many boards
    poller.register(sock, events)
    poller.poll(timeout_s * 1000)


def _unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes the target's kernel has not acknowledged yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _drain(plan: Plan, links: list[Link], stop) -> None:
    """Before hanging up, wait until the target has taken every byte: a board keeps its connection,
    and closing one the target has not accepted yet (a full listen queue) would lose the data."""
    deadline = time.monotonic() + plan.ack_timeout_s
    waiting = [link for link in links if link.open]
    while waiting and time.monotonic() < deadline and not stop.is_set():
        waiting = [link for link in waiting if _unacknowledged_bytes(link.sock) > 0]
        if waiting:
            time.sleep(0.05)


def _read_acks(link: Link, counters, row: int) -> bool:
    """Count the acks waiting on the connection; False when the target has hung up."""
    try:
        data = link.sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    if not data:
        return False
    size = MQTT_PUBACK if link.board.plan.fmt == "mqtt" else 1
    before = link.acks // size
    link.acks += len(data)
    counters[row + ACKS] += link.acks // size - before
    return True


def _collect_acks(plan: Plan, links: list[Link], counters, row: int, stop) -> None:
    size = MQTT_PUBACK if plan.fmt == "mqtt" else 1
    expected = {link: sum(n for _, n in link.chunks[:link.next]) for link in links if link.open}
    waiting = {link for link, n in expected.items() if link.acks // size < n}
    if not waiting:
        return
    selector = selectors.DefaultSelector()
    for link in waiting:
        selector.register(link.sock, selectors.EVENT_READ, link)
    deadline = time.monotonic() + plan.ack_timeout_s
    try:
        while waiting and time.monotonic() < deadline and not stop.is_set():
            for key, _ in selector.select(timeout=0.2):
                link = key.data
                if not _read_acks(link, counters, row):
                    link.open = False
                if not link.open or link.acks // size >= expected[link]:
                    waiting.discard(link)
                    selector.unregister(link.sock)
    finally:
        selector.close()


# --------------------------------------------------------------------------- the parent


@dataclass
class Summary:
    devices: int
    format: str
    target: str
    procs: int
    planned: int
    sent: int
    unsent: int
    bytes: int
    acks: int | None
    errors: int
    connected: int
    reconnects: int
    seconds: float
    rate: float
    first_send: float               # Unix time of the first send, s
    last_send: float
    start_ms: int
    step_ms: int
    prefix: str
    measurement: str
    interrupted: bool

    @property
    def ok(self) -> bool:
        return (not self.interrupted and self.unsent == 0 and self.errors == 0
                and (self.acks is None or self.acks >= self.sent))


def run(plan: Plan, progress: bool = False, out=sys.stderr) -> Summary:
    """Play the plan; draw progress on ``out`` when asked. Stops early on SIGTERM/SIGINT."""
    _raise_fd_limit(plan.devices // plan.procs + FD_MARGIN)
    ctx = mp.get_context("fork")
    counters = ctx.RawArray("q", SLOTS * plan.procs)
    go, stop = ctx.Event(), ctx.Event()
    interrupted = False

    def on_signal(signum, frame) -> None:
        nonlocal interrupted
        if interrupted:
            os._exit(128 + signum)
        interrupted = True
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    procs = []
    try:
        for slot in range(plan.procs):
            indexes = list(range(slot, plan.devices, plan.procs))
            proc = ctx.Process(target=_worker, args=(plan, slot, indexes, counters, go, stop), daemon=True)
            proc.start()
            procs.append(proc)
        while not stop.is_set() and not all(counters[s * SLOTS + STATE] >= READY for s in range(plan.procs)):
            if any(not p.is_alive() for p in procs):
                raise SimulateError("a sending process died while connecting (see above)")
            if progress:
                connected = sum(counters[s * SLOTS + CONNECTED] for s in range(plan.procs))
                out.write(f"\rpreparing: {connected:,}/{plan.devices:,} boards connected\x1b[K")
                out.flush()
            time.sleep(0.05)
        go.set()
        while any(p.is_alive() for p in procs):
            if progress:
                _draw(plan, counters, out)
            for p in procs:
                p.join(PROGRESS_EVERY_S / len(procs))
        if progress:
            _draw(plan, counters, out)
            out.write("\n")
            out.flush()
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        for s, handler in old.items():
            signal.signal(s, handler)
    return _summarise(plan, counters, interrupted)


def _total(counters, plan: Plan, index: int) -> int:
    return sum(counters[s * SLOTS + index] for s in range(plan.procs))


def _summarise(plan: Plan, counters, interrupted: bool) -> Summary:
    firsts = [counters[s * SLOTS + FIRST_NS] for s in range(plan.procs) if counters[s * SLOTS + FIRST_NS]]
    lasts = [counters[s * SLOTS + LAST_NS] for s in range(plan.procs) if counters[s * SLOTS + LAST_NS]]
    first, last = (min(firsts), max(lasts)) if firsts and lasts else (0, 0)
    sent = _total(counters, plan, SENT)
    seconds = (last - first) / 1e9
    return Summary(
        devices=plan.devices, format=plan.fmt, target=f"{plan.host}:{plan.port}", procs=plan.procs,
        planned=plan.total, sent=sent, unsent=plan.total - sent, bytes=_total(counters, plan, BYTES),
        acks=_total(counters, plan, ACKS) if plan.acked else None, errors=_total(counters, plan, ERRORS),
        connected=_total(counters, plan, CONNECTED), reconnects=_total(counters, plan, RECONNECTS),
        seconds=round(seconds, 4),
        rate=round(sent / seconds, 1) if seconds > 0 else 0.0, first_send=first / 1e9, last_send=last / 1e9,
        start_ms=plan.start_ms, step_ms=plan.step_ms, prefix=plan.prefix, measurement=plan.measurement,
        interrupted=interrupted)


def _draw(plan: Plan, counters, out) -> None:
    sent = _total(counters, plan, SENT)
    firsts = [counters[s * SLOTS + FIRST_NS] for s in range(plan.procs) if counters[s * SLOTS + FIRST_NS]]
    elapsed = (time.time_ns() - min(firsts)) / 1e9 if firsts else 0.0
    done = sent / plan.total if plan.total else 1.0
    filled = int(done * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    acks = f"  acks {_total(counters, plan, ACKS):,}" if plan.acked else ""
    rate = sent / elapsed if elapsed > 0 else 0.0
    out.write(f"\r[{bar}] {sent:,}/{plan.total:,} readings  {rate:,.0f}/s{acks}"
              f"  errors {_total(counters, plan, ERRORS)}  {elapsed:.1f} s\x1b[K")
    out.flush()


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SimulateError(f"{needed} open files needed per process, the hard limit is {hard}: "
                                f"use more --procs or raise `ulimit -Hn`")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def format_summary(s: Summary) -> str:
    lines = [f"simulate: {s.devices:,} boards ({s.format}) -> {s.target}, {s.procs} processes"
             + (" (stopped early)" if s.interrupted else ""),
             f"sent {s.sent:,} of {s.planned:,} readings ({s.bytes / 1e6:.1f} MB) in {s.seconds:.2f} s:"
             f" {s.rate:,.0f} readings/s"]
    acks = "n/a (the format has none)" if s.acks is None else f"{s.acks:,} of {s.sent:,}"
    lines.append(f"acks: {acks}; errors: {s.errors}; boards connected: {s.connected:,}/{s.devices:,}"
                 f" (reconnects {s.reconnects:,}); not sent: {s.unsent:,}")
    lines.append(f"timestamps: {s.prefix}-* from {s.start_ms} ms, {s.step_ms} ms apart per board")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def make_plan(args: argparse.Namespace, default_target: Callable[[str], tuple[str, int]]) -> Plan:
    fmt = args.format
    if args.devices < 1:
        raise SimulateError("--devices must be at least 1")
    if fmt == "binary" and args.devices > BINARY_MAX_DEVICES:
        raise SimulateError(f"binary boards are device numbers 1..{BINARY_MAX_DEVICES}: at most "
                            f"{BINARY_MAX_DEVICES} --devices")
    if args.rate is not None and args.rate <= 0:
        raise SimulateError("--rate must be positive")
    rate = args.rate or 0.0
    if args.total is not None:
        total = args.total
    elif rate:
        total = int(rate * args.duration)
    else:
        raise SimulateError("say how much: --total K, or --rate R (with --duration S, default 10)")
    if total < 1:
        raise SimulateError("nothing to send: --total must be at least 1")
    procs = max(1, min(args.procs or os.cpu_count() or 1, args.devices))
    per_device = math.ceil(total / args.devices)
    per_device_rate = rate / args.devices if rate else 0.0
    step_ms = args.step_ms or (max(1, round(1000 / per_device_rate)) if per_device_rate else 1)
    if args.chunk:
        chunk = args.chunk
    elif per_device_rate:
        chunk = max(1, min(MAX_CHUNK, int(per_device_rate / 100)))   # ~100 sends a second per board
    else:
        chunk = MAX_CHUNK
    now_ms = time.time_ns() // 1_000_000
    start_ms = args.start_ms if args.start_ms is not None else (now_ms if rate else now_ms - per_device * step_ms)
    if args.target:
        host, _, port = args.target.rpartition(":")
        if not host or not port.isdigit():
            raise SimulateError(f"--target: expected HOST:PORT, got {args.target!r}")
        target = (host, int(port))
    else:
        target = default_target(fmt)
    return Plan(devices=args.devices, total=total, rate=rate, fmt=fmt, host=target[0], port=target[1],
                procs=procs, prefix=args.prefix, measurement=args.measurement, start_ms=start_ms,
                step_ms=step_ms, chunk=chunk, qos=args.qos, hold_s=args.hold, connect_rate=args.connect_rate,
                ack_timeout_s=args.ack_timeout,
                seed=args.seed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=100, help="boards, each with its own connection (default 100)")
    p.add_argument("--total", type=int, help="readings to send in all")
    p.add_argument("--rate", type=float, help="readings per second in all (default: as fast as taken)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to send at --rate (default 10)")
    p.add_argument("--format", choices=FORMATS, default="json")
    p.add_argument("--target", help="HOST:PORT (default: the configured text listener, the binary one for "
                                    "--format binary, 127.0.0.1:1883 for mqtt)")
    p.add_argument("--procs", type=int, help="sending processes (default: one per core)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="device names are PREFIX-0001... (default sim)")
    p.add_argument("--measurement", default=DEFAULT_MEASUREMENT, help="measurement of --format line")
    p.add_argument("--start-ms", type=int, help="first timestamp, Unix ms (default: so the last is about now)")
    p.add_argument("--step-ms", type=int, help="ms between one board's readings (default 1, or 1/rate)")
    p.add_argument("--chunk", type=int, help=f"readings per send (default {MAX_CHUNK} at full speed)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=0, help="MQTT QoS (1 counts PUBACKs as acks)")
    p.add_argument("--hold", type=float, default=0.0, help="keep the connections open S seconds after sending")
    p.add_argument("--connect-rate", type=float, default=DEFAULT_CONNECT_RATE,
                   help=f"boards coming online a second before sending starts (default {DEFAULT_CONNECT_RATE:g};"
                        " 0 = all at once, like a fleet back after an outage)")
    p.add_argument("--ack-timeout", type=float, default=30.0,
                   help="seconds to wait for the last acks, and for the target to take the last bytes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr (auto: when it is a terminal)")


def command(args: argparse.Namespace, load_config: Callable[[], object]) -> int:
    def default_target(fmt: str) -> tuple[str, int]:
        if fmt == "mqtt":
            return "127.0.0.1", DEFAULT_MQTT_PORT
        cfg = load_config()
        wanted = "binary" if fmt == "binary" else None
        for listener in cfg.listeners:     # type: ignore[attr-defined]
            if (listener.framing == "binary") == (wanted == "binary"):
                if listener.auth == "required":
                    raise SimulateError(f"listener {listener.name} requires credentials and simulated boards have"
                                        " none: run it against a listener with auth = \"off\" (--target)")
                host = "127.0.0.1" if listener.host in ("0.0.0.0", "", "::") else listener.host
                return host, listener.port
        raise SimulateError(f"no {'binary' if wanted else 'text'} listener in the configuration: give --target")

    plan = make_plan(args, default_target)
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    summary = run(plan, progress=show)
    if args.json:
        import orjson
        print(orjson.dumps({**asdict(summary), "ok": summary.ok}).decode())
    else:
        print(format_summary(summary))
    return 0 if summary.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` to the ``sensorpipe`` command table."""
    from workers.tools import cli

    def handler(args: argparse.Namespace) -> int:
        try:
            return command(args, lambda: cli._load(args))
        except SimulateError as exc:
            raise cli.CommandError(str(exc)) from None

    p = sub.add_parser("simulate", help="play N boards against the pipeline (load test, benchmark)",
                       description=__doc__.split("\n")[0])
    add_arguments(p)
    p.set_defaults(handler=handler)
