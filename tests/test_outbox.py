"""The outbox and its disk spool, with a scripted sink: what is acknowledged when, what survives a
kill, and that the SQLite store makes a batch delivered twice harmless."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.core import outbox as outbox_mod
from workers.core.config import SinkCommon
from workers.core.deadletters import DeadLetterStore
from workers.core.envelope import Event, Reading
from workers.core.outbox import Outbox, Spool
from workers.core.runtime import Counters
from workers.sinks import Batch, PermanentError, TransientError
from workers.sinks.sqlite import SqliteSink


def batch(*values: int, device: str = "d1") -> Batch:
    return Batch([Reading(device, 1_000 + v, {"v": v}, {}) for v in values], [])


class ScriptedSink:
    """Writes into a list; ``down`` makes every write fail as the server being away."""
    name = "scripted"

    def __init__(self) -> None:
        self.written: list[Reading] = []
        self.down = False
        self.refuse: set[int] = set()          # values the server refuses as invalid

    def connect(self) -> None:
        pass

    def write(self, b: Batch) -> None:
        if self.down:
            raise TransientError("server away")
        if any(r.fields["v"] in self.refuse for r in b.readings):
            raise PermanentError("invalid value")
        self.written.extend(b.readings)

    def close(self) -> None:
        pass


class Harness:
    def __init__(self, tmp: Path, **opts: object) -> None:
        self.tmp = tmp
        self.sink = ScriptedSink()
        self.acked: list[int] = []
        self.deadletters = DeadLetterStore(tmp / "deadletters.db")
        self.counters = Counters("test")
        self.opts = SinkCommon(enabled=True, endpoint="inproc://x", batch_size=100, retry_initial_s=0.0,
                               **opts)  # type: ignore[arg-type]
        self.outbox = self.new_outbox()

    def new_outbox(self) -> Outbox:
        return Outbox(self.sink, self.opts, self.tmp / "spool", self.deadletters, self.acked.extend, self.counters)

    def values(self) -> list[int]:
        return [r.fields["v"] for r in self.sink.written]


# --------------------------------------------------------------------------- the spool


def test_spool_keeps_batches_in_order_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(batch(1, 2))
    spool.append(batch(3))
    again = Spool(tmp_path)                        # a new process after a kill
    assert len(again) == 2 and again.bytes == spool.bytes
    path, first = again.oldest()
    assert [r.fields["v"] for r in first.readings] == [1, 2]
    again.remove(path)
    again.append(batch(4))
    assert [p.name for p in again.files] == ["0000000000000002.1.0.batch", "0000000000000003.1.0.batch"]
    assert (again.waiting_readings, again.waiting_events) == (2, 0)


def test_a_kill_mid_write_leaves_a_tmp_that_is_never_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    spool.append(batch(1))

    def killed(src: object, dst: object) -> None:  # the process dies between the write and the rename
        raise SystemExit("SIGKILL")

    monkeypatch.setattr(outbox_mod.os, "replace", killed)
    with pytest.raises(SystemExit):
        spool.append(batch(2))
    monkeypatch.undo()
    assert len(list(tmp_path.glob("*.tmp"))) == 1
    again = Spool(tmp_path)
    assert len(again) == 1 and not list(tmp_path.glob("*.tmp"))
    assert again.bytes == sum(p.stat().st_size for p in tmp_path.glob("*.batch"))


def test_an_unreadable_spool_file_is_set_aside_not_a_crash_loop(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(batch(1))
    spool.append(batch(2))
    spool.files[0].write_bytes(b"")                # e.g. a power loss with fsync = false
    again = Spool(tmp_path)
    path, b = again.oldest()
    assert [r.fields["v"] for r in b.readings] == [2]
    assert again.corrupt == 1 and len(list(tmp_path.glob("*.corrupt"))) == 1
    again.remove(path)
    assert again.oldest() is None and again.bytes == 0


# --------------------------------------------------------------------------- the outbox


def test_written_batches_are_acknowledged(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.outbox.add([1, 2], batch(1, 2).readings, [])
    assert h.acked == []                           # not before it is written
    h.outbox.flush()
    assert h.acked == [1, 2] and h.values() == [1, 2]


def test_server_away_spools_acknowledges_and_writes_back_in_order(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sink.down = True
    h.outbox.add([1], batch(1).readings, [])
    h.outbox.flush()
    assert h.acked == [1] and len(h.outbox.spool) == 1        # durable in the spool: acknowledged
    h.sink.down = False
    h.outbox.add([2], batch(2).readings, [])
    h.outbox.flush()                                          # queues behind the spool, order kept
    assert h.values() == [] and h.acked == [1, 2]
    h.outbox.tick(float("inf"))
    assert h.values() == [1, 2] and len(h.outbox.spool) == 0


def test_spooled_batches_survive_a_kill_of_the_sink_worker(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sink.down = True
    h.outbox.add([1], batch(1).readings, [])
    h.outbox.flush()
    h.outbox.add([2], batch(2).readings, [])                  # pending in memory, not acknowledged: lost
    assert h.acked == [1]                                     # with the process; the edge sends seq 2 again
    h.sink.down = False
    restarted = h.new_outbox()
    restarted.tick(float("inf"))
    assert h.values() == [1]
    restarted.add([2], batch(2).readings, [])                 # the edge's redelivery
    restarted.flush()
    assert h.values() == [1, 2] and h.acked == [1, 2]


def test_full_spool_blocks_and_acknowledges_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path, spool_max_bytes=1)
    h.sink.down = True
    h.outbox.add([1], batch(1).readings, [])
    h.outbox.flush()                                          # the first batch fits (the spool was empty)
    h.outbox.add([2], batch(2).readings, [])
    h.outbox.flush()
    assert h.acked == [1] and not h.outbox.accepting          # seq 2 stays in the edge's journal
    h.sink.down = False
    h.outbox.tick(float("inf"))
    assert h.outbox.accepting and h.acked == [1, 2] and h.values() == [1, 2]


def test_drop_oldest_is_counted(tmp_path: Path) -> None:
    h = Harness(tmp_path, spool_max_bytes=1, spool_full="drop-oldest")
    h.sink.down = True
    for seq in (1, 2, 3):
        h.outbox.add([seq], batch(seq).readings, [])
        h.outbox.flush()
    assert h.acked == [1, 2, 3] and len(h.outbox.spool) == 1
    assert h.counters["spool_dropped_readings"] == 2


def test_refused_readings_become_dead_letters_and_the_rest_is_written(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.sink.refuse = {3}
    h.outbox.add([9], batch(1, 2, 3, 4, 5).readings, [])
    h.outbox.flush()
    assert sorted(h.values()) == [1, 2, 4, 5] and h.acked == [9]
    assert h.deadletters.count() == 1


# --------------------------------------------------------------------------- idempotent store


def test_sqlite_stores_a_batch_delivered_twice_once(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    sink.connect()
    b = Batch([Reading("d1", 2_000, {"t": 21.5, "h": 40}, {"room": "a"}),
               Reading("d1", 1_000, {"t": 20.0}, {})],
              [Event("d1", 1_500, "failed_read", {"fields": ["h"]}),
               Event("door", 1_500, "verifiedRecordU", {"card": 1}),      # two scans in one message:
               Event("door", 1_500, "verifiedRecordU", {"card": 2})])     # same instant, two events
    sink.write(b)
    sink.write(b)                                             # redelivered after a kill
    sink.write(Batch([Reading("d1", 500, {"t": 5.0}, {})], []))  # an older reading arriving late
    db = sink.db
    assert db is not None
    assert db.execute("SELECT count(*) FROM readings").fetchone() == (4,)
    assert db.execute("SELECT count(*) FROM events").fetchone() == (3,)
    assert db.execute("SELECT value, ts FROM latest WHERE field = 't'").fetchone() == (21.5, 2_000)
    sink.close()


# --------------------------------------------------------------------------- shared SQLite files


def _open_at_once(path: str, barrier: "multiprocessing.synchronize.Barrier", results: "multiprocessing.Queue") -> None:
    barrier.wait()
    try:
        DeadLetterStore(Path(path)).close()
        results.put("ok")
    except Exception as exc:  # reported to the test
        results.put(repr(exc))


def test_processes_starting_together_can_all_open_the_dead_letter_store(tmp_path: Path) -> None:
    """Parsers and sinks start at the same moment under supervisord; setting up the shared SQLite file
    in WAL mode must not fail one of them with "database is locked"."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(str(tmp_path / f"dl{attempt}.db"), barrier, results))
                 for _ in range(8)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert sorted(results.get(timeout=5) for _ in procs) == ["ok"] * 8
