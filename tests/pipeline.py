"""Real sensorpipe worker processes on free ports, for end-to-end tests.

Listeners have ``auth = "off"`` and no connection limits unless a test asks (the security tests do).
``pipeline`` starts edge, two parsers, the SQLite sink, the rollup worker and the query worker from a
TOML file written for the test (every port free, data in a temp dir). Tests wait with ``wait_for`` (poll with a
deadline), never with fixed sleeps.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.servers import free_port
from workers.core import runtime
from workers.processes import query as query_mod

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROLES = ("query", "sink-sqlite", "rollup", "parser", "parser", "edge")
COMMAND_ROLES = ("query", "sink-sqlite", "rollup", "commands", "parser", "parser", "edge")   # + commands, replies
STOP_ORDER = ["mqtt", "edge", "parser", "sink", "rollup", "commands", "query"]


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


BASE_TOML = """
data_dir = "{data}"
log_level = "INFO"

[[listeners]]
name = "text"
bind = "127.0.0.1:{text_port}"
max_frame_bytes = {max_frame}
idle_timeout_s = {idle_timeout}
auth = "{auth}"
max_connections_per_address = {per_address}
max_frames_per_s = {rate}
{text_extra}

[[listeners]]
name = "binary"
bind = "127.0.0.1:{binary_port}"
framing = "binary"
decoder = "binary"
auth = "{auth}"
max_connections_per_address = {per_address}

[endpoints]
frames = "tcp://127.0.0.1:{p_frames}"
acks = "tcp://127.0.0.1:{p_acks}"
live = "tcp://127.0.0.1:{p_live}"
inject = "tcp://127.0.0.1:{p_inject}"
query = "tcp://127.0.0.1:{p_query}"
command = "tcp://127.0.0.1:{p_command}"
seen = "tcp://127.0.0.1:{p_seen}"
downlink = "tcp://127.0.0.1:{p_downlink}"
stream = "tcp://127.0.0.1:{p_stream}"

[edge]
batch_max_delay_ms = 5
redeliver_after_s = {redeliver}
{edge}

[binary.devices.1]
device = "balcony"
fields = [
  {{ name = "light", type = "u16" }},
  {{ name = "humidity", type = "u16", scale = 0.0019073486328125, offset = -6.0 }},
  {{ name = "temperature", type = "u16", scale = 0.00268127441406250, offset = -46.85 }},
]

[devices.balcony]
tags = {{ place = "balcony" }}

[sinks.sqlite]
enabled = true
endpoint = "tcp://127.0.0.1:{p_sqlite}"
flush_interval_ms = 50

[rollups]
endpoint = "tcp://127.0.0.1:{p_rollup}"
{rollups}

[query]
resync_after_s = 1

[http]
bind = "127.0.0.1:{http_port}"
{http}
"""


class Pipeline:
    def __init__(self, tmp: Path, extra_toml: str = "", max_frame: int = 65536, idle_timeout: float = 600,
                 redeliver: float = 3.0, rollups: str = "", edge: str = "", auth: str = "off", text_extra: str = "",
                 per_address: int = 10000, rate: float = 0, http: str = "") -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.text_port = free_port()
        self.binary_port = free_port()
        ports = {f"p_{n}": free_port() for n in ("frames", "acks", "live", "inject", "query", "sqlite", "rollup",
                                                 "command", "seen", "downlink", "stream")}
        self.http_port = free_port()
        self.query_endpoint = f"tcp://127.0.0.1:{ports['p_query']}"
        self.command_endpoint = f"tcp://127.0.0.1:{ports['p_command']}"
        self.config_path = tmp / "sensorpipe.toml"
        self.config_path.write_text(BASE_TOML.format(
            data=self.data, text_port=self.text_port, binary_port=self.binary_port, max_frame=max_frame,
            idle_timeout=idle_timeout, redeliver=redeliver, rollups=rollups, edge=edge, auth=auth,
            text_extra=text_extra, per_address=per_address, rate=rate, http=http, http_port=self.http_port,
            **ports) + extra_toml)
        self.secret = runtime.pipeline_secret(self.data)      # what the workers will find there
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)

    # ------------------------------------------------------------------ processes

    def start(self, role: str, name: str | None = None) -> str:
        name = name or self._name(role)
        env = {**os.environ, "SUPERVISOR_PROCESS_NAME": name.replace(":", "_"), "PYTHONUNBUFFERED": "1"}
        log = open(self.logs / f"{name.replace(':', '_')}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "workers", "--config", str(self.config_path), "worker", role],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return name

    def _name(self, role: str) -> str:
        n = 1
        while f"{role}:{n}" in self.procs and self.procs[f"{role}:{n}"].poll() is None:
            n += 1
        return f"{role}:{n}"

    def start_all(self, roles: tuple[str, ...] = DEFAULT_ROLES) -> None:
        for role in roles:
            self.start(role)
        self.wait_ready()

    def wait_ready(self) -> None:
        # Several workers import and start at once on two cores: on a busy machine that takes a while.
        wait_for(lambda: self.query({"op": "ping"}, timeout=0.5).get("ok"), timeout=30, message="query worker")
        wait_for(self._port_open, message="edge listener")
        # A parser's readings reach the query worker over PUB/SUB, which drops what is sent before the
        # connection is up: a parser is ready once its stats got through.
        # Likewise the sinks: one that comes up seconds after the edge (a busy machine) gets the first
        # batches only when the edge sends them again, which a test counting deliveries does not expect.
        wait_for(lambda: self._reporting_workers() <= set(self.query({"op": "status"}, timeout=0.5).get("workers", {})),
                 message="parsers and sinks reporting to the query worker")

    def _reporting_workers(self) -> set[str]:
        """The names under which the running parsers and sinks report (``parser:1``, ``sink:sqlite``)."""
        names = set()
        for name, proc in self.procs.items():
            if proc.poll() is None and name.startswith("parser:"):
                names.add(name)
            elif proc.poll() is None and name.startswith("sink-"):
                names.add("sink:" + name.split(":")[0].removeprefix("sink-"))
        return names

    def _port_open(self) -> bool:
        # both listeners: the edge opens them one after the other, and a test may use either at once
        for port in (self.text_port, self.binary_port):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return True

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def kill(self, name: str) -> None:
        self.stop(name, signal.SIGKILL)

    def stop_all(self) -> None:
        # MQTT and edge first (stop taking frames), then parsers, then sinks and rollups flush, then the rest.
        order = sorted(self.procs, key=lambda n: next((i for i, p in enumerate(STOP_ORDER) if n.startswith(p)),
                                                      len(STOP_ORDER)))
        for name in order:
            if self.procs[name].poll() is None:
                try:
                    self.stop(name)
                except subprocess.TimeoutExpired:
                    self.kill(name)

    def log_text(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logs.iterdir()))

    # ------------------------------------------------------------------ talking to it

    def query(self, message: dict, timeout: float = 2.0) -> dict:
        runtime.use_secret(self.secret)           # this test process may talk to several pipelines
        try:
            return query_mod.request(self.query_endpoint, message, timeout_s=timeout, retries=0)
        finally:
            runtime.use_secret(None)

    def command(self, message: dict, timeout: float = 2.5) -> dict:
        """A request to the commands worker (send, commands, firmware...), with the pipeline's secret."""
        from workers.processes.commands import request

        runtime.use_secret(self.secret)
        try:
            return request(self.command_endpoint, message, timeout)
        finally:
            runtime.use_secret(None)

    def latest(self, device: str) -> dict:
        reply = self.query({"op": "latest", "device": device})
        return {k: v["value"] for k, v in reply.get("fields", {}).items()} if reply.get("ok") else {}

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers", "--config", str(self.config_path), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def send(self, data: bytes, port: int | None = None, read_reply: int = 0, timeout: float = 5) -> bytes:
        with socket.create_connection(("127.0.0.1", port or self.text_port), timeout=timeout) as sock:
            sock.sendall(data)
            reply = b""
            if read_reply:
                while len(reply) < read_reply:
                    chunk = sock.recv(read_reply - len(reply))
                    if not chunk:
                        break
                    reply += chunk
            return reply

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data / 'sensorpipe.db'}?mode=ro", uri=True, timeout=10)

    def count_rows(self, table: str = "readings", where: str = "", args: tuple = ()) -> int:
        if not (self.data / "sensorpipe.db").exists():
            return 0
        db = self.db()
        try:
            return db.execute(f"SELECT count(*) FROM {table} {where}", args).fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()


@pytest.fixture
def pipeline_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def make(**kwargs: Any) -> Pipeline:
        sub = tmp_path / f"pipeline{len(made)}"
        sub.mkdir()
        p = Pipeline(sub, **kwargs)
        made.append(p)
        return p

    yield make
    failed = any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))
    for p in made:
        p.stop_all()
        if failed:
            print(p.log_text())


@pytest.fixture
def pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    p = pipeline_factory()
    p.start_all()
    return p
