"""The rollup worker's window store alone (workers.core.rollupstore), no sockets: the window arithmetic
with explicit times (hand-computed values), late and out-of-order readings, redelivery, restart of the
state, bounds and pruning."""
from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

from workers.core.envelope import Reading, Stats
from workers.core.rollupstore import NS, RollupStore
from workers.core.runtime import Counters

UTC = timezone.utc


def at(hh: int, mm: int, ss: float = 0, day: int = 22) -> int:
    """2024-11-<day> hh:mm:ss UTC in ns."""
    whole = int(ss)
    base = datetime(2024, 11, day, hh, mm, whole, tzinfo=UTC)
    return int(base.timestamp()) * NS + round((ss - whole) * 1000) * 1_000_000


def reading(ts: int, device: str = "g1", **fields) -> Reading:
    return Reading(device, ts, fields, {})


def store(tmp_path: Path, sizes=(60, 3600), grace_s=30.0, correct_for_s=6 * 3600.0) -> RollupStore:
    return RollupStore(tmp_path / "rollups.db", sizes, grace_s, correct_for_s, Counters("test"))


def windows(s: RollupStore) -> dict[tuple[str, str, int, int], tuple[Stats, int]]:
    return {w.key: (w.stats, w.version) for w in s.unemitted(10_000)}


# The hand-computed example: greenhouse g1, field temp, windows 1 m and 1 h, grace 30 s.
#   12:02:59.999  18.0   -> 12:02 window
#   12:03:05      20.0 \
#   12:03:30      22.5  |  12:03 window: count 4, min 20.0, max 22.5, mean 84/4 = 21.0,
#   12:03:45      21.0  |  last 20.5 (the newest timestamp, whatever the arrival order)
#   12:03:59.999  20.5 /
#   12:04:00      30.0   -> 12:04 window
#   12:00 hour: count 6, min 18.0, max 30.0, mean 132/6 = 22.0, last 30.0
EXAMPLE = [(at(12, 2, 59.999), 18.0), (at(12, 3, 5), 20.0), (at(12, 3, 30), 22.5), (at(12, 3, 45), 21.0),
           (at(12, 3, 59.999), 20.5), (at(12, 4, 0), 30.0)]


def example_readings(seed: int = 1) -> list[Reading]:
    items = [reading(ts, temp=value) for ts, value in EXAMPLE]
    random.Random(seed).shuffle(items)           # out of order on purpose
    return items


def test_hand_computed_windows(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.add(example_readings(), now=at(12, 4, 5)) == 6
    assert s.close_due(at(12, 4, 5)) == 1                 # only 12:02 (due 12:03:30) so far
    assert s.close_due(at(12, 4, 29.999)) == 0            # 12:03 closes at 12:04:30, not before
    assert s.close_due(at(12, 4, 30)) == 1
    got = windows(s)
    assert got[("g1", "temp", 60, at(12, 2))] == (Stats(1, 18.0, 18.0, 18.0, 18.0), 1)
    assert got[("g1", "temp", 60, at(12, 3))] == (Stats(4, 20.0, 22.5, 21.0, 20.5), 1)
    assert ("g1", "temp", 60, at(12, 4)) not in got       # open until 12:05:30
    assert s.close_due(at(12, 5, 30)) == 1
    assert windows(s)[("g1", "temp", 60, at(12, 4))] == (Stats(1, 30.0, 30.0, 30.0, 30.0), 1)
    assert s.close_due(at(13, 0, 29)) == 0
    assert s.close_due(at(13, 0, 30)) == 1                # the hour, built from its minutes
    assert windows(s)[("g1", "temp", 3600, at(12, 0))] == (Stats(6, 18.0, 30.0, 22.0, 30.0), 1)
    assert s.counters.get("corrected_windows", 0) == 0
    assert s.counters["closed_windows"] == 4
    assert s.counters["late_readings"] == 1               # 12:02:59.999 came after 12:03:30


def test_integers_stay_integers_and_other_values_are_skipped(tmp_path: Path) -> None:
    s = store(tmp_path, sizes=(60,))
    s.add([reading(at(12, 3, 1), rssi=-60, door=True, name="north", bad=float("nan")),
           reading(at(12, 3, 2), rssi=-71, door=False, bad=float("inf"))], now=at(12, 3, 3))
    s.close_due(at(12, 4, 30))
    stats = windows(s)
    assert list(stats) == [("g1", "rssi", 60, at(12, 3))]
    got = stats[("g1", "rssi", 60, at(12, 3))][0]
    assert got == Stats(2, -71, -60, -65.5, -71)
    assert type(got.min) is int and type(got.last) is int and type(got.count) is int


def test_redelivered_batches_count_once(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(example_readings(1), now=at(12, 4, 5))
    s.add(example_readings(2), now=at(12, 4, 6))          # the same batch again, before the close
    s.close_due(at(12, 4, 30))
    s.add(example_readings(3), now=at(12, 4, 40))         # and after it (an edge restart replays it)
    s.close_due(at(12, 4, 41))
    got = windows(s)
    assert got[("g1", "temp", 60, at(12, 3))] == (Stats(4, 20.0, 22.5, 21.0, 20.5), 1)
    assert s.counters.get("corrected_windows", 0) == 0
    assert s.counters["late_readings"] == 1               # duplicates are not late readings


def test_late_reading_corrects_a_closed_window_and_is_counted(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(example_readings(), now=at(12, 4, 5))
    s.close_due(at(12, 5, 30))
    s.mark_emitted([(w.key, w.version) for w in s.unemitted()])
    assert s.unemitted() == []
    # a board that was offline sends 12:03:50 = 25.0 two minutes after that window closed
    s.add([reading(at(12, 3, 50), temp=25.0)], now=at(12, 6, 30))
    assert s.close_due(at(12, 6, 30)) == 1
    again = s.unemitted()
    assert [(w.key, w.stats, w.version) for w in again] == [
        (("g1", "temp", 60, at(12, 3)), Stats(5, 20.0, 25.0, 21.8, 20.5), 2)]   # 109 / 5
    assert s.counters["corrected_windows"] == 1
    assert s.counters["late_readings"] == 2
    s.mark_emitted([(w.key, w.version) for w in again])
    # the hour closes with it included; then a reading for an empty minute of that hour arrives
    s.close_due(at(13, 0, 30))
    assert windows(s)[("g1", "temp", 3600, at(12, 0))] == (Stats(7, 18.0, 30.0, 157 / 7, 30.0), 1)
    s.mark_emitted([(w.key, w.version) for w in s.unemitted()])
    s.add([reading(at(12, 30), temp=4.0)], now=at(13, 10))
    assert s.close_due(at(13, 10)) == 2
    got = windows(s)
    assert got[("g1", "temp", 60, at(12, 30))] == (Stats(1, 4.0, 4.0, 4.0, 4.0), 1)    # first version: late
    assert got[("g1", "temp", 3600, at(12, 0))] == (Stats(8, 4.0, 30.0, 161 / 8, 4.0), 2)  # 12:30 is its newest
    assert s.counters["corrected_windows"] == 2


def test_restart_in_the_middle_of_a_window(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.add(example_readings()[:3], now=at(12, 4, 1))
    first.close()                                          # the worker stops (or is killed) here
    second = store(tmp_path)
    second.add(example_readings(), now=at(12, 4, 20))      # the rest, and what the edge sends again
    second.close_due(at(13, 0, 30))
    got = windows(second)
    assert got[("g1", "temp", 60, at(12, 3))] == (Stats(4, 20.0, 22.5, 21.0, 20.5), 1)
    assert got[("g1", "temp", 3600, at(12, 0))] == (Stats(6, 18.0, 30.0, 22.0, 30.0), 1)
    second.close()


def test_changing_the_windows_keeps_the_points(tmp_path: Path) -> None:
    first = store(tmp_path, sizes=(60, 3600))
    first.add(example_readings(), now=at(12, 4, 5))
    first.close_due(at(12, 5, 30))
    first.close()
    second = store(tmp_path, sizes=(30, 300))             # the smallest window is now 30 s
    second.close_due(at(12, 10))
    got = {key: stats for key, (stats, _) in windows(second).items() if key[2] == 30}
    assert got[("g1", "temp", 30, at(12, 3))] == Stats(1, 20.0, 20.0, 20.0, 20.0)
    assert got[("g1", "temp", 30, at(12, 3, 30))] == Stats(3, 20.5, 22.5, 64 / 3, 20.5)
    assert windows(second)[("g1", "temp", 300, at(12, 0))][0] == Stats(6, 18.0, 30.0, 22.0, 30.0)
    assert second.db.execute("SELECT count(*) FROM windows WHERE size IN (60, 3600)").fetchone() == (0,)


def test_too_late_and_future_readings_are_counted_not_rolled_up(tmp_path: Path) -> None:
    s = store(tmp_path, correct_for_s=3600)
    now = at(14, 0)
    # 12:58's window closed at 12:59:30 and stays correctable until 13:59:30: too late now
    s.add([reading(at(12, 58), temp=1.0), reading(at(12, 59), temp=2.0),
           reading(now + 2 * 86400 * NS, temp=3.0)], now=now)
    assert s.counters["too_late_readings"] == 1
    assert s.counters["future_readings"] == 1
    s.close_due(now)
    assert {w.key for w in s.unemitted()} == {("g1", "temp", 60, at(12, 59)), ("g1", "temp", 3600, at(12, 0))}


def test_day_windows_align_to_utc_midnight(tmp_path: Path) -> None:
    s = store(tmp_path, sizes=(60, 3600, 86400), grace_s=0)
    s.add([reading(at(23, 59, 30), temp=1.0), reading(at(0, 0, 30, day=23), temp=3.0)], now=at(0, 1, day=23))
    s.close_due(at(0, 0, day=24))
    got = windows(s)
    assert got[("g1", "temp", 86400, at(0, 0))][0] == Stats(1, 1.0, 1.0, 1.0, 1.0)
    assert got[("g1", "temp", 86400, at(0, 0, day=23))][0] == Stats(1, 3.0, 3.0, 3.0, 3.0)
    assert got[("g1", "temp", 3600, at(23, 0))][0].count == 1


def test_prune_keeps_what_can_still_change_and_what_is_not_delivered(tmp_path: Path) -> None:
    # grace 30 s + corrections for 600 s: a minute [s, s+60) is final at s + 11:30
    s = store(tmp_path, sizes=(60, 3600), grace_s=30, correct_for_s=600)
    s.add(example_readings(), now=at(12, 4, 5))
    s.close_due(at(12, 5, 30))
    assert s.prune(at(12, 14, 29)) == (1, 0)       # 12:02's point (final at 12:13:30)
    assert s.prune(at(12, 14, 30)) == (4, 0)       # 12:03's four
    assert s.sizes_on_disk() == (1, 4)             # 12:04's point until 12:15:30; rows: hour still open
    s.close_due(at(13, 0, 30))
    assert s.prune(at(13, 11)) == (1, 0)           # every point gone; no row delivered yet: all kept
    assert s.sizes_on_disk() == (0, 4)
    s.mark_emitted([(w.key, w.version) for w in s.unemitted()])
    assert s.prune(at(13, 11)) == (0, 4)           # the hour is final since 13:10:30: its minutes go too
    s.add([reading(at(12, 3, 10), temp=99.0)], now=at(13, 12))   # too late: counted, changes nothing
    assert s.counters["too_late_readings"] == 1 and s.sizes_on_disk() == (0, 0)


def test_prune_keeps_the_minutes_of_an_hour_that_can_change(tmp_path: Path) -> None:
    s = store(tmp_path, sizes=(60, 3600), grace_s=30, correct_for_s=600)
    s.add([reading(at(12, 3), temp=1.0)], now=at(12, 4))
    s.add([reading(at(12, 58), temp=3.0)], now=at(12, 59))
    s.close_due(at(13, 0, 30))
    s.mark_emitted([(w.key, w.version) for w in s.unemitted()])
    assert s.prune(at(13, 10, 29)) == (2, 0)       # the points of 12:03 and 12:58; their rows stay
    s.add([reading(at(12, 59, 59), temp=5.0)], now=at(13, 10, 29))   # still correctable
    s.close_due(at(13, 10, 29))
    hour = {w.key: w.stats for w in s.unemitted()}[("g1", "temp", 3600, at(12, 0))]
    assert hour == Stats(3, 1.0, 5.0, 3.0, 5.0)


def test_each_size_is_built_from_the_next_smaller_and_kept_only_while_that_can_change(tmp_path: Path) -> None:
    s = store(tmp_path, sizes=(60, 3600, 86400), grace_s=30, correct_for_s=600)
    s.add([reading(at(12, 3), temp=1.0)], now=at(12, 4))
    s.add([reading(at(13, 3), temp=2.0)], now=at(13, 4))
    s.close_due(at(14, 0, 30))
    s.mark_emitted([(w.key, w.version) for w in s.unemitted()])
    # the 12:00 hour is final since 13:10:30, the 13:00 hour since 14:10:30: their minutes can go,
    # the hours stay for the day, which can still change
    assert s.prune(at(14, 11)) == (2, 2)         # both points, both minutes
    assert s.db.execute("SELECT size, count(*) FROM windows GROUP BY size").fetchall() == [(3600, 2), (86400, 1)]
    s.close_due(at(0, 0, 30, day=23))
    assert windows(s)[("g1", "temp", 86400, at(0, 0))] == (Stats(2, 1.0, 2.0, 1.5, 2.0), 1)
