"""The worker skeleton (workers.core.worker): the drain-and-count loop over a real inproc socket, and
backoff with jitter."""
from __future__ import annotations

import logging
import random

import pytest
import zmq

from workers.core import envelope, worker
from workers.core.runtime import Counters


@pytest.fixture
def pair():
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock in (inbox, outbox):
        sock.linger = 0
    inbox.bind("inproc://drain")
    outbox.connect("inproc://drain")
    try:
        yield inbox, outbox
    finally:
        inbox.close()
        outbox.close()
        ctx.term()


def fill(outbox: zmq.Socket, inbox: zmq.Socket, messages: list[list[bytes]]) -> None:
    for message in messages:
        outbox.send_multipart(message)
    assert inbox.poll(1000)                       # inproc delivers at once; poll makes the first one visible


def test_drain_reads_until_empty_or_the_bound(pair) -> None:
    inbox, outbox = pair
    fill(outbox, inbox, [[b"m", b"%d" % i] for i in range(5)])
    taken: list[list[bytes]] = []
    assert worker.drain(inbox, taken.append, 3) == 3
    assert worker.drain(inbox, taken.append) == 2
    assert worker.drain(inbox, taken.append) == 0
    assert [m[1] for m in taken] == [b"0", b"1", b"2", b"3", b"4"]


def test_a_bad_message_is_counted_and_logged_and_never_stops_the_others(pair, caplog) -> None:
    inbox, outbox = pair
    fill(outbox, inbox, [[b"good"], [b"bad"], [b"good"]])
    taken = []

    def take(message: list[bytes]) -> None:
        if message[0] == b"bad":
            raise envelope.EnvelopeError("not a message we know")
        taken.append(message)

    counters = Counters("test")
    with caplog.at_level(logging.WARNING):
        assert worker.drain(inbox, take, counters=counters, warning="test: ignoring a bad message: %s") == 3
    assert len(taken) == 2 and counters["bad_messages"] == 1
    assert [r.getMessage() for r in caplog.records] == ["test: ignoring a bad message: not a message we know"]


def test_without_counters_a_bad_message_is_the_caller_s(pair) -> None:
    inbox, outbox = pair
    fill(outbox, inbox, [[b"bad"]])

    def take(message: list[bytes]) -> None:
        raise envelope.EnvelopeError("bad")

    with pytest.raises(envelope.EnvelopeError):
        worker.drain(inbox, take)


def test_drain_stops_once_its_time_budget_is_spent(pair, monkeypatch) -> None:
    inbox, outbox = pair
    fill(outbox, inbox, [[b"%d" % i] for i in range(10)])
    clock = [100.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])

    def take(message: list[bytes]) -> None:
        clock[0] += 0.1                           # each message takes 100 ms

    assert worker.drain(inbox, take, budget_s=0.25) == 3    # the budget is checked before each message


def test_backoff_doubles_with_jitter_up_to_its_bound_and_resets() -> None:
    random.seed(13)
    backoff = worker.Backoff(1.0, 5.0)
    assert backoff.fresh
    delays = [backoff.failed() for _ in range(5)]
    for delay, base in zip(delays, [1.0, 2.0, 4.0, 5.0, 5.0]):
        assert 0.5 * base <= delay <= 1.5 * base
    assert not backoff.fresh and backoff.current_s == 5.0
    assert 2.5 <= backoff.delay() <= 7.5 and backoff.current_s == 5.0     # delay() counts no failure
    backoff.reset()
    assert backoff.fresh and 0.5 <= backoff.failed() <= 1.5
