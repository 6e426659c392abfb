"""What device authentication costs: the checks alone, and hellos against a running edge.

    .venv/bin/python benchmarks/auth_cost.py [--hellos 200] [--frames 20000]

- ``checks``: one scrypt token check (what a first hello costs the edge, in a thread), one binary
  packet MAC check (HMAC-SHA256 over a 21-byte balcony packet), one cached hello (SHA-256).
- ``hellos``: a real edge (with two parsers and the SQLite sink, on free 127.0.0.1 ports), one device
  connecting ``--hellos`` times in a row: connect, hello, wait for ``{"auth":"ok"}``, close. The
  first hello costs a scrypt, the rest hit the edge's cache: hellos/s and latency percentiles. Then
  ``--hellos`` different devices, each its first hello (a scrypt each, 16 at most in flight), from 16
  threads: hellos/s.
- ``frames``: JSON lines through one connection, ``auth = "off"`` against ``auth = "required"``
  (after the hello), twice each in turn: readings/s into SQLite, so the per-frame cost of being
  authenticated shows (the parser's device check).

Prints a Markdown table. Needs the package and its test helpers (run from the checkout).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pipeline import Pipeline, wait_for  # noqa: E402
from workers.core import credentials  # noqa: E402
from workers.core.credentials import CredentialStore  # noqa: E402

ROLES = ("query", "sink-sqlite", "parser", "parser", "edge")


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def checks() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = CredentialStore(tmp)
        token = store.add("d1")
        credential = store.get("d1")
        store.close()
    assert credential is not None
    key = credentials.mac_key_for(token)
    packet = credentials.sign_packet(key, bytes(21), 7)
    digest = credentials.hashlib.sha256(token.encode()).digest()
    return [
        ("scrypt token check (first hello)", f"{per_call(lambda: credential.verify(token), 30) * 1e3:.1f} ms"),
        ("binary packet MAC check", f"{per_call(lambda: credentials.open_packet(key, packet), 20000) * 1e6:.1f} µs"),
        ("cached hello check (SHA-256)", f"{per_call(lambda: credentials.hmac.compare_digest(credentials.hashlib.sha256(token.encode()).digest(), digest), 20000) * 1e6:.1f} µs"),
    ]


def hello(port: int, device: str, token: str) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(orjson.dumps({"auth": {"device": device, "token": token}}) + b"\n")
        reply = b""
        while b"\n" not in reply:
            chunk = sock.recv(64)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b'{"auth":"ok"}'), reply
    return time.perf_counter() - start


def pipeline(tmp: Path, auth: str) -> Pipeline:
    tmp.mkdir(parents=True)
    p = Pipeline(tmp.resolve(), auth=auth)
    for role in ROLES:
        p.start(role)
    wait_for(lambda: p.query({"op": "ping"}, timeout=0.5).get("ok"), message="query worker")
    wait_for(p._port_open, message="edge listener")
    return p


def hellos(tmp: Path, n: int) -> list[tuple[str, str]]:
    p = pipeline(tmp, "required")
    try:
        token = p.cli("devices", "add", "repeat").stdout.strip().splitlines()[-1]
        times = [hello(p.text_port, "repeat", token) for _ in range(n)]
        cached = sorted(times[1:])
        fresh = {f"dev-{i}": p.cli("devices", "add", f"dev-{i}").stdout.strip().splitlines()[-1]
                 for i in range(min(n, 50))}
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda item: hello(p.text_port, *item), fresh.items()))
        fresh_rate = len(fresh) / (time.perf_counter() - start)
    finally:
        p.stop_all()
    return [
        (f"{n} hellos in a row, one device (cached)", f"{len(cached) / sum(cached):.0f} hellos/s, p50 "
         f"{statistics.median(cached) * 1e3:.2f} ms, p99 {cached[int(len(cached) * 0.99) - 1] * 1e3:.2f} ms"),
        ("first hello of the device (scrypt)", f"{times[0] * 1e3:.1f} ms"),
        (f"{len(fresh)} devices' first hellos, 16 at once", f"{fresh_rate:.0f} hellos/s"),
    ]


def frames(tmp: Path, n: int) -> list[tuple[str, str]]:
    out = []
    for run, auth in enumerate(("off", "required", "off", "required")):      # twice each, in turn
        p = pipeline(tmp / f"{auth}{run}", auth)
        try:
            lines = b"".join(orjson.dumps({"device": "fast", "i": i}) + b"\n" for i in range(n))
            with socket.create_connection(("127.0.0.1", p.text_port), timeout=10) as sock:
                if auth == "required":
                    token = p.cli("devices", "add", "fast").stdout.strip().splitlines()[-1]
                    sock.sendall(orjson.dumps({"auth": {"device": "fast", "token": token}}) + b"\n")
                    assert sock.recv(64).startswith(b'{"auth":"ok"}')
                start = time.perf_counter()
                sock.sendall(lines)
                wait_for(lambda: p.count_rows("readings", "WHERE device = 'fast'") == n, timeout=120, interval=0.02,
                         message="all frames")
                out.append((f"{n} lines on one connection, auth = {auth}",
                            f"{n / (time.perf_counter() - start):.0f} readings/s into SQLite"))
        finally:
            p.stop_all()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hellos", type=int, default=200)
    parser.add_argument("--frames", type=int, default=20000)
    args = parser.parse_args()
    rows = checks()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        rows += hellos(Path(tmp) / "hellos", args.hellos)
        rows += frames(Path(tmp), args.frames)
    print("| what | cost |\n|---|---|")
    for what, cost in rows:
        print(f"| {what} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
