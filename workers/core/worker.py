"""What every worker in ``workers/processes`` repeats, in one place (dramatiq's ``worker.py`` and
``common.py``): its ``main`` (the stop flag, the context it owns), the drain-and-count loop that reads
a socket until it is empty, a bound or a time budget and counts bad messages, and backoff with jitter.

The shape of a worker (``workers.core.runtime``): build sockets, one poll loop with a timeout of at
most ``runtime.POLL_MS`` that checks ``stop``, close sockets with ``linger=0`` in ``finally``.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import time
from typing import Awaitable, Callable

import zmq
import zmq.asyncio

from workers.core import envelope, runtime

DRAIN_LIMIT = 256                  # messages read from one socket per wake-up: the other sockets get a turn
GC_YOUNG_THRESHOLD = 10_000        # containers allocated before a young collection (CPython's default: 700)

log = logging.getLogger(__name__)


def tune_gc() -> None:
    """Fewer cyclic-GC passes in a worker. Every batch allocates thousands of short-lived lists and
    tuples (decoded readings) and none of them forms a cycle, yet at CPython's default threshold (700)
    a young collection ran every few dozen readings and older ones walked the outbox's pending
    readings again and again: 35-40 % of the time a sink spent decoding a batch. Objects made at start
    (imports, the configuration) are frozen out of collection for good. Cycles are still collected,
    only later: at most this many containers wait for it."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def serve(run: Callable[[zmq.Context, runtime.StopFlag], int | None]) -> int:
    """A worker's ``main``: install the stop flag (SIGTERM/SIGINT; a second signal exits at once), make
    the context, ``run(ctx, stop)`` and end the context, which only its maker does. ``run`` returns its
    exit code, or None for ``runtime.EXIT_OK``."""
    stop = runtime.StopFlag().install()
    tune_gc()
    ctx = zmq.Context()
    try:
        code = run(ctx, stop)
    finally:
        runtime.term(ctx)
    return runtime.EXIT_OK if code is None else code


def serve_async(run: Callable[[zmq.asyncio.Context], Awaitable[int]],
                loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """``serve`` for a worker on asyncio (the edge): make the context, run ``run(ctx)`` in a new event
    loop (from ``loop_factory``, else asyncio's), end the context. ``run`` installs the stop flag with
    ``stop_on_signals`` once its loop runs."""
    tune_gc()
    ctx = zmq.asyncio.Context()
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(run(ctx))
    finally:
        runtime.term(ctx)


def stop_on_signals(stop: Callable[[], None]) -> runtime.StopFlag:
    """The stop flag of a worker on asyncio: SIGTERM/SIGINT set it and call ``stop`` (on the running
    loop, not inside a signal handler); a second signal exits at once, as ``runtime.StopFlag`` does."""
    flag = runtime.StopFlag()

    def on_signal(signum: int) -> None:
        if flag.is_set:
            os._exit(128 + signum)
        flag.set()
        stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return flag


def drain(sock: zmq.Socket, take: Callable[[list[bytes]], object], limit: int = DRAIN_LIMIT, *,
          budget_s: float | None = None, counters: runtime.Counters | None = None,
          logger: logging.Logger = log, warning: str = "ignoring a bad message: %s") -> int:
    """Hand what ``sock`` holds to ``take``, one multipart message at a time, until it is empty, after
    ``limit`` messages or once ``budget_s`` has passed (stats, timers and the stop flag wait no longer).

    With ``counters``, a message ``take`` refuses with ``envelope.EnvelopeError`` is counted as
    ``bad_messages`` and logged with ``warning``; one bad message never stops the others. Returns how
    many messages were read."""
    busy_until = time.monotonic() + budget_s if budget_s is not None else None
    count = 0
    for _ in range(limit):
        if busy_until is not None and time.monotonic() > busy_until:
            break
        try:
            message = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        count += 1
        if counters is None:
            take(message)
            continue
        try:
            take(message)
        except envelope.EnvelopeError as exc:
            counters.add("bad_messages")
            logger.warning(warning, exc)
    return count


def jitter(delay: float) -> float:
    """``delay`` spread over half to one and a half of itself, so peers that failed together do not
    all come back at the same instant."""
    return delay * random.uniform(0.5, 1.5)


class Backoff:
    """Exponential backoff with jitter: each failure doubles the wait, up to ``maximum_s``; a success
    (``reset``) starts again from ``initial_s``."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.current_s = initial_s

    @property
    def fresh(self) -> bool:
        """No failure since the last success: the first failure of a run is worth a louder log line."""
        return self.current_s == self.initial_s

    def delay(self) -> float:
        """The wait before the next try, jittered, without counting a failure."""
        return jitter(self.current_s)

    def failed(self) -> float:
        """A try failed: the wait before the next one (jittered); the one after waits twice as long."""
        delay = jitter(self.current_s)
        self.current_s = min(self.current_s * 2, self.maximum_s)
        return delay

    def reset(self) -> None:
        self.current_s = self.initial_s
