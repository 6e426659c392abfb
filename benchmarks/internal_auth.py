"""What authenticating the internal sockets costs: NULL (none), PLAIN with a ZAP handler (what
sensorpipe uses), and CURVE (encrypted), over TCP on 127.0.0.1.

    .venv/bin/python benchmarks/internal_auth.py [--messages 100000] [--size 1024]

For each mechanism: a PUSH socket sends ``--messages`` messages of ``--size`` bytes to a PULL socket
in the same process (two threads); prints messages/s, the CPU seconds the process spent, and the
time from connect to the first message delivered (the handshake, ZAP included).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    print(f"{args.messages} messages of {args.size} bytes, PUSH -> PULL over tcp://127.0.0.1\n")
    print("| mechanism | messages/s | MB/s | CPU s | handshake ms |")
    print("|---|---|---|---|---|")
    for mechanism in ("NULL", "PLAIN", "CURVE"):
        rate, cpu, handshake = run(mechanism, args.messages, args.size)
        print(f"| {mechanism} | {rate:,.0f} | {rate * args.size / 1e6:,.0f} | {cpu:.2f} | {handshake * 1000:.1f} |")


if __name__ == "__main__":
    main()
