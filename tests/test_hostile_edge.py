"""Hostile and unlucky devices at the edge (issue 12): each case is sent while good devices stream
beside it, and the good devices lose nothing."""
from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Callable

import pytest

from tests.pipeline import Pipeline, wait_for


def balcony_packet(light: int) -> bytes:
    return struct.pack("<HHHBBB", 6, 600, 60, 6, 1, 1) + struct.pack("<HHH", light, 30000, 25000)


class GoodDevices:
    """A text device streaming JSON lines and a battery board sending one packet at a time (waiting
    for each A), in a thread, until stopped. ``check`` proves every reading they sent was stored."""

    def __init__(self, pipeline: Pipeline, name: str = "good") -> None:
        self.pipeline = pipeline
        self.device = name
        self.lines = 0
        self.packets = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GoodDevices":
        self._thread.start()
        wait_for(lambda: self.lines >= 5 and self.packets >= 1, message="good devices streaming")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            text = socket.create_connection(("127.0.0.1", self.pipeline.text_port), timeout=5)
            try:
                while not self._stop.is_set():
                    text.sendall(b'{"device":"%s","n":%d}\n' % (self.device.encode(), self.lines))
                    self.lines += 1
                    if self.lines % 10 == 0:        # one packet per 10 lines, each on its own connection
                        self._packet()
                    self._stop.wait(0.005)
            finally:
                text.close()
        except BaseException as exc:            # reported by check(), not lost in the thread
            self.errors.append(exc)

    def _packet(self) -> None:
        with socket.create_connection(("127.0.0.1", self.pipeline.binary_port), timeout=5) as board:
            board.sendall(balcony_packet(self.packets))
            assert board.recv(1) == b"A", "a good board got no A"
            self.packets += 1

    def check(self) -> None:
        assert not self.errors, self.errors
        p = self.pipeline
        wait_for(lambda: p.count_rows("readings", "WHERE device = ?", (self.device,)) == self.lines,
                 message=f"all {self.lines} lines of {self.device}")
        wait_for(lambda: p.count_rows("readings", "WHERE device = 'balcony' AND field = 'light'") == self.packets,
                 message=f"all {self.packets} packets of the balcony board")


def edge_counters(p: Pipeline) -> dict:
    return p.query({"op": "status"})["workers"].get("edge", {})


def counter_reaches(p: Pipeline, name: str, value: int = 1) -> Callable[[], bool]:
    return lambda: edge_counters(p).get(name, 0) >= value


def test_binary_board_that_half_closes_right_after_sending_gets_its_a(pipeline: Pipeline) -> None:
    with GoodDevices(pipeline) as good:
        for i in range(10):
            with socket.create_connection(("127.0.0.1", pipeline.binary_port), timeout=5) as board:
                board.sendall(struct.pack("<HHHBBB", 6, 600, 60, 6, 7, 1) + struct.pack("<HHH", i, 0, 0))
                board.shutdown(socket.SHUT_WR)          # the board is done talking; it still listens
                assert board.recv(1) == b"A", f"packet {i}: no A after a half-close"
                assert board.recv(1) == b""             # then the edge closes
    good.check()
    # device number 7 has no layout: each packet is one dead letter, kept once (no board sent one again)
    wait_for(lambda: pipeline.cli("deadletters", "--limit", "100").stdout.count("no record layout for device number 7")
             == 10, message="ten dead letters for device 7")


def test_bad_header_behind_a_good_packet_answers_the_good_one_first(pipeline: Pipeline) -> None:
    bad = struct.pack("<HHHBBB", 12, 600, 60, 6, 1, 3) + b"\0" * 12        # 3 x 6 != 12
    with GoodDevices(pipeline) as good:
        with socket.create_connection(("127.0.0.1", pipeline.binary_port), timeout=5) as board:
            board.sendall(balcony_packet(60000) + bad)
            assert board.recv(1) == b"A"
            assert board.recv(1) == b""               # closed for the fatal header, after the A
    good.packets += 1                                 # the good packet in front of the bad header counts
    good.check()
    wait_for(counter_reaches(pipeline, "closed_fatal"), message="closed_fatal counted")


def test_one_byte_every_few_seconds_does_not_hold_a_connection(pipeline_factory) -> None:
    p = pipeline_factory(idle_timeout=1.2)
    p.start_all()
    with GoodDevices(p) as good:
        slow = socket.create_connection(("127.0.0.1", p.text_port), timeout=5)
        started = time.monotonic()
        try:
            def closed_by_edge() -> bool:
                try:
                    slow.sendall(b"x")                # a line that never ends, a byte at a time
                    return False
                except OSError:
                    return True
            wait_for(closed_by_edge, timeout=8, interval=0.25, message="the slow sender closed")
        finally:
            slow.close()
        assert time.monotonic() - started < 6
    good.check()
    counters = wait_for(lambda: (c := edge_counters(p)).get("closed_idle") and c, message="closed_idle")
    assert counters["dropped_partial_bytes"] >= 1


def test_partial_frames_of_many_connections_are_capped(pipeline_factory) -> None:
    p = pipeline_factory(edge="max_partial_bytes = 262144")
    p.start_all()
    with GoodDevices(p) as good:
        crowd = [socket.create_connection(("127.0.0.1", p.text_port), timeout=5) for _ in range(40)]
        try:
            for sock in crowd:
                sock.sendall(b"y" * 16384)            # 40 x 16 KiB of lines that never end: 640 KiB
            counters = wait_for(lambda: (c := edge_counters(p)).get("closed_memory", 0) >= 20 and c,
                                message="the stalest holders closed")
            assert counters["partial_bytes"] <= 262144
        finally:
            for sock in crowd:
                sock.close()
    good.check()


def test_bare_json_over_the_limit_is_refused_in_one_read_or_many(pipeline_factory) -> None:
    p = pipeline_factory(max_frame=4096)
    p.start_all()
    big = b'{"device":"big","blob":"' + b"z" * 6000 + b'"}'
    with GoodDevices(p) as good:
        for pieces in ([big], [big[i:i + 1000] for i in range(0, len(big), 1000)]):
            with socket.create_connection(("127.0.0.1", p.text_port), timeout=5) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for piece in pieces:
                    sock.sendall(piece)
                sock.sendall(b'{"device":"after-big-%d","n":1}' % len(pieces))   # the stream goes on after it
        wait_for(lambda: p.count_rows("readings", "WHERE device LIKE 'after-big-%'") == 2, message="objects after")
    good.check()
    assert p.count_rows("readings", "WHERE device = 'big'") == 0
    out = wait_for(lambda: (r := p.cli("deadletters", "--limit", "100").stdout).count("longer than 4096") >= 2 and r,
                   message="two dead letters")
    assert out
