"""Golden cases: tests/golden/<decoder>/<case>/input is decoded into expected.json (Telegraf's testcases).

Every case is decoded with tests/golden/config.toml, the fallback device "peer" and the arrival time
1732260000123 ms. A case whose input must be rejected has ``{"error": "<part of the reason>"}``.
A case without its expected.json fails. Write expected files (for a new case, or after a deliberate
change) only on request: ``pytest tests/test_decoders.py --update-golden``; then read each one and keep it.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.core import envelope
from workers.core.config import from_dict
from workers.core.envelope import Event, Reading
from workers.decoders import REGISTRY, Context, DecodeError

GOLDEN = Path(__file__).parent / "golden"
CONFIG = from_dict({**tomllib.loads((GOLDEN / "config.toml").read_text()), "sinks": {"sqlite": {"enabled": True}}})
RECV_TS = 1732260000123 * 1_000_000
CASES = sorted(p for p in GOLDEN.glob("*/*") if p.is_dir())


def run(case: Path) -> object:
    if not (case / "input").is_file():
        pytest.fail(f"{case.relative_to(GOLDEN.parent.parent)} has no input file", pytrace=False)
    decoder = REGISTRY[case.parent.name]
    try:
        items = decoder((case / "input").read_bytes(), Context("peer", RECV_TS, CONFIG))
    except DecodeError as exc:
        return {"error": exc.reason}
    return [{"reading" if type(i).__name__ == "Reading" else "event": list(i)} for i in items]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_golden(case: Path, request: pytest.FixtureRequest) -> None:
    got = run(case)
    expected_path = case / "expected.json"
    if request.config.getoption("--update-golden"):
        expected_path.write_bytes(orjson.dumps(got, option=orjson.OPT_INDENT_2) + b"\n")
    if not expected_path.exists():
        pytest.fail(f"{expected_path.relative_to(GOLDEN.parent.parent)} is missing: write it with pytest "
                    "tests/test_decoders.py --update-golden, read it, keep it", pytrace=False)
    expected = orjson.loads(expected_path.read_bytes())
    if isinstance(expected, dict) and "error" in expected:
        assert isinstance(got, dict), f"expected a rejection, got {got}"
        assert expected["error"] in got["error"]
    else:
        assert _close(got, expected), f"{got} != {expected}"


def _close(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def test_every_decoder_has_golden_cases() -> None:
    assert {c.parent.name for c in CASES} == set(REGISTRY)


def test_decoders_never_raise_anything_but_decode_error() -> None:
    import random
    rng = random.Random(7)
    for name, decoder in REGISTRY.items():
        for _ in range(2000):
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            if rng.random() < 0.3:
                frame = b"{" + frame
            try:
                decoder(frame, Context("peer", RECV_TS, CONFIG))
            except DecodeError:
                pass


# --------------------------------------------------------------------------- the parser around them


class Captured:
    """A PUSH/PUB socket stand-in that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, parts: list, *args: object, **kwargs: object) -> None:
        self.sent.append([bytes(p) for p in parts])


def test_a_value_the_envelope_cannot_carry_costs_only_its_own_frame(tmp_path: Path, monkeypatch) -> None:
    from workers.core import envelope
    from workers.core.envelope import Reading
    from workers.processes.parser import Parser

    def decode(frame: bytes, ctx: Context) -> list:      # a decoder that lets an integer beyond 64 bits through
        return [Reading(frame.decode(), ctx.recv_ts, {"n": 2 ** 70 if frame == b"big" else 1}, {})]

    monkeypatch.setitem(REGISTRY, "lenient", decode)
    cfg = from_dict({"data_dir": str(tmp_path), "sinks": {"sqlite": {"enabled": True}},
                     "listeners": [{"name": "text", "bind": "127.0.0.1:7000", "decoder": "lenient"}]})
    parser = Parser(cfg)
    sink, live = Captured(), Captured()
    conn = envelope.Conn(1, "text", "10.0.0.7:5000")
    body = envelope.pack_frames([(b"a", RECV_TS, 0), (b"big", RECV_TS, 0), (b"c", RECV_TS, 0)])
    parser.handle(envelope.frames_message(7, [conn], body), {"sqlite": sink}, live)  # type: ignore[dict-item]
    (message,) = sink.sent
    seqs, readings, _ = envelope.parse_readings(message[1], message[2])
    assert seqs == [7] and [r.device for r in readings] == ["a", "c"]
    (letter,) = parser.deadletters.list()
    assert letter.raw == b"big" and "outside the 64-bit signed integers" in letter.reason
    assert parser.counters["unstorable_frames"] == 1
    parser.deadletters.close()


scalars = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2 ** 63), 2 ** 64 - 1),
                    st.booleans(), st.text(max_size=8), st.none(), st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.floats(allow_nan=False), max_size=2))


@given(members=st.dictionaries(st.sampled_from(["temp", "humi", "rssi", "device", "id", "ts", "time", "Value",
                                                "x y", "=", ""]), scalars, max_size=6))
@settings(max_examples=300, deadline=None)
def test_the_json_short_path_gives_what_the_general_path_gives(members: dict) -> None:
    """A flat object of numbers or text becomes its reading without a loop per member; whatever the
    members, the result (or the error) is the general path's, member order included."""
    from workers.decoders import json as json_decoder

    frame = orjson.dumps(members)
    ctx = Context("peer", RECV_TS, CONFIG)

    def general(obj: dict) -> object:
        # the general path alone: what decode gave before the short path existed
        saved = json_decoder._NUMBERS, json_decoder._TEXT_AND_INTEGERS
        json_decoder._NUMBERS = json_decoder._TEXT_AND_INTEGERS = frozenset()
        try:
            return json_decoder.decode(frame, ctx)
        except DecodeError as exc:
            return exc.reason
        finally:
            json_decoder._NUMBERS, json_decoder._TEXT_AND_INTEGERS = saved

    try:
        got: object = json_decoder.decode(frame, ctx)
    except DecodeError as exc:
        got = exc.reason
    expected = general(members)
    assert got == expected
    if isinstance(got, list):
        assert [type(i) for i in got] == [type(i) for i in expected]
        assert [list(i.fields) for i in got if isinstance(i, Reading)] == \
               [list(i.fields) for i in expected if isinstance(i, Reading)]


def test_a_readings_message_with_a_row_of_the_wrong_length_is_refused() -> None:
    header = envelope.readings_message([3], b"")[1]
    good = orjson.dumps([[["d1", 1, {"t": 1.5}, {}]], [["d1", 1, "door", {}]]])
    seqs, readings, events = envelope.parse_readings(header, good)
    assert seqs == [3] and readings == [Reading("d1", 1, {"t": 1.5}, {})] and type(readings[0]) is Reading
    assert events == [Event("d1", 1, "door", {})] and type(events[0]) is Event
    for body in (b'[[["d1", 1, {"t": 1.5}]], []]', b'[[], [["d1", 1, "door", {}, 5]]]', b'[[5], []]'):
        with pytest.raises(envelope.EnvelopeError):
            envelope.parse_readings(header, body)


def test_the_flat_reader_takes_only_what_every_store_keeps() -> None:
    """``flat_reader`` (the parser's fast path) gives None for what ``storable.problem`` would refuse."""
    from workers.core import storable
    from workers.decoders.json import JsonOptions, flat_reader

    read = flat_reader(JsonOptions())
    good = read(orjson.loads(b'{"device":"d1","ts":1732260000,"t":21.5,"n":3}'), "peer", 5, 40)
    assert good == Reading("d1", 1_732_260_000_000_000_000, {"t": 21.5, "n": 3}, {})
    assert storable.problem(good) is None
    assert read(orjson.loads(b'{"t":21.5}'), "", 5, 10) is None                     # no device at all
    assert read(orjson.loads(b'{"device":"d\\u0001","t":1}'), "peer", 5, 20) is None
    assert read(orjson.loads(b'{"device":"d1","t":9223372036854775808}'), "peer", 5, 40) is None
    assert read(orjson.loads(b'{"device":"d1","t":1,"s":"x"}'), "peer", 5, 30) is None   # text beside an integer
    assert read(orjson.loads(b'{"device":"d1","t":null}'), "peer", 5, 30) is None
    assert read(orjson.loads(b'{"device":"d1","cmd":"heartU"}'), "peer", 5, 30) is None
    assert read(orjson.loads(b'{"device":"d1","ts":99999999999999999999,"t":1}'), "peer", 5, 50) is None
