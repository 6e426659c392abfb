"""The end-to-end benchmark: sensorpipe side by side with what users run today, in one run.

    make bench                               # everything (about 8 minutes on the 2-core machine)
    make bench BENCH_ARGS=--quick            # smaller workloads (about 3 minutes)
    .venv/bin/python benchmarks/run.py --only sensorpipe,ceiling --devices 100
    .venv/bin/python benchmarks/run.py --only twoedges --quick --devices 100   # JetStream, two edges

Starts VictoriaMetrics (for InfluxDB; tests/servers.py), then for each system under test starts it,
plays a fixed workload with ``sensorpipe simulate`` (every board its own connection, every reading a
unique (device, timestamp)), and counts what is actually stored: VictoriaMetrics' export API, or the
SQLite file, never what the system believes it wrote. Prints a Markdown report and writes it, with the
raw figures as JSON, to ``benchmarks/results/``. BENCHMARKS.md explains each figure.

Systems: sensorpipe (InfluxDB sink; SQLite sink; both), Node-RED (the tutorial flow, and a tuned flow
that batches), the thread-per-connection design (benchmarks/baseline_threaded.py), and the ceiling:
the same readings as line protocol straight into VictoriaMetrics' own TCP listener. Only when named
(``--only twoedges``, it needs nats-server): the shipped configuration plus InfluxDB on the file journal
and one edge, beside the same on the JetStream journal (three nats-servers) with the boards split over
two edges (docs/scale-out.md).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from tests.servers import ServerProcess, Victoria, free_port, port_accepts  # noqa: E402

PYTHON = sys.executable
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"                    # the published full run (BENCHMARKS.md)
PARTIAL = REPO / ".cache" / "bench"            # quick and partial runs
DEFAULT_DEVICES = "100,1000"
CONFIG_OVERRIDES: dict[str, dict[str, str]] = {}   # --set: sections and values added to sensorpipe.toml
NODERED_DIR = REPO / ".cache" / "nodered"
NODERED_RED = NODERED_DIR / "node_modules" / "node-red" / "red.js"
POLL_S = 0.05                      # how often the store is counted while a workload runs
IDLE_S = 5.0                       # the two-edge runs: CPU at rest measured over this long
IDLE_CPU_SHARE = 0.05              # a system using less CPU than this (of one core) has stopped working
START_TIMEOUT_S = 60.0
FIELDS = ("temp", "humi", "rssi")
BATCHED_CHUNK = 32                 # readings per write in the batched table (the simulator's full-speed default)
SP_SHIPPED = "sensorpipe shipped + InfluxDB"   # deploy/sensorpipe.toml (SQLite, rollups) plus [sinks.influx]
SP_DEFAULT = "sensorpipe shipped (SQLite)"     # deploy/sensorpipe.toml as it is


@dataclass(frozen=True)
class Workload:
    readings: int                  # per throughput run (sensorpipe, tuned Node-RED)
    ceiling_readings: int          # the ceiling takes them so fast that a larger run is needed to time it
    tutorial_readings: int         # Node-RED tutorial flow (one write per message)
    threaded_readings: int         # thread per connection (one write per reading, ~1 ms each)
    baseline_cap_s: float          # the slow baselines are stopped after this and counted as they are
    latency_rate: float
    latency_s: float
    connections: int
    query_s: float
    query_clients: int
    fleet_boards: int              # the steady fleet: boards sending one reading a second each
    fleet_s: float
    batched_readings: int          # the batched table (BATCHED_CHUNK readings per write)


FULL = Workload(readings=300_000, ceiling_readings=1_000_000, tutorial_readings=100_000, threaded_readings=20_000,
                baseline_cap_s=60, latency_rate=20_000, latency_s=20, connections=10_000, query_s=6, query_clients=50,
                fleet_boards=10_000, fleet_s=60, batched_readings=300_000)
QUICK = Workload(readings=60_000, ceiling_readings=300_000, tutorial_readings=20_000, threaded_readings=3_000,
                 baseline_cap_s=20, latency_rate=20_000, latency_s=8, connections=10_000, query_s=3, query_clients=50,
                 fleet_boards=10_000, fleet_s=20, batched_readings=60_000)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes and meters


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Meter:
    """CPU seconds (user + system) of some processes between start() and stop(), and their peak RSS."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {label: psutil.Process(pid) for label, pid in pids.items()}
        self.cpu0: dict[str, float] = {}

    def _cpu(self, proc: psutil.Process) -> float:
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def start(self) -> None:
        self.cpu0 = {label: self._cpu(p) for label, p in self.procs.items()}

    def total(self) -> float:
        """CPU seconds of all the processes so far (for telling a stalled system from a busy one)."""
        return sum(self._cpu(p) for p in self.procs.values())

    def stop(self) -> dict[str, dict[str, float]]:
        return {label: {"cpu_s": round(self._cpu(p) - self.cpu0.get(label, 0.0), 3),
                        "peak_rss_mb": round(peak_rss_mb(p.pid), 1)}
                for label, p in self.procs.items()}


def child(name: str, argv: list[str], logs: Path, ready: Callable[[], bool],
          env: dict[str, str] | None = None) -> ServerProcess:
    """A child process (tests/servers.py's ServerProcess: dies with us, stopped with SIGTERM)."""
    if env:
        argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
    proc = ServerProcess(name, argv, logs / f"{name.replace(':', '_')}.log", ready)
    proc.start(timeout=START_TIMEOUT_S)
    return proc


# --------------------------------------------------------------------------- stores: what is really stored


@dataclass
class Count:
    stored: int = 0                # distinct (device, timestamp) readings stored
    samples: int = 0               # rows/samples of the reference field, duplicates included
    duplicates: int = 0
    unexpected: int = 0            # readings stored that the simulator did not send
    fields_complete: bool = True   # every field of every stored reading is there


class VictoriaStore:
    def __init__(self, vm: Victoria, measurement: str) -> None:
        self.vm = vm
        self.measurement = measurement

    def samples(self) -> int:
        self.vm._get("/internal/force_flush")
        reply = json.loads(self.vm._get("/api/v1/query", {
            "query": f'sum(count_over_time({{__name__="{self.measurement}_temp"}}[30d]))',
            "time": str(int(time.time()) + 86400), "nocache": "1"}))
        result = reply["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def count(self, summary: dict) -> Count:
        out = Count()
        per_field: dict[str, int] = {}
        for name in FIELDS:
            series = self.vm.export(f'{{__name__="{self.measurement}_{name}"}}')
            total = 0
            for item in series:
                device = item["metric"].get("device", "")
                stamps = item["timestamps"]
                total += len(stamps)
                if name != "temp":
                    continue
                distinct = set(stamps)
                out.samples += len(stamps)
                out.duplicates += len(stamps) - len(distinct)
                expected = sum(1 for ts in distinct if _expected(summary, device, ts))
                out.stored += expected
                out.unexpected += len(distinct) - expected
            per_field[name] = total
        out.fields_complete = len(set(per_field.values())) == 1
        return out


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)

    def samples(self) -> int:
        if not self.path.exists():
            return 0
        db = self._db()
        try:
            # a row per reading (every reading here has temp): counted every POLL_S, so not through the view
            if db.execute("SELECT type FROM sqlite_master WHERE name = 'readings'").fetchone() == ("view",):
                recent = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'recent_readings'").fetchone()
                return db.execute("SELECT (SELECT count(*) FROM packed_readings)" + (
                    " + (SELECT count(*) FROM recent_readings)" if recent else "")).fetchone()[0]
            return db.execute("SELECT count(*) FROM readings WHERE field = 'temp'").fetchone()[0]   # a row per field
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def count(self, summary: dict) -> Count:
        out = Count()
        db = self._db()
        try:
            counts = dict(db.execute("SELECT field, count(*) FROM readings GROUP BY field").fetchall())
            for device, ts in db.execute("SELECT device, ts FROM readings WHERE field = 'temp'"):
                out.samples += 1
                if _expected(summary, device, ts // 1_000_000):
                    out.stored += 1
                else:
                    out.unexpected += 1
        finally:
            db.close()
        out.fields_complete = len({counts.get(f, 0) for f in FIELDS}) == 1
        return out                 # (device, field, ts) is the primary key: a duplicate cannot be stored


def _expected(summary: dict, device: str, ts_ms: int) -> bool:
    """Whether (device, ts) is one of the readings the simulator sent."""
    if not device.startswith(summary["prefix"] + "-"):
        return False
    offset = ts_ms - summary["start_ms"]
    return offset >= 0 and offset % summary["step_ms"] == 0


# --------------------------------------------------------------------------- systems under test


class System:
    """Something that takes device connections on ``port`` and stores readings."""
    label = ""

    def __init__(self) -> None:
        self.port = 0
        self.children: list[ServerProcess] = []

    def pids(self) -> dict[str, int]:
        return {c.name: c.pid for c in self.children if c.pid}

    def errors(self) -> str:
        """The most frequent error lines in the system's logs, numbers masked: what went wrong."""
        counts: dict[str, int] = {}
        for c in self.children:
            try:
                text = c.log_path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if re.search(r"\w(Error|Exception): |\[error\]|EMFILE|ECONNRESET", line) and "WARN" not in line:
                    key = re.sub(r"\d+", "N", line.split("] ", 1)[-1])[:120]
                    counts[key] = counts.get(key, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:2]
        return "; ".join(f"{n:,}× {line.strip()}" for line, n in top)

    def stop(self) -> None:
        for c in reversed(self.children):
            c.stop(timeout=20)

    def simulate(self, devices: int, total: int, prefix: str, *extra: str) -> "Simulation":
        """The boards of a throughput run: all on ``port``."""
        return simulate(self.port, devices, total, prefix, *extra)


class SensorPipe(System):
    """sensorpipe on free ports. ``supervised``: the whole pipeline under supervisord, as `sensorpipe run`
    starts it (every worker, supervisord included, is measured); otherwise the workers alone, started here
    (the parser-count runs, which supervisord.conf's fixed ``numprocs`` cannot vary)."""
    ROLES = ("query", "sinks", "parsers", "edge")
    NAMES = {"influx": "InfluxDB", "sqlite": "SQLite"}

    def __init__(self, workdir: Path, sinks: tuple[str, ...], vm: Victoria | None, measurement: str,
                 parsers: int = 2, rollups: bool = True, supervised: bool = True) -> None:
        super().__init__()
        self.label = sensorpipe_label(sinks, rollups)
        self.workdir = workdir
        self.sinks = sinks
        self.parsers = parsers
        self.rollups = rollups
        self.supervised = supervised
        self.workers: dict[str, int] = {}
        self.data = workdir / "data"
        from workers.core import runtime
        self.secret = runtime.pipeline_secret(self.data)       # the internal sockets' credentials
        runtime.use_secret(self.secret)
        self.port = free_port()
        self.ports = {n: free_port()
                      for n in ("binary", "frames", "acks", "live", "inject", "query", "sqlite", "influx",
                                "command", "seen", "downlink", "rollup", "mongo", "webhook", "stream", "http")}
        self.query_endpoint = f"tcp://127.0.0.1:{self.ports['query']}"
        self.config = workdir / "sensorpipe.toml"
        p = self.ports
        # deploy/sensorpipe.toml on free ports: its values are the defaults, and its example rollup windows
        self.config.write_text(f"""
data_dir = "{self.data}"
log_level = "WARNING"

[[listeners]]
name = "text"
bind = "127.0.0.1:{self.port}"
max_connections = 20000
auth = "off"                     # trusted simulated boards: measure the pipeline, not the guard
max_connections_per_address = 100000
max_frames_per_s = 0

[[listeners]]
name = "binary"
bind = "127.0.0.1:{p['binary']}"
framing = "binary"
decoder = "binary"
auth = "off"
max_connections_per_address = 100000

[endpoints]
frames = "tcp://127.0.0.1:{p['frames']}"
acks = "tcp://127.0.0.1:{p['acks']}"
live = "tcp://127.0.0.1:{p['live']}"
inject = "tcp://127.0.0.1:{p['inject']}"
query = "tcp://127.0.0.1:{p['query']}"
command = "tcp://127.0.0.1:{p['command']}"
seen = "tcp://127.0.0.1:{p['seen']}"
downlink = "tcp://127.0.0.1:{p['downlink']}"
stream = "tcp://127.0.0.1:{p['stream']}"

[http]
bind = "127.0.0.1:{p['http']}"

[rollups]
enabled = {str(rollups).lower()}
endpoint = "tcp://127.0.0.1:{p['rollup']}"
windows = ["1m", "1h", "1d"]

[sinks.sqlite]
enabled = {str('sqlite' in sinks).lower()}
endpoint = "tcp://127.0.0.1:{p['sqlite']}"

[sinks.influx]
enabled = {str('influx' in sinks).lower()}
endpoint = "tcp://127.0.0.1:{p['influx']}"
url = "{vm.url if vm else 'http://127.0.0.1:8086'}"
token = "benchmark"
measurement = "{measurement}"

[sinks.mongo]
endpoint = "tcp://127.0.0.1:{p['mongo']}"

[sinks.webhook]
endpoint = "tcp://127.0.0.1:{p['webhook']}"
""" + "".join(f"\n[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
              for section, values in sorted(CONFIG_OVERRIDES.items())))
        self.store: VictoriaStore | SqliteStore
        if "influx" in sinks:
            assert vm is not None
            self.store = VictoriaStore(vm, measurement)
        else:
            self.store = SqliteStore(self.data / "sensorpipe.db")

    def expected_workers(self) -> list[str]:
        return ["edge", "query", "commands", *[f"parser:{i + 1}" for i in range(self.parsers)],
                *[f"sink-{s}" for s in self.sinks], *(["rollup"] if self.rollups else [])]

    def start(self) -> "SensorPipe":
        logs = self.workdir / "logs"
        if self.supervised:
            run = child("supervisord", [PYTHON, "-m", "workers", "--config", str(self.config), "run"], logs,
                        lambda: self._edge_ready() and self._query_ready())
            self.children.append(run)
            if not wait_until(lambda: set(self.expected_workers()) <= set(self._find_workers(run.pid or 0)), 30):
                raise RuntimeError(f"not every worker started under supervisord: {self._find_workers(run.pid or 0)}")
            found = self._find_workers(run.pid or 0)
            # only the workers that stay (disabled sinks and the MQTT worker exit 0 as they start)
            self.workers = {k: v for k, v in found.items() if k in self.expected_workers() or k == "supervisord"}
            self._wait_started()
            return self
        roles = ["query", *[f"sink-{s}" for s in self.sinks], *(["rollup"] if self.rollups else []),
                 *["parser"] * self.parsers, "edge"]
        counts: dict[str, int] = {}
        for role in roles:
            counts[role] = counts.get(role, 0) + 1
            name = f"{role}:{counts[role]}" if role == "parser" else role
            ready = self._edge_ready if role == "edge" else (self._query_ready if role == "query" else (lambda: True))
            self.children.append(child(name, [PYTHON, "-m", "workers", "--config", str(self.config), "worker", role],
                                       logs, ready, env={"SUPERVISOR_PROCESS_NAME": name.replace(":", "_")}))
        self._wait_started()
        return self

    def _wait_started(self) -> None:
        """Until the query worker has made the restores of its start (the second ``[query]
        resync_after_s`` after it, reading the whole ``latest`` view): start-up work, not the workload's,
        which fell inside a measured run when that began within those seconds."""
        def started() -> bool:
            try:
                query = self.request({"op": "status"}).get("workers", {}).get("query", {})
            except Exception:  # noqa: BLE001  not answering yet
                return False
            return query.get("restores", 0) >= 2 and query.get("resync_due", 1) == 0
        if not wait_until(started, 30):
            log("the query worker's start-up restores did not finish within 30 s; measuring anyway")

    @staticmethod
    def _find_workers(supervisord_pid: int) -> dict[str, int]:
        """supervisord's running workers by role (parsers numbered), supervisord itself included."""
        found = {"supervisord": supervisord_pid}
        try:
            kids = sorted(psutil.Process(supervisord_pid).children(), key=lambda p: p.pid)
        except psutil.Error:
            return found
        parsers = 0
        for kid in kids:
            try:
                if kid.status() == psutil.STATUS_ZOMBIE:
                    continue
                argv = kid.cmdline()
            except psutil.Error:
                continue
            if len(argv) < 2 or argv[-2] != "worker":
                continue                      # exited, or not one of ours
            role = argv[-1]
            if role == "parser":
                parsers += 1
                role = f"parser:{parsers}"
            found[role] = kid.pid
        return found

    def pids(self) -> dict[str, int]:
        return dict(self.workers) if self.supervised else super().pids()

    def _query_ready(self) -> bool:
        return bool(self.request({"op": "ping"}, timeout=0.5).get("ok"))

    def _edge_ready(self) -> bool:
        return port_accepts(self.port)

    def request(self, message: dict, timeout: float = 2.0) -> dict:
        from workers.processes.query import request
        return request(self.query_endpoint, message, timeout_s=timeout, retries=0)

    def status(self) -> dict:
        try:
            return self.request({"op": "status"}).get("workers", {})
        except Exception:  # noqa: BLE001 -- not answering right now
            return {}


def sensorpipe_label(sinks: tuple[str, ...], rollups: bool) -> str:
    if set(sinks) == {"sqlite", "influx"} and rollups:
        return SP_SHIPPED
    if sinks == ("sqlite",) and rollups:
        return SP_DEFAULT
    names = " + ".join(SensorPipe.NAMES[s] for s in sinks)
    return f"sensorpipe ({names}{', rollups' if rollups else ', no rollups'})"


class NodeRed(System):
    def __init__(self, workdir: Path, flow: str, vm: Victoria, measurement: str) -> None:
        super().__init__()
        self.label = f"Node-RED {flow} flow"
        self.workdir = workdir
        self.flow = flow
        self.vm = vm
        self.port = free_port()
        self.store = VictoriaStore(vm, measurement)
        self.measurement = measurement

    def start(self) -> "NodeRed":
        if not NODERED_RED.exists():
            raise SystemExit(f"Node-RED is not installed in {NODERED_DIR}: run `make bench` (it installs it)")
        userdir = self.workdir / "nodered"
        userdir.mkdir(parents=True, exist_ok=True)
        (userdir / "node_modules").symlink_to(NODERED_DIR / "node_modules")
        env = {"TCP_PORT": str(self.port), "INFLUX_URL": self.vm.url, "MEASUREMENT": self.measurement,
               "NODE_RED_PORT": str(free_port())}
        argv = ["node", str(NODERED_RED), "-u", str(userdir), "-s", str(BENCH / "nodered" / "settings.js"),
                str(BENCH / "nodered" / f"{self.flow}.json")]
        self.children.append(child("node-red", argv, self.workdir, lambda: port_accepts(self.port), env=env))
        return self


class Threaded(System):
    label = "thread per connection"

    def __init__(self, workdir: Path, vm: Victoria, measurement: str) -> None:
        super().__init__()
        self.workdir = workdir
        self.vm = vm
        self.port = free_port()
        self.measurement = measurement
        self.store = VictoriaStore(vm, measurement)

    def start(self) -> "Threaded":
        argv = [PYTHON, str(BENCH / "baseline_threaded.py"), str(self.port), self.vm.url, self.measurement]
        self.children.append(child("threaded", argv, self.workdir, lambda: port_accepts(self.port)))
        return self


class Ceiling(System):
    """No server logic: the simulator writes line protocol straight into VictoriaMetrics' TCP listener."""
    label = "ceiling: straight to VictoriaMetrics"

    def __init__(self, vm: Victoria, measurement: str) -> None:
        super().__init__()
        self.port = vm.influx_port
        self.store = VictoriaStore(vm, measurement)

    def start(self) -> "Ceiling":
        return self


class TwoEdges(SensorPipe):
    """sensorpipe with the JetStream journal and two edges, on one machine as on the hosts of
    docs/scale-out.md: three nats-servers (127.0.0.1, stream with 3 replicas); host 1 runs the shipped
    pipeline under supervisord (its edge, ``edge_id`` 1, also feeds its sinks from the stream); host 2 is
    an edge alone (``edge_id`` 2, no sinks, its own data directory and ports). The boards are split
    over the two edges."""

    def __init__(self, workdir: Path, sinks: tuple[str, ...], vm: Victoria | None, measurement: str) -> None:
        from tests.servers import NatsCluster
        super().__init__(workdir / "host1", sinks, vm, measurement)
        self.label += ", JetStream R3, 2 edges"
        self.cluster = NatsCluster(workdir / "nats")
        consumers = ", ".join(f'"{name}"' for name in sinks)   # the rollup worker reads the SQLite rows
        servers = ", ".join(f'"{url}"' for url in self.cluster.urls)
        journal = f"""
[journal]
backend = "jetstream"
servers = [{servers}]
consumers = [{consumers}]
"""
        self.config.write_text(self.config.read_text() + journal + "edge_id = 1\n")
        # host 2: an edge only; its sockets on ports of its own (nothing connects to them)
        edge2 = workdir / "host2"
        edge2.mkdir(parents=True, exist_ok=True)
        self.port2 = free_port()
        p2 = {n: free_port() for n in ("binary", "frames", "acks", "live", "inject", "query", "command", "seen",
                                       "downlink", "stream", "http")}
        self.config2 = edge2 / "sensorpipe.toml"
        self.config2.write_text(f"""
data_dir = "{edge2 / 'data'}"
log_level = "WARNING"

[[listeners]]
name = "text"
bind = "127.0.0.1:{self.port2}"
max_connections = 20000
auth = "off"
max_connections_per_address = 100000
max_frames_per_s = 0

[[listeners]]
name = "binary"
bind = "127.0.0.1:{p2['binary']}"
framing = "binary"
decoder = "binary"
auth = "off"
max_connections_per_address = 100000

[endpoints]
{chr(10).join(f'{n} = "tcp://127.0.0.1:{p2[n]}"' for n in ("frames", "acks", "live", "inject", "query",
                                                            "command", "seen", "downlink", "stream"))}

[http]
bind = "127.0.0.1:{p2['http']}"

[rollups]
enabled = false

[sinks.sqlite]
enabled = false
""" + journal + "edge_id = 2\n")
        self.edge2: ServerProcess | None = None

    def start(self) -> "TwoEdges":
        try:
            self.cluster.start()
            super().start()
            self.edge2 = child("edge-2", [PYTHON, "-m", "workers", "--config", str(self.config2), "worker",
                                          "edge"], self.config2.parent / "logs", lambda: port_accepts(self.port2),
                               env={"SUPERVISOR_PROCESS_NAME": "edge-2"})
            self.children.append(self.edge2)
            self._warm_up()
        except BaseException:
            self.stop()                        # Bench.with_system stops only what started
            raise
        return self

    def _warm_up(self) -> None:
        """Ready once a reading sent to each edge is in SQLite: the feeder starts only when the new
        streams have their leaders and it has read the consumers' floors (seconds after the edges listen)."""
        stamp = time.time_ns() // 1_000_000
        for port in (self.port, self.port2):
            with socket.create_connection(("127.0.0.1", port)) as sock:     # a field the stores do not count
                sock.sendall(b'{"device":"warm-up-%d","ts":%d,"seq":1}\n' % (port, stamp))

        def stored() -> bool:
            try:
                db = sqlite3.connect(f"file:{self.data / 'sensorpipe.db'}?mode=ro", uri=True, timeout=10)
                try:
                    return db.execute("SELECT count(DISTINCT device) FROM readings WHERE device LIKE 'warm-up-%'"
                                      ).fetchone()[0] == 2
                finally:
                    db.close()
            except sqlite3.Error:
                return False                   # not created yet
        if not wait_until(stored, START_TIMEOUT_S):
            raise RuntimeError("a reading sent to each edge did not reach SQLite: the stream feeds nothing")

    def pids(self) -> dict[str, int]:
        pids = super().pids()
        if self.edge2 is not None and self.edge2.pid:
            pids["edge-2"] = self.edge2.pid
        for node in self.cluster.nodes:
            if node.process.pid:
                pids[f"nats-{node.name}"] = node.process.pid
        return pids

    def stop(self) -> None:
        try:
            super().stop()                     # edge 2 first (the last child), then supervisord
        finally:
            self.cluster.stop()

    def simulate(self, devices: int, total: int, prefix: str, *extra: str) -> "Simulation":
        """Half the boards on each edge (``prefix``-a-0001... and ``prefix``-b-0001...), one timeline."""
        return SplitSimulation([self.port, self.port2], devices, total, prefix, extra)


# --------------------------------------------------------------------------- the simulator


class Simulation:
    def __init__(self, args: list[str]) -> None:
        self.argv = [PYTHON, "-m", "workers", "simulate", *args, "--json", "--progress", "never"]
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.summary: dict[str, Any] | None = None
        self.cpu_s = 0.0

    def running(self) -> bool:
        return self.proc.poll() is None if self.summary is None else False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        """Wait for it; its summary (and the CPU seconds of all its processes, from wait4)."""
        if self.summary is not None:
            return self.summary
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.stop()
        out, err = self.proc.communicate(timeout=30)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_s = usage.ru_utime + usage.ru_stime      # cumulative; differences are taken by the caller
        try:
            self.summary = json.loads(out.decode().strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise RuntimeError(f"simulate failed ({self.proc.returncode}): {err.decode()[-2000:]}") from None
        return self.summary


def simulate(target_port: int, devices: int, total: int, prefix: str, *extra: str) -> Simulation:
    """The simulator as the bench plays it: one reading per TCP write unless ``extra`` says ``--chunk``."""
    chunk = [] if "--chunk" in extra else ["--chunk", "1"]
    return Simulation(["--devices", str(devices), "--total", str(total), "--target", f"127.0.0.1:{target_port}",
                       "--prefix", prefix, *chunk, *extra])


class SplitSimulation:
    """One workload played by one simulator per target, the boards and readings split evenly, every board
    on the same timestamps (so the stores count it as one run); ``finish()`` gives the merged summary."""

    def __init__(self, ports: list[int], devices: int, total: int, prefix: str, extra: tuple[str, ...]) -> None:
        per_board = math.ceil(total / devices)
        start_ms = time.time_ns() // 1_000_000 - per_board   # the last reading about now, as one simulator
        self.parts = [simulate(port, devices // len(ports), total // len(ports), f"{prefix}-{chr(97 + i)}",
                               "--start-ms", str(start_ms), "--step-ms", "1", "--procs", "1", *extra)
                      for i, port in enumerate(ports)]
        self.prefix = prefix
        self.summary: dict[str, Any] | None = None
        self.cpu_s = 0.0

    def running(self) -> bool:
        return any(part.running() for part in self.parts)

    def stop(self) -> None:
        for part in self.parts:
            part.stop()

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        if self.summary is not None:
            return self.summary
        summaries = [part.finish(timeout) for part in self.parts]
        self.cpu_s = self.parts[-1].cpu_s                  # cumulative over every child by then
        first = min(s["first_send"] for s in summaries)
        last = max(s["last_send"] for s in summaries)
        sent = sum(s["sent"] for s in summaries)
        self.summary = {**summaries[0], "prefix": self.prefix, "sent": sent,
                        "bytes": sum(s["bytes"] for s in summaries), "first_send": first, "last_send": last,
                        "rate": round(sent / (last - first), 1) if last > first else 0.0}
        return self.summary


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- scenarios


@dataclass
class Run:
    system: str
    devices: int
    planned: int
    sent: int = 0
    stored: int = 0
    lost: int = 0
    duplicates: int = 0
    unexpected: int = 0
    fields_complete: bool = True
    seconds: float | None = None       # first send -> last stored (None: nothing was stored)
    rate: float = 0.0                  # stored readings / seconds
    sim_rate: float = 0.0              # the simulator's own sending rate
    sim_cpu_s: float = 0.0
    capped: bool = False               # stopped at the time cap, counted as it was
    processes: dict[str, dict[str, float]] = field(default_factory=dict)
    server_cpu_s: float | None = None  # all processes of the system under test (None: it has none)
    cpu_per_100k: float | None = None
    db_cpu_s: float = 0.0              # VictoriaMetrics (or 0 for SQLite, which lives in the sink)
    note: str = ""
    chunk: int = 1                     # readings per TCP write (1: as boards send)
    bytes_per_write: float = 0.0
    stored_p50_ms: float | None = None   # send -> row in SQLite under a paced load (stored_latency)
    stored_p95_ms: float | None = None
    idle_cpu_pct: float | None = None    # % of one core the whole system takes at rest (before the workload)


def throughput(bench: "Bench", system: System, devices: int, total: int, fmt: str = "json",
               cap_s: float = 180.0, stall_s: float = 8.0, sim_args: tuple[str, ...] = (), chunk: int = 1,
               settled: Callable[[int], bool] | None = None) -> Run:
    """Play ``total`` readings from ``devices`` boards into ``system``, ``chunk`` readings per TCP write
    (1, as boards send: every reading its own write); count what its store holds. ``settled(sent)``: once
    the store has everything, CPU is counted on until it is true (at most ``stall_s``): the work of the
    other consumers still busy then (SQLite) is in the CPU figures too."""
    prefix = f"d{devices}"
    run = Run(system.label, devices, total, chunk=chunk)
    meter = Meter(system.pids())
    vm_meter = Meter({"victoria-metrics": bench.vm.process.pid}) if isinstance(system.store, VictoriaStore) else None
    store = system.store
    extra = ["--format", fmt, "--measurement", getattr(store, "measurement", "sim"), "--chunk", str(chunk), *sim_args]
    cpu_before = children_cpu()
    profilers = bench.profile(system, f"{system.label}-{devices}")
    meter.start()
    if vm_meter:
        vm_meter.start()
    sim = system.simulate(devices, total, prefix, *extra)
    started = time.monotonic()
    last_count, last_change = -1, time.time()
    checked = -1                       # the sample count at which the stored readings were last counted
    previous_poll = 0.0
    summary: dict[str, Any] | None = None
    busy: list[tuple[float, float]] = []     # (time, CPU seconds of the system under test)
    while True:
        now_mono = time.monotonic()
        if summary is None and not sim.running():
            summary = sim.finish()
        n = store.samples()
        now = time.time()
        if n != last_count:
            # it changed somewhere since the previous count: take the middle (error ± POLL_S / 2)
            last_count, last_change = n, (now + previous_poll) / 2 if previous_poll else now
        previous_poll = now
        busy.append((now, meter.total() + (vm_meter.total() if vm_meter else 0.0)))
        while len(busy) > 2 and busy[1][0] < now - stall_s:
            busy.pop(0)
        if summary is not None:
            if n >= summary["sent"] and n != checked:
                checked = n
                if store.count(summary).stored >= summary["sent"]:
                    break
            # stalled: nothing new stored for a while and the system has stopped working on it
            idle = busy[-1][1] - busy[0][1] < IDLE_CPU_SHARE * (busy[-1][0] - busy[0][0])
            if now - last_change > stall_s and idle:
                break
        if now_mono - started > cap_s:
            run.capped = True
            sim.stop()
            summary = sim.finish()
            # what was sent is counted once it has had the stall time to arrive
            deadline = time.time() + stall_s
            while time.time() < deadline:
                n = store.samples()
                if n != last_count:
                    last_count, last_change = n, time.time()
                time.sleep(0.5)
            break
        time.sleep(POLL_S)
    if settled is not None and summary is not None:
        wait_until(lambda: settled(summary["sent"]), stall_s)
    run.processes = meter.stop()
    if vm_meter:
        run.db_cpu_s = vm_meter.stop()["victoria-metrics"]["cpu_s"]
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        profiler.wait(30)
    assert summary is not None
    run.sim_cpu_s = round(sim.cpu_s - cpu_before, 2)
    count = store.count(summary)
    run.sent = summary["sent"]
    run.bytes_per_write = round(summary["bytes"] / max(1, math.ceil(summary["sent"] / chunk)), 1)
    run.sim_rate = summary["rate"]
    run.stored, run.duplicates, run.unexpected = count.stored, count.duplicates, count.unexpected
    run.fields_complete = count.fields_complete
    run.lost = max(0, run.sent - run.stored)
    run.note = system.errors()
    run.seconds = round(last_change - summary["first_send"], 3) if run.stored else None
    run.rate = round(run.stored / run.seconds, 1) if run.seconds else 0.0
    run.server_cpu_s = round(sum(p["cpu_s"] for p in run.processes.values()), 2) if run.processes else None
    run.cpu_per_100k = round(run.server_cpu_s / run.stored * 100_000, 2) if run.stored and run.processes else None
    log(f"{system.label}, {devices} devices: stored {run.stored:,}/{run.sent:,} in {run.seconds or 0:.2f} s = "
        f"{run.rate:,.0f}/s; lost {run.lost:,}, duplicates {run.duplicates:,}; CPU {run.server_cpu_s} s "
        f"({run.cpu_per_100k} s/100k); VM CPU {run.db_cpu_s} s" + (" [capped]" if run.capped else "")
        + (f"; in its log: {run.note}" if run.note else ""))
    return run


def stored_latency(pipe: SensorPipe, ports: list[int], rate: float = 2000, probes: int = 40) -> tuple[float, float]:
    """Send -> stored (the row is in SQLite), p50 and p95 ms: ``probes`` probe readings, sent in turn to each
    edge of ``ports``, while ``rate`` readings/s of background load (100 boards, split over the edges) flow."""
    seconds = probes * 0.1 + 3
    background = [Simulation(["--devices", str(100 // len(ports)), "--rate", str(rate / len(ports)),
                              "--duration", str(seconds), "--chunk", "1", "--procs", "1",
                              "--target", f"127.0.0.1:{port}", "--prefix", f"bg-{i}"])
                  for i, port in enumerate(ports)]
    time.sleep(1.0)                                   # let the load settle
    links = [socket.create_connection(("127.0.0.1", port)) for port in ports]
    db = sqlite3.connect(f"file:{pipe.data / 'sensorpipe.db'}?mode=ro", uri=True, timeout=10)
    base_ms = time.time_ns() // 1_000_000 - 30_000_000
    times: list[float] = []
    try:
        for i in range(probes):
            ts_ms = base_ms + i
            sent_at = time.monotonic()
            links[i % len(links)].sendall(b'{"device":"probe","ts":%d,"seq":%d}\n' % (ts_ms, i))
            while time.monotonic() - sent_at < 10.0:
                if db.execute("SELECT 1 FROM readings WHERE device = 'probe' AND ts = ?",
                              (ts_ms * 1_000_000,)).fetchone():
                    times.append((time.monotonic() - sent_at) * 1000)
                    break
                time.sleep(0.002)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - sent_at)))
    finally:
        for link in links:
            link.close()
        db.close()
        for sim in background:
            sim.finish(timeout=seconds + 30)
    times.sort()
    if not times:
        return float("nan"), float("nan")
    return round(statistics.median(times), 1), round(times[min(len(times) - 1, int(len(times) * 0.95))], 1)


def latency(bench: "Bench", pipe: SensorPipe, rate: float, seconds: float) -> dict[str, Any]:
    """Send-to-latest latency of probe readings while ``rate`` readings/s of background load flow."""
    import zmq

    devices = 100
    sim = Simulation(["--devices", str(devices), "--rate", str(rate), "--duration", str(seconds),
                      "--target", f"127.0.0.1:{pipe.port}", "--prefix", "lat"])
    meter = Meter(pipe.pids())
    meter.start()
    time.sleep(1.0)                                   # let the load settle
    from workers.core import runtime
    ctx = zmq.Context()
    req = runtime.socket(ctx, zmq.REQ, connect=pipe.query_endpoint)
    device = "probe"
    latencies: list[float] = []
    missed = 0
    request = json.dumps({"op": "latest", "device": device}).encode()
    probe = socket.create_connection(("127.0.0.1", pipe.port))
    probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    seq = 0
    end = time.monotonic() + seconds - 2.0
    try:
        while time.monotonic() < end:
            seq += 1
            sent_at = time.monotonic()
            probe.sendall(b'{"device":"%s","ts":%d,"seq":%d}\n' % (device.encode(), time.time_ns() // 1_000_000, seq))
            seen = None
            while time.monotonic() - sent_at < 2.0:
                req.send(request)
                if not req.poll(2000):
                    req.close()
                    req = runtime.socket(ctx, zmq.REQ, connect=pipe.query_endpoint)
                    continue
                reply = json.loads(req.recv())
                if reply.get("ok") and reply["fields"].get("seq", {}).get("value") == seq:
                    seen = time.monotonic()
                    break
                time.sleep(0.0005)
            if seen is None:
                missed += 1
            else:
                latencies.append((seen - sent_at) * 1000)
            time.sleep(max(0.0, 0.02 - (time.monotonic() - sent_at)))
    finally:
        probe.close()
        req.close()
        ctx.term()
    summary = sim.finish(timeout=seconds + 30)
    processes = meter.stop()
    # the background load at this rate: everything stored?
    wait_until(lambda: pipe.store.samples() >= summary["sent"], 15)   # (the probe's readings have no temp)
    count = pipe.store.count(summary)
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))], 2) if latencies else float("nan")

    result = {"rate": rate, "achieved_rate": summary["rate"], "probes": len(latencies), "missed": missed,
              "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
              "max_ms": round(latencies[-1], 2) if latencies else float("nan"),
              "mean_ms": round(statistics.fmean(latencies), 2) if latencies else float("nan"),
              "background_sent": summary["sent"], "background_stored": count.stored,
              "background_lost": max(0, summary["sent"] - count.stored), "duplicates": count.duplicates,
              "processes": processes}
    log(f"latency at {rate:,.0f}/s: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
        f"({len(latencies)} probes, {missed} missed); background stored {count.stored:,}/{summary['sent']:,}")
    return result


def steady_fleet(bench: "Bench", pipe: SensorPipe, boards: int, seconds: float,
                 probe_every_s: float = 0.2) -> dict[str, Any]:
    """``boards`` boards each sending one reading a second for ``seconds``, as a fleet does all day: the
    whole pipeline's CPU (% of one core), per process, memory, and a probe board's send->stored (the
    SQLite row is there) and send->latest (the query worker answers it) latencies."""
    import zmq

    sim = Simulation(["--devices", str(boards), "--rate", str(boards), "--duration", str(seconds),
                      "--chunk", "1", "--target", f"127.0.0.1:{pipe.port}", "--prefix", "fleet"])
    # Measure once every board is connected and sending (connecting 10,000 takes a few seconds).
    wait_until(lambda: pipe.status().get("edge", {}).get("connections", 0) >= boards or not sim.running(), 60)
    meter = Meter(pipe.pids())
    profilers = bench.profile(pipe, f"fleet-{boards}")
    meter.start()
    measured_from = time.monotonic()
    from workers.core import runtime

    ctx = zmq.Context()
    req = runtime.socket(ctx, zmq.REQ, connect=pipe.query_endpoint)      # with the pipeline's secret
    db = sqlite3.connect(f"file:{pipe.store.path}?mode=ro", uri=True, timeout=10) \
        if isinstance(pipe.store, SqliteStore) else None
    to_latest: list[float] = []
    to_stored: list[float] = []
    missed = 0
    probe = socket.create_connection(("127.0.0.1", pipe.port))
    probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = json.dumps({"op": "latest", "device": "fleet-probe"}).encode()
    seq = 0
    try:
        while sim.running():
            seq += 1
            ts_ms = time.time_ns() // 1_000_000
            sent_at = time.monotonic()
            probe.sendall(b'{"device":"fleet-probe","ts":%d,"seq":%d}\n' % (ts_ms, seq))
            latest_at = stored_at = None
            while time.monotonic() - sent_at < 5.0 and (latest_at is None or (db and stored_at is None)):
                if latest_at is None:
                    req.send(request)
                    if not req.poll(2000):
                        req.close()
                        req = runtime.socket(ctx, zmq.REQ, connect=pipe.query_endpoint)
                        continue
                    reply = json.loads(req.recv())
                    if reply.get("ok") and reply["fields"].get("seq", {}).get("value") == seq:
                        latest_at = time.monotonic()
                if db is not None and stored_at is None:
                    try:
                        if db.execute("SELECT 1 FROM readings WHERE device = 'fleet-probe' AND field = 'seq' "
                                      "AND ts = ?", (ts_ms * 1_000_000,)).fetchone():
                            stored_at = time.monotonic()
                    except sqlite3.OperationalError:
                        pass                  # the table is not there yet
                time.sleep(0.002)
            if latest_at is None or (db is not None and stored_at is None):
                missed += 1
            if latest_at is not None:
                to_latest.append((latest_at - sent_at) * 1000)
            if stored_at is not None:
                to_stored.append((stored_at - sent_at) * 1000)
            time.sleep(max(0.0, probe_every_s - (time.monotonic() - sent_at)))
    finally:
        wall = time.monotonic() - measured_from
        processes = meter.stop()
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
        for profiler in profilers:
            profiler.wait(30)
        probe.close()
        req.close()
        ctx.term()
        if db is not None:
            db.close()
    rss = {label: round(rss_mb(pid), 1) for label, pid in pipe.pids().items()}
    summary = sim.finish(timeout=60)
    # a pipeline that fell behind (a loaded machine) is given time to catch up: lost means never stored
    caught_up = time.monotonic()
    wait_until(lambda: pipe.store.samples() >= summary["sent"], 180)
    caught_up = time.monotonic() - caught_up
    count = pipe.store.count(summary)

    def pct(values: list[float], p: float) -> float:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(len(values) * p))], 1) if values else float("nan")

    cpu_s = sum(p["cpu_s"] for p in processes.values())
    result = {"boards": boards, "seconds": seconds, "config": pipe.label, "measured_s": round(wall, 1),
              "sent": summary["sent"], "stored": count.stored, "lost": max(0, summary["sent"] - count.stored),
              "duplicates": count.duplicates, "achieved_rate": summary["rate"],
              "cpu_s": round(cpu_s, 2), "cpu_pct_one_core": round(100 * cpu_s / wall, 1) if wall else None,
              "cpu_pct": {k: round(100 * v["cpu_s"] / wall, 2) for k, v in processes.items()} if wall else {},
              "rss_mb": rss, "rss_total_mb": round(sum(rss.values()), 1),
              "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in processes.items()},
              "probes": seq, "missed": missed,
              "stored_p50_ms": pct(to_stored, 0.5), "stored_p99_ms": pct(to_stored, 0.99),
              "latest_p50_ms": pct(to_latest, 0.5), "latest_p99_ms": pct(to_latest, 0.99),
              "bytes_per_write": round(summary["bytes"] / max(1, summary["sent"]), 1),
              "catch_up_s": round(caught_up, 1)}
    log(f"steady fleet, {boards:,} boards at 1 reading/s: CPU {result['cpu_pct_one_core']}% of one core; "
        f"send->stored p50 {result['stored_p50_ms']} ms p99 {result['stored_p99_ms']} ms; send->latest p50 "
        f"{result['latest_p50_ms']} ms p99 {result['latest_p99_ms']} ms; RSS {result['rss_total_mb']} MB; "
        f"stored {count.stored:,}/{summary['sent']:,}")
    return result


def _query_clients(endpoint: str, devices: list[str], clients: int, seconds: float, out,
                   secret: bytes) -> None:
    import zmq

    from workers.core import runtime
    runtime.use_secret(secret)                        # a spawned process starts without it
    ctx = zmq.Context()
    socks = []
    for _ in range(clients):
        socks.append(runtime.socket(ctx, zmq.REQ, connect=endpoint))
    rng = random.Random(os.getpid())
    requests = [json.dumps({"op": "latest", "device": d}).encode() for d in devices]
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
        s.send(rng.choice(requests))
    done = bad = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s, _ in poller.poll(100):
            reply = s.recv()
            if reply.startswith(b'{"ok":true'):
                done += 1
            else:
                bad += 1
            s.send(rng.choice(requests))
    out.put((done, bad))
    for s in socks:
        s.close()
    ctx.term()


def query_rate(pipe: SensorPipe, devices: list[str], clients: int, seconds: float, procs: int = 2) -> dict[str, Any]:
    """Latest-value requests answered per second with ``clients`` concurrent REQ clients."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    query_pid = pipe.pids()["query"]
    meter = Meter({"query": query_pid})
    meter.start()
    workers = [ctx.Process(target=_query_clients, args=(pipe.query_endpoint, devices, clients // procs
                                                          + (1 if i < clients % procs else 0), seconds, out,
                                                          pipe.secret))
               for i in range(procs)]
    started = time.monotonic()
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    elapsed = time.monotonic() - started
    for w in workers:
        w.join()
    cpu = meter.stop()["query"]["cpu_s"]
    answered = sum(r[0] for r in results)
    result = {"clients": clients, "seconds": seconds, "answered": answered, "errors": sum(r[1] for r in results),
              "requests_per_s": round(answered / seconds, 1), "query_cpu_s": cpu,
              "cpu_us_per_request": round(cpu / answered * 1e6, 1) if answered else 0.0,
              "wall_s": round(elapsed, 2)}
    log(f"query endpoint: {result['requests_per_s']:,.0f} latest requests/s with {clients} clients "
        f"({result['cpu_us_per_request']} us of query-worker CPU each)")
    return result


def connections(bench: "Bench", pipe: SensorPipe, count: int) -> dict[str, Any]:
    """Hold ``count`` device connections on one edge, each sending one reading; edge memory per connection."""
    edge_pid = pipe.pids()["edge"]
    idle = rss_mb(edge_pid)
    sim = Simulation(["--devices", str(count), "--total", str(count), "--target", f"127.0.0.1:{pipe.port}",
                      "--prefix", "conn", "--hold", "600"])
    started = time.monotonic()
    held = 0
    while time.monotonic() - started < 120:
        held = pipe.status().get("edge", {}).get("connections", 0)
        if held >= count and pipe.store.samples() >= count:
            break
        if not sim.running():
            break
        time.sleep(0.5)
    time.sleep(2.5)                                   # one more stats period: the edge's own count
    held = pipe.status().get("edge", {}).get("connections", 0)
    rss = rss_mb(edge_pid)
    result = {"connections": count, "held": held, "seconds_to_hold": round(time.monotonic() - started, 1),
              "edge_rss_idle_mb": round(idle, 1), "edge_rss_mb": round(rss, 1),
              "edge_peak_rss_mb": round(peak_rss_mb(edge_pid), 1),
              "kb_per_connection": round((rss - idle) * 1024 / count, 1)}
    result["sim"] = sim
    log(f"{held:,} connections held by one edge: RSS {rss:.0f} MB (idle {idle:.0f} MB, "
        f"{result['kb_per_connection']} kB each)")
    return result


def simulator_speed(bench: "Bench", devices: int, total: int) -> dict[str, Any]:
    """The simulator against a server that only reads and discards: its own ceiling."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, str(BENCH / "discard.py"), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        summary = simulate(port, devices, total, "speed").finish()
        time.sleep(0.5)                               # the last bytes reach the reader
    finally:
        proc.send_signal(signal.SIGTERM)
        received = json.loads(proc.communicate(timeout=30)[0].strip().splitlines()[-1])
    seconds = received["last"] - summary["first_send"]
    result = {"devices": devices, "readings": summary["sent"], "bytes_sent": summary["bytes"],
              "bytes_received": received["bytes"], "send_rate": summary["rate"],
              "received_rate": round(summary["sent"] / seconds, 1) if seconds > 0 else 0.0}
    log(f"simulator alone: {summary['sent']:,} readings from {devices} boards sent at {summary['rate']:,.0f}/s, "
        f"all received by a discarding server at {result['received_rate']:,.0f}/s")
    return result


# --------------------------------------------------------------------------- the whole run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="sensorpipe-bench-"))
        self.load = QUICK if args.quick else FULL
        if args.readings:
            self.load = Workload(**{**asdict(self.load), "readings": args.readings})
        self.tag = time.strftime("%H%M%S")
        self.vm = Victoria(self.work / "victoria", self.work / "victoria.log")
        self.results: dict[str, Any] = {"runs": []}
        self.devices = [int(d) for d in args.devices.split(",")]
        self.only = set(args.only.split(",")) if args.only else None
        self._n = 0
        try:
            import workers.sinks.influx  # noqa: F401
            self.main_sinks: tuple[str, ...] = ("influx",)
        except ImportError:
            log("no InfluxDB sink in this checkout (workers/sinks/influx.py): sensorpipe runs use SQLite only")
            self.main_sinks = ("sqlite",)

    def wants(self, part: str) -> bool:
        return self.only is None or part in self.only

    def measurement(self, what: str) -> str:
        self._n += 1
        return f"b{self.tag}_{self._n}_{what}"

    def sub(self, name: str) -> Path:
        path = self.work / f"{self._n:02d}-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, run: Run, group: str) -> None:
        self.results["runs"].append({"group": group, **asdict(run)})

    def profile(self, system: System, name: str) -> list[subprocess.Popen]:
        """py-spy on every process of the system (``--profile DIR``): collapsed stacks per process."""
        if not self.args.profile or not system.children:
            return []
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        return [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                                  "--nonblocking", "-o", str(out / f"{slug}--{label.replace(':', '')}.txt")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for label, pid in system.pids().items() if label != "node-red"]

    def with_system(self, system: System, body: Callable[[System], Any]) -> Any:
        system.start()
        try:
            return body(system)
        finally:
            system.stop()

    def run(self) -> dict[str, Any]:
        load = self.load
        _raise_fd_limit()
        self.results["machine"] = machine()
        self.results["load_before"] = os.getloadavg()
        self.results["mode"] = "quick" if self.args.quick else "full"
        self.results["settings"] = {f"{section}.{key}": value for section, values in CONFIG_OVERRIDES.items()
                                    for key, value in values.items()}
        self.results["workload"] = asdict(load)
        started = time.monotonic()
        if self.wants("simulator"):
            self.results["simulator"] = simulator_speed(self, 1000, 1_000_000 if not self.args.quick else 300_000)
        self.vm.start()
        try:
            self._run_all(load)
        finally:
            self.vm.stop()
        self.results["load_after"] = os.getloadavg()
        self.results["seconds"] = round(time.monotonic() - started, 1)
        return self.results

    def _run_all(self, load: Workload) -> None:
        # The headline: the shipped configuration plus the InfluxDB sink (counted in VictoriaMetrics, where
        # the baselines write too), and the shipped configuration as it is (SQLite, rollups).
        sinks_variants = [("sqlite", "influx"), ("sqlite",)]
        if self.main_sinks == ("sqlite",):
            sinks_variants = [("sqlite",)]
        for devices in self.devices:
            if self.wants("ceiling"):
                m = self.measurement("ceiling")
                # Hang up at once: VictoriaMetrics' TCP listener holds one of its few insert slots while
                # it waits on an open connection, so idle boards held open would stall the others.
                self.add(self.with_system(Ceiling(self.vm, m),
                                          lambda s: throughput(self, s, devices, load.ceiling_readings, fmt="line",
                                                               sim_args=("--ack-timeout", "0"))), "ceiling")
            if self.wants("sensorpipe"):
                for sinks in sinks_variants:
                    m = self.measurement("sp")
                    pipe = SensorPipe(self.sub("sensorpipe"), sinks, self.vm, m)
                    self.add(self.with_system(pipe, lambda s: throughput(self, s, devices, load.readings)),
                             "sensorpipe")
            if self.wants("nodered"):
                m = self.measurement("nr_tuned")
                self.add(self.with_system(NodeRed(self.sub("nr-tuned"), "tuned", self.vm, m),
                                          lambda s: throughput(self, s, devices, load.readings)), "nodered-tuned")
                m = self.measurement("nr_tutorial")
                self.add(self.with_system(NodeRed(self.sub("nr-tutorial"), "tutorial", self.vm, m),
                                          lambda s: throughput(self, s, devices, load.tutorial_readings,
                                                               cap_s=load.baseline_cap_s)), "nodered-tutorial")
            if self.wants("threaded"):
                m = self.measurement("threaded")
                self.add(self.with_system(Threaded(self.sub("threaded"), self.vm, m),
                                          lambda s: throughput(self, s, devices, load.threaded_readings,
                                                               cap_s=load.baseline_cap_s)), "threaded")
        if self.wants("batched"):
            # The simulator's full-speed mode: 32 readings per write (a gateway, or a board's backlog)
            devices = self.devices[0]
            m = self.measurement("sp_batched")
            pipe = SensorPipe(self.sub("batched"), sinks_variants[0], self.vm, m)
            self.add(self.with_system(pipe, lambda s: throughput(self, s, devices, load.batched_readings,
                                                                 chunk=BATCHED_CHUNK)), "batched")
            if self.wants("nodered"):
                m = self.measurement("nr_batched")
                self.add(self.with_system(NodeRed(self.sub("nr-batched"), "tuned", self.vm, m),
                                          lambda s: throughput(self, s, devices, load.batched_readings,
                                                               chunk=BATCHED_CHUNK)), "batched")
        if self.wants("fleet"):
            m = self.measurement("fleet")
            pipe = SensorPipe(self.sub("fleet"), ("sqlite",), self.vm, m)
            self.results["fleet"] = self.with_system(pipe, lambda s: steady_fleet(self, s, load.fleet_boards,
                                                                                  load.fleet_s))
        if self.wants("parsers"):
            devices = self.devices[0]
            for parsers in (1, 4):
                m = self.measurement(f"p{parsers}")
                pipe = SensorPipe(self.sub(f"parsers{parsers}"), self.main_sinks, self.vm, m, parsers=parsers,
                                  rollups=False, supervised=False)
                run = self.with_system(pipe, lambda s: throughput(self, s, devices, load.readings))
                run.note = f"{parsers} parser" + ("s" if parsers > 1 else "")
                self.add(run, f"parsers-{parsers}")
        if self.only is not None and "twoedges" in self.only:
            # Asked for by name only (it needs nats-server): the board-like workload on the file journal
            # and one edge, then on the JetStream journal with the boards split over two edges.
            devices = self.devices[0]

            def measured(s: SensorPipe) -> Run:
                meter = Meter(s.pids())
                meter.start()
                time.sleep(IDLE_S)
                idle = sum(p["cpu_s"] for p in meter.stop().values()) / IDLE_S * 100
                sqlite = SqliteStore(s.data / "sensorpipe.db")
                run = throughput(self, s, devices, load.readings, settled=lambda sent: sqlite.samples() >= sent)
                run.idle_cpu_pct = round(idle, 1)
                edges = [s.port, s.port2] if isinstance(s, TwoEdges) else [s.port]
                run.stored_p50_ms, run.stored_p95_ms = stored_latency(s, edges)
                log(f"{s.label}: send->stored at 2,000/s p50 {run.stored_p50_ms} ms, p95 {run.stored_p95_ms} ms")
                return run
            m = self.measurement("file1")
            pipe = SensorPipe(self.sub("file-1-edge"), sinks_variants[0], self.vm, m)
            pipe.label += ", file journal, 1 edge"
            self.add(self.with_system(pipe, measured), "twoedges")
            m = self.measurement("js2")
            self.add(self.with_system(TwoEdges(self.sub("jetstream-2-edges"), sinks_variants[0], self.vm, m),
                                      measured), "twoedges")
        if self.wants("latency"):
            m = self.measurement("lat")
            pipe = SensorPipe(self.sub("latency"), self.main_sinks, self.vm, m)
            self.results["latency"] = self.with_system(pipe, lambda s: latency(self, s, load.latency_rate,
                                                                              load.latency_s))
        if self.wants("connections"):
            m = self.measurement("conn")
            pipe = SensorPipe(self.sub("connections"), self.main_sinks, self.vm, m)

            def held(s: SensorPipe) -> None:
                result = connections(self, s, load.connections)
                sim = result.pop("sim")
                try:
                    if self.wants("query") or self.only is None:
                        devices = [f"conn-{i + 1:05d}" for i in range(load.connections)]
                        self.results["query"] = query_rate(s, devices, load.query_clients, load.query_s)
                finally:
                    sim.stop()
                    summary = sim.finish()
                    count = s.store.count(summary)
                    result.update(stored=count.stored, sent=summary["sent"], duplicates=count.duplicates)
                self.results["connections"] = result
            self.with_system(pipe, held)
        elif self.wants("query"):
            m = self.measurement("query")
            pipe = SensorPipe(self.sub("query"), self.main_sinks, self.vm, m)

            def ask(s: SensorPipe) -> None:
                summary = simulate(s.port, 1000, 1000, "q").finish()
                wait_until(lambda: s.store.samples() >= summary["sent"], 30)
                devices = [f"q-{i + 1:04d}" for i in range(1000)]
                self.results["query"] = query_rate(s, devices, load.query_clients, load.query_s)
            self.with_system(pipe, ask)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    def npm_version(package: str) -> str:
        try:
            return json.loads((NODERED_DIR / "node_modules" / package / "package.json").read_text())["version"]
        except (OSError, KeyError, ValueError):
            return "not installed"

    from importlib.metadata import version as py_version
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(), "os": version(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(), "pyzmq": py_version("pyzmq"), "orjson": py_version("orjson"),
        "influxdb-client": py_version("influxdb-client"),
        "victoria-metrics": version(["dpkg-query", "-W", "-f=${Version}", "victoria-metrics"]),
        "node": version(["node", "--version"]), "node-red": npm_version("node-red"),
        "node-red-contrib-influxdb": npm_version("node-red-contrib-influxdb"),
        "git": version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


# --------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    from benchmarks.report import render
    return render(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads (about 3 minutes)")
    parser.add_argument("--devices", default=DEFAULT_DEVICES, help="board counts for the throughput runs")
    parser.add_argument("--readings", type=int, help="readings per throughput run (overrides the mode's)")
    parser.add_argument("--only", help="comma-separated parts: simulator, ceiling, sensorpipe, nodered, threaded, "
                                       "batched, fleet, parsers, latency, connections, query; and twoedges "
                                       "(only when named: file journal + 1 edge against JetStream + 2 edges)")
    parser.add_argument("--out", help=f"where to write last-run.md and last-run.json (default: {RESULTS} for a "
                                      f"full run, {PARTIAL} for --quick, --only, --devices or --readings)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a value of the sensorpipe configuration the runs use, in TOML (a section the bench "
                             "does not write already: edge, presence, limits...), e.g. --set edge.batch_max_delay_ms=20")
    parser.add_argument("--profile", metavar="DIR", help="py-spy every Python process of the systems under test "
                                                        "(collapsed stacks in DIR; see benchmarks/profile_top.py)")
    args = parser.parse_args(argv)
    for setting in args.set:
        name, _, value = setting.partition("=")
        section, _, key = name.partition(".")
        if not (section and key and value):
            parser.error(f"--set {setting!r}: expected SECTION.KEY=VALUE")
        CONFIG_OVERRIDES.setdefault(section, {})[key] = value
    bench = Bench(args)
    log(f"work directory {bench.work}; load average {os.getloadavg()[0]:.2f}")
    try:
        results = bench.run()
    except BaseException:
        # what was measured before the failure is kept (a full run is long)
        broken = Path(args.out or PARTIAL)
        broken.mkdir(parents=True, exist_ok=True)
        (broken / "failed-run.json").write_text(json.dumps(bench.results, indent=1, default=str))
        log(f"failed: the figures so far are in {broken / 'failed-run.json'}")
        raise
    finally:
        if not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    full = not (args.quick or args.only or args.readings or args.devices != DEFAULT_DEVICES)
    out = Path(args.out or (RESULTS if full else PARTIAL))
    out.mkdir(parents=True, exist_ok=True)
    (out / "last-run.json").write_text(json.dumps(results, indent=1, default=str))
    text = report(results)
    (out / "last-run.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
