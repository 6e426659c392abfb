"""The poison-batch rule (workers/core/tries.py) in the parser, the sinks' outbox and the rollup
worker, and the bounds on the dead-letter store. Real workers' classes, real SQLite files."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.sinktools import OutboxHarness
from workers.core import envelope
from workers.core.config import SqliteSink as SqliteOptions
from workers.core.config import from_dict
from workers.core.deadletters import DeadLetter, DeadLetterStore
from workers.core.envelope import Reading
from workers.core.outbox import Outbox
from workers.core.tries import BatchTries
from workers.sinks import Batch
from workers.sinks.sqlite import SqliteSink

RECV_TS = 1_732_260_000_000_000_000


class Captured:
    def __init__(self) -> None:
        self.sent: list[list] = []

    def send_multipart(self, message: list, *args: object, **kwargs: object) -> None:
        self.sent.append([bytes(part) for part in message])


def frames_message(seq: int) -> list[bytes]:
    conn = envelope.Conn(1, "text", "10.0.0.7:5000")
    body = envelope.pack_frames([(b'{"device":"a","v":1}', RECV_TS, 0), (b'{"device":"b","v":2}', RECV_TS + 1, 0)])
    return envelope.frames_message(seq, [conn], body)


def test_a_batch_the_parsers_keep_failing_on_is_set_aside_whole_and_acknowledged(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from workers.processes.parser import Parser

    cfg = from_dict({"data_dir": str(tmp_path), "sinks": {"sqlite": {"enabled": True}}, "limits": {"batch_tries": 2}})
    sink, live = Captured(), Captured()

    def broken(*args: object) -> bytes:
        raise RuntimeError("the serializer is broken")

    monkeypatch.setattr(envelope, "readings_body", broken)
    for attempt in range(2):                 # each try a new parser, as after a crash and a restart
        parser = Parser(cfg)
        parser.handle(frames_message(41), {"sqlite": sink}, live)  # type: ignore[dict-item]
        assert parser.counters["failed_batches"] == 1 and not sink.sent
        parser.deadletters.close()
    monkeypatch.undo()
    parser = Parser(cfg)
    parser.handle(frames_message(41), {"sqlite": sink}, live)  # type: ignore[dict-item]
    (message,) = sink.sent                                     # an empty batch: the sink acknowledges seq 41
    seqs, readings, events = envelope.parse_readings(message[1], message[2])
    assert seqs == [41] and readings == [] and events == []
    letters = parser.deadletters.list()
    assert sorted(d.raw for d in letters) == [b'{"device":"a","v":1}', b'{"device":"b","v":2}']
    assert all("failed 2 times" in d.reason for d in letters)
    assert parser.counters["poison_batches"] == 1
    assert BatchTries.for_role(tmp_path, "parser").count(41) == 0      # the note is cleared
    parser.deadletters.close()


class Choking:
    """A sink that raises an error it does not classify on one reading (a library choking on it)."""
    name = "choking"

    def __init__(self) -> None:
        self.stored: list[Reading] = []

    def connect(self) -> None:
        pass

    def write(self, batch: Batch) -> None:
        if any(r.device == "poison" for r in batch.readings):
            raise KeyError("poison")
        self.stored.extend(batch.readings)

    def close(self) -> None:
        pass


def test_the_outbox_narrows_a_poison_batch_down_on_its_last_try_even_across_restarts(tmp_path: Path) -> None:
    sink = Choking()
    readings = [Reading(f"d{i}", RECV_TS + i, {"v": i}, {}) for i in range(7)] + [Reading("poison", RECV_TS, {"v": 0}, {})]
    tries = BatchTries(tmp_path / "tries")

    def outbox() -> tuple[Outbox, list[int]]:         # a new one each try: the worker was restarted
        acked: list[int] = []
        harness = OutboxHarness(sink, SqliteOptions(), tmp_path)
        box = Outbox(sink, SqliteOptions(), tmp_path / "spool", harness.deadletters, acked.extend,
                     harness.counters, tries, batch_tries=3)
        return box, acked

    for attempt in range(2):
        box, acked = outbox()
        box.add([5, 6], readings, [])
        box.flush()
        assert acked == [] and sink.stored == [] and box.counters["failed_batches"] == 1
        box.deadletters.close()
    box, acked = outbox()
    box.add([5, 6], readings, [])
    box.flush()
    assert acked == [5, 6]
    assert sorted(r.device for r in sink.stored) == [f"d{i}" for i in range(7)]
    (letter,) = box.deadletters.list()
    assert letter.device == "poison" and "choking failed on it 3 times: 'poison'" in letter.reason
    assert tries.count(5) == tries.count(6) == 0
    box.deadletters.close()


def test_the_sqlite_sink_sets_aside_what_sqlite_cannot_store_and_writes_the_rest(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "store.db")
    sink.connect()
    harness = OutboxHarness(sink, SqliteOptions(), tmp_path)
    bad = [Reading("e", 10 ** 19, {"v": 1}, {}), Reading("e", RECV_TS, {"v": 2 ** 64 - 1}, {})]
    good = [Reading("g", RECV_TS + i, {"v": i}, {}) for i in range(5)]
    harness.outbox.add([1], [good[0], bad[0], *good[1:3], bad[1], *good[3:]], [])
    harness.outbox.flush()
    assert harness.acked == [1]
    assert sink.db.execute("SELECT count(*) FROM readings").fetchone()[0] == 5     # type: ignore[union-attr]
    dead = harness.dead()
    assert len(dead) == 2 and all("beyond the 64-bit integers" in d.reason for d in dead)
    assert {d.recv_ts for d in dead} == {2 ** 63 - 1, RECV_TS}          # clamped: the insert cannot overflow
    sink.close()
    harness.close()


def test_the_rollup_worker_sets_aside_readings_it_keeps_failing_on(tmp_path: Path, monkeypatch) -> None:
    from workers.processes.rollup import RollupWorker

    cfg = from_dict({"data_dir": str(tmp_path), "sinks": {"sqlite": {"enabled": True}}, "limits": {"batch_tries": 2}})
    now = time.time_ns()
    readings = [Reading("d", now - i * 1000, {"v": i}, {}) for i in range(4)] + [Reading("poison", now, {"v": 1}, {})]
    body = envelope.readings_body(readings, [])
    message = envelope.readings_message([9], body)
    acks = Captured()
    worker = RollupWorker(cfg)
    real_add = worker.store.add

    def add(batch: list, at: int) -> int:
        if any(r.device == "poison" for r in batch):
            raise ZeroDivisionError("a bug")
        return real_add(batch, at)

    monkeypatch.setattr(worker.store, "add", add)
    worker.hold([message])
    worker.commit(acks)                               # try 1: not acknowledged
    assert acks.sent == [] and worker.counters["failed_batches"] == 1
    worker.hold([message])
    worker.commit(acks)                               # try 2, the last: reading by reading
    assert len(acks.sent) == 1
    (letter,) = worker.deadletters.list()
    assert letter.device == "poison" and letter.source == "rollup" and "a bug" in letter.reason
    assert worker.store.db.execute("SELECT count(*) FROM points").fetchone()[0] == 4
    worker.store.close()
    worker.deadletters.close()


def test_the_rollup_worker_skips_values_no_store_keeps(tmp_path: Path) -> None:
    from workers.processes.rollup import RollupWorker

    cfg = from_dict({"data_dir": str(tmp_path), "sinks": {"sqlite": {"enabled": True}}})
    worker = RollupWorker(cfg)
    now = time.time_ns()
    taken = worker.store.add([Reading("e", now, {"u": 2 ** 64 - 1, "ok": 1}, {}), Reading("e", 10 ** 19, {"v": 1}, {})],
                             now)
    assert taken == 1 and worker.counters["unstorable_values"] == 2
    worker.store.close()
    worker.deadletters.close()


def test_dead_letters_are_bounded_in_size_and_age_and_what_goes_is_counted(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.db", max_bytes=10_000, max_age_s=3600)
    store.add([DeadLetter(i, "parser", "text", "p", "d", "bad", b"x" * 1000) for i in range(30)])
    store.prune()
    assert store.stored_bytes() <= 10_000 and store.count() == 9               # down to 90 % of the bound
    assert store.dropped() == {"size": 21}
    assert [d.recv_ts for d in store.list()] == list(range(21, 30))            # the oldest went first
    store.prune(now_ms=int(time.time() * 1000) + 3601 * 1000)
    assert store.count() == 0 and store.dropped() == {"size": 21, "age": 9}
    store.close()


@pytest.mark.parametrize("letter", [
    DeadLetter(10 ** 30, "sink:x", "replay", "", "dev", "r", b"raw"),
    DeadLetter(-(10 ** 30), "sink:x", "replay", "", "dev", "r", b"raw"),
    DeadLetter(1, "parser", "text", "p", "dev\ud800", ValueError("not text"), "text, not bytes"),   # type: ignore[arg-type]
    DeadLetter(1, "parser", "text", "p", "dev", "r" * 10_000, bytearray(b"raw")),                # type: ignore[arg-type]
])
def test_a_dead_letter_is_always_written(tmp_path: Path, letter: DeadLetter) -> None:
    store = DeadLetterStore(tmp_path / "dl.db")
    store.add([letter])
    (stored,) = store.list()
    assert isinstance(stored.raw, bytes) and len(stored.reason) <= 500
    store.close()


@pytest.mark.parametrize("table, message", [
    ({"limits": {"batch_tries": 0}}, "limits.batch_tries: must be at least 1"),
    ({"limits": {"max_devices": 0}}, "limits.max_devices: must be at least 1"),
    ({"deadletters": {"max_bytes": 10}}, "deadletters.max_bytes: must be at least 1024"),
    ({"deadletters": {"max_age_days": 0}}, "deadletters.max_age_days: must be more than 0"),
])
def test_bounds_are_checked_at_start_with_a_clear_message(table: dict, message: str) -> None:
    from workers.core.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        from_dict(table)
