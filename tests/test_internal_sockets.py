"""The internal ZeroMQ sockets against strangers and bad peers (issue 12, item 7): only processes that
hold the pipeline secret connect, a message over a socket's size bound is refused by ZeroMQ, and a
malformed message on the live socket is counted and ignored. Good devices stream beside each case."""
from __future__ import annotations

import stat
import time

import orjson
import zmq

from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for
from tests.test_commands import Device, send
from tests.test_hostile_edge import GoodDevices
from workers.core import config as config_mod
from workers.core import envelope, runtime
from workers.processes.query import LatestValues


def status_workers(p: Pipeline) -> dict:
    return p.query({"op": "status"})["workers"]


def test_secret_is_private_and_a_stranger_cannot_take_the_edges_routing_id(pipeline_factory) -> None:
    p = pipeline_factory()
    p.start_all(COMMAND_ROLES)
    secret_file = p.data / runtime.SECRET_FILE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    downlink = config_mod.load(str(p.config_path)).endpoints.downlink
    ctx = zmq.Context()
    strangers = []
    try:
        for password in (None, b"a guess"):      # no credentials; the wrong secret
            stranger = ctx.socket(zmq.DEALER)
            stranger.linger = 0
            stranger.setsockopt(zmq.ROUTING_ID, b"edge")      # ROUTER_HANDOVER would give it the edge's place
            if password is not None:
                stranger.plain_username, stranger.plain_password = b"sensorpipe", password
            stranger.connect(downlink)
            strangers.append(stranger)
        wait_for(lambda: any(w.get("refused_peers") for w in status_workers(p).values()),
                 message="the wrong secret refused and counted")
        with GoodDevices(p) as good:
            board = Device(p.text_port)
            try:
                board.send({"device": "relay-9", "temp": 20.5})
                wait_for(lambda: p.latest("relay-9"), message="relay-9 reading")
                code, reply = send(p, "relay-9", {"cmd": "relay", "on": True}, "--id", "c1")
                assert code == 0 and reply["status"] == "delivered", reply
                assert board.line() == {"id": "c1", "cmd": "relay", "on": True}
            finally:
                board.close()
            assert not any(s.poll(200) for s in strangers), "a stranger received a command"
        good.check()
    finally:
        for stranger in strangers:
            stranger.close()
        ctx.term()


def test_a_message_over_the_bound_is_refused_by_zeromq_before_the_worker(pipeline: Pipeline) -> None:
    ctx = zmq.Context()
    try:
        with GoodDevices(pipeline) as good:
            before = pipeline.query({"op": "status"})["workers"]["query"]["requests"]
            huge = ctx.socket(zmq.REQ)
            huge.linger = 0
            huge.plain_username, huge.plain_password = b"sensorpipe", pipeline.secret
            huge.connect(pipeline.query_endpoint)
            huge.send(b'{"op":"ping","pad":"' + b"x" * (4 * runtime.CONTROL_MESSAGE_BYTES) + b'"}')
            assert not huge.poll(1500), "a 4 MiB request was answered"
            huge.close()
            after = pipeline.query({"op": "status"})["workers"]["query"]["requests"]
            assert after == before + 1                 # only the status request itself reached the worker
            big = pipeline.query({"op": "ping", "pad": "x" * 100_000})      # under ZeroMQ's bound: a clear error
            assert big == {"ok": False, "code": "bad_request", "error": "request larger than 65536 bytes"}
        good.check()
    finally:
        ctx.term()


def test_malformed_live_messages_are_counted_and_ignored(pipeline: Pipeline) -> None:
    live_endpoint = config_mod.load(str(pipeline.config_path)).endpoints.live
    ctx = zmq.Context()
    runtime.use_secret(pipeline.secret)
    pub = runtime.socket(ctx, zmq.PUB, connect=live_endpoint)
    runtime.use_secret(None)
    bad = [
        [envelope.READINGS, b'{"seqs":[]}', b'[[5, ["d", "x", {}, {}], ["d", 1, "no", {}], ["d", 1, {"f": [1]}, {}]], []]'],
        [envelope.READINGS, b'{"seqs":[]}', b'[7, []]'],
        [envelope.READINGS, b"not json", b""],
        [envelope.READINGS],
        [envelope.STATS, b"edge", b"[1, 2]"],
        [envelope.STATS, b"\xff", b"{}"],
    ]
    try:
        with GoodDevices(pipeline) as good:
            def counted() -> bool:
                for message in bad:
                    pub.send_multipart(message)
                counters = status_workers(pipeline)["query"]
                return counters.get("bad_live_readings", 0) >= 4 and counters.get("bad_live_messages", 0) >= 5
            wait_for(counted, message="bad live messages counted")
            # a row like the good ones still goes in, and status is whole
            pub.send_multipart(envelope.readings_message([], orjson.dumps([[["probe", time.time_ns(), {"v": 1}, {}]], []])))
            wait_for(lambda: pipeline.latest("probe") == {"v": 1} or pub.send_multipart(envelope.readings_message(
                [], orjson.dumps([[["probe", time.time_ns(), {"v": 1}, {}]], []]))), message="a good live message")
            assert "edge" in status_workers(pipeline)
            assert pipeline.latest(good.device)
        good.check()
    finally:
        pub.close()
        ctx.term()


def test_latest_values_skip_malformed_rows_without_spoiling_good_ones() -> None:
    latest = LatestValues()
    bad = latest.apply_readings([["d", 5, {"t": 1}, {}], ["d", "6", {"t": 2}, {}], ["d", True, {"t": 3}, {}],
                                 [1, 2], "row", ["d", 7, {"t": {"x": 1}}, {}], ["d", 8, {"t": 4}, {}]])
    assert bad == 5
    assert latest.fields("d") == {"t": (4, 8)}
    assert latest.apply_readings({"not": "a list"}) == 1
