"""The file journal against the JetStream journal, on this machine: throughput, CPU per reading,
send-to-stored latency and the binary ``A`` round trip.

    .venv/bin/python benchmarks/journal_backends.py [--seconds 8] [--only file,jetstream]

Each backend runs the real pipeline (edge, two parsers, SQLite sink, rollup worker, query worker; the
tests' Pipeline fixture on free 127.0.0.1 ports); ``jetstream`` adds three nats-servers on 127.0.0.1
(a stream with 3 replicas, the edge's feeder pulling for its consumers). Measured per backend:

- ``A`` round trip: one battery board sends a packet and waits for the ``A``, 200 times, at rest.
- flat out: 8 connections send JSON lines (explicit timestamps) as fast as they can for ``--seconds``;
  readings/s stored in SQLite (until the last is in), and CPU time of every process of the system
  (workers, and the nats-servers for jetstream) per reading stored.
- send to stored: at 2,000 lines/s, 40 marker lines, each polled in SQLite until it is there.

``--boards N`` measures instead the battery-board workload with and without authenticated packets:
N boards (threads), each a device of its own, each packet (``RECORDS_PER_PACKET`` u32 records) on a
connection of its own, the next one as soon as the ``A`` came, for ``--seconds``; packets/s answered,
CPU per reading stored (all processes, the nats-servers included) and the ``A`` time (connect, send,
``A``) p50 / p99. ``auth = "required"``: sealed packets (counter + MAC), their (device, counter) the
idempotency key (docs/scale-out.md); ``off``: seed-style packets.

Prints a Markdown table. Needs nats-server (deploy/test-servers.sh) and psutil (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.pipeline import Pipeline, wait_for  # noqa: E402
from tests.servers import NatsCluster  # noqa: E402

SENDERS = 8
LINES_PER_WRITE = 200
PACED_RATE = 2000
MARKERS = 40
ACK_SAMPLES = 200
RECORDS_PER_PACKET = 4
FIRST_BOARD = 10


def packet(n: int) -> bytes:
    data = struct.pack("<HHH", n % 65536, 30000, 25000)
    return struct.pack("<HHHBBB", len(data), 600, 60, 6, 1, 1) + data


def ack_round_trip(p: Pipeline) -> tuple[float, float]:
    times = []
    with socket.create_connection(("127.0.0.1", p.binary_port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n in range(ACK_SAMPLES):
            began = time.perf_counter()
            sock.sendall(packet(n))
            assert sock.recv(1) == b"A"
            times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_for(seconds: float, stop: threading.Event, threads: list[threading.Thread]) -> float:
    """Start the senders, let them send for ``seconds``, stop and join them; when they began."""
    began = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return began


def flat_out(p: Pipeline, seconds: float, procs: list[psutil.Process]) -> tuple[float, float]:
    stop = threading.Event()
    base_ms = int(time.time() * 1000) - 10_000_000

    def send(i: int) -> None:
        n = 0
        with socket.create_connection(("127.0.0.1", p.text_port)) as sock:
            while not stop.is_set():
                chunk = b"".join(b'{"device":"flat-%d","ts":%d,"v":%d}\n' % (i, base_ms + n + k, k)
                                 for k in range(LINES_PER_WRITE))
                sock.sendall(chunk)
                n += LINES_PER_WRITE

    before_rows = p.count_rows()
    cpu_before = cpu_seconds(procs)
    began = run_for(seconds, stop, [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)])
    # everything sent is stored in the end: readings/s is what was stored over the time until the last
    # reading was in (the backlog included), not over the sending time
    last, last_growth = -1, time.monotonic()
    while time.monotonic() - last_growth < 1.0:
        rows = p.count_rows()
        if rows != last:
            last, last_growth = rows, time.monotonic()
        time.sleep(0.05)
    stored = last - before_rows
    elapsed = last_growth - began
    cpu = cpu_seconds(procs) - cpu_before
    return stored / elapsed, cpu / stored * 1e6 if stored else float("nan")


def send_to_stored(p: Pipeline) -> tuple[float, float]:
    stop = threading.Event()
    base_ms = int(time.time() * 1000) - 20_000_000

    def paced() -> None:
        n = 0
        with socket.create_connection(("127.0.0.1", p.text_port)) as sock:
            while not stop.is_set():
                sock.sendall(b"".join(b'{"device":"paced","ts":%d,"v":%d}\n' % (base_ms + n + k, k)
                                      for k in range(PACED_RATE // 100)))
                n += PACED_RATE // 100
                time.sleep(0.01)

    thread = threading.Thread(target=paced, daemon=True)
    thread.start()
    latencies = []
    db = None
    try:
        with socket.create_connection(("127.0.0.1", p.text_port)) as sock:
            for i in range(MARKERS):
                began = time.perf_counter()
                sock.sendall(b'{"device":"marker","ts":%d,"m":%d}\n' % (1_600_000_000_000 + i, i))
                while True:
                    if db is None and (p.data / "sensorpipe.db").exists():
                        db = p.db()
                    if db is not None and db.execute("SELECT 1 FROM readings WHERE device='marker' AND ts=?",
                                                     ((1_600_000_000_000 + i) * 1_000_000,)).fetchone():
                        break
                    time.sleep(0.002)
                latencies.append((time.perf_counter() - began) * 1000)
                time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        if db is not None:
            db.close()
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.95) - 1]


def boards_toml(count: int) -> str:
    return "".join(f'\n[binary.devices.{n}]\ndevice = "bench-{n}"\nfields = [ {{ name = "n", type = "u32" }} ]\n'
                   for n in range(FIRST_BOARD, FIRST_BOARD + count))


def boards_run(p: Pipeline, seconds: float, procs: list[psutil.Process], keys: dict[int, bytes]
               ) -> tuple[float, float, float, float]:
    """(packets/s answered, CPU µs per reading stored, A p50 ms, A p99 ms); ``keys``: device number ->
    MAC key (b"": unauthenticated)."""
    from workers.core import credentials
    stop = threading.Event()
    times: list[float] = []
    sent = [0]

    def board(number: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = b"".join(struct.pack("<I", n * RECORDS_PER_PACKET + k) for k in range(RECORDS_PER_PACKET))
            packet = struct.pack("<HHHBBB", len(body), 60, 1, 4, number, RECORDS_PER_PACKET) + body
            if keys[number]:                  # b"": a seed-style board (auth off)
                packet = credentials.sign_packet(keys[number], packet, n)
            began = time.perf_counter()
            with socket.create_connection(("127.0.0.1", p.binary_port)) as sock:
                sock.sendall(packet)
                assert sock.recv(1) == b"A"
            times.append((time.perf_counter() - began) * 1000)
            sent[0] += 1

    before_rows = p.count_rows()
    cpu_before = cpu_seconds(procs)
    began = run_for(seconds, stop, [threading.Thread(target=board, args=(number,), daemon=True) for number in keys])
    elapsed = time.monotonic() - began
    expected = before_rows + sent[0] * RECORDS_PER_PACKET
    wait_for(lambda: p.count_rows() >= expected, timeout=60, message="every reading stored")
    time.sleep(0.5)
    stored = p.count_rows() - before_rows
    cpu = cpu_seconds(procs) - cpu_before
    times.sort()
    return sent[0] / elapsed, cpu / stored * 1e6, statistics.median(times), times[int(len(times) * 0.99) - 1]


def measure_boards(backend: str, auth: str, work: Path, seconds: float, count: int) -> dict[str, float]:
    cluster = None
    extra = boards_toml(count)
    if backend == "jetstream":
        cluster = NatsCluster(work / f"nats-{auth}")
        cluster.start()
        servers = ", ".join(f'"{u}"' for u in cluster.urls)
        extra += f'\n[journal]\nbackend = "jetstream"\nservers = [{servers}]\n'
    (work / f"{backend}-{auth}").mkdir(exist_ok=True)
    p = Pipeline(work / f"{backend}-{auth}", extra_toml=extra, redeliver=15, auth=auth)
    try:
        from workers.core import credentials
        keys: dict[int, bytes] = {}
        for n in range(FIRST_BOARD, FIRST_BOARD + count):
            if auth == "required":
                out = p.cli("devices", "add", f"bench-{n}")
                assert out.returncode == 0, out.stderr
                keys[n] = credentials.mac_key_for(out.stdout.strip().splitlines()[-1])
            else:
                keys[n] = b""
        p.start_all()
        wait_for(p._port_open, message="edge answering")
        procs = [psutil.Process(proc.pid) for proc in p.procs.values()]
        if cluster is not None:
            procs += [psutil.Process(node.process.pid) for node in cluster.nodes if node.process.pid]
        rate, cpu, a50, a99 = boards_run(p, seconds, procs, keys)
        return {"rate": rate, "cpu": cpu, "a50": a50, "a99": a99}
    finally:
        p.stop_all()
        if cluster is not None:
            cluster.stop()


def measure(backend: str, work: Path, seconds: float) -> dict[str, float]:
    cluster = None
    extra = ""
    if backend == "jetstream":
        cluster = NatsCluster(work / "nats")
        cluster.start()
        servers = ", ".join(f'"{u}"' for u in cluster.urls)
        extra = f'\n[journal]\nbackend = "jetstream"\nservers = [{servers}]\n'
    (work / backend).mkdir(exist_ok=True)
    p = Pipeline(work / backend, extra_toml=extra, redeliver=15)
    try:
        p.start_all()
        wait_for(lambda: p.send(packet(0), port=p.binary_port, read_reply=1) == b"A", message="edge answering")
        procs = [psutil.Process(proc.pid) for proc in p.procs.values()]
        if cluster is not None:
            procs += [psutil.Process(node.process.pid) for node in cluster.nodes if node.process.pid]
        a50, a99 = ack_round_trip(p)
        rate, cpu_per_k = flat_out(p, seconds, procs)
        l50, l95 = send_to_stored(p)
        return {"a50": a50, "a99": a99, "rate": rate, "cpu": cpu_per_k, "l50": l50, "l95": l95}
    finally:
        p.stop_all()
        if cluster is not None:
            cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--only", default="file,jetstream")
    parser.add_argument("--boards", type=int, default=0, help="the battery-board workload, auth off and required")
    args = parser.parse_args()
    load = " / ".join(f"{x:.1f}" for x in psutil.getloadavg())
    rows = []
    if args.boards:
        with tempfile.TemporaryDirectory(prefix="journal-bench-", dir=".") as tmp:
            for backend in args.only.split(","):
                for auth in ("off", "required"):
                    r = measure_boards(backend, auth, Path(tmp), args.seconds, args.boards)
                    rows.append(f"| {backend} | {auth} | {r['rate']:,.0f} | {r['cpu']:.1f} | {r['a50']:.2f} / "
                                f"{r['a99']:.2f} ms |")
                    print(rows[-1], flush=True)
        print(f"\nload average before: {load}; {psutil.cpu_count()} CPUs; {args.boards} boards, "
              f"{RECORDS_PER_PACKET} u32 records a packet, a connection a packet, {args.seconds:.0f} s\n")
        print("| journal | auth | packets/s answered | CPU µs per reading (all processes) | A time p50 / p99 |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
        return 0
    with tempfile.TemporaryDirectory(prefix="journal-bench-", dir=".") as tmp:
        for backend in args.only.split(","):
            r = measure(backend, Path(tmp), args.seconds)
            rows.append(f"| {backend} | {r['rate']:,.0f} | {r['cpu']:.1f} | {r['l50']:.1f} / {r['l95']:.1f} ms"
                        f" | {r['a50']:.2f} / {r['a99']:.2f} ms |")
            print(rows[-1], flush=True)
    print(f"\nload average before: {load}; {psutil.cpu_count()} CPUs\n")
    print("| journal | flat out: readings/s stored | CPU µs per reading (all processes) "
          "| send to stored at 2,000/s, p50 / p95 | binary A round trip at rest, p50 / p99 |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
