"""The HTTP worker on a real pipeline: REST API, live streams, tokens, CORS, /metrics, /healthz,
/readyz, and the OpenAPI document kept in step with the routes. Real worker processes over real
sockets on free ports; waits poll with a deadline."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for

WEB_ROLES = (*COMMAND_ROLES, "http")


class Board:
    """A TCP board that answers every command it gets with an acknowledgement, as the firmware does."""

    def __init__(self, port: int, device: str) -> None:
        self.device = device
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.got: list[dict] = []
        self.closed = False
        self.reader = threading.Thread(target=self._answer, daemon=True)
        self.reader.start()

    def send(self, obj: dict) -> None:
        self.sock.sendall(orjson.dumps({"device": self.device, **obj}) + b"\n")

    def _answer(self) -> None:
        buffer = b""
        while not self.closed:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                self.got.append(command)
                self.send({"cmd_ack": command["id"], "ok": True})

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def web(p: Pipeline) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{p.http_port}", timeout=10)


def wait_http(p: Pipeline) -> None:
    wait_for(lambda: web(p).get("/healthz").status_code == 200, message="http worker")


@pytest.fixture
def p(pipeline_factory) -> Pipeline:
    pipeline = pipeline_factory(rollups='windows = ["1s", "1m"]\ngrace_s = 0.5')
    pipeline.start_all(WEB_ROLES)
    wait_http(pipeline)
    return pipeline


def test_api_devices_latest_history_commands_and_errors(p: Pipeline) -> None:
    client = web(p)
    board = Board(p.text_port, "greenhouse-1")
    try:
        board.send({"temp": 21.5, "humi": 50})
        wait_for(lambda: client.get("/api/devices/greenhouse-1/latest").status_code == 200, message="latest")
        latest = client.get("/api/devices/greenhouse-1/latest").json()
        assert latest["device"] == "greenhouse-1" and latest["fields"]["temp"]["value"] == 21.5
        devices = client.get("/api/devices").json()["devices"]
        assert [d["device"] for d in devices] == ["greenhouse-1"] and devices[0]["online"] is True

        raw = wait_for(lambda: client.get("/api/devices/greenhouse-1/history", params={"field": "temp"}).json()
                       .get("points"), message="raw history")
        assert raw[0][1] == 21.5
        rollups = wait_for(lambda: client.get("/api/devices/greenhouse-1/history",
                                              params={"field": "temp", "window": "1s"}).json().get("points"),
                           message="1s rollups")
        assert rollups[0][1:] == [1, 21.5, 21.5, 21.5, 21.5]

        # errors: JSON with a code and a message
        missing = client.get("/api/devices/nobody/latest")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_device"
        bad = client.get("/api/devices/greenhouse-1/history", params={"field": "temp", "window": "7m"})
        assert bad.status_code == 400 and "configured windows" in bad.json()["error"]["message"]
        assert client.get("/api/devices/greenhouse-1/history", params={"field": "temp", "from": "x"}).status_code == 400
        assert client.get("/nowhere").json()["error"]["code"] == "not_found"
        not_json = client.post("/api/devices/greenhouse-1/commands", content=b"{nope")
        assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "bad_request"

        # a command, followed to its acknowledgement
        sent = client.post("/api/devices/greenhouse-1/commands", json={"command": {"cmd": "interval", "value": 30},
                                                                       "id": "w1"})
        assert sent.status_code == 200 and sent.json()["status"] == "delivered", sent.text
        wait_for(lambda: client.get("/api/devices/greenhouse-1/commands/w1").json()["status"] == "acked",
                 message="command acked")
        assert board.got == [{"id": "w1", "cmd": "interval", "value": 30}]
        assert [c["id"] for c in client.get("/api/devices/greenhouse-1/commands").json()["commands"]] == ["w1"]
        unknown = client.post("/api/devices/ghost/commands", json={"command": {"cmd": "read"}})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_device"

        status = client.get("/api/status").json()
        assert status["sinks"]["sqlite"]["state"] == "ok"
        assert status["http"]["rollup_windows"] == [["1s", 1], ["1m", 60]]
    finally:
        board.close()


def test_dead_letters_listed_and_replayed(p: Pipeline) -> None:
    client = web(p)
    assert client.get("/api/deadletters").json() == {"total": 0, "deadletters": []}
    p.send(b"\xff\xfe{{{{\n")
    letters = wait_for(lambda: client.get("/api/deadletters").json()["deadletters"], message="a dead letter")
    assert letters[0]["source"] in ("edge", "parser") and letters[0]["reason"]
    assert client.post("/api/deadletters/replay", json={}).status_code == 400
    replayed = client.post("/api/deadletters/replay", json={"ids": [letters[0]["id"]]})
    assert replayed.status_code == 200 and replayed.json() == {"replayed": 1}


def _read_events(response: httpx.Response, wanted: int, into: list[dict]) -> None:
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "reading":
            into.append(json.loads(line[6:]))
            if len(into) >= wanted:
                return


def test_live_streams_of_one_device_and_of_all(p: Pipeline) -> None:
    client = httpx.Client(base_url=f"http://127.0.0.1:{p.http_port}", timeout=httpx.Timeout(10, read=15))
    one: list[dict] = []
    every: list[dict] = []
    with client.stream("GET", "/api/devices/d1/stream") as a, client.stream("GET", "/api/stream") as b:
        assert a.headers["content-type"].startswith("text/event-stream")
        readers = [threading.Thread(target=_read_events, args=(a, 2, one), daemon=True),
                   threading.Thread(target=_read_events, args=(b, 3, every), daemon=True)]
        for reader in readers:
            reader.start()
        wait_for(lambda: client.get("/api/status").json()["http"]["stream_clients"] == 2, message="both subscribed")
        p.send(b'{"device":"d1","temp":1}\n{"device":"d2","temp":2}\n')
        wait_for(lambda: len(every) >= 2, message="the all-devices stream")
        p.send(b'{"device":"d1","temp":3}\n')
        for reader in readers:
            reader.join(10)
    assert [(r["device"], r["fields"]) for r in one] == [("d1", {"temp": 1}), ("d1", {"temp": 3})]
    assert sorted(r["device"] for r in every) == ["d1", "d1", "d2"]


def test_tokens_read_only_and_admin_and_cors(pipeline_factory) -> None:
    p = pipeline_factory(http='read_tokens = ["r3ad"]\nadmin_tokens = ["adm1n"]\ncors_origins = ["https://app.example"]')
    for role in ("query", "commands", "http"):
        p.start(role)
    wait_http(p)
    client = web(p)
    assert client.get("/api/devices").json()["error"]["code"] == "unauthorized"
    assert client.get("/api/devices", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/devices", headers={"Authorization": "Bearer r3ad"}).status_code == 200
    assert client.get("/api/devices", params={"token": "adm1n"}).status_code == 200
    refused = client.post("/api/devices/x/commands", json={"command": {"cmd": "read"}},
                          headers={"Authorization": "Bearer r3ad"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    allowed = client.post("/api/devices/x/commands", json={"command": {"cmd": "read"}},
                          headers={"Authorization": "Bearer adm1n"})
    assert allowed.status_code == 404          # past the token check: x was never seen
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    preflight = client.options("/api/devices", headers={"Origin": "https://app.example",
                                                        "Access-Control-Request-Method": "GET",
                                                        "Access-Control-Request-Headers": "Authorization"})
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = client.get("/api/devices", headers={"Origin": "https://evil.example", "Authorization": "Bearer r3ad"})
    assert "access-control-allow-origin" not in other.headers


def test_metrics_after_known_traffic_and_readiness(p: Pipeline) -> None:
    client = web(p)
    wait_for(lambda: client.get("/readyz").json()["ok"], message="ready: " + client.get("/readyz").text)
    p.send(b"".join(b'{"device":"m%d","temp":%d}\n' % (i % 5, i) for i in range(100)))
    p.send(b"\xff\xfe{{{{\n")
    wait_for(lambda: p.count_rows() == 100, message="100 readings stored")

    def families() -> dict:
        text = client.get("/metrics").text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def sample(family, **labels: str) -> float:
        return sum(s.value for s in family.samples
                   if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"))

    def settled() -> dict | None:
        f = families()
        ok = ("sensorpipe_sink_written" in f and sample(f["sensorpipe_sink_written"], sink="sqlite") >= 100
              and sample(f["sensorpipe_frames"], role="edge") >= 101)
        return f if ok else None

    f = wait_for(settled, timeout=20, message="the stats to reach /metrics")
    assert sample(f["sensorpipe_sink_written"], sink="sqlite") == 100
    assert sample(f["sensorpipe_sink_failing"], sink="sqlite") == 0
    assert f["sensorpipe_journal_bytes"].type == "gauge" and sample(f["sensorpipe_journal_bytes"]) > 0
    assert f["sensorpipe_connections"].type == "gauge"
    assert "sensorpipe_inflight_batches" in f
    assert sample(f["sensorpipe_worker_up"], role="edge") == 1
    histogram = f["sensorpipe_stored_latency_seconds"]
    assert histogram.type == "histogram"
    count = [s.value for s in histogram.samples if s.name.endswith("_count") and s.labels["sink"] == "sqlite"][0]
    inf = [s.value for s in histogram.samples if s.labels.get("le") == "+Inf" and s.labels["sink"] == "sqlite"][0]
    assert count >= 1 and inf == count
    dead = wait_for(lambda: sample(families()["sensorpipe_dead_letters"]) >= 1 if "sensorpipe_dead_letters" in
                    families() else None, message="the dead letter counted")
    assert dead

    p.stop(next(name for name in p.procs if name.startswith("edge")))
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["checks"]["edge"]["ok"] is False


def test_openapi_document_matches_the_routes(p: Pipeline) -> None:
    from starlette.routing import Route

    from workers.core import config
    from workers.web.app import build_app

    app = build_app(config.load(p.config_path))
    served = {(route.path, method.lower()) for route in app.routes if isinstance(route, Route)
              for method in route.methods or () if method != "HEAD"}
    document = web(p).get("/openapi.json").json()
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served == described
    assert document["openapi"].startswith("3.")


def test_live_hub_cuts_off_a_client_that_falls_behind_and_keeps_the_others() -> None:
    import asyncio

    from workers.core import envelope
    from workers.web.backend import ALL, LiveHub

    async def scenario() -> None:
        hub = LiveHub(bound=2)
        slow, fast = hub.subscribe(ALL), hub.subscribe("d1")
        message = envelope.readings_message([1], envelope.readings_body(
            [envelope.Reading("d1", 1_000_000_000, {"temp": 1.5}, {})], []))
        for _ in range(3):
            hub.publish(message[1], message[2])
            assert (await fast.take(1)).count(b"event: reading") == 1       # the fast client keeps up
        assert hub.counters["stream_clients_too_slow"] == 1
        assert await slow.take(1) is None          # told to end its stream
        assert hub.clients == 1
        hub.publish(message[1], message[2])
        hub.publish(message[1], message[2])
        both = await fast.take(1)                  # what waited goes out in one piece
        assert both.count(b'"fields":{"temp":1.5}') == 2
        assert await fast.take(0.01) == b""        # nothing: a keepalive is due

    asyncio.run(scenario())


def test_readyz_waits_for_a_sink_failing_longer_than_allowed(pipeline_factory) -> None:
    p = pipeline_factory(http="sink_failing_for_s = 0.5")
    for role in ("query", "parser", "edge", "http"):          # the enabled SQLite sink is not running
        p.start(role)
    wait_http(p)
    client = web(p)

    def sinks_check() -> dict:
        return client.get("/readyz").json()["checks"]["sinks"]

    detail = wait_for(lambda: "sqlite failing for" in sinks_check()["detail"] and sinks_check()["detail"],
                      message="the sink counted as failing")
    assert "sqlite failing for" in detail and client.get("/readyz").status_code == 503
    p.start("sink-sqlite")
    wait_for(lambda: client.get("/readyz").status_code == 200, message="ready once the sink reports")
