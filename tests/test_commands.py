"""Commands down to TCP devices, heartbeats answered on the same connection, and presence: real worker
processes (edge, parsers, SQLite sink, commands and query workers) over real sockets."""
from __future__ import annotations

import json
import socket
import time

import orjson
import pytest

from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for

EXTRA = """
[[replies]]
match = { cmd = "heartU" }
reply = { cmd = "heartD", time = "{now:%Y-%m-%d %H:%M:%S}" }

[devices.quiet]
offline_after_s = 1

[devices.planned]
tags = { place = "shed" }
"""


class Device:
    """A TCP board: sends lines, reads the lines the server writes back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, obj: dict) -> None:
        self.sock.sendall(orjson.dumps(obj) + b"\n")

    def line(self, timeout: float = 10) -> dict:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def nothing_for(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(4096) == b"" and False
        except socket.timeout:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def p(pipeline_factory) -> Pipeline:
    pipeline = pipeline_factory(extra_toml=EXTRA)
    pipeline.start_all(COMMAND_ROLES)
    return pipeline


def send(p: Pipeline, device: str, command: dict, *args: str) -> tuple[int, dict | str]:
    result = p.cli("send", device, orjson.dumps(command).decode(), "--json", *args)
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result.returncode, result.stderr


def commands(p: Pipeline, device: str) -> dict[str, dict]:
    result = p.cli("commands", device, "--json")
    assert result.returncode == 0, result.stderr
    return {c["id"]: c for c in json.loads(result.stdout)["commands"]}


def known(p: Pipeline, device: str) -> bool:
    """The commands worker has seen the device (its answer is no longer "unknown device")."""
    code, reply = send(p, device, {"cmd": "read"}, "--id", f"probe-{device}-{time.monotonic_ns()}", "--ttl", "0.001")
    return isinstance(reply, dict) and reply.get("status") != "unknown device"


def test_command_reaches_a_connected_board_and_its_ack_is_recorded(p: Pipeline) -> None:
    board = Device(p.text_port)
    try:
        board.send({"device": "relay-1", "temp": 20.5})
        wait_for(lambda: p.latest("relay-1"), message="relay-1 reading")
        code, reply = send(p, "relay-1", {"cmd": "relay", "pin": 5, "on": True}, "--id", "c42")
        assert code == 0 and reply["status"] == "delivered", reply
        assert reply["via"].startswith("text 127.0.0.1:")
        assert board.line() == {"id": "c42", "cmd": "relay", "pin": 5, "on": True}
        board.send({"device": "relay-1", "cmd_ack": "c42", "ok": True})
        wait_for(lambda: commands(p, "relay-1")["c42"]["status"] == "acked", message="ack recorded")

        # no id given: one is made and put first
        code, reply = send(p, "relay-1", {"cmd": "interval", "value": 30})
        assert reply["status"] == "delivered"
        line = board.line()
        assert list(line) == ["id", "cmd", "value"] and line["id"] == reply["id"]
        board.send({"device": "relay-1", "cmd_ack": line["id"], "ok": False, "error": "not whole seconds"})
        wait_for(lambda: commands(p, "relay-1")[line["id"]]["status"] == "failed", message="refusal recorded")
        assert commands(p, "relay-1")[line["id"]]["error"] == "not whole seconds"
    finally:
        board.close()
    # the acks are events in the store too
    wait_for(lambda: p.count_rows("events", "WHERE device = 'relay-1' AND kind = 'cmd_ack'") == 2, message="ack events")


def test_a_board_that_is_away_gets_its_commands_when_it_connects_even_after_a_restart(p: Pipeline) -> None:
    board = Device(p.text_port)
    board.send({"device": "sleeper", "vbat": 3.7})
    wait_for(lambda: p.latest("sleeper"), message="sleeper seen")
    wait_for(lambda: known(p, "sleeper"), message="commands worker knows sleeper")
    board.close()

    code, reply = send(p, "sleeper", {"cmd": "wake", "value": 900}, "--id", "w1")
    assert code == 0 and reply["status"] == "queued", reply
    assert reply["reason"] == "not connected"
    code, reply = send(p, "sleeper", {"cmd": "led", "on": True}, "--id", "w2")
    assert reply["status"] == "queued"
    code, reply = send(p, "sleeper", {"cmd": "read"}, "--id", "w3", "--ttl", "0.5")
    assert reply["status"] == "queued"

    # queued commands survive a restart of the commands worker
    p.stop("commands:1")
    p.start("commands")
    wait_for(lambda: p.cli("commands", "sleeper").returncode == 0, message="commands worker back")
    wait_for(lambda: commands(p, "sleeper")["w3"]["status"] == "expired", message="w3 expired")

    board = Device(p.text_port)
    try:
        board.send({"device": "sleeper", "vbat": 3.6})        # wakes up, says something: gets its commands
        assert board.line() == {"id": "w1", "cmd": "wake", "value": 900}
        assert board.line() == {"id": "w2", "cmd": "led", "on": True}
        assert board.nothing_for(0.5)                          # w3 expired: not sent
        wait_for(lambda: {c["status"] for i, c in commands(p, "sleeper").items() if i in ("w1", "w2")}
                 == {"delivered"}, message="delivered")
        board.send({"device": "sleeper", "cmd_ack": "w1", "ok": True})     # w2's ack is lost
    finally:
        board.close()
    wait_for(lambda: commands(p, "sleeper")["w1"]["status"] == "acked", message="w1 acked")

    # it acknowledges commands, so the unacknowledged w2 goes again on its next connection (the
    # firmware applies an id once); the acknowledged w1 does not
    board = Device(p.text_port)
    try:
        board.send({"device": "sleeper", "vbat": 3.5})
        assert board.line() == {"id": "w2", "cmd": "led", "on": True}
        assert board.nothing_for(0.5)
        board.send({"device": "sleeper", "cmd_ack": "w2", "ok": True})
        wait_for(lambda: commands(p, "sleeper")["w2"]["status"] == "acked", message="w2 acked")
        assert commands(p, "sleeper")["w2"]["attempts"] == 2
    finally:
        board.close()


def test_send_says_unknown_device_expired_and_errors(p: Pipeline) -> None:
    result = p.cli("send", "ghost", '{"cmd":"read"}')
    assert result.returncode == 2
    assert "never been seen" in result.stderr and "nothing queued" in result.stderr
    # a device named in [devices] is known before it is first seen: its commands wait for it
    code, reply = send(p, "planned", {"cmd": "read"}, "--ttl", "1", "--wait", "5")
    assert code == 1 and reply["status"] == "expired", reply
    assert "expired" in p.cli("send", "planned", '{"cmd":"read"}', "--ttl", "0.5", "--wait", "3").stdout
    for bad, message in (("[1,2]", "JSON object"), ("{nope", "not JSON")):
        result = p.cli("send", "planned", bad)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    code, reply = send(p, "planned", {"cmd": "read"}, "--id", "same")
    assert reply["status"] == "queued"
    code, again = send(p, "planned", {"cmd": "read"}, "--id", "same")      # the same send again: safe
    assert again["status"] == "queued" and again["id"] == "same"
    result = p.cli("send", "planned", '{"cmd":"led"}', "--id", "same")     # another command, same id
    assert result.returncode == 2 and "already used" in result.stderr


def test_command_protocol_answers_bad_requests() -> None:
    from workers.processes.commands import Commands
    from workers.core.config import from_dict

    import tempfile
    with tempfile.TemporaryDirectory() as data:
        worker = Commands(from_dict({"data_dir": data}))
        try:
            for raw, part in ((b"nope", "not JSON"), (b"[1]", "JSON object"), (b'{"op":"fly"}', "unknown op"),
                              (b'{"op":"send"}', '"device"'), (b'{"op":"send","device":"d"}', '"command"'),
                              (b'{"op":"send","device":"d","command":{},"ttl_s":-1}', '"ttl_s"'),
                              (b'{"op":"cancel","id":"x"}', "no command")):
                reply = worker.answer([b"client", b""], raw)
                assert reply is not None and reply["ok"] is False and part in reply["error"], (raw, reply)
        finally:
            worker.store.close()


class Router:
    """The commands worker's downlink ROUTER: EHOSTUNREACH until the edge's DEALER has connected."""

    def __init__(self) -> None:
        self.connected = False
        self.sent: list[list[bytes]] = []

    def send_multipart(self, parts: list, flags: int = 0) -> None:
        import zmq

        if not self.connected:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self.sent.append(parts)


def test_a_reply_waits_for_a_transport_that_is_still_connecting(tmp_path) -> None:
    from workers.processes.commands import REPLY_HOLD_S, Commands
    from workers.core.config import from_dict
    from workers.core.envelope import Downlink

    worker = Commands(from_dict({"data_dir": str(tmp_path)}))
    worker.downlink = socket_ = Router()  # type: ignore[assignment]
    try:
        worker.on_seen([], [], [Downlink("door-7", "text", 3, "10.0.0.7:5000", b'{"cmd":"heartD"}')])
        assert socket_.sent == [] and len(worker.held_replies) == 1
        socket_.connected = True
        worker.tick(time.monotonic())
        assert len(socket_.sent) == 1 and worker.held_replies == []
        worker.on_seen([], [], [Downlink("door-8", "text", 4, "10.0.0.8:5000", b'{"cmd":"heartD"}')])
        socket_.connected = False                                # (sent at once: not held)
        worker.on_seen([], [], [Downlink("door-9", "text", 5, "10.0.0.9:5000", b'{"cmd":"heartD"}')])
        worker.tick(time.monotonic() + REPLY_HOLD_S + 1)        # never connected in time: counted, dropped
        assert worker.held_replies == [] and worker.counters["replies_not_delivered"] == 1
    finally:
        worker.store.close()


def test_a_command_queued_while_its_transport_was_away_goes_once_it_connects(tmp_path) -> None:
    """Not at the device's next frame, which for an hourly board is an hour away."""
    from workers.core.config import from_dict
    from workers.core.envelope import Seen
    from workers.processes.commands import QUEUED, Commands

    worker = Commands(from_dict({"data_dir": str(tmp_path)}))
    worker.downlink = router = Router()  # type: ignore[assignment]
    worker.front = None
    try:
        worker.on_seen([Seen("door-7", time.time_ns(), "text", 3, "10.0.0.7:5000")], [], [])
        for n in (1, 2):
            assert worker.op_send({"device": "door-7", "id": f"c{n}", "command": {"cmd": "open"}}, [])["status"] == QUEUED
        worker.tick(time.monotonic())
        assert router.sent == [] and worker.counters["transport_away"] >= 3
        router.connected = True
        worker.tick(time.monotonic())
        ids = [orjson.loads(orjson.loads(parts[-1])["payload"])["id"] for parts in router.sent]
        assert ids == ["c1", "c2"]                              # both, in the order they were sent
        assert all(worker.open[c].inflight for c in ("c1", "c2")) and worker.transport_waits == set()
    finally:
        worker.store.close()


def test_heartbeat_is_answered_on_the_same_connection_and_not_stored(p: Pipeline) -> None:
    board = Device(p.text_port)
    try:
        before = time.time()
        board.send({"device": "door-7", "cmd": "heartU"})
        reply = board.line()
        assert reply["cmd"] == "heartD" and list(reply) == ["cmd", "time"]
        stamp = time.mktime(time.strptime(reply["time"], "%Y-%m-%d %H:%M:%S"))
        assert before - 2 <= stamp <= time.time() + 1
        board.send({"device": "door-7", "cmd": "verifiedRecordU", "data": [{"num": "1001", "verifiedCode": 0}]})
        wait_for(lambda: p.count_rows("events", "WHERE device = 'door-7'") == 1, message="door event")
    finally:
        board.close()
    db = p.db()
    assert [r[0] for r in db.execute("SELECT kind FROM events WHERE device = 'door-7'")] == ["verifiedRecordU"]
    db.close()

    def answered() -> int:
        workers = p.query({"op": "status"})["workers"]
        return sum(c.get("replies:replies[0]", 0) for w, c in workers.items() if w.startswith("parser"))

    wait_for(lambda: answered() == 1, message="the heartbeat counted")
    wait_for(lambda: p.query({"op": "status"})["workers"].get("commands", {}).get("replies_sent") == 1,
             message="the reply counted as sent")


def test_presence_online_offline_in_query_and_sqlite(p: Pipeline) -> None:
    p.send(b'{"device":"quiet","temp":1}\n{"device":"chatty","temp":2}\n')
    board = Device(p.text_port)
    try:
        board.send({"device": "hb-only", "cmd": "heartU"})          # a heartbeat alone makes it present
        board.line()

        def presence() -> dict[str, dict]:
            return {d["device"]: d for d in p.query({"op": "devices"})["devices"]}

        wait_for(lambda: {"quiet", "chatty", "hb-only"} <= presence().keys(), message="devices listed")
        now_ms = time.time() * 1000
        for name in ("chatty", "hb-only"):
            entry = presence()[name]
            assert entry["online"] is True and entry["via"] == "text" and entry["peer"].startswith("127.0.0.1:")
            assert now_ms - 10_000 < entry["last_seen"] <= now_ms + 1000
        # quiet's threshold is 1 s ([devices.quiet] offline_after_s)
        wait_for(lambda: presence()["quiet"]["online"] is False, message="quiet offline")
        assert presence()["chatty"]["online"] is True

        # stored: the devices table and the presence view
        def rows() -> dict:
            db = p.db()
            try:
                return {r[0]: r[1:] for r in db.execute("SELECT device, online, via, offline_after_s FROM presence")}
            finally:
                db.close()

        wait_for(lambda: {"quiet", "chatty", "hb-only"} <= rows().keys(), message="presence rows")
        got = rows()
        assert got["quiet"] == (0, "text", 1.0)
        assert got["chatty"] == (1, "text", 900.0)
        out = p.cli("devices")
        assert out.returncode == 0
        lines = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
        assert "offline" in lines["quiet"] and "online" in lines["chatty"]
    finally:
        board.close()

    # the query worker restores presence from SQLite after a restart
    p.stop("query:1")
    p.start("query")
    wait_for(lambda: p.query({"op": "ping"}, timeout=0.5).get("ok"), message="query back")
    wait_for(lambda: {d["device"]: d["via"] for d in p.query({"op": "devices"})["devices"]}.get("hb-only") == "text",
             message="presence restored")
