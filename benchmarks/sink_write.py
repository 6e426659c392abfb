"""In-process cost of the SQLite sink's write (no sockets): CPU us per reading for batches shaped as the
benchmarks send them. ``python -m benchmarks.sink_write [--batches N] [--rollups]``.

Shapes: ``200x1`` a 200-reading batch from 200 devices (one each, as in the fleet), ``100x2`` 100 devices
with 2 each, ``2000x1`` the fleet's 200 ms batch (10,000 boards x 1 reading/s) out of 10,000 devices,
``5000x50`` and ``5000x5`` a full batch at full speed from 100 and 1,000 boards.
Each reading is the benchmark's (temp, humi, rssi), a new timestamp per device per batch."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import shutil
import tempfile
import time
from pathlib import Path

from workers.core.envelope import Reading, Seen
from workers.sinks import Batch
from workers.sinks import sqlite
from workers.sinks.sqlite import SqliteSink

NS = 1_000_000_000
BATCH_S = 0.2                 # the sink's flush interval: a fleet's batch, or a full-speed one
FOLD_BATCHES = round(sqlite.FOLD_EVERY_S / BATCH_S)
MOVE_BATCHES = round(getattr(sqlite, "MOVE_EVERY_S", 1e9) / BATCH_S)


def batches(devices: int, per_device: int, size: int, count: int, start_ns: int) -> list[Batch]:
    out = []
    names = [f"bench-{i:05d}" for i in range(devices)]
    cursor = 0
    tick = 0
    for _ in range(count):
        readings = []
        seen = []
        for _ in range(size // per_device):
            device = names[cursor % devices]
            cursor += 1
            if cursor % devices == 0:
                tick += 1
            for k in range(per_device):
                ts = start_ns + (tick * per_device + k) * NS // 10 + cursor * 1000
                readings.append(Reading(device, ts, {"temp": 21.5 + (ts % 100) / 10, "humi": 40 + ts % 7,
                                                     "rssi": -60 - ts % 20}, {}))
            seen.append(Seen(device, ts, "tcp:7777", 1, "127.0.0.1:5000"))
        out.append(Batch(readings, [], seen))
    return out


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(shape: str, devices: int, per: int, size: int, count: int, rollups: bool, profile: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="sinkbench-"))
    try:
        roll = (work / "rollups.db", (60, 3600), 30.0, 21600.0) if rollups else None
        sink = SqliteSink(work / "sensorpipe.db", rollups=roll)
        sink.connect()
        start = time.time_ns()       # on time for the rollups: the fleet's readings are current
        warm = batches(devices, per, size, count, start - 20 * NS)
        for b in warm[: count // 2]:        # the table holds rows already, as in a running store
            sink.write(b)
        todo = batches(devices, per, size, count, start)
        prof = cProfile.Profile() if profile else None
        c0, w0 = cpu(), time.perf_counter()
        if prof:
            prof.enable()
        for k, b in enumerate(todo):
            # each batch stands for BATCH_S of time: the fold and the move come as often as in a run
            if k % FOLD_BATCHES == 0:
                sink.fold_at = 0.0
            if k % MOVE_BATCHES == 0 and hasattr(sink, "move_at"):
                sink.move_at = 0.0
            sink.write(b)
        if prof:
            prof.disable()
        c1, w1 = cpu(), time.perf_counter()
        n = sum(len(b.readings) for b in todo)
        sink.close()
        wal = sum(p.stat().st_size for p in work.glob("*.db*"))
        print(f"{shape:>8}: {(c1 - c0) / n * 1e6:6.2f} us CPU per reading ({(w1 - w0) / n * 1e6:6.2f} us wall), "
              f"{n} readings in {count} batches, files {wal / 1e6:.0f} MB", flush=True)
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    finally:
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--rollups", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", default="200x1,100x2,2000x1,5000x50,5000x5")
    args = ap.parse_args()
    shapes = {"200x1": (200, 1, 200), "100x2": (100, 2, 200), "2000x1": (10_000, 1, 2000),
              "5000x50": (100, 50, 5000), "5000x5": (1000, 5, 5000)}
    for shape in args.only.split(","):
        devices, per, size = shapes[shape]
        count = {200: args.batches, 2000: args.batches // 2}.get(size, args.batches // 10)
        run(shape, devices, per, size, count, args.rollups, shape if args.profile else None)


if __name__ == "__main__":
    main()
