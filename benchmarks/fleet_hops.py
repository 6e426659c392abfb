"""The fleet's per-reading work in the edge and the query worker, in-process (no sockets, no kernel).

    python benchmarks/fleet_hops.py [--boards 10000] [--reads 200000]

edge: ``boards`` connections (the edge's own ``DeviceConnection`` objects on fake transports, auth off,
no rate limit: as ``benchmarks/run.py`` configures it) each given one 78-byte JSON line in turn, as
a fleet's reads come; the batches are journaled (a temporary directory, fsync as shipped) and taken
off the queue to the parsers and acknowledged at once. query: the live ``readings`` messages two
parsers publish for such a fleet (20-ms batches of 100 readings from 100 different boards, a seen
entry for one in five) applied to the latest values of ``boards`` devices.

Prints CPU µs per read (edge) and per reading (query). What this leaves out is the event loop, the
kernel and ZeroMQ: ``benchmarks/run.py --only fleet`` measures all of it.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from workers.core import config as config_mod
from workers.core import envelope

EVICT_BYTES = 8 * 1024 * 1024        # --cold: written between two messages, more than the L2 caches hold


class FakeTransport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0


def line(board: int, n: int) -> bytes:
    return b'{"device":"fleet-%05d","ts":%d,"temp":%.1f,"hum":%d}\n' % (board, 1_764_000_000_000 + n,
                                                                        20 + n % 10 / 10, 40 + n % 20)


async def edge_reads(boards: int, reads: int, data_dir: Path) -> float:
    from workers.processes.edge import DeviceConnection, Edge

    cfg = config_mod.from_dict({"data_dir": str(data_dir),
                                "listeners": [{"name": "text", "bind": "127.0.0.1:0", "auth": "off",
                                               "max_frames_per_s": 0, "max_connections": 100_000,
                                               "max_connections_per_address": 100_000}]})
    edge = Edge(cfg, None)  # type: ignore[arg-type]    # no sockets used here
    edge.journal.recover(edge.sinks)
    listener = cfg.listeners[0]
    conns = []
    for i in range(boards):
        conn = DeviceConnection(edge, listener)
        conn.connection_made(FakeTransport(("127.0.0.1", 10_000 + i)))  # type: ignore[arg-type]
        conns.append(conn)
    payloads = [line(i, 0) for i in range(boards)]

    def drain() -> None:
        while not edge.outq.empty():
            seq, _ = edge.outq.get_nowait()
            for sink in edge.sinks:
                edge.acknowledged(sink, [seq])

    for conn, payload in zip(conns, payloads):        # the first read decides the framing
        conn.data_received(payload)
        drain()
    edge.flush()
    drain()

    order = list(range(boards))
    random.shuffle(order)
    started = time.process_time()
    done = 0
    per_batch = boards // 50            # 20-ms batches at one reading per board a second
    while done < reads:
        for start in range(0, boards, per_batch):
            for i in order[start:start + per_batch]:
                conns[i].data_received(payloads[i])
            edge.flush()                # what the batch timer does 20 ms after the batch's first frame
            drain()
        done += boards
    edge.flush()
    drain()
    spent = time.process_time() - started
    edge.journal.close()
    return spent / done * 1e6


def query_readings(boards: int, readings: int, cold: bool) -> float:
    from workers.processes.query import QueryWorker

    cfg = config_mod.from_dict({"data_dir": "/nonexistent"})     # nothing restored: no store there
    worker = QueryWorker(cfg)
    per_message = 100
    order = list(range(boards))
    random.shuffle(order)
    messages = []
    ts = 1_764_000_000_000_000_000
    for start in range(0, boards, per_message):
        rows = [[f"fleet-{b:05d}", ts + b, {"temp": 20.5, "hum": 41, "seq": b}, {}]
                for b in order[start:start + per_message]]
        seen = [envelope.Seen(r[0], r[1], "text", 1000 + i, f"127.0.0.1:{10_000 + i}")
                for i, r in enumerate(rows) if i % 5 == 0]
        header = orjson.dumps({"seqs": [start], "seen": [tuple(s) for s in seen]})
        messages.append([envelope.READINGS, header, orjson.dumps([rows, []])])
    for message in messages:
        worker.on_live(message)
    spent = 0.0
    done = 0
    clock = time.process_time
    other = bytearray(EVICT_BYTES) if cold else None
    while done < readings:
        for message in messages:
            if other is not None:
                other[:] = bytes(EVICT_BYTES)       # as other processes leave the caches between wake-ups
            started = clock()
            worker.on_live(message)
            spent += clock() - started
        done += boards
    return spent / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boards", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument("--only", choices=("edge", "query"))
    parser.add_argument("--cold", action="store_true", help="query: the caches emptied before each message")
    args = parser.parse_args()
    from workers.core import worker
    worker.tune_gc()
    if args.only in (None, "edge"):
        with tempfile.TemporaryDirectory() as tmp:
            us = asyncio.run(edge_reads(args.boards, args.reads, Path(tmp)))
        print(f"edge: {us:.2f} µs of CPU per read ({args.boards:,} connections, one 78-byte line per read)")
    if args.only in (None, "query"):
        us = query_readings(args.boards, args.reads, args.cold)
        print(f"query: {us:.2f} µs of CPU per reading ({args.boards:,} devices, 100 readings per message"
              f"{', caches emptied before each' if args.cold else ''})")


if __name__ == "__main__":
    main()
