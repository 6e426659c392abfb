"""A TCP server that reads and throws away everything: the target for the simulator's own speed.

    python benchmarks/discard.py PORT

One process, epoll, 256 KiB reads. Prints ``ready`` when listening and, on SIGTERM, one JSON line:
the bytes read and the Unix times of the first and the last byte.
"""
from __future__ import annotations

import json
import selectors
import signal
import socket
import sys
import time

READ_BYTES = 256 * 1024


def serve(port: int) -> int:
    stop = False

    def on_term(signum, frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    selector = selectors.EpollSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    buffer = bytearray(READ_BYTES)
    total = 0
    first = last = 0.0
    print("ready", flush=True)
    while not stop:
        for key, _ in selector.select(0.2):
            if key.data is None:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            try:
                n = conn.recv_into(buffer)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n:
                last = time.time()
                first = first or last
                total += n
            else:
                selector.unregister(conn)
                conn.close()
    print(json.dumps({"bytes": total, "first": first, "last": last}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
