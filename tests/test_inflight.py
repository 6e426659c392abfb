"""The edge's in-flight ledger alone (workers.core.inflight), no sockets and no journal: which batches
wait for which sinks, when each is due again (backoff), a sink back from a silence, what a checkpoint
writes. The same rules through a whole edge: tests/test_journal.py."""
from __future__ import annotations

from workers.core.inflight import REDELIVER_MAX_BACKOFF, InFlight, InFlightLedger
from workers.core.journal import Location

SINKS = ("sqlite", "influx")


def ledger(*seqs: int, sent_at: float = 100.0, redeliver_after_s: float = 10.0) -> InFlightLedger:
    book = InFlightLedger(SINKS, redeliver_after_s)
    for seq in seqs:
        book[seq] = InFlight(Location(1, seq * 100, 100), set(SINKS), sent_at)
    return book


def due(book: InFlightLedger, now: float) -> list[int]:
    return [seq for seq, _ in book.due(now)]


def test_a_batch_is_done_once_every_sink_acknowledged_it() -> None:
    book = ledger(1, 2, 3)
    assert book.acknowledged("sqlite", [1, 2], now=101.0) == []
    done = book.acknowledged("influx", [2, 3, 99], now=101.0)      # 99: already done, or never here
    assert [seq for seq, _ in done] == [2] and done[0][1].location == Location(1, 200, 100)
    assert list(book) == [1, 3] and book[1].pending == {"influx"} and book[3].pending == {"sqlite"}
    assert book.changed


def test_redelivery_waits_and_backs_off_per_batch() -> None:
    book = ledger(1)
    assert due(book, 109.0) == []                 # redeliver_after_s is 10
    assert due(book, 110.0) == [1]
    book[1].attempts, book[1].sent_at = 1, 110.0
    assert due(book, 129.0) == []                 # the second try waits 20 s
    assert due(book, 130.0) == [1]
    book[1].attempts = 99                         # the wait stops growing at 2**REDELIVER_MAX_BACKOFF times
    assert due(book, 110.0 + 10.0 * 2 ** REDELIVER_MAX_BACKOFF) == [1]


def test_replayed_batches_are_due_at_once_oldest_first() -> None:
    book = ledger(5, 7, sent_at=0.0)              # replayed from the journal: never sent in this run
    book.sent(7, 100.0)
    assert due(book, 100.0) == [5]
    assert due(book, 110.0) == [5, 7]


def test_a_sink_back_from_a_silence_gets_its_backlog_at_once() -> None:
    book = ledger(1, 2, redeliver_after_s=1.0)
    book.acknowledged("sqlite", [1, 2], now=100.0)
    book.acknowledged("influx", [], now=100.0)    # heard from once, then away
    for entry in book.values():
        entry.attempts, entry.sent_at = 4, 100.0
    assert due(book, 103.0) == []                 # backing off: 16 s between tries
    book.acknowledged("influx", [1], now=105.0)   # silent for 5 s, then an ack
    assert due(book, 105.0) == [2] and book[2].attempts == 0


def test_checkpoint_rows_and_forgetting_a_lost_batch() -> None:
    book = ledger(1, 2)
    book.acknowledged("sqlite", [1], now=100.0)
    book.changed = False                          # checkpointed
    assert list(book.checkpoint_rows()) == [(1, {"influx"}), (2, {"sqlite", "influx"})]
    entry = book.forget(2)
    assert entry.location == Location(1, 200, 100) and list(book) == [1] and book.changed
