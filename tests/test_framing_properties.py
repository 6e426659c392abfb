"""Property tests over the framers: limits hold by rule, not by how TCP happened to cut the stream.

For any input and any way of cutting it into reads, the frames and rejects are those of one single
read, and every byte fed ends up in a frame, in a counted reject (``rejected_bytes``), or is a
delimiter or whitespace between frames.
"""
from __future__ import annotations

import json
import struct

from hypothesis import given, settings, strategies as st

from workers.core.framing import AutoFramer, LineFramer, PacketFramer

MAX = 32

settings.register_profile("framers", max_examples=int(__import__("os").environ.get("FRAMER_EXAMPLES", "300")), deadline=None)
settings.load_profile("framers")


def feed(framer, data: bytes, cuts: list[int]) -> tuple[list[bytes], list[tuple[str, bytes]], int]:
    """Feed ``data`` cut at ``cuts``; stop at a fatal error as the edge does (it closes the connection)."""
    frames: list[bytes] = []
    rejects: list[tuple[str, bytes]] = []
    fed = 0
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(bounds, bounds[1:]):
        f, r = framer.feed(data[start:end])
        frames += f
        rejects += r
        fed = end
        if framer.fatal:
            return frames, rejects, fed
    f, r = framer.finish()
    return frames + f, rejects + r, fed


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=40)


# --------------------------------------------------------------------------- any bytes


@given(data=st.binary(max_size=400), cuts=cuts,
       make=st.sampled_from([AutoFramer, LineFramer]))
def test_any_bytes_any_cuts_give_the_frames_of_one_read(data: bytes, cuts: list[int], make) -> None:
    whole = make(MAX)
    expected = feed(whole, data, [])
    cut = make(MAX)
    assert feed(cut, data, cuts) == expected
    assert cut.rejected_bytes == whole.rejected_bytes


texty = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")) | st.sampled_from(
    [b"", b" ", b"\r", b"x" * MAX, b"x" * (MAX - 1) + b"\r", b"x" * (MAX + 1), b"{", b"}", b'"', b"\\"])
lines = st.lists(st.tuples(texty, st.sampled_from([b"\n", b"\r\n"])), max_size=30)


@given(lines=lines, tail=texty, cuts=cuts)
def test_lines_every_byte_is_a_frame_a_counted_reject_or_a_delimiter(lines, tail: bytes, cuts) -> None:
    data = b"".join(body + end for body, end in lines) + tail
    framer = LineFramer(MAX)
    frames, rejects, _ = feed(framer, data, cuts)
    expected_frames, rejected, ignored = [], 0, 0
    for piece in data.split(b"\n")[:-1]:                 # what the rule says, line by line
        body = piece[:-1] if piece.endswith(b"\r") else piece
        if len(body) > MAX:
            rejected += len(piece)
        elif body.strip():
            expected_frames.append(body)
            ignored += len(piece) - len(body)
        else:
            ignored += len(piece)
    last = data.split(b"\n")[-1]
    if len(last.rstrip(b"\r")) > MAX and len(last) > MAX:
        rejected += len(last)
    elif last.rstrip(b"\r").strip():
        expected_frames.append(last.rstrip(b"\r"))
        ignored += len(last) - len(last.rstrip(b"\r"))
    else:
        ignored += len(last)
    ignored += data.count(b"\n")
    assert frames == expected_frames
    assert framer.rejected_bytes == rejected and len(rejects) >= (1 if rejected else 0)
    assert sum(map(len, frames)) + framer.rejected_bytes + ignored == len(data)
    assert all(len(raw) <= MAX for _, raw in rejects)


@given(before=lines, tail=texty, read=st.binary(max_size=MAX + 4) | lines.map(
    lambda ls: b"".join(body + end for body, end in ls)))
def test_whole_lines_cuts_what_feed_cuts(before, tail: bytes, read: bytes) -> None:
    """The edge's short path for a read (``whole_lines``) is the general one's frames whenever it
    answers, after any earlier reads (held bytes, a line being skipped), and leaves the framer as
    ``feed`` does."""
    earlier = b"".join(body + end for body, end in before) + tail
    short, general = LineFramer(MAX), LineFramer(MAX)
    short.feed(earlier)
    general.feed(earlier)
    frames = short.whole_lines(read)
    expected, rejects = general.feed(read)
    if frames is None:
        return                                   # the edge feeds it: nothing to compare
    assert frames == expected and rejects == []
    assert short.buffer == general.buffer == b"" and short.skipping == general.skipping
    assert short.rejected_bytes == general.rejected_bytes
    assert feed(short, b"next\n", []) == feed(general, b"next\n", [])


def test_whole_lines_answers_a_boards_reads() -> None:
    framer = LineFramer(MAX)
    assert framer.whole_lines(b'{"t":1}\n') == [b'{"t":1}']
    assert framer.whole_lines(b'{"t":1}\r\n') == [b'{"t":1}']
    assert framer.whole_lines(b'{"t":1}\n{"t":2}\n') == [b'{"t":1}', b'{"t":2}']
    assert framer.whole_lines(b"\n") == []
    assert framer.whole_lines(b'{"t":1}') is None                      # a partial line: feed holds it
    assert framer.whole_lines(b"x" * (MAX + 1) + b"\n") is None         # over the limit: feed rejects it


# --------------------------------------------------------------------------- bare JSON objects

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='{}"\\ab\u00e9', max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("ab{}", max_size=3), inner, max_size=3),
    max_leaves=8)
objects = st.dictionaries(st.text("abc}{\"", max_size=4), json_values, max_size=4).map(
    lambda d: json.dumps(d).encode())
garbage = st.text(alphabet="xyz}\"\\:0", min_size=1, max_size=60).map(str.encode)
stream = st.lists(st.one_of(objects.map(lambda o: ("object", o)), garbage.map(lambda g: ("garbage", g)),
                            st.sampled_from([b" ", b"\t", b"  "]).map(lambda w: ("space", w))),
                  max_size=25)


@given(tokens=stream, cuts=cuts)
def test_bare_json_objects_over_the_limit_are_refused_whatever_the_reads(tokens, cuts) -> None:
    data = b'{"first":1}' + b"".join(t for _, t in tokens)   # starts as a JSON stream, no newline: stays one
    framer = AutoFramer(MAX)
    frames, rejects, _ = feed(framer, data, cuts)
    expected, reasons, rejected, spaces = [b'{"first":1}'], [], 0, 0
    run = None                      # a garbage run goes on up to the next object
    run_spaces = 0                  # whitespace at the end of the run: not garbage if the device hangs up there
    for kind, token in tokens:
        if kind == "object":
            if run is not None:
                reasons.append("not a JSON object")
                rejected += run
                run = None
            if len(token) > MAX:
                reasons.append(f"JSON object longer than {MAX} bytes")
                rejected += len(token)
            else:
                expected.append(token)
        elif kind == "garbage":
            run = (run or 0) + run_spaces + len(token)
            run_spaces = 0
        elif run is not None:
            run_spaces += len(token)
        else:
            spaces += len(token)
        if kind == "object":
            rejected += run_spaces
            run_spaces = 0
    if run is not None and run + run_spaces > MAX:     # skipped as it came: its whitespace went with it
        rejected += run_spaces
    else:
        spaces += run_spaces
    if run is not None:
        reasons.append("not a JSON object")
        rejected += run
    assert frames == expected
    assert [reason for reason, _ in rejects] == reasons
    assert framer.rejected_bytes == rejected
    assert sum(map(len, frames)) + framer.rejected_bytes + spaces == len(data)
    assert all(len(raw) <= MAX for _, raw in rejects)


# --------------------------------------------------------------------------- binary packets


def packet(records: int, per: int, payload: bytes) -> bytes:
    body = (payload * (per * records))[:per * records] if payload else b"\0" * (per * records)
    return struct.pack("<HHHBBB", per * records, 600, 60, per, 1, records) + body


packets = st.builds(packet, st.integers(0, 8), st.integers(1, 6), st.binary(max_size=8))
bad_header = st.builds(lambda n, per, count: struct.pack("<HHHBBB", n, 600, 60, per, 1, count),
                       st.integers(0, 2000), st.integers(0, 255), st.integers(0, 255)).filter(
    lambda h: struct.unpack("<HHHBBB", h)[0] != h[6] * h[8] or struct.unpack("<HHHBBB", h)[0] > 64)


@given(good=st.lists(packets, max_size=8), bad=st.none() | bad_header, trail=st.binary(max_size=40), cuts=cuts)
def test_packets_any_cuts_and_every_byte_accounted(good: list[bytes], bad, trail: bytes, cuts) -> None:
    data = b"".join(good) + (bad + trail if bad is not None else b"")
    framer = PacketFramer(64)
    frames, rejects, fed = feed(framer, data, cuts)
    expected = [p for p in good]
    assert frames[:len(expected)] == [p for p in expected if len(p) - 9 <= 64][:len(frames)]
    whole = feed(PacketFramer(64), data, [])
    assert (frames, rejects) == whole[:2]
    assert sum(map(len, frames)) + framer.rejected_bytes == fed
    if bad is not None:
        assert rejects and rejects[-1][1] == bad
