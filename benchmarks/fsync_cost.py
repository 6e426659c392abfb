"""What the journal's fsync policy costs: readings/s and binary-ack latency with fsync never/interval/batch.

    .venv/bin/python benchmarks/fsync_cost.py [--seconds 5] [--repeat 3] [--data-dir DIR] [--only edge,pipeline]

Three measurements per policy, each with real worker processes on free 127.0.0.1 ports:

- ``edge``: the edge alone, its batches taken and acknowledged at once by this script (an instant
  parser+sink). Fed as fast as 16 TCP connections can send JSON lines: readings/s the edge journals
  and has acknowledged, the ceiling the journal sets (under such load batches are large, so fsyncs
  per batch are few). Fed 20,000 lines/s in small writes (many devices each sending a little): a
  small batch every few ms, the case where fsync per batch costs most. And one battery board at a
  time sending a binary packet and waiting for the ``A``: the round-trip latency (what a board pays
  in awake time), at rest and at that paced rate.
- ``pipeline``: edge, two parsers and the SQLite sink, fed flat out: readings/s written to SQLite.
- the raw cost of one fdatasync of a 4 KiB append on the disk under test.

The journal lives in ``--data-dir`` (default: a temporary directory under the current one, so on the
disk the pipeline would use): fsync costs what that disk charges. Prints a Markdown table.
Standalone: needs only the package (``pip install -e .``).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.servers import free_port  # noqa: E402
from workers.core import envelope, runtime  # noqa: E402

POLICIES = ("never", "interval", "batch")
SENDERS = 16
LINES_PER_WRITE = 200
PACED_RATE = 20_000          # lines/s for the "many small batches" measurement
PACE_S = 0.01
ACK_SAMPLES = 200
REPO = Path(__file__).resolve().parent.parent

CONFIG = """
data_dir = "{data}"
log_level = "WARNING"

[[listeners]]
name = "text"
bind = "127.0.0.1:{text}"
framing = "lines"
decoder = "json"
auth = "off"                     # trusted simulated boards: measure the pipeline, not the guard
max_connections_per_address = 100000
max_frames_per_s = 0

[[listeners]]
name = "binary"
bind = "127.0.0.1:{binary}"
framing = "binary"
decoder = "binary"
auth = "off"
max_connections_per_address = 100000

[endpoints]
frames = "tcp://127.0.0.1:{frames}"
acks = "tcp://127.0.0.1:{acks}"
live = "tcp://127.0.0.1:{live}"
inject = "tcp://127.0.0.1:{inject}"
query = "tcp://127.0.0.1:{query}"
command = "tcp://127.0.0.1:{command}"
seen = "tcp://127.0.0.1:{seen}"
downlink = "tcp://127.0.0.1:{downlink}"
stream = "tcp://127.0.0.1:{stream}"

[http]
bind = "127.0.0.1:{http}"

[rollups]                         # what is measured is the journal's cost: no rollup worker
enabled = false
endpoint = "tcp://127.0.0.1:{rollup}"

[edge]
fsync = "{policy}"

[binary.devices.1]
device = "bench-board"
fields = [ {{ name = "n", type = "u32" }} ]

[sinks.sqlite]
enabled = true
endpoint = "tcp://127.0.0.1:{sqlite}"
"""


class Run:
    """One pipeline (or just its edge) under one fsync policy."""

    def __init__(self, base: Path, policy: str, roles: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"fsync-{policy}-", dir=base))
        self.ports = {name: free_port() for name in ("text", "binary", "frames", "acks", "live", "inject",
                                                      "query", "sqlite", "command", "seen", "downlink",
                                                      "rollup", "stream", "http")}
        self.config = self.dir / "sensorpipe.toml"
        self.config.write_text(CONFIG.format(data=self.dir / "data", policy=policy, **self.ports))
        runtime.use_secret(runtime.pipeline_secret(self.dir / "data"))   # the workers' credentials
        self.ctx = zmq.Context()
        # stands in for the query worker: counters
        self.live = runtime.socket(self.ctx, zmq.SUB, bind=f"tcp://127.0.0.1:{self.ports['live']}")
        self.live.setsockopt(zmq.SUBSCRIBE, envelope.STATS)
        self.procs = [subprocess.Popen([sys.executable, "-m", "workers", "--config", str(self.config), "worker", role],
                                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{role}.log", "ab"))
                      for role in roles]
        self.stats: dict[str, dict] = {}
        deadline = time.monotonic() + 20
        while not _port_open(self.ports["text"]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the edge did not start; see {self.dir}")
            time.sleep(0.05)

    def poll_stats(self) -> None:
        while self.live.poll(0):
            worker, counters = envelope.parse_stats(self.live.recv_multipart())
            self.stats[worker] = counters

    def counter(self, worker: str, name: str, timeout: float = 5.0) -> tuple[float, int]:
        """(when, value) of a counter from the next stats message ``worker`` publishes from now on."""
        while self.live.poll(0):                          # older messages queued: not "now"
            self.live.recv_multipart()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.live.poll(100):
                who, counters = envelope.parse_stats(self.live.recv_multipart())
                if who.startswith(worker):
                    return time.monotonic(), int(counters.get(name, 0))
        raise RuntimeError(f"no stats from {worker}")

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.live.close()
        runtime.term(self.ctx)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class InstantSink(threading.Thread):
    """Takes the edge's batches and acknowledges each at once for the one enabled sink."""

    def __init__(self, run: Run) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.frames = 0
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        ctx = zmq.Context()
        pull = runtime.socket(ctx, zmq.PULL, connect=f"tcp://127.0.0.1:{self.run_.ports['frames']}",
                              max_message=runtime.BATCH_MESSAGE_BYTES)
        push = runtime.socket(ctx, zmq.PUSH, connect=f"tcp://127.0.0.1:{self.run_.ports['acks']}")
        try:
            while not self.stop.is_set():
                if not pull.poll(100):
                    continue
                message = pull.recv_multipart()
                seq, _, conns = envelope.parse_frames_header(message[1])
                self.frames += sum(1 for _ in envelope.iter_frames(message[2], conns))
                push.send_multipart(envelope.ack_message("sqlite", [seq]))
        finally:
            pull.close()
            push.close()
            ctx.term()


class Senders:
    """TCP connections writing JSON lines: as fast as the edge reads them, or ``rate`` lines/s in all,
    in small writes every 10 ms (many devices each sending a little: small batches)."""

    def __init__(self, port: int, count: int = SENDERS, rate: float = 0) -> None:
        self.stop = threading.Event()
        self.rate = rate
        self.threads = [threading.Thread(target=self._send, args=(port, i, count), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _send(self, port: int, index: int, count: int) -> None:
        device = f"bench-{index:02d}".encode()
        per_write = max(1, round(self.rate / count * PACE_S)) if self.rate else LINES_PER_WRITE
        with socket.create_connection(("127.0.0.1", port)) as sock:
            i = 0
            next_write = time.monotonic()
            while not self.stop.is_set():
                chunk = b"".join(b'{"device":"%s","t":%d,"h":%d}\n' % (device, i + k, k) for k in range(per_write))
                i += per_write
                try:
                    sock.sendall(chunk)
                except OSError:
                    return
                if self.rate:
                    next_write += PACE_S
                    time.sleep(max(0.0, next_write - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def ack_latency(port: int, samples: int = ACK_SAMPLES) -> tuple[float, float]:
    """p50 and p99 in ms of packet -> A, one board, a new connection per packet as boards do."""
    times = []
    for n in range(samples):
        packet = struct.pack("<HHHBBB", 4, 60, 1, 4, 1, 1) + struct.pack("<I", n)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            start = time.perf_counter()
            sock.sendall(packet)
            if sock.recv(1) != b"A":
                raise RuntimeError("no A")
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def measure_edge(base: Path, policy: str, seconds: float) -> dict[str, float]:
    run = Run(base, policy, ["edge"])
    sink = InstantSink(run)
    try:
        idle_p50, idle_p99 = ack_latency(run.ports["binary"])
        # many devices each sending a little: small batches, one every batch_max_delay_ms
        paced = Senders(run.ports["text"], rate=PACED_RATE)
        time.sleep(1.0)
        ts0, s0 = run.counter("edge", "fsyncs")
        _, b0 = run.counter("edge", "batches")
        paced_p50, paced_p99 = ack_latency(run.ports["binary"])
        ts1, s1 = run.counter("edge", "fsyncs")
        _, b1 = run.counter("edge", "batches")
        paced.close()
        paced_fsyncs, paced_batches = (s1 - s0) / (ts1 - ts0), (b1 - b0) / (ts1 - ts0)
        # flat out: how many readings a second the journal lets through
        senders = Senders(run.ports["text"])
        time.sleep(1.0)
        f0, t0 = sink.frames, time.monotonic()
        ts0, s0 = run.counter("edge", "fsyncs")
        _, b0 = run.counter("edge", "batches")
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        f1, t1 = sink.frames, time.monotonic()
        ts1, s1 = run.counter("edge", "fsyncs")
        _, b1 = run.counter("edge", "batches")
        senders.close()
        return {"readings_s": (f1 - f0) / (t1 - t0), "fsyncs_s": (s1 - s0) / (ts1 - ts0),
                "batches_s": (b1 - b0) / (ts1 - ts0),
                "paced_fsyncs_s": paced_fsyncs, "paced_batches_s": paced_batches,
                "ack_idle_p50": idle_p50, "ack_idle_p99": idle_p99,
                "ack_paced_p50": paced_p50, "ack_paced_p99": paced_p99}
    finally:
        sink.stop.set()
        sink.join(5)
        run.close()


def fdatasync_latency(base: Path, samples: int = 200) -> tuple[float, float]:
    """p50 and p99 in ms of a 4 KiB append + fdatasync: what one journal fsync costs on this disk."""
    path = base / "fdatasync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    times = []
    try:
        for _ in range(samples):
            os.write(fd, b"x" * 4096)
            start = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def measure_pipeline(base: Path, policy: str, seconds: float) -> dict[str, float]:
    run = Run(base, policy, ["sink-sqlite", "parser", "parser", "edge"])
    try:
        senders = Senders(run.ports["text"])
        time.sleep(2.0)                                  # warm up
        t0, w0 = run.counter("sink:sqlite", "written_readings")
        ts0, s0 = run.counter("edge", "fsyncs")
        time.sleep(seconds)
        t1, w1 = run.counter("sink:sqlite", "written_readings")
        ts1, s1 = run.counter("edge", "fsyncs")
        senders.close()
        return {"readings_s": (w1 - w0) / (t1 - t0), "fsyncs_s": (s1 - s0) / (ts1 - ts0)}
    finally:
        run.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window per policy and mode")
    parser.add_argument("--data-dir", default=".", help="where the journals go (the disk under test)")
    parser.add_argument("--only", default="edge,pipeline", help="which measurements: edge, pipeline or both")
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is shown")
    args = parser.parse_args()
    base = Path(args.data_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    modes = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="fsync-cost-", dir=base) as tmp:
        runs: dict[str, dict[str, list[dict[str, float]]]] = {}
        for _ in range(args.repeat):           # policies interleaved, so a busy spell hits them all alike
            for policy in POLICIES:
                for mode, measure in (("edge", measure_edge), ("pipeline", measure_pipeline)):
                    if mode in modes:
                        result = measure(Path(tmp), policy, args.seconds)
                        runs.setdefault(mode, {}).setdefault(policy, []).append(result)
                        print(f"{mode} {policy}: {orjson.dumps(result).decode()}", file=sys.stderr)
        results = {mode: {policy: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
                          for policy, rs in by_policy.items()}
                   for mode, by_policy in runs.items()}
    fs = subprocess.run(["df", "-T", str(base)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    sync_p50, sync_p99 = fdatasync_latency(base)
    print(f"\njournal on {fs[0]} ({fs[1]}), 4 KiB append + fdatasync p50 {sync_p50:.2f} ms, p99 {sync_p99:.2f} ms;"
          f" {os.cpu_count()} CPUs; {SENDERS} TCP connections sending JSON lines; window {args.seconds:g} s;"
          f" median of {args.repeat} run(s)\n")
    if "edge" in results:
        print("| fsync | edge alone, flat out: readings/s | batches/s | fsyncs/s |"
              f" {PACED_RATE:,} lines/s in small writes: batches/s | fsyncs/s |"
              " binary A at rest p50 / p99 | binary A at that rate p50 / p99 |")
        print("|---|---|---|---|---|---|---|---|")
        for policy, r in results["edge"].items():
            print(f"| {policy} | {r['readings_s']:,.0f} | {r['batches_s']:,.0f} | {r['fsyncs_s']:,.0f} |"
                  f" {r['paced_batches_s']:,.0f} | {r['paced_fsyncs_s']:,.0f} |"
                  f" {r['ack_idle_p50']:.1f} / {r['ack_idle_p99']:.1f} ms |"
                  f" {r['ack_paced_p50']:.1f} / {r['ack_paced_p99']:.1f} ms |")
        print()
    if "pipeline" in results:
        print("| fsync | whole pipeline (edge, 2 parsers, SQLite): readings/s stored | journal fsyncs/s |")
        print("|---|---|---|")
        for policy, r in results["pipeline"].items():
            print(f"| {policy} | {r['readings_s']:,.0f} | {r['fsyncs_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
