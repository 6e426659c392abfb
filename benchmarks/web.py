"""HTTP worker benchmark: latest values over HTTP with wrk, and live-stream clients held while readings flow.

    .venv/bin/python benchmarks/web.py [--quick]

1. A pipeline (edge, 2 parsers, SQLite sink, rollup, query, http) on free ports in a temp dir, seeded
   with 100 simulated boards. ``wrk`` (Debian's, installed by deploy/test-servers.sh) asks
   GET /api/devices/sim-0042/latest with 10, 100 and 400 connections: requests/s and latency.
2. ``sensorpipe simulate`` sends 10,000 readings/s from 1,000 boards (10 a second each) for
   --seconds; the pipeline's throughput is the readings stored in SQLite per second, from the
   simulator's start to the last one stored. Once with no stream clients, once with 1,000
   Server-Sent-Event clients held open by a separate process that counts what they get: 999 each
   watching one board (a dashboard), 1 watching every board (a wall display).

Prints the figures (and --json writes them); not part of ``make test``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pipeline import Pipeline, wait_for  # noqa: E402

ROLES = ("query", "sink-sqlite", "rollup", "parser", "parser", "edge", "http")
DEVICES = 100                      # seeded before the wrk runs


# --------------------------------------------------------------------------- stream clients (own process)


async def hold_streams(port: int, clients: int, all_clients: int, seconds: float, devices: int) -> dict:
    counts = {"connected": 0, "events": 0, "bytes": 0, "ended_early": 0, "failed": 0}

    async def one(path: str) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["failed"] += 1
            return
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        counts["connected"] += 1
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    counts["ended_early"] += 1
                    return
                counts["bytes"] += len(chunk)
                counts["events"] += chunk.count(b"event: reading")
        except (OSError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    paths = [f"/api/devices/sim-{(i % devices) + 1:04d}/stream" for i in range(clients - all_clients)]
    paths += ["/api/stream"] * all_clients
    tasks = []
    for path in paths:
        tasks.append(asyncio.create_task(one(path)))
        await asyncio.sleep(0.001)              # not all at once: the listen backlog
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return counts


def clients_main(argv: list[str]) -> int:
    port, clients, all_clients, seconds, devices = int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4])
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    print(json.dumps(asyncio.run(hold_streams(port, clients, all_clients, seconds, devices))), flush=True)
    return 0


# --------------------------------------------------------------------------- the benchmark


def wrk(url: str, connections: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    p50 = re.search(r"50%\s+([\d.]+\w+)", out)[1]
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)[1]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"connections": connections, "requests_per_s": rps, "p50": p50, "p99": p99,
            "non_2xx": int(errors[1]) if errors else 0}


def simulate(p: Pipeline, rate: int, seconds: float, devices: int) -> dict:
    before = p.count_rows()
    started = time.monotonic()
    result = p.cli("simulate", "--devices", str(devices), "--rate", str(rate), "--duration", str(seconds),
                   "--procs", "1", "--json", "--progress", "never", timeout=seconds * 4 + 60)
    summary = json.loads(result.stdout)
    expected = before + summary["sent"]
    wait_for(lambda: p.count_rows() >= expected, timeout=120, interval=0.1, message="every reading stored")
    elapsed = time.monotonic() - started
    return {"sent": summary["sent"], "send_s": round(summary.get("seconds", seconds), 2),
            "stored_per_s": round(summary["sent"] / elapsed), "last_stored_after_s": round(elapsed, 2)}


def cpu_seconds(pid: int) -> float:
    import psutil
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def pipeline_cpu(p: Pipeline) -> float:
    """CPU seconds of the pipeline's own workers (not the HTTP worker): a figure the machine's other
    load does not move, unlike readings per second."""
    return sum(cpu_seconds(proc.pid) for name, proc in p.procs.items() if not name.startswith("http"))


def measured_flow(p: Pipeline, rate: int, seconds: float, devices: int, http_pid: int) -> dict:
    http_cpu, cpu = cpu_seconds(http_pid), pipeline_cpu(p)
    flow = simulate(p, rate, seconds, devices)
    flow["http_cpu_s"] = round(cpu_seconds(http_pid) - http_cpu, 2)
    flow["pipeline_cpu_s_per_100k"] = round((pipeline_cpu(p) - cpu) * 100_000 / flow["sent"], 2)
    return flow


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        return clients_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (3 s wrk, 5 s streams)")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long readings flow in each stream run")
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=1000, help="live-stream clients")
    parser.add_argument("--all-clients", type=int, default=1, help="how many of them watch every device")
    parser.add_argument("--devices", type=int, default=1000, help="simulated boards in the stream runs")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--no-wrk", action="store_true", help="only the live-stream runs")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benchmarks/web.py: wrk is not installed: run deploy/test-servers.sh install", file=sys.stderr)
        return 1
    wrk_s, flow_s = (3, 5.0) if args.quick else (10, args.seconds)
    figures: dict = {"cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="sensorpipe-web-bench-") as tmp:
        p = Pipeline(Path(tmp), redeliver=15.0)     # the shipped default: the tests' 3 s resends batches a loaded machine is still writing
        try:
            p.start_all(ROLES)
            wait_for(lambda: p.cli("devices").returncode == 0, message="query worker")
            p.cli("simulate", "--devices", str(DEVICES), "--total", "2000", "--procs", "1", "--progress", "never")
            wait_for(lambda: p.count_rows() >= 2000, message="seeded")
            url = f"http://127.0.0.1:{p.http_port}/api/devices/sim-0042/latest"
            figures["wrk"] = [] if args.no_wrk else [wrk(url, c, wrk_s) for c in (10, 100, 400)]
            for row in figures["wrk"]:
                print(f"latest over HTTP, {row['connections']:>3} connections: {row['requests_per_s']:>8.0f} req/s,"
                      f" p50 {row['p50']}, p99 {row['p99']}, non-2xx {row['non_2xx']}")

            http_pid = p.procs["http:1"].pid
            figures["flow_alone"] = measured_flow(p, args.rate, flow_s, args.devices, http_pid)
            print(f"{args.rate} readings/s, no stream clients: {figures['flow_alone']}")

            hold = flow_s * 2 + 30
            holder = subprocess.Popen([sys.executable, __file__, "--clients", str(p.http_port), str(args.clients),
                                       str(args.all_clients), str(hold), str(args.devices)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                wait_for(lambda: p.query({"op": "ping"}) and _stream_clients(p) >= args.clients * 0.99, timeout=60,
                         interval=0.5, message=f"{args.clients} stream clients")
                figures["clients_connected"] = _stream_clients(p)
                holder_cpu = cpu_seconds(holder.pid)
                figures["flow_with_streams"] = measured_flow(p, args.rate, flow_s, args.devices, http_pid)
                figures["flow_with_streams"]["clients_process_cpu_s"] = round(cpu_seconds(holder.pid) - holder_cpu, 2)
                figures["clients_at_end"] = _stream_clients(p)
                figures["http_counters"] = {k: v for k, v in _status_http(p).items() if k.startswith("stream_")}
                holder.send_signal(signal.SIGINT)
            finally:
                try:
                    out, _ = holder.communicate(timeout=hold + 30)
                    figures["stream_clients"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
                except (subprocess.TimeoutExpired, ValueError):
                    holder.kill()
            print(f"{args.rate} readings/s, {figures['clients_connected']} stream clients: "
                  f"{figures['flow_with_streams']}; still connected at the end: {figures['clients_at_end']};"
                  f" the clients got: {figures.get('stream_clients')}; HTTP worker: {figures.get('http_counters')}")
        except Exception:
            print(p.log_text()[-6000:], file=sys.stderr)
            raise
        finally:
            p.stop_all()
    figures["load_after"] = os.getloadavg()[0]
    print(f"load average (1 min) before {figures['load_before']:.1f}, after {figures['load_after']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _status_http(p: Pipeline) -> dict:
    """The HTTP worker's own counters; on a loaded machine the query worker may miss an answer: ask again."""
    import httpx

    def ask() -> dict | None:
        return httpx.get(f"http://127.0.0.1:{p.http_port}/api/status", timeout=30).json().get("http")

    return wait_for(ask, timeout=90, interval=1, message="an answer to /api/status")


def _stream_clients(p: Pipeline) -> int:
    return _status_http(p)["stream_clients"]


if __name__ == "__main__":
    sys.exit(main())
