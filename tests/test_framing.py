"""Framing: byte streams cut into frames exactly, however they are split."""
from __future__ import annotations

import os
import random
import struct

import pytest

from workers.core.framing import AutoFramer, LineFramer, PacketFramer

OBJECTS = [b'{"temp":22.6,"humi":52}', b'{"s":"}{\\"","n":{"a":[1,{"b":2}]}}', b'{"x":"\\\\"}']


def feed_in_pieces(framer, data: bytes, sizes) -> tuple[list[bytes], list]:
    frames, rejects, pos = [], [], 0
    while pos < len(data):
        n = next(sizes)
        f, r = framer.feed(data[pos:pos + n])
        frames += f
        rejects += r
        pos += n
    f, r = framer.finish()
    return frames + f, rejects + r


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 4096])
def test_bare_json_back_to_back_any_split(chunk: int) -> None:
    data = b"".join(OBJECTS * 5)
    frames, rejects = feed_in_pieces(AutoFramer(1024), data, iter(lambda: chunk, None))
    assert frames == OBJECTS * 5 and rejects == []


def test_random_splits_lines_and_json() -> None:
    rng = random.Random(1)
    lines = [b"Soil: %d; temp: 22; from dev-%d" % (i, i % 3) for i in range(200)]
    data = b"\r\n".join(lines) + b"\r\n"
    for _ in range(20):
        frames, rejects = feed_in_pieces(AutoFramer(1024), data, iter(lambda: rng.randrange(1, 50), None))
        assert frames == lines and not rejects
        json_data = b"\n".join(OBJECTS * 10) + b"\n"
        frames, rejects = feed_in_pieces(AutoFramer(1024), json_data, iter(lambda: rng.randrange(1, 50), None))
        assert frames == OBJECTS * 10 and not rejects


def test_json_lines_switch_to_line_mode() -> None:
    framer = AutoFramer(1024)
    frames, _ = framer.feed(b'{"a":1}\n{"b":2}\n')
    assert frames == [b'{"a":1}', b'{"b":2}'] and framer.mode == "lines"


def test_json_lines_switch_to_line_mode_when_reads_end_mid_object() -> None:
    # A busy board's reads rarely end on an object boundary; the switch must not wait for one.
    framer = AutoFramer(1024)
    data = b"".join(b'{"device":"d","n":%d}\n' % i for i in range(50))
    frames, _ = framer.feed(data[:37])
    assert framer.mode == "lines"
    more, _ = framer.feed(data[37:])
    assert frames + more == [b'{"device":"d","n":%d}' % i for i in range(50)]


def test_json_lines_switch_to_line_mode_within_one_large_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # All of a board's backlog in one read: only its first object is scanned as a JSON stream.
    from workers.core import framing
    scanned = []
    original = framing.JsonStreamFramer._scan
    monkeypatch.setattr(framing.JsonStreamFramer, "_scan", lambda self, buf: scanned.append(1) or original(self, buf))
    framer = AutoFramer(1024)
    data = b"".join(b'{"device":"d","n":%d}\n' % i for i in range(300))
    frames, _ = framer.feed(data)
    assert framer.mode == "lines" and frames == [b'{"device":"d","n":%d}' % i for i in range(300)]
    assert len(scanned) == 1


def test_pretty_printed_objects_stay_json_stream() -> None:
    framer = AutoFramer(1024)
    data = b'{\n  "a": 1\n}\n{\n  "b": 2\n}\n{\n  "c": 3\n}\n'
    frames, rejects = feed_in_pieces(framer, data, iter(lambda: 5, None))
    assert frames == [b'{\n  "a": 1\n}', b'{\n  "b": 2\n}', b'{\n  "c": 3\n}'] and rejects == []
    assert framer.mode == "json-stream"


def test_last_line_without_newline_is_a_frame_at_hangup() -> None:
    framer = AutoFramer(1024)
    assert framer.feed(b"temp: 22") == ([], [])
    assert framer.finish() == ([b"temp: 22"], [])


def test_oversized_line_rejected_and_skipped() -> None:
    framer = LineFramer(16)
    frames, rejects = framer.feed(b"a: 1\n" + b"x" * 40)
    assert frames == [b"a: 1"] and len(rejects) == 1 and "longer than 16" in rejects[0][0]
    frames, rejects = framer.feed(b"yyyy\nb: 2\n")      # the rest of the oversized line is skipped
    assert frames == [b"b: 2"] and rejects == []


def test_oversized_bare_json_is_refused_and_skipped_with_bounded_memory() -> None:
    framer = AutoFramer(32)
    frames, rejects = framer.feed(b'{"a":"' + b"x" * 100)
    assert frames == [] and rejects == [] and not framer.fatal
    for _ in range(100):                                    # the object goes on; the framer keeps none of it
        framer.feed(b"x" * 1000)
    assert len(framer.inner.buffer) <= 32
    frames, rejects = framer.feed(b'"}{"b":2}')
    assert frames == [b'{"b":2}'] and rejects == [("JSON object longer than 32 bytes", b'{"a":"' + b"x" * 26)]


def test_bare_json_over_the_limit_is_refused_whatever_the_read_size() -> None:
    big = b'{"a":"' + b"x" * 40 + b'"}'
    for chunk in (1, 7, 40, len(big), 1000):
        frames, rejects = feed_in_pieces(AutoFramer(32), big + b'{"b":2}', iter(lambda: chunk, None))
        assert frames == [b'{"b":2}'] and [r[0] for r in rejects] == ["JSON object longer than 32 bytes"], chunk


@pytest.mark.parametrize("cut", [None, -1, -2])
def test_line_at_the_limit_is_accepted_however_cr_and_lf_arrive(cut) -> None:
    line = b"t: " + b"1" * 13                               # exactly 16 bytes
    data = line + b"\r\n" + b"x" * 17 + b"\r\n"
    framer = LineFramer(16)
    pieces = [data] if cut is None else [data[:len(line) + 2 + cut], data[len(line) + 2 + cut:]]
    frames, rejects = [], []
    for piece in pieces:
        f, r = framer.feed(piece)
        frames, rejects = frames + f, rejects + r
    assert frames == [line] and [r[0] for r in rejects] == ["frame longer than 16 bytes"]


def test_garbage_between_json_objects_is_rejected_not_lost() -> None:
    framer = AutoFramer(1024)
    frames, rejects = framer.feed(b'{"a":1}garbage{"b":2}')
    assert frames == [b'{"a":1}', b'{"b":2}'] and rejects == [("not a JSON object", b"garbage")]


def test_invalid_utf8_and_random_bytes_never_raise() -> None:
    for seed in range(50):
        rng = random.Random(seed)
        framer = AutoFramer(256)
        data = bytes(rng.randrange(256) for _ in range(2000))
        if seed % 2:
            data = b"{" + data
        pos = 0
        while pos < len(data) and not framer.fatal:
            n = rng.randrange(1, 100)
            framer.feed(data[pos:pos + n])
            pos += n
        framer.finish()


def packet(records: int, per: int = 6, number: int = 1) -> bytes:
    data = os.urandom(per * records)
    return struct.pack("<HHHBBB", len(data), 600, 60, per, number, records) + data


@pytest.mark.parametrize("chunk", [1, 5, 9, 10, 1000])
def test_packets_any_split(chunk: int) -> None:
    packets = [packet(1), packet(3), packet(40)]
    frames, rejects = feed_in_pieces(PacketFramer(4096), b"".join(packets), iter(lambda: chunk, None))
    assert frames == packets and rejects == []


def test_packet_header_inconsistent_is_fatal() -> None:
    framer = PacketFramer(4096)
    frames, rejects = framer.feed(struct.pack("<HHHBBB", 12, 600, 60, 6, 1, 3) + b"\0" * 12)
    assert frames == [] and framer.fatal and "do not make" in rejects[0][0]


def test_packet_over_limit_is_fatal() -> None:
    framer = PacketFramer(100)
    framer.feed(struct.pack("<HHHBBB", 600, 600, 60, 6, 1, 100))
    assert framer.fatal and "limit" in framer.fatal
