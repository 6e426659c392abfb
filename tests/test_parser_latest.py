"""What the parser publishes to the query worker: only what its latest values need of a batch."""
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.core.envelope import Reading
from workers.processes.parser import newest_per_field, newest_per_field_general
from workers.processes.query import LatestValues


def _latest(readings: list[Reading]) -> dict:
    values = LatestValues()
    assert values.apply_readings([list(r) for r in readings]) == 0
    return _state(values)


def _state(values: LatestValues) -> dict:
    """Every device's fields and newest timestamp, as the query worker answers them."""
    return {device: (values.fields(device), values.last_seen(device)) for device in values.newest}


def test_one_reading_per_device_is_passed_through_as_it_is() -> None:
    readings = [Reading("a", 1, {"t": 1.0}, {}), Reading("b", 2, {"t": 2.0}, {})]
    assert newest_per_field(readings) is readings


def test_a_board_with_many_readings_in_a_batch_costs_one() -> None:
    readings = [Reading("a", ts, {"t": float(ts), "h": 50.0}, {}) for ts in range(1, 21)]
    readings.append(Reading("b", 5, {"t": 9.0}, {}))
    kept = newest_per_field(readings)
    assert kept == [readings[19], readings[20]]
    assert _latest(kept) == _latest(readings)


def test_an_older_reading_stays_for_a_field_the_newer_ones_lack() -> None:
    readings = [Reading("a", 1, {"t": 1.0, "battery": 3.7}, {}), Reading("a", 3, {"t": 3.0}, {}),
                Reading("a", 2, {"h": 40.0}, {}), Reading("a", 0, {"t": 0.5}, {})]
    kept = newest_per_field(readings)
    assert sorted(r.ts for r in kept) == [1, 2, 3]
    assert _latest(kept) == _latest(readings)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 4),
                               st.sets(st.sampled_from(["t", "h", "v"]), min_size=1)), max_size=12))
def test_the_in_order_shortcut_keeps_what_the_general_grouping_keeps(rows: list) -> None:
    readings = [Reading(d, ts, {f: float(ts) for f in sorted(fields)}, {}) for d, ts, fields in rows]
    kept = newest_per_field(readings)
    assert kept == newest_per_field_general(readings)
    assert _latest(kept) == _latest(readings)


def test_of_equal_timestamps_the_later_wins_as_in_the_query_worker() -> None:
    readings = [Reading("a", 7, {"t": 1.0}, {}), Reading("a", 7, {"t": 2.0}, {})]
    kept = newest_per_field(readings)
    assert kept == [readings[1]]
    assert _latest(kept) == _latest(readings)


def _parser(tmp_path):
    from workers.core.config import from_dict
    from workers.processes.parser import Parser

    cfg = from_dict({"data_dir": str(tmp_path), "sinks": {"sqlite": {"enabled": True}},
                     "listeners": [{"name": "text", "bind": "127.0.0.1:7000"}],
                     "devices": {"napper": {"offline_after_s": 1}}})
    return Parser(cfg)


def test_presence_is_passed_on_when_new_moved_or_due_not_per_reading(tmp_path) -> None:
    from workers.core.envelope import Conn

    parser = _parser(tmp_path)
    first, second = Conn(1, "text", "10.0.0.7:5000"), Conn(2, "text", "10.0.0.7:5001")
    s = 1_000_000_000
    assert [e.device for e in parser.presence_news({"a": (10 * s, first), "b": (10 * s, first)})] == ["a", "b"]
    assert parser.presence_news({"a": (11 * s, first)}) == []                  # the same way, 1 s later
    moved = parser.presence_news({"a": (12 * s, second), "b": (12 * s, first)})
    assert [(e.device, e.conn_id, e.ts) for e in moved] == [("a", 2, 12 * s)]   # another connection: at once
    assert parser.presence_news({"b": (19 * s, first)}) == []
    assert [e.ts for e in parser.presence_news({"b": (20 * s, first)})] == [20 * s]   # 10 s on: told again
    assert parser.presence_news({"b": (15 * s, first)}) == []                 # an older frame sent again
    # a tenth of a device's own offline_after_s when that is shorter: 1 s -> 100 ms
    assert len(parser.presence_news({"napper": (10 * s, first)})) == 1
    assert parser.presence_news({"napper": (10 * s + s // 20, first)}) == []
    assert len(parser.presence_news({"napper": (10 * s + s // 5, first)})) == 1


def test_latest_values_are_the_same_whichever_order_and_path_readings_take() -> None:
    import random

    rng = random.Random(14)
    for _ in range(200):
        rows = [[rng.choice("ab"), rng.randint(-3, 6), {f: rng.random() for f in rng.sample("xyz", rng.randint(1, 3))},
                 {}] for _ in range(rng.randint(1, 12))]
        rule: dict = {}                 # the rule, field by field: the newest wins, of equal times the later
        for device, ts, fields, _ in rows:
            known, newest = rule.setdefault(device, ({}, ts))
            for field, value in fields.items():
                if field not in known or ts >= known[field][1]:
                    known[field] = (value, ts)
            rule[device] = (known, max(newest, ts))
        one_by_one = LatestValues()
        for device, ts, fields, _ in rows:
            for field, value in fields.items():
                one_by_one.update(device, field, value, ts)
        batched = LatestValues()
        cut = rng.randint(0, len(rows))
        batched.apply_readings(rows[:cut])
        batched.apply_readings(rows[cut:])
        assert _state(batched) == rule
        assert _state(one_by_one) == rule
