"""What a crowd of half-sent frames costs the edge, and whether the memory comes back.

    .venv/bin/python benchmarks/partial_frames.py [--connections 1000] [--bytes 64000]

Starts the edge alone (real process, free 127.0.0.1 ports), opens ``--connections`` connections that
each send ``--bytes`` of a line that never ends, then resets them all (an unfinished line
at a reset is dropped, counted; at a clean hang-up it would be a frame). Prints the edge's RSS at rest,
with the crowd connected, and after they closed (once the edge's housekeeping ran), for the shipped
``[edge] max_partial_bytes`` (16 MiB) and for an unbounded one (1 GiB): the cap bounds the growth,
``malloc_trim`` gives the heap back after. Needs psutil (a runtime dependency).
"""
from __future__ import annotations

import argparse
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.pipeline import Pipeline, wait_for  # noqa: E402

MIB = 1024 * 1024


def rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def run(cap: int, connections: int, size: int) -> tuple[float, float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        p = Pipeline(Path(tmp), idle_timeout=4, edge=f"max_partial_bytes = {cap}")
        p.start("edge")
        try:
            wait_for(p._port_open, message="edge listener")
            pid = p.procs["edge:1"].pid
            time.sleep(1)
            rest = rss(pid)
            socks = []
            chunk = b"y" * size
            for _ in range(connections):
                sock = socket.create_connection(("127.0.0.1", p.text_port))
                try:
                    sock.sendall(chunk)
                except OSError:
                    pass                              # already closed by the edge: over its budget
                socks.append(sock)
            time.sleep(2)
            crowd = rss(pid)
            open_now = 0
            for sock in socks:
                sock.setblocking(False)
                try:
                    open_now += sock.recv(1) != b""
                except BlockingIOError:
                    open_now += 1
                except OSError:
                    pass
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()                          # a reset: the unfinished line is not a frame
            time.sleep(7)                             # a sweep (and its malloc_trim) runs every idle/4 s
            return rest, crowd, rss(pid), open_now
        finally:
            p.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--bytes", type=int, default=64000)
    args = parser.parse_args()
    print(f"{args.connections} connections x {args.bytes} bytes of an unfinished line, then all closed\n")
    print("| max_partial_bytes | RSS at rest | with the crowd | still open | after they closed |")
    print("|---|---|---|---|---|")
    for cap in (16 * MIB, 1024 * MIB):
        rest, crowd, after, still_open = run(cap, args.connections, args.bytes)
        print(f"| {cap // MIB} MiB | {rest:.1f} MiB | {crowd:.1f} MiB | {still_open} | {after:.1f} MiB |")


if __name__ == "__main__":
    main()
