"""The edge's journal and its redelivery bookkeeping, without processes: recover, torn records,
trimming, seq continuity, the acknowledgement checkpoint, write failures; then the edge's in-flight
table (targeted redelivery, backoff, a sink coming back, replay after a restart)."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from workers.core import config as config_mod
from workers.core import envelope, journal as journal_mod
from workers.processes.edge import Edge
from workers.core.journal import CHECKPOINT, RECORD, SUFFIX, Journal

SINKS = {"sqlite", "influx"}


def payload(i: int, size: int = 40) -> bytes:
    return (b"batch-%06d-" % i).ljust(size, b".")


def open_journal(directory: Path, sinks: set[str] = SINKS, segment_bytes: int = 1 << 20, **kw) -> tuple[Journal, list]:
    j = Journal(directory, segment_bytes, **kw)
    return j, j.recover(sinks)


def kill(j: Journal) -> None:
    """What SIGKILL leaves: the fd closed by the kernel, no flush of anything, no checkpoint."""
    os.close(j._fd)
    j._fd = -1


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*" + SUFFIX))


# --------------------------------------------------------------------------- recover


def test_recover_replays_every_unacknowledged_batch_to_every_sink(tmp_path: Path) -> None:
    j, replay = open_journal(tmp_path)
    assert replay == [] and j.next_seq == 1
    locations = [j.append(payload(i)) for i in range(3)]
    assert [seq for seq, _ in locations] == [1, 2, 3]
    kill(j)

    j2, replay = open_journal(tmp_path)
    assert [r.seq for r in replay] == [1, 2, 3]
    assert all(r.missing == frozenset(SINKS) for r in replay)
    assert [j2.read(r.location) for r in replay] == [(i + 1, payload(i)) for i in range(3)]
    assert j2.append(payload(3))[0] == 4


def test_torn_record_at_the_end_is_cut_and_its_seq_reused(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    for i in range(3):
        j.append(payload(i))
    kill(j)
    [segment] = tmp_path.glob("*" + SUFFIX)
    good_size = segment.stat().st_size
    record = RECORD.pack(len(payload(3)), 4, 0) + payload(3)
    with open(segment, "ab") as fh:          # a write cut short by a crash: half a record
        fh.write(record[: len(record) // 2])

    j2, replay = open_journal(tmp_path)
    assert [r.seq for r in replay] == [1, 2, 3]
    assert j2.torn_bytes == len(record) // 2
    assert segment.stat().st_size == good_size
    # seq 4 was never acknowledged to anyone nor pushed (append had not returned), so reusing it is safe
    assert j2.append(payload(4))[0] == 4
    kill(j2)
    _, replay = open_journal(tmp_path)
    assert [r.seq for r in replay] == [1, 2, 3, 4]


def test_corrupt_record_is_cut_with_everything_after_it_in_its_segment(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    for i in range(3):
        j.append(payload(i))
    kill(j)
    [segment] = tmp_path.glob("*" + SUFFIX)
    data = bytearray(segment.read_bytes())
    data[RECORD.size + len(payload(0)) + RECORD.size + 3] ^= 0xFF      # a flipped bit in record 2
    segment.write_bytes(bytes(data))
    j2, replay = open_journal(tmp_path)
    assert [r.seq for r in replay] == [1]
    assert j2.torn_bytes > 0


def test_zero_length_and_stray_files(tmp_path: Path) -> None:
    (tmp_path / f"{7:016d}{SUFFIX}").write_bytes(b"")
    (tmp_path / "notes.jnl").write_bytes(b"not a segment")
    j, replay = open_journal(tmp_path)
    assert replay == []
    assert j.append(payload(0))[0] == 7          # the empty segment's name is a floor for seqs


# --------------------------------------------------------------------------- trimming


def test_segments_are_deleted_once_every_batch_in_them_is_acknowledged(tmp_path: Path) -> None:
    record_size = RECORD.size + len(payload(0))
    j, _ = open_journal(tmp_path, segment_bytes=record_size * 3)     # three records per segment
    written = [j.append(payload(i)) for i in range(7)]               # segments 1-3, 4-6, 7-
    assert segment_files(tmp_path) == [f"{1:016d}{SUFFIX}", f"{4:016d}{SUFFIX}", f"{7:016d}{SUFFIX}"]
    for seq, location in written[:2]:
        j.done(location, seq)
    assert len(segment_files(tmp_path)) == 3                         # seq 3 still open in segment 1
    j.done(written[2][1], 3)
    assert segment_files(tmp_path) == [f"{4:016d}{SUFFIX}", f"{7:016d}{SUFFIX}"]
    for seq, location in written[3:]:
        j.done(location, seq)
    # segment 4 is gone; the current segment (7) held a quarter or more, so a fresh one was started
    assert segment_files(tmp_path) == [f"{8:016d}{SUFFIX}"]
    assert j.size == 0


def test_a_small_current_segment_is_kept_but_not_replayed(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    written = [j.append(payload(i)) for i in range(3)]
    for seq, location in written:
        j.done(location, seq)
    assert len(segment_files(tmp_path)) == 1                          # under a quarter: kept, appended to
    j.checkpoint([])
    kill(j)
    j2, replay = open_journal(tmp_path)
    assert replay == [] and j2.skipped_on_recovery == 3
    assert j2.append(payload(3))[0] == 4
    assert segment_files(tmp_path) == [f"{4:016d}{SUFFIX}"]           # the old one went on recovery


def test_seqs_continue_after_the_journal_was_fully_trimmed(tmp_path: Path) -> None:
    record_size = RECORD.size + len(payload(0))
    j, _ = open_journal(tmp_path, segment_bytes=record_size * 2)
    for i in range(5):
        seq, location = j.append(payload(i))
        j.done(location, seq)
    kill(j)                                       # no checkpoint written: the segment names carry the seq
    j2, replay = open_journal(tmp_path, segment_bytes=record_size * 2)
    assert [r.seq for r in replay] == []
    assert j2.append(payload(5))[0] == 6


# --------------------------------------------------------------------------- the checkpoint


def test_checkpoint_replays_only_what_each_sink_misses(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    for i in range(5):
        j.append(payload(i))
    # 1 and 2 acknowledged by both; 3 by influx only; 4 and 5 by nobody
    j.checkpoint([(3, {"sqlite"}), (4, {"sqlite", "influx"}), (5, {"sqlite", "influx"})])
    assert (tmp_path / CHECKPOINT).exists()
    j.append(payload(5))                          # seq 6, written after the checkpoint
    kill(j)
    j2, replay = open_journal(tmp_path)
    assert [(r.seq, sorted(r.missing)) for r in replay] == [
        (3, ["sqlite"]), (4, ["influx", "sqlite"]), (5, ["influx", "sqlite"]), (6, ["influx", "sqlite"])]
    assert j2.skipped_on_recovery == 2


def test_checkpoint_forgets_sinks_that_are_no_longer_enabled(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    j.append(payload(0))
    j.append(payload(1))
    j.checkpoint([(1, {"influx"}), (2, {"influx", "sqlite"})])
    kill(j)
    _, replay = open_journal(tmp_path, sinks={"sqlite"})
    assert [(r.seq, sorted(r.missing)) for r in replay] == [(2, ["sqlite"])]


def test_seqs_never_go_back_behind_the_checkpoint(tmp_path: Path) -> None:
    """A power loss with fsync = never/interval can lose the journal's tail while the checkpoint
    survived: new batches must not reuse seqs the checkpoint counts as acknowledged."""
    j, _ = open_journal(tmp_path)
    for i in range(10):
        j.append(payload(i))
    j.checkpoint([])
    kill(j)
    [segment] = tmp_path.glob("*" + SUFFIX)
    os.truncate(segment, (RECORD.size + len(payload(0))) * 4)         # records 5..10 lost
    j2, replay = open_journal(tmp_path)
    assert replay == []
    assert j2.append(payload(10))[0] == 11
    kill(j2)
    _, replay = open_journal(tmp_path)
    assert [r.seq for r in replay] == [11]


def test_unreadable_checkpoint_means_replaying_everything(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    j.append(payload(0))
    kill(j)
    (tmp_path / CHECKPOINT).write_bytes(b'{"next_seq": 5, "pend')
    _, replay = open_journal(tmp_path)
    assert [(r.seq, r.missing) for r in replay] == [(1, frozenset(SINKS))]


def test_checkpoint_is_compact(tmp_path: Path) -> None:
    j, _ = open_journal(tmp_path)
    for i in range(1000):
        j.append(payload(i, 8))
    j.checkpoint([(seq, {"sqlite"}) for seq in range(1, 1001)])
    assert len((tmp_path / CHECKPOINT).read_bytes()) < 100


# --------------------------------------------------------------------------- write failures


def test_a_failed_write_leaves_no_half_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j, _ = open_journal(tmp_path)
    j.append(payload(0))
    real_write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "write", disk_full)
    with pytest.raises(OSError):
        j.append(payload(1))
    monkeypatch.setattr(journal_mod.os, "write", real_write)
    assert j.append(payload(2))[0] == 2           # the failed batch got no seq
    kill(j)
    j2, replay = open_journal(tmp_path)
    assert [j2.read(r.location)[1] for r in replay] == [payload(0), payload(2)]
    assert j2.torn_bytes == 0


def test_fsync_policies(tmp_path: Path) -> None:
    for policy, expected in (("batch", 3), ("never", 0)):
        j, _ = open_journal(tmp_path / policy, fsync=policy)
        for i in range(3):
            j.append(payload(i))
        assert j.fsyncs == expected
        kill(j)
    j, _ = open_journal(tmp_path / "interval", fsync="interval", fsync_interval_s=0.0)
    j.append(payload(0))
    j.append(payload(1))
    j.tick()
    assert j.fsyncs == 1
    j.tick()                                      # nothing new written: no fsync
    assert j.fsyncs == 1


# --------------------------------------------------------------------------- the edge's in-flight table


def make_edge(tmp_path: Path, sinks: tuple[str, ...] = ("sqlite", "influx"), redeliver: float = 10.0) -> Edge:
    table = {"data_dir": str(tmp_path), "edge": {"redeliver_after_s": redeliver},
             "sinks": {name: {"enabled": True, "endpoint": f"inproc://{name}"} for name in sinks},
             "rollups": {"enabled": False}}                   # the sinks named are the only consumers
    if "sqlite" not in sinks:
        table["sinks"]["sqlite"] = {"enabled": False}
    edge = Edge(config_mod.from_dict(table), None)  # type: ignore[arg-type]   # no sockets used here
    for seq, location, missing in edge.journal.recover(edge.sinks):
        from workers.processes.edge import InFlight
        edge.inflight[seq] = InFlight(location, set(missing), 0.0)
    return edge


def push_batch(edge: Edge, text: bytes) -> int:
    conn = envelope.Conn(1, "text", "127.0.0.1:5000")
    edge._batch_conn_list = [conn]
    edge._pending = [(text, time.time_ns(), 0)]
    edge.flush()
    _, message = edge.outq.get_nowait()
    seq, targets, _ = envelope.parse_frames_header(message[1])
    assert targets is None
    return seq


def drain(edge: Edge) -> list[tuple[int, list[str] | None]]:
    out = []
    while not edge.outq.empty():
        seq, targets, _ = envelope.parse_frames_header(edge.outq.get_nowait()[1][1])
        out.append((seq, targets))
    return out


def test_redelivery_goes_only_to_the_sinks_that_miss_a_batch(tmp_path: Path) -> None:
    edge = make_edge(tmp_path)
    a, b = push_batch(edge, b'{"x":1}'), push_batch(edge, b'{"x":2}')
    edge.acknowledged("sqlite", [a, b])
    edge.acknowledged("influx", [a])
    assert list(edge.inflight) == [b]
    now = time.monotonic()
    edge.redeliver(now + 5)
    assert drain(edge) == []                                  # not yet: redeliver_after_s is 10
    edge.redeliver(now + 11)
    assert drain(edge) == [(b, ["influx"])]
    edge.redeliver(now + 25)                                  # backoff: the second try waits 20 s
    assert drain(edge) == []
    edge.redeliver(now + 32)
    assert drain(edge) == [(b, ["influx"])]
    assert edge.inflight[b].attempts == 2


def test_a_batch_nobody_acknowledged_goes_to_everyone_again(tmp_path: Path) -> None:
    edge = make_edge(tmp_path)
    seq = push_batch(edge, b'{"x":1}')                        # a parser died holding it
    edge.redeliver(time.monotonic() + 11)
    assert drain(edge) == [(seq, None)]                       # None: every sink, and the live feed


def test_a_sink_that_comes_back_gets_its_backlog_at_once(tmp_path: Path) -> None:
    edge = make_edge(tmp_path, redeliver=1.0)
    seqs = [push_batch(edge, b'{"x":%d}' % i) for i in range(3)]
    edge.acknowledged("sqlite", seqs)
    edge.acknowledged("influx", [])                           # influx was heard from once, then went away
    for entry in edge.inflight.values():                      # tried 4 times while it was down
        entry.attempts, entry.sent_at = 4, time.monotonic() - 3
    edge.redeliver(time.monotonic())
    assert drain(edge) == []                                  # backing off: 16 s between tries
    edge.last_ack["influx"] -= 5                              # silent for 5 s, then an ack arrives
    edge.acknowledged("influx", [seqs[0]])
    edge.redeliver(time.monotonic())
    assert drain(edge) == [(seqs[1], ["influx"]), (seqs[2], ["influx"])]


def test_restart_replays_from_the_checkpoint_to_the_missing_sinks_only(tmp_path: Path) -> None:
    edge = make_edge(tmp_path)
    a, b, c = (push_batch(edge, b'{"x":%d}' % i) for i in range(3))
    edge.acknowledged("sqlite", [a, b])
    edge.acknowledged("influx", [a])
    edge.checkpoint()
    d = push_batch(edge, b'{"x":3}')
    kill(edge.journal)                                        # SIGKILL

    edge2 = make_edge(tmp_path)
    assert edge2.journal.skipped_on_recovery == 1             # a: acknowledged by both
    edge2.redeliver(time.monotonic())
    assert drain(edge2) == [(b, ["influx"]), (c, None), (d, None)]
    assert push_batch(edge2, b'{"x":4}') == d + 1


def test_a_journal_write_failure_acknowledges_nothing_and_pauses(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    edge = make_edge(tmp_path)

    def broken(payload: bytes) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(edge.journal, "append", broken)
    edge._batch_conn_list = [envelope.Conn(1, "text", "p")]
    edge._pending = [(b'{"x":1}', 1, 0)]
    edge.flush()
    assert edge.paused and edge.journal_failing and edge._pending and edge.outq.empty()
    monkeypatch.undo()
    edge.flush()                                              # what housekeeping does every tick
    assert not edge.journal_failing and not edge._pending and edge.outq.qsize() == 1


def test_text_lines_wait_for_a_batch_longer_than_frames_someone_waits_on(tmp_path: Path) -> None:
    """batch_max_delay_ms for text lines; ack_max_delay_ms once a binary board waits for its A (or an
    injector for its answer), counted from the batch's first frame; a full batch goes at once."""
    import asyncio

    edge = make_edge(tmp_path)
    edge.cfg = config_mod.from_dict({"data_dir": str(tmp_path), "edge": {"batch_max_delay_ms": 40,
                                                                         "ack_max_delay_ms": 5,
                                                                         "batch_max_frames": 3}})

    async def deadlines() -> list[float]:
        loop = asyncio.get_running_loop()
        edge._pending = [(b'{"x":1}', 1, 0)]
        edge._schedule()
        started = edge._batch_started
        text_due = edge._flush_timer.when() - started
        edge._pending.append((b"packet", 2, 0))
        edge._schedule(urgent=True)
        urgent_due = edge._flush_timer.when() - started
        edge._schedule()                          # more text: still the earlier deadline
        still_due = edge._flush_timer.when() - started
        assert loop.time() >= started
        edge._pending.append((b'{"x":3}', 3, 0))
        edge._batch_conn_list = [envelope.Conn(1, "text", "127.0.0.1:5000")]
        edge._schedule()                          # full: flushed now
        return [text_due, urgent_due, still_due, edge._flush_timer is None, len(edge._pending)]

    text_due, urgent_due, still_due, no_timer, pending = asyncio.run(deadlines())
    assert abs(text_due - 0.040) < 1e-9 and abs(urgent_due - 0.005) < 1e-9 and still_due == urgent_due
    assert no_timer and pending == 0 and edge.outq.qsize() == 1


def test_batch_delays_are_checked_at_start(tmp_path: Path) -> None:
    for bad in ({"ack_max_delay_ms": -1}, {"batch_max_delay_ms": 5000}, {"batch_max_delay_ms": "20"}):
        with pytest.raises(config_mod.ConfigError, match=f"edge.{next(iter(bad))}"):
            config_mod.from_dict({"data_dir": str(tmp_path), "edge": bad})


def test_a_journaled_batch_is_sent_with_the_header_frames_message_would_give() -> None:
    conns = [envelope.Conn(7, "text", "10.0.0.7:5000"),
             envelope.Conn(8, "text", "10.0.0.8:5000", "gw-1", ("room-*",))]
    body = envelope.pack_frames([(b'{"x":1}', 11, 0), (b'{"x":2}', 12, 1)])
    record = envelope.journal_record(conns, body)
    for targets in (None, ["sqlite"]):
        ours = envelope.frames_message_of_record(42, record, targets)
        theirs = envelope.frames_message(42, conns, body, targets)
        assert ours[0] == theirs[0] and ours[2] == theirs[2]
        assert envelope.parse_frames_header(ours[1]) == envelope.parse_frames_header(theirs[1])
        assert envelope.parse_frames_header(ours[1]) == (42, targets, conns)
