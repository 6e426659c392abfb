"""What authenticating the internal sockets costs: NULL (none), PLAIN with a ZAP handler (what
sensorpipe uses), and CURVE (encrypted), over TCP on 127.0.0.1.

    .venv/bin/python benchmarks/internal_auth.py [--messages 100000] [--size 1024]
    .venv/bin/python benchmarks/internal_auth.py --per-reading [--batch 500]

For each mechanism: a PUSH socket sends ``--messages`` messages of ``--size`` bytes to a PULL socket
in the same process (two threads); prints messages/s, the CPU seconds the process spent, and the
time from connect to the first message delivered (the handshake, ZAP included).

``--per-reading`` prices CURVE for the pipeline: the messages are what one batch of ``--batch``
readings becomes on each internal hop (the edge's frames batch to a parser; the parser's readings
message to the SQLite sink, to the rollup worker and to the query worker's live socket), built with
``workers.core.envelope`` from board-like frames; it prints the CPU per reading, all hops together,
with PLAIN and with CURVE (both ends of every socket are in this process, as they are on one host).
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator


def run(mechanism: str, messages: int, size: int) -> tuple[float, float, float]:
    ctx = zmq.Context()
    auth = None
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 10000
    if mechanism != "NULL":
        auth = ThreadAuthenticator(ctx)
        auth.start()
    if mechanism == "PLAIN":
        auth.configure_plain(domain="bench", passwords={"sensorpipe": "secret"})
        pull.zap_domain = b"bench"
        pull.plain_server = True
        push.plain_username, push.plain_password = b"sensorpipe", b"secret"
    elif mechanism == "CURVE":
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        pull.curve_secretkey, pull.curve_publickey, pull.curve_server = server_secret, server_public, True
        push.curve_serverkey, push.curve_publickey, push.curve_secretkey = server_public, client_public, client_secret
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    payload = os.urandom(size)
    started = time.perf_counter()
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"hello")
    pull.recv()
    handshake = time.perf_counter() - started

    def sender() -> None:
        for _ in range(messages):
            push.send(payload, copy=False)

    cpu0, t0 = time.process_time(), time.perf_counter()
    thread = threading.Thread(target=sender)
    thread.start()
    for _ in range(messages):
        pull.recv(copy=False)
    thread.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    push.close()
    pull.close()
    if auth is not None:
        auth.stop()
    ctx.term()
    return messages / elapsed, cpu, handshake


def hop_messages(batch: int) -> list[bytes]:
    """One batch of ``batch`` readings as it crosses each internal hop (payloads only: ZeroMQ frames
    of one message cost about what their bytes do)."""
    from workers.core import envelope

    now = time.time_ns()
    lines = [b'{"device":"greenhouse-%d","temp":%.2f,"humi":%.1f}' % (i % 50, 20 + i % 7 / 3, 50 + i % 11 / 2)
             for i in range(batch)]
    conns = [envelope.Conn(i, "text", f"192.168.1.{i}:4000") for i in range(min(batch, 50))]
    frames = envelope.frames_message(1, conns, envelope.pack_frames([(line, now + i, i % len(conns))
                                                                     for i, line in enumerate(lines)]))
    readings = [envelope.Reading(f"greenhouse-{i % 50}", now + i, {"temp": 20 + i % 7 / 3, "humi": 50 + i % 11 / 2},
                                 {"place": "greenhouse"}) for i in range(batch)]
    message = envelope.readings_message([1], envelope.readings_body(readings, []))
    frames_bytes, readings_bytes = b"".join(frames), b"".join(message)
    return [frames_bytes, readings_bytes, readings_bytes, readings_bytes]   # parser; sink, rollup, live


def per_reading(batch: int, batches: int) -> None:
    hops = hop_messages(batch)
    print(f"{batches} batches of {batch} board-like readings; hop sizes {[len(h) for h in hops]} bytes"
          f" ({sum(len(h) for h in hops) / batch:.0f} bytes per reading over {len(hops)} hops)\n")
    print("| mechanism | CPU µs per reading (all hops) |")
    print("|---|---|")
    cost: dict[str, float] = {}
    for mechanism in ("PLAIN", "CURVE"):
        cpu = 0.0
        for size in sorted({len(h) for h in hops}):
            _, seconds, _ = run(mechanism, batches, size)
            cpu += seconds * sum(1 for h in hops if len(h) == size)
        cost[mechanism] = cpu / (batch * batches) * 1e6
        print(f"| {mechanism} | {cost[mechanism]:.2f} |")
    print(f"\nCURVE costs {cost['CURVE'] - cost['PLAIN']:.2f} CPU µs per reading more than PLAIN")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--per-reading", action="store_true", help="price CURVE per reading (module docstring)")
    parser.add_argument("--batch", type=int, default=500, help="--per-reading: readings per batch")
    parser.add_argument("--batches", type=int, default=2000, help="--per-reading: batches per hop")
    args = parser.parse_args()
    if args.per_reading:
        per_reading(args.batch, args.batches)
        return
    print(f"{args.messages} messages of {args.size} bytes, PUSH -> PULL over tcp://127.0.0.1\n")
    print("| mechanism | messages/s | MB/s | CPU s | handshake ms |")
    print("|---|---|---|---|---|")
    for mechanism in ("NULL", "PLAIN", "CURVE"):
        rate, cpu, handshake = run(mechanism, args.messages, args.size)
        print(f"| {mechanism} | {rate:,.0f} | {rate * args.size / 1e6:,.0f} | {cpu:.2f} | {handshake * 1000:.1f} |")


if __name__ == "__main__":
    main()
