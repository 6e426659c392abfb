"""The webhook sink: events selected by device, kind and conditions, POSTed to a real local HTTP server
that fails the first attempts; retries with backoff (Retry-After honoured), dead letters after
max_attempts, permanent refusals set aside. End to end through the real pipeline, plus unit tests of
the conditions and of the shared outbox's max_attempts."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from tests.pipeline import DEFAULT_ROLES, Pipeline, free_port, wait_for
from workers.core.config import SinkCommon
from workers.core.deadletters import DeadLetterStore
from workers.core.envelope import Event
from workers.core.outbox import Outbox
from workers.core.runtime import Counters
from workers.sinks import Batch, TransientError
from workers.sinks.webhook import event_id, parse_condition, retry_after


class HookServer:
    """A web service: answers ``fail_status`` to the first ``fail_first`` POSTs, then 200, and keeps
    what it accepted (path, headers, JSON body) and when each attempt came."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, retry_after: str | None = None) -> None:
        self.fail_first, self.fail_status, self.retry_after = fail_first, fail_status, retry_after
        self.attempts: list[tuple[float, str]] = []
        self.accepted: list[tuple[str, dict, object]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    server.attempts.append((time.monotonic(), self.path))
                    failing = len(server.attempts) <= server.fail_first
                    if not failing:
                        server.accepted.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(server.fail_status if failing else 200)
                if failing and server.retry_after:
                    self.send_header("Retry-After", server.retry_after)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hooks() -> Iterator[list[HookServer]]:
    made: list[HookServer] = []
    yield made
    for server in made:
        server.close()


WEBHOOK_TOML = """
[sinks.webhook]
enabled = true
endpoint = "tcp://127.0.0.1:{endpoint}"
flush_interval_ms = 50
retry_initial_s = 0.2
retry_max_s = 0.4
max_attempts = {max_attempts}
timeout_s = 2

[[sinks.webhook.hooks]]
name = "door"
url = "{door}"
kinds = ["verifiedRecordU"]
where = ["verifiedCode == 0", "personType == 1"]
headers = {{ Authorization = "Bearer s3cret" }}

[[sinks.webhook.hooks]]
name = "alarms"
url = "{alarms}"
devices = ["door-1"]
kinds = ["alarm"]
batch = true
"""

GRANTED = {"cmd": "verifiedRecordU", "data": [{"num": "1001", "name": "Ada", "verifiedCode": 0, "personType": "1",
                                               "time": "2026-11-22 14:03:05", "liveImageBase64": "aGVsbG8="}]}
DENIED = {"cmd": "verifiedRecordU", "data": [{"num": "1002", "name": "Bob", "verifiedCode": 1, "personType": "1"}]}
VISITOR = {"cmd": "verifiedRecordU", "data": [{"num": "1003", "name": "Cy", "verifiedCode": 0, "personType": "2"}]}


def webhook_pipeline(factory, door: str, alarms: str, max_attempts: int = 10) -> Pipeline:
    p = factory(extra_toml=WEBHOOK_TOML.format(endpoint=free_port(), door=door, alarms=alarms,
                                               max_attempts=max_attempts))
    p.start_all((*DEFAULT_ROLES, "sink-webhook"))
    return p


def lines(*objects: dict) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def test_selected_events_arrive_exactly_as_configured_once_the_server_accepts(pipeline_factory, hooks) -> None:
    door = HookServer(fail_first=3, fail_status=503, retry_after="1")
    alarms = HookServer(fail_first=1, fail_status=500)
    hooks.extend([door, alarms])
    p = webhook_pipeline(pipeline_factory, door.url("/door"), alarms.url("/alarms"))
    p.send(lines({"device": "door-1", **GRANTED}, {"device": "door-1", **DENIED}, {"device": "door-1", **VISITOR},
                 {"device": "door-1", "temp": 21.5},
                 {"device": "door-1", "event": "alarm", "zone": 3}, {"device": "door-2", "event": "alarm", "zone": 4}))

    wait_for(lambda: door.accepted and alarms.accepted, timeout=30, message="both hooks accepted")
    time.sleep(0)  # (nothing else is coming: checked below once the SQLite sink has everything)
    wait_for(lambda: p.count_rows("events", "WHERE device IN ('door-1', 'door-2')") == 5, message="events stored")

    # door: one POST per event, only the granted employee, exactly this payload and these headers
    assert len(door.accepted) == 1
    path, headers, payload = door.accepted[0]
    assert path == "/door" and headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"] == "application/json"
    assert set(payload) == {"id", "hook", "device", "kind", "ts", "time", "body"}
    assert payload["hook"] == "door" and payload["device"] == "door-1" and payload["kind"] == "verifiedRecordU"
    assert payload["body"] == {"device": "door-1", **GRANTED}
    assert headers["Idempotency-Key"] == payload["id"]
    db = p.db()
    (ts,) = db.execute("SELECT ts FROM events WHERE device = 'door-1' AND body LIKE '%Ada%'").fetchone()
    db.close()
    assert payload["ts"] == ts // 1_000_000 and payload["id"] == event_id(Event("door-1", ts, "verifiedRecordU", {}))
    assert payload["time"].endswith("Z") and payload["time"][:4] == time.strftime("%Y", time.gmtime(ts / 1e9))

    # three refused attempts, then the one that was taken; Retry-After: 1 was waited for
    times = [t for t, _ in door.attempts]
    assert len(times) == 4
    assert all(b - a >= 0.9 for a, b in zip(times, times[1:])), times

    # alarms: one batch POST with door-1's alarm only
    assert len(alarms.accepted) == 1
    path, _, payload = alarms.accepted[0]
    assert [(e["device"], e["kind"], e["body"]["zone"]) for e in payload["events"]] == [("door-1", "alarm", 3)]
    assert len(alarms.attempts) == 2

    status = wait_for(lambda: p.query({"op": "status"})["workers"].get("sink:webhook", {}).get("write_failures"),
                      message="webhook counters")
    assert status >= 3


def test_refused_events_and_events_that_never_get_through_become_dead_letters(pipeline_factory, hooks) -> None:
    door = HookServer(fail_first=1000, fail_status=422)            # refuses: permanent
    alarms = HookServer(fail_first=1000, fail_status=503)          # never comes back: transient
    hooks.extend([door, alarms])
    p = webhook_pipeline(pipeline_factory, door.url("/door"), alarms.url("/alarms"), max_attempts=3)
    p.send(lines({"device": "door-1", **GRANTED}))
    p.send(lines({"device": "door-1", "event": "alarm", "zone": 9}))

    def letters() -> list[dict]:
        return [d for d in json.loads(p.cli("deadletters", "--json", "--source", "sink:webhook").stdout)]

    got = wait_for(lambda: len(letters()) == 2 and letters(), timeout=30, message="two dead letters")
    reasons = {json.loads(d["raw"]).get("zone"): d["reason"] for d in got}
    assert reasons[None].startswith("door: HTTP 422 Unprocessable Entity")
    assert reasons[9].startswith("gave up after 3 attempts: alarms: HTTP 503")
    assert 1 <= len(door.attempts) <= 2          # twice when both came in one batch: once more to isolate it
    # three attempts by the outbox; one more POST when both came in one batch and it was split
    assert 3 <= len(alarms.attempts) <= 4
    # the events are in the SQLite store all the same: only the webhook gave up
    assert p.count_rows("events", "WHERE device = 'door-1'") == 2


# ------------------------------------------------------------------ unit


@pytest.mark.parametrize("condition, body, holds", [
    ("verifiedCode == 0", {"cmd": "v", "data": [{"verifiedCode": 0}]}, True),
    ("verifiedCode == 0", {"cmd": "v", "data": [{"verifiedCode": 1}]}, False),
    ("verifiedCode == 0", {"cmd": "v", "data": [{"verifiedCode": 1}, {"verifiedCode": 0}]}, True),
    ("verifiedCode == 0", {"cmd": "v"}, False),
    ("personType == 1", {"data": [{"personType": "1"}]}, True),         # a number in a string
    ("personType == \"1\"", {"data": [{"personType": 1}]}, True),
    ("name == Ada", {"data": [{"name": "Ada"}]}, True),                  # a bare word
    ("name != Ada", {"data": [{"name": "Bob"}]}, True),
    ("data.num >= 1000", {"data": [{"num": "1001"}]}, True),
    ("temp > 30", {"temp": 30}, False),
    ("temp <= 30.5", {"temp": 30}, True),
    ("ok == true", {"ok": True}, True),
    ("ok == true", {"ok": 1}, False),
    ("error == null", {"error": None}, True),
    ("name < 5", {"name": "abc"}, False),
])
def test_conditions(condition: str, body: dict, holds: bool) -> None:
    assert parse_condition(condition).holds(body) is holds


def test_retry_after_header() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(None) is None and retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after(later) <= 31


class FlakySink:
    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.written = failures, 0, []

    def write(self, batch: Batch) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientError("away", retry_after=0)
        self.written.extend(batch.events)


def outbox_for(sink: FlakySink, tmp_path: Path, max_attempts: int) -> tuple[Outbox, DeadLetterStore, list]:
    acked: list = []
    store = DeadLetterStore(tmp_path / "dead.db")
    opts = SinkCommon(enabled=True, endpoint="x", batch_size=10, max_attempts=max_attempts, fsync=False)
    return Outbox(sink, opts, tmp_path / "spool", store, acked.extend, Counters("t")), store, acked


@pytest.mark.parametrize("max_attempts, failures, dead, written", [(3, 2, 0, 1), (3, 3, 1, 0), (1, 1, 1, 0),
                                                                   (0, 6, 0, 1)])
def test_outbox_gives_up_after_max_attempts(tmp_path: Path, max_attempts: int, failures: int, dead: int,
                                            written: int) -> None:
    sink = FlakySink(failures)
    outbox, store, acked = outbox_for(sink, tmp_path, max_attempts)
    outbox.add([7], [], [Event("d", 1, "alarm", {"zone": 1})])
    outbox.flush()
    assert acked == [7]                       # spooled (or set aside): durable either way
    for _ in range(10):
        outbox.tick(time.monotonic() + 100)
    assert store.count() == dead and len(sink.written) == written
    assert len(outbox.spool) == 0
    if dead:
        assert store.list()[0].reason == f"gave up after {max_attempts} attempts: away"
    store.close()


class PickySink:
    """Refuses event "bad" for good; is away for event "later" the first ``away`` times."""
    name = "picky"

    def __init__(self, away: int) -> None:
        self.away, self.written = away, []

    def write(self, batch: Batch) -> None:
        from workers.sinks import PermanentError
        kinds = [e.kind for e in batch.events]
        if "bad" in kinds:
            raise PermanentError("bad event")
        if "later" in kinds and self.away:
            self.away -= 1
            raise TransientError("away", retry_after=0)
        self.written.extend(kinds)


def test_outbox_spools_only_what_is_neither_written_nor_set_aside(tmp_path: Path) -> None:
    sink = PickySink(away=2)
    acked: list = []
    store = DeadLetterStore(tmp_path / "dead.db")
    opts = SinkCommon(enabled=True, endpoint="x", batch_size=10, fsync=False)
    outbox = Outbox(sink, opts, tmp_path / "spool", store, acked.extend, Counters("t"))
    outbox.add([1], [], [Event("d", i, kind, {}) for i, kind in enumerate(["ok1", "bad", "later", "ok2"])])
    outbox.flush()
    assert acked == [1] and sink.written == ["ok1"]
    assert [e.kind for e in outbox.spool.oldest()[1].events] == ["later", "ok2"]   # not ok1, not bad
    for _ in range(5):
        outbox.tick(time.monotonic() + 100)
    assert sink.written == ["ok1", "later", "ok2"]
    assert [d.reason for d in store.list()] == ["bad event"]                      # set aside once
    store.close()
