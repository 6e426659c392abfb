"""Chaos: SIGKILL every kind of worker in turn, under the real supervisord, while devices stream.

The pipeline runs exactly as ``make run`` runs it: ``supervisord`` with the repository's
supervisord.conf (its ``.venv/bin/sensorpipe`` pointed at the interpreter running the tests, and
``%(here)s`` at the repository; nothing else changes), a test configuration with free ports passed
through SENSORPIPE_CONFIG / SENSORPIPE_DATA. While 50 text devices stream JSON lines and 5 battery
boards send binary packets, the test kills with SIGKILL (the PID from ``sensorpipe ctl pid NAME``,
i.e. supervisorctl) a parser, each enabled sink, the rollup worker, the query worker and the edge, one
after another, waiting each time for supervisord to restart it and for readings to flow again.

What counts as accepted (docs/durability.md):

- a binary packet once the board has read its ``A``: it must be stored exactly once, or, if the board
  had to send it again because the ``A`` never came (the edge was killed after journaling it), at
  least once and at most once per attempt (the binary protocol has no packet id to deduplicate);
- a text line once the edge has journaled it. A text device gets no acknowledgement, so what the
  edge had not yet journaled when it was SIGKILLed (bytes in its socket buffer, a batch younger than
  ``batch_max_delay_ms``) is not accepted and is lost. Since the edge journals each connection's
  frames in order, what is stored of a connection the edge's death cut is a prefix of what was sent
  on it; everything sent on a connection that ended normally is stored.

Then, in every store: every accepted reading is present exactly once per (device, field, timestamp)
with the values sent, nothing else is, and the latest values are the newest readings: in SQLite, in
InfluxDB (VictoriaMetrics, read back with its export API) and in MongoDB's ``latest`` (mongoeco; its
optional readings history stays off). The query worker answers the same latest values, and the edge
has nothing left in flight.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from supervisor.xmlrpc import SupervisorTransport

from tests.pipeline import REPO, Pipeline, free_port, wait_for
from tests.servers import Mongo, Victoria, unique_name
from workers.core import config as config_mod

BIN = Path(sys.executable).parent
TEXT_DEVICES = 50
TEXT_INTERVAL_S = 0.1          # 10 lines a second per device, two fields each
BOARDS = (10, 11, 12, 13, 14)  # binary device numbers
PARSERS = ["parser:parser_0", "parser:parser_1"]   # supervisord.conf's numprocs = 2
BOARD_INTERVAL_S = 0.05
ACK_TIMEOUT_S = 5.0            # a board that gets no A in this time sends the packet again
REDELIVER_S = 2.0
PROGRESS_ROWS = 1500           # rows to see stored after each restart before the next kill
STALL_PACKETS = 50             # binary packets the edge acknowledges while a worker is stalled, before its kill
EDGE_STALL_PACKETS = 15        # fewer with the parsers down: the edge pauses once 64 batches wait for them

BOARD_TOML = "".join(f"""
[binary.devices.{n}]
device = "board-{n}"
fields = [ {{ name = "n", type = "u32" }} ]
""" for n in BOARDS)


# --------------------------------------------------------------------------- supervisord


def supervisord_conf(tmp: Path) -> Path:
    """The supervisord template sensorpipe ships, unchanged: it takes the interpreter from the environment."""
    from workers.core import paths

    path = tmp / "supervisord.conf"
    path.write_text(paths.supervisord_template().read_text())
    return path


class Supervisor:
    def __init__(self, pipeline: Pipeline, tmp: Path) -> None:
        self.pipeline = pipeline
        self.conf = supervisord_conf(tmp)
        self.env = {**os.environ, "SENSORPIPE_CONFIG": str(pipeline.config_path),
                    "SENSORPIPE_DATA": str(pipeline.data), "PYTHONUNBUFFERED": "1",
                    "SENSORPIPE_PYTHON": sys.executable}
        (pipeline.data / "logs").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(self.conf)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pids: set[int] = set()          # every worker PID seen, to clean up if supervisord dies
        self.stopped: set[int] = set()       # workers stalled with SIGSTOP

    @property
    def rpc(self) -> Any:
        """supervisord's XML-RPC interface (what supervisorctl talks to); a new connection each time,
        since one that failed while supervisord was starting cannot be reused."""
        transport = SupervisorTransport(serverurl=f"unix://{self.pipeline.data / 'supervisor.sock'}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport)

    def info(self, name: str) -> dict[str, Any]:
        info = self.rpc.supervisor.getProcessInfo(name)
        if info["pid"]:
            self.pids.add(info["pid"])
        return info

    def states(self) -> dict[str, str]:
        return {f"{p['group']}:{p['name']}" if p["group"] != p["name"] else p["name"]: p["statename"]
                for p in self.rpc.supervisor.getAllProcessInfo()}

    def ctl_pid(self, name: str) -> int:
        """The PID as an operator gets it: ``sensorpipe ctl pid NAME`` (supervisorctl)."""
        out = subprocess.run([str(BIN / "sensorpipe"), "--config", str(self.pipeline.config_path), "ctl",
                              "--supervisord-conf", str(self.conf), "pid", name],
                             env=self.env, capture_output=True, text=True, timeout=30)
        pid = int(out.stdout.strip())
        self.pids.add(pid)
        return pid

    def signal(self, name: str, sig: int) -> int:
        pid = self.ctl_pid(name)
        assert pid > 0, f"{name} is not running"
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(pid)
        return pid

    def kill(self, name: str) -> float:
        """SIGKILL the worker, wait until supervisord has it RUNNING again; return when it was killed."""
        pid = self.signal(name, signal.SIGKILL)
        killed_at = time.monotonic()
        self.stopped.discard(pid)
        wait_for(lambda: self.info(name)["pid"] not in (0, pid) and self.info(name)["statename"] == "RUNNING",
                 timeout=30, message=f"supervisord to restart {name}")
        return killed_at

    def resume(self) -> None:
        for pid in self.stopped:
            os.kill(pid, signal.SIGCONT)
        self.stopped.clear()

    def shutdown(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)        # stops the workers in priority order
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.pids:                            # only ever our own workers
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# --------------------------------------------------------------------------- devices


@dataclass
class TextDevice:
    name: str
    base_ms: int
    epochs: list[list[int]] = field(default_factory=list)   # the line numbers sent on each connection
    sent_at: dict[int, float] = field(default_factory=dict)

    def line(self, i: int) -> bytes:
        return b'{"device":"%s","ts":%d,"v":%d,"w":%d}\n' % (self.name.encode(), self.base_ms + i, i, -i)


@dataclass
class Board:
    number: int
    acked: list[tuple[int, int]] = field(default_factory=list)   # (n, attempts it took to get the A)

    @property
    def device(self) -> str:
        return f"board-{self.number}"

    def packet(self, n: int) -> bytes:
        return struct.pack("<HHHBBB", 4, 60, 1, 4, self.number, 1) + struct.pack("<I", n)


class Devices:
    """Text devices and battery boards on one asyncio loop in a thread."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        base_ms = time.time_ns() // 1_000_000 - 3_600_000           # explicit timestamps, an hour ago
        self.text = [TextDevice(f"chaos-{i:02d}", base_ms) for i in range(TEXT_DEVICES)]
        self.boards = [Board(n) for n in BOARDS]
        self.loop = asyncio.new_event_loop()
        self.stop_event = asyncio.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def start(self) -> None:
        self.thread.start()

    def acknowledged(self) -> int:
        """Binary packets the boards have read an A for: a measure of the edge taking input."""
        return sum(len(b.acked) for b in self.boards)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)
        assert not self.thread.is_alive(), "devices did not stop"
        assert not self.errors, self.errors

    def _run(self) -> None:
        async def main() -> None:
            tasks = [*(self._text(d) for d in self.text), *(self._board(b) for b in self.boards)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            self.errors.extend(r for r in results if isinstance(r, BaseException))
        self.loop.run_until_complete(main())
        self.loop.close()

    async def _connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:                 # the edge is restarting
            await asyncio.sleep(0.05)
            return None

    async def _text(self, device: TextDevice) -> None:
        i = 0
        while not self.stop_event.is_set():
            conn = await self._connect(self.pipeline.text_port)
            if conn is None:
                continue
            _, writer = conn
            epoch: list[int] = []
            device.epochs.append(epoch)
            try:
                while not self.stop_event.is_set():
                    epoch.append(i)
                    device.sent_at[i] = time.monotonic()
                    writer.write(device.line(i))
                    i += 1
                    await writer.drain()
                    await asyncio.sleep(TEXT_INTERVAL_S)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:               # the edge died under this connection: connect again
                writer.close()

    async def _board(self, board: Board) -> None:
        n = 0
        conn = None
        while True:
            packet, attempts = board.packet(n), 0
            while True:                   # a board keeps its records until it reads the A
                attempts += 1
                try:
                    while conn is None:
                        conn = await self._connect(self.pipeline.binary_port)
                    reader, writer = conn
                    writer.write(packet)
                    await writer.drain()
                    if await asyncio.wait_for(reader.readexactly(1), ACK_TIMEOUT_S) == b"A":
                        break
                    raise ConnectionError("not an A")
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    if conn is not None:
                        conn[1].close()
                    conn = None
            board.acked.append((n, attempts))
            n += 1
            if self.stop_event.is_set():
                if conn is not None:
                    conn[1].close()
                    await conn[1].wait_closed()
                return
            await asyncio.sleep(BOARD_INTERVAL_S)


# --------------------------------------------------------------------------- checks


def stored_rows(pipeline: Pipeline) -> dict[str, list[tuple[str, int, Any]]]:
    db = pipeline.db()
    try:
        rows: dict[str, list[tuple[str, int, Any]]] = {}
        for device, name, ts, value in db.execute("SELECT device, field, ts, value FROM readings"):
            rows.setdefault(device, []).append((name, ts, value))
        return rows
    finally:
        db.close()


def influx_rows(victoria: Victoria, measurement: str) -> dict[str, list[tuple[str, int, Any]]]:
    """What VictoriaMetrics holds, as ``stored_rows`` (timestamps are milliseconds there)."""
    rows: dict[str, list[tuple[str, int, Any]]] = {}
    # not the rollups (measurement <measurement>_<window>): a window closes 90 s after its first reading,
    # which a slow run reaches
    for item in victoria.export(f'{{__name__=~"{measurement}_.*", __name__!~"{measurement}_[0-9]+[smhd]_.*"}}'):
        name = item["metric"]["__name__"][len(measurement) + 1:]
        out = rows.setdefault(item["metric"].get("device", ""), [])
        out.extend((name, ms * 1_000_000, value) for ms, value in zip(item["timestamps"], item["values"]))
    return rows


def newest_of(rows: dict[str, list[tuple[str, int, Any]]]) -> dict[tuple[str, str], tuple[int, Any]]:
    latest: dict[tuple[str, str], tuple[int, Any]] = {}
    for device, items in rows.items():
        for name, ts, value in items:
            if (device, name) not in latest or ts >= latest[(device, name)][0]:
                latest[(device, name)] = (ts, value)
    return latest


def mongo_latest(mongo: Mongo, database: str) -> dict[tuple[str, str], tuple[int, Any]]:
    with mongo.client() as client:
        return {(doc["_id"], name): (entry["ts"], entry["value"])
                for doc in client[database]["latest"].find() for name, entry in doc["fields"].items()}


def stored_latest(pipeline: Pipeline) -> dict[tuple[str, str], tuple[int, Any]]:
    db = pipeline.db()
    try:
        return {(d, f): (ts, v) for d, f, ts, v in db.execute("SELECT device, field, ts, value FROM latest")}
    finally:
        db.close()


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    lost_text_lines: int = 0
    # When the lines not accepted were sent, relative to the edge's death: the last moments before it
    # (a batch younger than batch_max_delay_ms; longer if the edge had paused reading its sockets), and
    # after it, into a dead socket. Only printed: no acknowledgement means no promise for these.
    lost_window: tuple[float, float] = (float("inf"), float("-inf"))
    duplicated_resent_packets: int = 0
    readings: int = 0

    def fail(self, message: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(message)


def verify(rows: dict[str, list[tuple[str, int, Any]]], latest: dict[tuple[str, str], tuple[int, Any]],
           devices: Devices, edge_killed_at: float) -> Verdict:
    """Every accepted reading in ``rows`` once, nothing else, ``latest`` the newest (one store's view)."""
    verdict = Verdict()
    for d in devices.text:
        lines: dict[int, dict[str, Any]] = {}
        for name, ts, value in rows.get(d.name, []):
            i = ts // 1_000_000 - d.base_ms
            lines.setdefault(i, {})[name] = value
        sent = {i for epoch in d.epochs for i in epoch}
        for i, fields in lines.items():
            if i not in sent or fields != {"v": i, "w": -i}:
                verdict.fail(f"{d.name}: stored line {i} {fields} was never sent like that")
        if len(d.epochs) > 2:
            verdict.fail(f"{d.name}: {len(d.epochs)} connections; only the edge's death should cut one")
        for k, epoch in enumerate(d.epochs):
            present = [i in lines for i in epoch]
            kept = present.index(False) if False in present else len(present)
            if any(present[kept:]):
                verdict.fail(f"{d.name}: connection {k} has holes: line {epoch[kept]} missing, later ones stored")
            if k == len(d.epochs) - 1 and kept < len(epoch):
                verdict.fail(f"{d.name}: line {epoch[kept]} of the last connection (ended normally) missing")
            for i in epoch[kept:]:
                verdict.lost_text_lines += 1
                after = d.sent_at[i] - edge_killed_at
                verdict.lost_window = (min(verdict.lost_window[0], after), max(verdict.lost_window[1], after))
        verdict.readings += len(lines)
        last = d.epochs[-1][-1]
        want = {"v": (d.base_ms + last) * 1_000_000, "w": (d.base_ms + last) * 1_000_000}
        for name, ts in want.items():
            if latest.get((d.name, name)) != (ts, last if name == "v" else -last):
                verdict.fail(f"{d.name}: latest {name} is {latest.get((d.name, name))}, newest sent is line {last}")
    for b in devices.boards:
        counts: dict[int, int] = {}
        newest = (0, None)
        for name, ts, value in rows.get(b.device, []):
            if name != "n":
                verdict.fail(f"{b.device}: unexpected field {name}")
                continue
            counts[value] = counts.get(value, 0) + 1
            newest = max(newest, (ts, value))
        acked = dict(b.acked)
        for value in counts.keys() - acked.keys():
            verdict.fail(f"{b.device}: stored n={value} that was never acknowledged")
        for n, attempts in acked.items():
            stored = counts.get(n, 0)
            if attempts == 1 and stored != 1 or not 1 <= stored <= attempts:
                verdict.fail(f"{b.device}: packet n={n} acknowledged after {attempts} attempt(s), stored {stored} times")
            verdict.duplicated_resent_packets += stored > 1
        verdict.readings += sum(counts.values())
        if latest.get((b.device, "n")) != newest or newest[1] != b.acked[-1][0]:
            verdict.fail(f"{b.device}: latest {latest.get((b.device, 'n'))}, newest stored {newest},"
                         f" last acknowledged n={b.acked[-1][0]}")
    extra = set(rows) - {d.name for d in devices.text} - {b.device for b in devices.boards}
    if extra:
        verdict.fail(f"readings from devices nobody simulated: {sorted(extra)[:5]}")
    return verdict


def query_latest_matches(pipeline: Pipeline, devices: Devices) -> list[str]:
    latest = stored_latest(pipeline)
    problems = []
    for device in [d.name for d in devices.text] + [b.device for b in devices.boards]:
        reply = pipeline.query({"op": "latest", "device": device})
        got = {name: (f["ts"], f["value"]) for name, f in reply.get("fields", {}).items()}
        want = {name: (ts // 1_000_000, value) for (d, name), (ts, value) in latest.items() if d == device}
        if got != want:
            problems.append(f"query latest {device}: {got} != store {want}")
    return problems


def edge_settled(pipeline: Pipeline) -> bool:
    """The edge's stats after every device hung up (so sent after the stream) show nothing in flight."""
    edge = pipeline.query({"op": "status"})["workers"].get("edge", {})
    return edge.get("connections") == 0 and edge.get("inflight_batches") == 0


# --------------------------------------------------------------------------- the test


def sinks_toml(victoria: Victoria, measurement: str, mongo: Mongo, database: str) -> str:
    common = ("flush_interval_ms = 100\nretry_initial_s = 0.2\nretry_max_s = 1.0\nconnect_timeout_s = 1.0\n")
    return (f'\n[sinks.influx]\nenabled = true\nendpoint = "tcp://127.0.0.1:{free_port()}"\nurl = "{victoria.url}"\n'
            f'measurement = "{measurement}"\n{common}'
            f'\n[sinks.mongo]\nenabled = true\nendpoint = "tcp://127.0.0.1:{free_port()}"\nurl = "{mongo.url}"\n'
            f'database = "{database}"\n{common}')


@pytest.mark.timeout(300)
def test_sigkill_each_worker_under_supervisord_loses_no_accepted_reading(tmp_path: Path, victoria: Victoria,
                                                                         mongo: Mongo) -> None:
    measurement, database = unique_name("chaos"), unique_name("chaos")
    pipeline = Pipeline(tmp_path, extra_toml=BOARD_TOML + sinks_toml(victoria, measurement, mongo, database),
                        redeliver=REDELIVER_S)
    sinks = ["sink-" + name for name in config_mod.load(pipeline.config_path).sinks.enabled()]
    workers = ["edge", *PARSERS, "query", *sinks, "rollup"]
    started = time.monotonic()
    supervisor = Supervisor(pipeline, tmp_path)
    devices = Devices(pipeline)

    def all_running() -> bool:
        states = supervisor.states()
        return all(states.get(name) == "RUNNING" for name in workers)

    try:
        wait_for(all_running, timeout=30, message="supervisord to start the pipeline")
        pipeline.wait_ready()
        devices.start()

        def rows() -> int:
            return pipeline.count_rows()

        def flowing() -> None:
            base = rows()
            wait_for(lambda: rows() >= base + PROGRESS_ROWS, timeout=30, message="readings to flow again")

        def edge_takes(packets: int) -> None:
            base = devices.acknowledged()
            wait_for(lambda: devices.acknowledged() >= base + packets, timeout=30, message="the edge to take input")

        flowing()
        # The edge dies while the parsers are down (an operator restarting them): batches it journaled and
        # answered boards for are in its own memory only, in no parser or store; only its replay on
        # restart brings them there. It goes first, so that no later restart of it can make up for a
        # worker killed after it.
        supervisor.rpc.supervisor.stopProcessGroup("parser")
        edge_takes(EDGE_STALL_PACKETS)
        edge_killed_at = supervisor.kill("edge")
        supervisor.rpc.supervisor.startProcessGroup("parser")
        flowing()
        # Each other worker is stalled while the edge keeps taking input, so that it dies holding work:
        # batches queued to a parser, a sink's inbox and unwritten batch, the query's live feed. What they
        # held comes back through the edge's redelivery.
        for name in [PARSERS[0], *sinks, "rollup", "query"]:
            supervisor.signal(name, signal.SIGSTOP)
            edge_takes(STALL_PACKETS)
            supervisor.kill(name)
            if name == "query":
                wait_for(lambda: pipeline.query({"op": "ping"}, timeout=0.5).get("ok"), message="query back")
            flowing()
        devices.stop()
        streamed = time.monotonic()

        verdict = Verdict(problems=["not checked yet"])

        def settled() -> bool:
            nonlocal verdict
            verdict = verify(stored_rows(pipeline), stored_latest(pipeline), devices, edge_killed_at)
            if verdict.problems or not edge_settled(pipeline):
                return False
            in_sqlite = verdict
            rows = influx_rows(victoria, measurement)
            verdict = verify(rows, newest_of(rows), devices, edge_killed_at)
            verdict.problems = [f"InfluxDB: {p}" for p in verdict.problems]
            if verdict.readings != in_sqlite.readings:
                verdict.fail(f"InfluxDB: {verdict.readings} readings, SQLite {in_sqlite.readings}")
            if not verdict.problems and mongo_latest(mongo, database) != stored_latest(pipeline):
                verdict.fail("MongoDB: latest differs from the newest readings (SQLite's latest)")
            if verdict.problems:
                return False
            verdict = in_sqlite
            return True

        try:
            wait_for(settled, timeout=40, interval=0.5, message="every accepted reading in the store")
        except AssertionError:
            pytest.fail("\n".join(verdict.problems) or "the edge still has batches in flight")
        mismatches: list[str] = []

        def query_agrees() -> bool:
            mismatches[:] = query_latest_matches(pipeline, devices)
            return not mismatches

        try:
            wait_for(query_agrees, timeout=10, interval=0.5, message="the query worker's latest values")
        except AssertionError:
            pytest.fail("\n".join(mismatches[:20]))
        assert all_running(), supervisor.states()
        assert _deadletters(pipeline) == 0
        # the edge writes its checkpoint once a second: it may still name what was acknowledged just now
        checkpoint: dict = {}

        def checkpointed() -> bool:
            checkpoint.update(orjson.loads((pipeline.data / "journal" / "acked.json").read_bytes()))
            return checkpoint["pending"] == []

        try:
            wait_for(checkpointed, timeout=5, interval=0.2, message="the edge's checkpoint")
        except AssertionError:
            pytest.fail(f"the checkpoint still names batches in flight: {checkpoint}")
        accepted_binary = sum(len(b.acked) for b in devices.boards)
        print(f"\nchaos: {verdict.readings} readings stored ({accepted_binary} binary packets acknowledged,"
              f" {verdict.duplicated_resent_packets} of them stored twice after a lost A);"
              f" {verdict.lost_text_lines} text lines not accepted when the edge was killed, sent from"
              f" {verdict.lost_window[0]:+.3f} s to {verdict.lost_window[1]:+.3f} s after the kill; ran"
              f" {streamed - started:.1f} s, settled in {time.monotonic() - streamed:.1f} s")
    except BaseException:
        print(_logs(pipeline))
        raise
    finally:
        if devices.thread.is_alive():
            devices.loop.call_soon_threadsafe(devices.stop_event.set)
            devices.thread.join(30)
        supervisor.shutdown()
    assert time.monotonic() - started < 120


def _deadletters(pipeline: Pipeline) -> int:
    if not (pipeline.data / "deadletters.db").exists():
        return 0
    db = sqlite3.connect(f"file:{pipeline.data / 'deadletters.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM deadletters").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _logs(pipeline: Pipeline) -> str:
    out = []
    for path in sorted((pipeline.data / "logs").glob("*.log")):
        out.append(f"==== {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(out)
