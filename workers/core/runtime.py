"""What every worker shares: logging setup, the stop flag, counters, socket options.

The shape of every worker (zguide): build sockets, one poll loop with a timeout of at most a second
that checks ``stop``, close sockets with ``linger=0`` in ``finally``. The caller owns the context.
SIGTERM/SIGINT set the flag; a second signal exits at once.
"""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import orjson
import zmq

from workers.core import envelope, errors, starts

POLL_MS = 200                      # every poll loop wakes at least this often
STATS_INTERVAL_S = 2.0

EXIT_OK = 0
EXIT_CONFIG = 2                    # the configuration is wrong: supervisord should not retry forever
EXIT_FAILURE = 1
MAX_REQUEST_BYTES = 64 * 1024      # a JSON request to the query or commands worker

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


class StopFlag:
    """Set by SIGTERM/SIGINT. The handler only sets a flag; a second signal exits at once."""

    def __init__(self) -> None:
        self.is_set = False

    def install(self) -> "StopFlag":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def set(self) -> None:
        self.is_set = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.is_set:
            os._exit(128 + signum)
        self.is_set = True

    def __bool__(self) -> bool:
        return self.is_set


def socket(ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None,
           hwm: int | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    if hwm is not None:
        sock.sndhwm = hwm
        sock.rcvhwm = hwm
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


class Counters(dict):
    """Named counters a worker publishes to the query worker every few seconds (``stats``)."""

    def __init__(self, worker: str) -> None:
        super().__init__(starts.published(worker))      # restarts survive the restart (workers.core.starts)
        self.worker = worker
        self._next = 0.0

    def add(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n

    def publish_due(self, live: zmq.Socket, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now >= self._next:
            self._next = now + STATS_INTERVAL_S
            try:
                live.send_multipart(envelope.stats_message(self.worker, dict(self)), zmq.NOBLOCK)
            except zmq.Again:
                pass


def open_wal_db(path: Path, schema: str, timeout_s: float = 30.0) -> sqlite3.Connection:
    """Open (creating if needed) a SQLite file shared by several processes, in WAL mode, with ``schema``.

    Switching to WAL takes an exclusive lock, and SQLite answers "database is locked" at once, without
    waiting out the busy timeout, when another process is setting up the same file (a parser and a
    sink starting together): so the setup is retried until ``timeout_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def worker_name(role: str) -> str:
    """``parser`` -> ``parser:2`` under supervisord's numprocs (process_num), else ``parser:<pid>``."""
    num = os.environ.get("SUPERVISOR_PROCESS_NAME", "")
    return f"{role}:{num.rsplit('_', 1)[-1]}" if num else f"{role}:{os.getpid()}"


class RequestError(Exception):
    """A request that cannot be answered; the client gets ``{"ok": false, "code": <code>, "error": <the
    message>}``, the code one of ``workers.core.errors``."""

    def __init__(self, message: str, code: str = errors.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


def dispatch(raw: bytes, ops: dict[str, Callable[..., Any]], counters: Counters, *args: Any) -> Any:
    """Parse the JSON request ``raw`` and return what its op's handler returns for ``(request, *args)``.
    Never raises: a bad request (RequestError) or a bug in a handler becomes ``{"ok": false, ...}``, so
    one request can never take a worker down."""
    counters.add("requests")
    try:
        if len(raw) > MAX_REQUEST_BYTES:
            raise RequestError(f"request larger than {MAX_REQUEST_BYTES} bytes", errors.BAD_REQUEST)
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"request is not JSON: {exc}", errors.BAD_REQUEST) from None
        if not isinstance(request, dict):
            raise RequestError("request must be a JSON object", errors.BAD_REQUEST)
        op = request.get("op")
        handler = ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise RequestError(f"unknown op {op!r}; known: {sorted(ops)}", errors.UNKNOWN_OP)
        return handler(request, *args)
    except RequestError as exc:
        counters.add("bad_requests")
        return errors.failure(exc.code, str(exc))
    except Exception as exc:
        log.exception("request failed: %r", raw[:200])
        return errors.failure(errors.INTERNAL, f"internal error: {exc!r}")
