"""Helpers shared by the database sink tests: an Outbox around a sink, readings streamed into a pipeline,
and a fake InfluxDB write endpoint (a real HTTP server) for the failures VictoriaMetrics never shows.
"""
from __future__ import annotations

import gzip
import http.server
import json
import socket
import threading
import urllib.parse
from pathlib import Path
import orjson

from workers.core.config import SinkCommon
from workers.core.deadletters import DeadLetterStore
from workers.core.outbox import Outbox
from workers.core.runtime import Counters
from workers.sinks import Sink
from tests.pipeline import Pipeline, free_port

BASE_TS_MS = 1_732_260_000_000       # 2024-11-22, whole seconds


class OutboxHarness:
    """An Outbox around ``sink`` with a real spool and dead-letter store in ``tmp``; acks recorded."""

    def __init__(self, sink: Sink, opts: SinkCommon, tmp: Path) -> None:
        self.acked: list[int] = []
        self.counters = Counters(f"sink:{sink.name}")
        self.deadletters = DeadLetterStore(tmp / "deadletters.db")
        self.outbox = Outbox(sink, opts, tmp / "spool" / sink.name, self.deadletters, self.acked.extend,
                             self.counters)

    def dead(self) -> list:
        return self.deadletters.list(limit=100000)

    def close(self) -> None:
        self.deadletters.close()


# --------------------------------------------------------------------------- streaming into a pipeline


def reading_line(device: str, i: int) -> bytes:
    """Reading number ``i`` of ``device``: its own timestamp (one second apart), fields n and temp."""
    return orjson.dumps({"device": device, "ts": BASE_TS_MS + i * 1000, "n": i, "temp": 20 + i / 8}) + b"\n"


def send_readings(pipeline: Pipeline, devices: list[str], numbers: range) -> None:
    with socket.create_connection(("127.0.0.1", pipeline.text_port), timeout=10) as sock:
        sock.sendall(b"".join(reading_line(d, i) for i in numbers for d in devices))


def sink_status(pipeline: Pipeline, sink: str) -> dict:
    return pipeline.query({"op": "status"}).get("sinks", {}).get(sink, {})


def restart_with_full_spool(pipeline: Pipeline, sink: str) -> int:
    """SIGTERM the sink worker, check its spool on disk holds batches, start it again. Returns the
    number of spooled batch files found while it was down."""
    pipeline.stop(f"sink-{sink}:1")
    files = list((pipeline.data / "spool" / sink).glob("*.batch"))
    assert files, f"the {sink} spool should hold batches while the server is away"
    pipeline.start(f"sink-{sink}")
    return len(files)


# --------------------------------------------------------------------------- a fake InfluxDB


class FakeInflux:
    """``POST /api/v2/write`` on a free port, answering like InfluxDB 2.x does when things go wrong:

    - a body with a line containing ``bad_marker`` -> 400 with InfluxDB's JSON error body;
    - a body larger than ``max_body`` bytes (uncompressed) -> 413;
    - ``script``: statuses to answer first, in order, e.g. ``[(429, {"Retry-After": "7"}), (503, {})]``.
    Everything else is stored in ``lines`` (204). ``requests`` records (query, headers, line count).
    """

    def __init__(self, bad_marker: str = "BAD", max_body: int = 10 ** 9) -> None:
        self.bad_marker = bad_marker
        self.max_body = max_body
        self.script: list[tuple[int, dict[str, str]]] = []
        self.lines: list[str] = []
        self.requests: list[tuple[dict, dict, int]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                lines = body.decode().split("\n")
                with fake.lock:
                    fake.requests.append((query, dict(self.headers), len(lines)))
                    status, headers = fake.script.pop(0) if fake.script else (0, {})
                    if not status:
                        if len(body) > fake.max_body:
                            status = 413
                        elif any(fake.bad_marker in line for line in lines):
                            status = 400
                        else:
                            fake.lines.extend(lines)
                            status = 204
                payload = b""
                if status != 204:
                    payload = json.dumps({"code": "invalid", "message": f"fake influx says {status}"}).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"
