"""Three hosts made of Linux network namespaces, the journal in JetStream: nothing acknowledged is lost
when a host dies, a NATS server restarts or a host is cut off (docs/scale-out.md).

Each host is a namespace (``ip netns``) joined to the others by a veth pair and a bridge, with a
private address made here (10.x.y.1-3; the test process reaches them through the bridge's .254). Each
runs its nats-server (clustered, routes to the other two) and the pipeline under its own supervisord
with the shipped supervisord.conf, as `sensorpipe run` does: an edge and parsers everywhere, the SQLite
sink and the rollup worker on host 1 only. Battery boards (authenticated binary packets, the A after
JetStream's quorum; their credentials made with `sensorpipe devices add` on host 1 and the credential
store copied to the other hosts, docs/scale-out.md) stream to the edges of hosts 2 and 3; a board whose
edge does not answer in time resets the connection and sends the same packet, byte for byte, to the
other edge, as a board behind a load balancer does.

While they stream: (a) host 3 is SIGKILLed whole (every process in its namespace) and its data
directory (JetStream store included) deleted, then started again empty; (b) host 1's NATS server is
restarted; (c) host 2 is cut off from the others for 10 s (its link down). Then every packet a board
was acknowledged for is stored exactly once in host 1's SQLite, also those sent again after a lost A
(the packet's (device, counter) is its idempotency key on every edge, docs/scale-out.md), nothing is
stored that was not sent, and the latest values are the newest.

Needs root (namespaces) and nats-server: it fails, never skips, without them.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
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

import pytest
from supervisor.xmlrpc import SupervisorTransport

from tests.pipeline import wait_for
from tests.servers import NatsCluster, free_port, require
from workers.core import credentials, jetstream, paths

pytestmark = pytest.mark.servers

BIN = Path(sys.executable).parent
BOARDS = (21, 22, 23, 24)
BOARD_INTERVAL_S = 0.05
ACK_TIMEOUT_S = 2.0            # a board that gets no A in this time sends the packet to the other edge
CUT_OFF_S = 10.0
PROGRESS_PACKETS = 40          # packets acknowledged after each event before the next


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Host:
    index: int                     # 1..3
    ns: str
    addr: str
    veth: str                      # the root end of its link, on the bridge
    data: Path
    binary_port: int
    supervisord: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "SENSORPIPE_CONFIG": str(self.data.parent / f"host{self.index}.toml"),
                "SENSORPIPE_DATA": str(self.data), "PYTHONUNBUFFERED": "1", "SENSORPIPE_PYTHON": sys.executable}

    def cli(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "workers", "--config", self.env()["SENSORPIPE_CONFIG"], *args],
                                capture_output=True, text=True, env=self.env(), timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def take_credentials(self, source: Path) -> None:
        """The operator's copy of the credential store (docs/scale-out.md): SQLite's online backup."""
        self.data.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(source / credentials.STORE_NAME)
        dst = sqlite3.connect(self.data / credentials.STORE_NAME)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()

    def start(self, conf: Path) -> None:
        (self.data / "logs").mkdir(parents=True, exist_ok=True)
        self.supervisord = subprocess.Popen(["ip", "netns", "exec", self.ns, str(BIN / "supervisord"), "-n",
                                             "-c", str(conf)], env=self.env(),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def states(self) -> dict[str, str]:
        transport = SupervisorTransport(serverurl=f"unix://{self.data / 'supervisor.sock'}")
        rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport)
        return {p["name"]: p["statename"] for p in rpc.supervisor.getAllProcessInfo()}

    def running(self, *names: str) -> bool:
        states = self.states()
        return all(states.get(name) == "RUNNING" for name in names)

    def kill_everything(self) -> None:
        """SIGKILL every process in the namespace: all of them are this test's (nats-server, supervisord,
        the workers)."""
        for _ in range(3):
            pids = [int(p) for p in sh("ip", "netns", "pids", self.ns, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.supervisord is not None:
            self.supervisord.wait(10)



def host_toml(host: Host, cluster: NatsCluster, sinks: bool) -> str:
    own = cluster.nodes[host.index - 1].url
    servers = [own] + [url for url in cluster.urls if url != own]   # this host's server first
    ports = {name: free_port() for name in ("frames", "acks", "live", "inject", "query", "command", "seen",
                                            "downlink", "stream", "sqlite", "rollup")}
    boards = "".join(f"""
[binary.devices.{n}]
device = "board-{n}"
fields = [ {{ name = "n", type = "u32" }} ]
""" for n in BOARDS)
    endpoints = "\n".join(f'{name} = "tcp://127.0.0.1:{port}"' for name, port in ports.items()
                          if name not in ("sqlite", "rollup"))
    return f"""
data_dir = "{host.data}"

[[listeners]]
name = "binary"
bind = "0.0.0.0:{host.binary_port}"
framing = "binary"
decoder = "binary"
auth = "required"
max_connections_per_address = 10000

[endpoints]
{endpoints}

[edge]
batch_max_delay_ms = 5

[journal]
backend = "jetstream"
servers = [{", ".join(f'"{s}"' for s in servers)}]
edge_id = {host.index}
consumers = ["sqlite"]   # the rollup worker reads the SQLite rows
ack_wait_s = 3
publish_timeout_s = 2

[sinks.sqlite]
enabled = {"true" if sinks else "false"}
endpoint = "tcp://127.0.0.1:{ports['sqlite']}"
flush_interval_ms = 50

[rollups]
enabled = {"true" if sinks else "false"}
endpoint = "tcp://127.0.0.1:{ports['rollup']}"

[http]
enabled = false
{boards}
"""


class Network:
    """A bridge, three namespaces and their veth pairs, with addresses in a private /24 made up here."""

    def __init__(self, tmp: Path) -> None:
        tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.prefix = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"spbr{tag}"
        self.hosts = [Host(i, f"sp{tag}h{i}", f"{self.prefix}.{i}", f"spv{tag}h{i}", tmp / f"host{i}" / "data",
                           free_port()) for i in (1, 2, 3)]
        self.made: list[tuple[str, ...]] = []     # what to delete, last made first

    def create(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.made.append(("ip", "link", "del", self.bridge))
        sh("ip", "addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host in self.hosts:
            sh("ip", "netns", "add", host.ns)
            self.made.append(("ip", "netns", "del", host.ns))
            sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            self.made.append(("ip", "link", "del", host.veth))
            sh("ip", "link", "set", host.veth, "master", self.bridge)
            sh("ip", "link", "set", host.veth, "up")
            sh("ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
            sh("ip", "-n", host.ns, "link", "set", "lo", "up")

    def cut(self, host: Host, off: bool) -> None:
        sh("ip", "link", "set", host.veth, "down" if off else "up")

    def delete(self) -> None:
        for argv in reversed(self.made):
            sh(*argv, check=False)


@dataclass
class Board:
    number: int
    edges: list[Host]                                           # preferred first
    acked: list[tuple[int, int]] = field(default_factory=list)  # (n, attempts it took)
    failovers: int = 0
    key: bytes = b""                                            # its MAC key (sensorpipe devices add)

    def packet(self, n: int) -> bytes:
        """Packet ``n``, sealed with counter n + 1: the bytes sent again, unchanged, until its A."""
        return credentials.sign_packet(self.key, struct.pack("<HHHBBB", 4, 60, 1, 4, self.number, 1)
                                       + struct.pack("<I", n), n + 1)


class Boards:
    def __init__(self, boards: list[Board]) -> None:
        self.boards = boards
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.errors: list[BaseException] = []

    def acknowledged(self) -> int:
        return sum(len(b.acked) for b in self.boards)

    def wait_progress(self, packets: int, message: str, timeout: float = 30) -> None:
        target = self.acknowledged() + packets
        wait_for(lambda: self.acknowledged() >= target, timeout=timeout, message=message)

    async def _main(self) -> None:
        results = await asyncio.gather(*(self._board(b) for b in self.boards), return_exceptions=True)
        self.errors.extend(r for r in results if isinstance(r, BaseException))

    async def _board(self, board: Board) -> None:
        n, edge, conn = 0, 0, None
        while not self.stop_event.is_set():
            packet, attempts = board.packet(n), 0
            while True:                     # a board keeps its record until it reads the A
                attempts += 1
                try:
                    if conn is None:
                        host = board.edges[edge]
                        conn = await asyncio.wait_for(asyncio.open_connection(host.addr, host.binary_port), 1.0)
                    reader, writer = conn
                    writer.write(packet)
                    await writer.drain()
                    if await asyncio.wait_for(reader.readexactly(1), ACK_TIMEOUT_S) == b"A":
                        break
                    raise ConnectionError("not an A")
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    if conn is not None:
                        abort(conn[1])
                    conn = None
                    edge = (edge + 1) % len(board.edges)     # the load balancer sends it elsewhere
                    board.failovers += 1
                    await asyncio.sleep(0.05)
            board.acked.append((n, attempts))
            n += 1
            await asyncio.sleep(BOARD_INTERVAL_S)
        if conn is not None:
            conn[1].close()


def abort(writer: asyncio.StreamWriter) -> None:
    """A board that gives up on its A resets the connection: a FIN would leave the packet in the kernel's
    queue, and a cut-off network can deliver it seconds later, after newer packets, to be stamped then
    (a binary packet carries no time of its own; docs/scale-out.md)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.close()


def stream_status(cluster: NatsCluster) -> dict[str, Any]:
    opts = jetstream.JournalOptions(backend="jetstream", servers=tuple(cluster.urls))
    return jetstream.run_status(opts, ["sqlite"])


def forget_server(cluster: NatsCluster, server: str) -> bool:
    opts = jetstream.JournalOptions(backend="jetstream", servers=tuple(cluster.urls))
    asyncio.run(jetstream.forget_server(opts, server))
    return True


def replicas_current(cluster: NatsCluster, server: str, old: str) -> bool:
    """Every stream (batches, floors, shared counters) has its replica on ``server``, none on ``old``."""
    import nats

    async def members() -> list[tuple[set[str], bool]]:
        nc = await nats.connect(cluster.urls, connect_timeout=3, max_reconnect_attempts=1, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=3)
            out = []
            for name in ("SENSORPIPE", "SENSORPIPE_ACKS", "KV_SENSORPIPE_COUNTERS"):
                c = (await js.stream_info(name)).cluster
                peers = c.replicas or [] if c else []
                out.append(({p.name for p in peers} | {c.leader if c else ""}, all(p.current for p in peers)))
            return out
        finally:
            await nc.close()

    return all(server in names and old not in names and current for names, current in asyncio.run(members()))


def caught_up(cluster: NatsCluster) -> bool:
    status = stream_status(cluster)
    return all(c.get("pending") == 0 for c in status["consumers"].values())


def test_three_hosts_lose_nothing_acknowledged(tmp_path: Path) -> None:
    require("nats-server")
    if os.geteuid() != 0:
        pytest.fail("the cluster test makes network namespaces: run it as root (CI does)", pytrace=False)
    net = Network(tmp_path)
    cluster = NatsCluster(tmp_path / "nats", hosts=[h.addr for h in net.hosts],
                          prefixes=[("ip", "netns", "exec", h.ns) for h in net.hosts])
    conf = tmp_path / "supervisord.conf"
    conf.write_text(paths.supervisord_template().read_text())
    h1, h2, h3 = net.hosts
    boards = Boards([Board(n, [h2, h3] if i % 2 == 0 else [h3, h2]) for i, n in enumerate(BOARDS)])
    started = time.monotonic()
    try:
        net.create()
        cluster.start()
        for host in net.hosts:
            host.data.mkdir(parents=True)
            (host.data.parent / f"host{host.index}.toml").write_text(host_toml(host, cluster, sinks=host is h1))
        for board in boards.boards:
            board.key = credentials.mac_key_for(h1.cli("devices", "add", f"board-{board.number}").strip().splitlines()[-1])
        for host in (h2, h3):
            host.take_credentials(h1.data)
        for host in net.hosts:
            host.start(conf)
        wait_for(lambda: h1.running("edge", "sink-sqlite", "rollup") and h2.running("edge") and h3.running("edge"),
                 timeout=60, message="supervisord to start every host")
        boards.thread.start()
        boards.wait_progress(PROGRESS_PACKETS, "boards acknowledged by the edges of hosts 2 and 3", timeout=60)

        # (a) host 3 dies whole, its disk with it; its boards go to host 2. Then it comes back empty.
        h3.kill_everything()
        cluster.nodes[2].kill()                 # (dead already: reaped)
        shutil.rmtree(h3.data)
        shutil.rmtree(cluster.nodes[2].workdir / "store", ignore_errors=True)
        boards.wait_progress(PROGRESS_PACKETS, "boards acknowledged by host 2 alone")
        # A server that lost its store comes back under a new name, and the stream's replica is moved
        # off the old one (docs/scale-out.md: under its old name it could vote with an empty log).
        cluster.nodes[2].rename("n3-new")
        cluster.nodes[2].start()
        h3.take_credentials(h1.data)            # a host rebuilt empty gets the store again
        h3.start(conf)
        wait_for(lambda: forget_server(cluster, "n3"), timeout=30, message="the stream to forget n3")
        wait_for(lambda: h3.running("edge"), timeout=60, message="host 3 back")
        wait_for(lambda: replicas_current(cluster, "n3-new", "n3"), timeout=30, message="the replicas on n3-new current")
        boards.wait_progress(PROGRESS_PACKETS, "boards acknowledged after host 3 came back")

        # (b) a NATS server restarted: host 1's, next to the sinks.
        cluster.nodes[0].stop()
        cluster.nodes[0].start()
        boards.wait_progress(PROGRESS_PACKETS, "boards acknowledged after host 1's NATS server restarted")

        # (c) host 2 cut off for 10 s: its edge cannot reach a quorum, its boards go to host 3.
        # (Taking a new leader for what host 2's server led costs a few seconds of the cut.)
        before = boards.acknowledged()
        net.cut(h2, off=True)
        time.sleep(CUT_OFF_S)                  # the cut lasts 10 s, whatever happens meanwhile
        net.cut(h2, off=False)
        during_cut = boards.acknowledged() - before
        boards.wait_progress(PROGRESS_PACKETS, "boards acknowledged after host 2 came back")

        boards.stop_event.set()
        boards.thread.join(30)
        assert not boards.errors, boards.errors
        wait_for(lambda: caught_up(cluster), timeout=60, message="every consumer to acknowledge everything")
        try:
            verify(h1.data / "sensorpipe.db", boards)
        except AssertionError:
            for host in net.hosts:         # what each edge counted, from its own query worker
                out = sh("ip", "netns", "exec", host.ns, sys.executable, "-m", "workers", "--config",
                         str(host.env()["SENSORPIPE_CONFIG"]), "status", "--json", check=False)
                print(f"host {host.index} status:\n{out.stdout[-6000:]}{out.stderr[-2000:]}")
            raise
        print(f"cluster test: {boards.acknowledged()} packets acknowledged ({during_cut} while host 2 was cut off), "
              f"{sum(b.failovers for b in boards.boards)} failovers, {time.monotonic() - started:.0f} s")
    finally:
        boards.stop_event.set()
        for host in net.hosts:              # the checks are done: no need for a graceful stop
            host.kill_everything()
        cluster.stop()
        net.delete()


def verify(db_path: Path, boards: Boards) -> None:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        problems: list[str] = []
        resent = 0
        for board in boards.boards:
            device = f"board-{board.number}"
            rows = db.execute("SELECT ts, value FROM readings WHERE device = ? AND field = 'n' ORDER BY ts",
                              (device,)).fetchall()
            counts: dict[int, int] = {}
            for _, value in rows:
                counts[int(value)] = counts.get(int(value), 0) + 1
            sent = {n: attempts for n, attempts in board.acked}
            for n, attempts in board.acked:
                if counts.get(n, 0) == 0:
                    problems.append(f"{device}: packet {n} was acknowledged and is not stored")
                elif counts[n] > 1:
                    problems.append(f"{device}: packet {n} stored {counts[n]} times (sent {attempts} times)")
                if attempts > 1:
                    resent += 1
            last_sent = len(board.acked)          # the packet in hand when the boards stopped, maybe stored
            if counts.get(last_sent, 0) > 1:
                problems.append(f"{device}: packet {last_sent} (the last, unacknowledged) stored {counts[last_sent]} times")
            strangers = [n for n in counts if n not in sent and n != last_sent]
            if strangers:
                problems.append(f"{device}: stored packets never sent: {strangers[:5]}")
            latest = db.execute("SELECT ts, value FROM latest WHERE device = ? AND field = 'n'", (device,)).fetchone()
            if latest is None or (latest[0], latest[1]) != (rows[-1][0], rows[-1][1]) or \
                    int(latest[1]) != max(counts):
                problems.append(f"{device}: latest is {latest}, the newest row {rows[-1]}, highest packet "
                                f"{max(counts)}")
        print(f"cluster test: {resent} packets sent more than once (a lost or late A), each stored once")
        assert not problems, "\n".join(problems[:20])
    finally:
        db.close()
