"""What the parser publishes to the query worker: only what its latest values need of a batch."""
from workers.core.envelope import Reading
from workers.processes.parser import newest_per_field
from workers.processes.query import LatestValues


def _latest(readings: list[Reading]) -> tuple[dict, dict]:
    values = LatestValues()
    values.apply_readings([tuple(r) for r in readings])
    return values.devices, values.last_seen


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


def test_of_equal_timestamps_the_later_wins_as_in_the_query_worker() -> None:
    readings = [Reading("a", 7, {"t": 1.0}, {}), Reading("a", 7, {"t": 2.0}, {})]
    kept = newest_per_field(readings)
    assert kept == [readings[1]]
    assert _latest(kept) == _latest(readings)
