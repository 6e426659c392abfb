"""Real servers for the tests, each a child process on a free 127.0.0.1 port.

What runs in place of what users run in production (install all with `deploy/test-servers.sh install`):

- ``victoria``: VictoriaMetrics for InfluxDB. influxdb-client writes to ``victoria.url`` unchanged (any
  token, org, bucket). Each field becomes the series ``<measurement>_<field>``, tags become labels,
  timestamps are cut to milliseconds, string fields are stored as 0. Flux queries do not work: read
  back with ``victoria.export('{__name__=~"meas_.*"}')``. Run with ``-dedup.minScrapeInterval=1ms`` so
  that, like InfluxDB, a point written twice (same series, same timestamp) is kept once.
- ``mongo``: mongoeco, a MongoDB wire-protocol server on SQLite, for pymongo. Inserts cost O(n) in the
  collection size, so keep test collections to hundreds of documents.
- ``mosquitto``: the Mosquitto broker, anonymous, with persistence.
- ``micropython``: ``micropython(src, modules)`` runs source under MicroPython (WebAssembly, in node)
  and returns its stdout.

The servers are shared by the whole session: use ``unique_name()`` for measurements, databases and
topics. ``stop()`` and ``start()`` (same port, same data) simulate an outage; a server a test left
stopped is started again before the next test. A missing server fails the test, it never skips.

Enable with ``pytest_plugins = ["tests.servers"]`` in tests/conftest.py.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pymongo import MongoClient

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
MONGOECO_PYTHON = CACHE / "mongoeco-venv" / "bin" / "python"
MONGOECO_SERVE = REPO / "deploy" / "mongoeco_serve.py"
MPY_RUN = REPO / "deploy" / "mpy_run.mjs"
MPY_PACKAGE_ENTRY = (
    CACHE / "node" / "node_modules" / "@micropython" / "micropython-webassembly-pyscript" / "micropython.mjs"
)
INSTALL_HINT = "run `deploy/test-servers.sh install`"

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
HTTP_TIMEOUT = 10.0
LOG_TAIL_LINES = 40
MICROPYTHON_TIMEOUT = 60.0
# /api/v1/export's default range ends at "now" and misses points written in the last second or
# so (and any from a device clock running ahead), so exports ask for everything up to 2100.
EXPORT_START = "0"
EXPORT_END = "4102444800"

__all__ = [
    "MicroPython",
    "Mongo",
    "Mosquitto",
    "NatsCluster",
    "ServerProcess",
    "ServerStartError",
    "Victoria",
    "free_port",
    "micropython",
    "mongo",
    "mongo_server",
    "mosquitto",
    "mosquitto_server",
    "port_accepts",
    "require",
    "unique_name",
    "victoria",
    "victoria_server",
]


class ServerStartError(Exception):
    """A server exited or did not become ready; the message carries the end of its log."""


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and was never handed out before in this process.

    Taken from below Linux's ephemeral range (32768-60999), so that no outgoing connection of the
    suite (a client to VictoriaMetrics, a board) can be given it by the kernel between this call and
    the moment a server binds it; and never twice, so that two listeners of one test cannot collide.
    """
    while True:
        port = random.randrange(10_000, 32_000)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port


def unique_name(prefix: str) -> str:
    """``prefix`` plus a random suffix, for measurements, databases and topics on a shared server."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def port_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# Every server process still running, so the atexit hook can end them if a teardown never ran.
_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _live.clear()


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel SIGKILLs it if pytest dies without atexit (kill -9).
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ServerProcess:
    """One server binary run as a child process; it can be stopped and started again with the same argv."""

    def __init__(self, name: str, argv: list[str], log_path: Path, ready: Callable[[], bool]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.ready = ready
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and poll ``ready`` until it holds; raise ServerStartError otherwise."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(self.log_path, "ab") as log_file:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 -- fixtures start servers from one thread
            )
        self._proc = proc
        _live.add(proc)
        deadline = began + timeout
        last_error: Exception | None = None
        while True:
            if proc.poll() is not None:
                self._forget()
                raise ServerStartError(
                    f"{self.name} exited with status {proc.returncode} while starting\n"
                    f"{self._describe()}"
                )
            try:
                if self.ready():
                    break
            except Exception as exc:  # noqa: BLE001 -- not up yet; the reason goes in the message
                last_error = exc
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"{self.name} not ready after {timeout:.0f} s (last error: {last_error!r})\n"
                    f"{self._describe()}"
                )
            time.sleep(POLL_INTERVAL)
        self.last_start_seconds = time.monotonic() - began
        log.info("%s ready in %.2f s (pid %d)", self.name, self.last_start_seconds, proc.pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process and wait for it; SIGKILL it if it does not exit within ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s; killing pid %d", self.name, timeout, proc.pid)
                proc.kill()
                proc.wait()
        self._forget()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _describe(self) -> str:
        return f"command: {' '.join(self.argv)}\nlog {self.log_path}:\n{self.log_tail()}"

    def _forget(self) -> None:
        if self._proc is not None:
            _live.discard(self._proc)
        self._proc = None


class _Server:
    """What every server fixture yields: ``stop()``, ``start()`` on the same port and data, ``running``."""

    process: ServerProcess

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    @property
    def running(self) -> bool:
        return self.process.running


class Victoria(_Server):
    """VictoriaMetrics standing in for InfluxDB: influxdb-client writes to ``url`` unchanged.

    ``influx_port`` also takes raw line protocol over TCP (cheaper than HTTP, for benchmarks).
    """

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.influx_port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        argv = [
            "victoria-metrics",
            f"-storageDataPath={data_dir}",
            f"-httpListenAddr={HOST}:{self.port}",
            f"-influxListenAddr={HOST}:{self.influx_port}",
            "-retentionPeriod=100y",
            "-search.latencyOffset=0s",
            # InfluxDB keeps one point per series and timestamp (a second write replaces the first);
            # VictoriaMetrics keeps both unless told to deduplicate. Writes are at-least-once, so the
            # tests run it the way docs/databases.md tells VictoriaMetrics users to.
            "-dedup.minScrapeInterval=1ms",
        ]
        self.process = ServerProcess("victoria-metrics", argv, log_path, self._ready)

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every series matching the selector ``match`` (e.g. ``{__name__=~"smoke_.*"}``), flushed first.

        Each item is ``{"metric": {"__name__": ..., label: value}, "values": [...], "timestamps": [ms...]}``.
        """
        self._get("/internal/force_flush")
        body = self._get("/api/v1/export", {"match[]": match, "start": EXPORT_START, "end": EXPORT_END})
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def delete(self, match: str) -> None:
        """Delete every series matching the selector ``match``."""
        self._get("/api/v1/admin/tsdb/delete_series", {"match[]": match})

    def _ready(self) -> bool:
        return self._get("/health").strip() == b"OK" and port_accepts(self.influx_port)

    def _get(self, path: str, params: dict[str, str] | None = None) -> bytes:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return bytes(response.read())


class Mongo(_Server):
    """mongoeco standing in for MongoDB: pymongo connects to ``url``; data lives in the SQLite ``db_path``."""

    def __init__(self, db_path: Path, log_path: Path) -> None:
        self.db_path = db_path
        self.port = free_port()
        self.url = f"mongodb://{HOST}:{self.port}"
        argv = [
            str(MONGOECO_PYTHON),
            str(MONGOECO_SERVE),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--db",
            str(db_path),
        ]
        self.process = ServerProcess("mongoeco", argv, log_path, self._ready)

    def client(self, **options: Any) -> MongoClient[dict[str, Any]]:
        """A pymongo client that gives up after 5 s instead of pymongo's 30 s; the caller closes it."""
        from pymongo import MongoClient

        options.setdefault("serverSelectionTimeoutMS", 5000)
        return MongoClient(self.url, **options)

    def _ready(self) -> bool:
        if not port_accepts(self.port):
            return False
        with self.client(serverSelectionTimeoutMS=500) as client:
            client.admin.command("ping")
        return True


class Mosquitto(_Server):
    """The Mosquitto broker: anonymous clients, persistence on, listening on ``host``:``port`` only."""

    def __init__(self, workdir: Path) -> None:
        self.host = HOST
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "mosquitto.conf"
        # `user root` keeps a broker started by root as root: by default it drops to the
        # `mosquitto` user, which cannot write its persistence file in pytest's 0700 tmp dirs.
        config.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "log_dest stderr\n"
            "log_type all\n"
            "user root\n"
        )
        self.process = ServerProcess(
            "mosquitto", ["mosquitto", "-c", str(config)], workdir / "mosquitto.log", self._ready
        )

    def _ready(self) -> bool:
        return port_accepts(self.port, self.host)


class MicroPython:
    """Runs source under MicroPython (the WebAssembly port, in node) through deploy/mpy_run.mjs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def __call__(self, src: str, modules: dict[str, str] | None = None) -> str:
        return self.run(src, modules)

    def run(self, src: str, modules: dict[str, str] | None = None, timeout: float = MICROPYTHON_TIMEOUT) -> str:
        """Run ``src`` and return its stdout; raise AssertionError with the output if it fails.

        ``modules`` maps an importable name to its source: ``{"packet": "..."}`` or
        ``{"umqtt/simple.py": "..."}``; they are put where ``import`` finds them.
        """
        rundir = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        script = rundir / "main.py"
        script.write_text(src)
        argv = ["node", str(MPY_RUN)]
        for name, source in (modules or {}).items():
            dest = name if name.endswith(".py") else name.replace(".", "/") + ".py"
            path = rundir / "lib" / dest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source)
            argv += ["--module", f"{dest}={path}"]
        argv.append(str(script))
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise AssertionError(
                f"MicroPython exited with status {result.returncode} (script {script})\n"
                f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
            )
        return result.stdout


def require(path_or_binary: str | Path) -> None:
    """Fail the test (never skip) when a server binary or installed file is missing."""
    if isinstance(path_or_binary, Path):
        if not path_or_binary.exists():
            pytest.fail(f"{path_or_binary} is missing: {INSTALL_HINT}", pytrace=False)
    elif shutil.which(path_or_binary) is None:
        pytest.fail(f"{path_or_binary} not found on PATH: {INSTALL_HINT}", pytrace=False)


def _start_or_fail(server: _Server) -> None:
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(f"{exc}\n(if a server is missing or broken: {INSTALL_HINT})", pytrace=False)


@pytest.fixture(scope="session")
def victoria_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victoria]:
    """The VictoriaMetrics shared by the session, for other session fixtures; tests take ``victoria``."""
    require("victoria-metrics")
    workdir = tmp_path_factory.mktemp("victoria")
    server = Victoria(workdir / "data", workdir / "victoria.log")
    _start_or_fail(server)
    yield server
    server.stop()


@pytest.fixture
def victoria(victoria_server: Victoria) -> Victoria:
    """The session's VictoriaMetrics, running at the start of each test."""
    if not victoria_server.running:
        _start_or_fail(victoria_server)
    return victoria_server


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mongo]:
    """The mongoeco server shared by the session, for other session fixtures; tests take ``mongo``."""
    require(MONGOECO_PYTHON)
    require(MONGOECO_SERVE)
    workdir = tmp_path_factory.mktemp("mongoeco")
    server = Mongo(workdir / "mongo.sqlite", workdir / "mongoeco.log")
    _start_or_fail(server)
    yield server
    server.stop()


@pytest.fixture
def mongo(mongo_server: Mongo) -> Mongo:
    """The session's mongoeco server, running at the start of each test."""
    if not mongo_server.running:
        _start_or_fail(mongo_server)
    return mongo_server


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """The Mosquitto broker shared by the session, for other session fixtures; tests take ``mosquitto``."""
    require("mosquitto")
    server = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    _start_or_fail(server)
    yield server
    server.stop()


@pytest.fixture
def mosquitto(mosquitto_server: Mosquitto) -> Mosquitto:
    """The session's Mosquitto broker, running at the start of each test."""
    if not mosquitto_server.running:
        _start_or_fail(mosquitto_server)
    return mosquitto_server


@pytest.fixture(scope="session")
def micropython(tmp_path_factory: pytest.TempPathFactory) -> MicroPython:
    """``micropython(src, modules=None) -> stdout``, run under real MicroPython."""
    require("node")
    require(MPY_RUN)
    require(MPY_PACKAGE_ENTRY)
    return MicroPython(tmp_path_factory.mktemp("micropython"))



# --------------------------------------------------------------------------- NATS JetStream


class NatsNode(_Server):
    """One nats-server of a JetStream cluster: client ``port``, cluster ``route_port``, monitoring
    ``http_port`` (``/healthz``), its store in ``workdir``. ``prefix`` runs it elsewhere (``ip netns exec NS``)."""

    def __init__(self, name: str, workdir: Path, cluster: str, host: str = HOST, prefix: tuple[str, ...] = (),
                 port: int | None = None, route_port: int | None = None, http_port: int | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.route_port = route_port or free_port()
        self.http_port = http_port or free_port()
        self.workdir = workdir
        self.cluster = cluster
        self.prefix = prefix
        self.routes: list[str] = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = ServerProcess(f"nats-server {name}", [], workdir / "nats.log", self._ready)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> None:
        self.process.argv = [*self.prefix, "nats-server", "-js", "-sd", str(self.workdir / "store"),
                             "-a", self.host, "-p", str(self.port), "-m", str(self.http_port),
                             "-n", self.name, "--cluster_name", self.cluster,
                             "--cluster", f"nats://{self.host}:{self.route_port}",
                             "--routes", ",".join(self.routes)]
        self.process.start()

    def rename(self, name: str) -> None:
        """The next start is a new server to the cluster (what a host that lost its disk must be)."""
        self.name = name
        self.process.name = f"nats-server {name}"

    def kill(self) -> None:
        """SIGKILL, as a host that dies."""
        proc = self.process._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.process._forget()

    def _ready(self) -> bool:
        # /healthz fails until the cluster has elected a meta leader, which needs the other nodes:
        # a node is up once it takes clients; ``NatsCluster.start`` waits for the leader.
        return port_accepts(self.port, self.host)


class NatsCluster:
    """Three (or ``size``) nats-servers with JetStream, routed to each other: what `[journal] backend =
    "jetstream"` needs. ``urls`` for the configuration; ``ready()`` once a JetStream meta leader is elected."""

    def __init__(self, workdir: Path, size: int = 3, hosts: list[str] | None = None,
                 prefixes: list[tuple[str, ...]] | None = None) -> None:
        cluster = unique_name("sp")
        self.nodes = [NatsNode(f"n{i + 1}", workdir / f"n{i + 1}", cluster,
                               host=hosts[i] if hosts else HOST, prefix=prefixes[i] if prefixes else ())
                      for i in range(size)]
        for node in self.nodes:
            node.routes = [f"nats://{other.host}:{other.route_port}" for other in self.nodes if other is not node]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.meta_leader():
            if time.monotonic() > deadline:
                raise ServerStartError("nats cluster: no JetStream meta leader after "
                                       f"{START_TIMEOUT:.0f} s\n{self.nodes[0].process.log_tail()}")
            time.sleep(POLL_INTERVAL * 4)

    def meta_leader(self) -> str:
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with urllib.request.urlopen(f"http://{node.host}:{node.http_port}/jsz", timeout=1) as reply:
                    leader = json.loads(reply.read()).get("meta_cluster", {}).get("leader", "")
            except (OSError, ValueError):
                continue
            if leader:
                return str(leader)
        return ""

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-servers with JetStream on 127.0.0.1, clustered, for this test only."""
    require("nats-server")
    cluster = NatsCluster(tmp_path / "nats")
    try:
        cluster.start()
    except ServerStartError as exc:
        cluster.stop()
        pytest.fail(f"{exc}\n(if a server is missing or broken: {INSTALL_HINT})", pytrace=False)
    yield cluster
    cluster.stop()
