"""What every worker shares: logging setup, the stop flag, counters, socket options.

The shape of every worker (zguide): build sockets, one poll loop with a timeout of at most a second
that checks ``stop``, close sockets with ``linger=0`` in ``finally``. The caller owns the context
and ends it with ``term`` (which stops its authenticator first).
SIGTERM/SIGINT set the flag; a second signal exits at once. What every worker repeats around this
(its ``main``, the drain-and-count loop, backoff) is in ``workers.core.worker``.

Every socket is made by ``socket``, the one place that sets what all of them need: ``linger = 0``,
``ZMQ_MAXMSGSIZE`` (a peer that sends more is disconnected by ZeroMQ before anything is read), and
the pipeline's credentials. Internal sockets authenticate with ZeroMQ's PLAIN mechanism against a
per-pipeline secret (``pipeline.secret`` in the data directory, mode 0600, made on first use): a
binding socket is a PLAIN server checked by a ZAP handler (pyzmq's ThreadAuthenticator, one thread
per process), a connecting one presents the secret. A process on the host that cannot read the data
directory cannot connect to any of them, so it can neither feed them nor take a worker's routing id
(the edge's on the downlink) and receive what is meant for it. Why PLAIN and not CURVE, and what it
costs: docs/operations.md. A socket whose endpoint reaches beyond loopback uses CURVE instead (keys
and who may connect: ``workers.core.curve``), checked by the same ZAP handler.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import sqlite3
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import orjson
import zmq
from zmq.auth.thread import ThreadAuthenticator

from workers.core import curve, envelope, errors, starts

POLL_MS = 200                      # every poll loop wakes at least this often
STATS_INTERVAL_S = 2.0
STARTUP_STATS_S = 0.25             # the first few stats come sooner: a PUB drops what it sends before it is
STARTUP_STATS = 4                  # connected, and a worker is seen in status once one gets through

EXIT_OK = 0
EXIT_CONFIG = 2                    # the configuration is wrong: supervisord should not retry forever
EXIT_FAILURE = 1
MAX_REQUEST_BYTES = 64 * 1024      # a JSON request to the query or commands worker
# ZMQ_MAXMSGSIZE per socket, by what it receives. Requests, stats, commands: small JSON (the
# request bound is 16 x MAX_REQUEST_BYTES so an oversized request still gets a clear error reply).
CONTROL_MESSAGE_BYTES = 1024 * 1024
# Batches of frames and of readings (the edge cuts batches at 8 MiB of frames; readings decoded from
# them are larger), acks (a sink back from an outage acknowledges thousands of batches at once),
# history replies.
BATCH_MESSAGE_BYTES = 256 * 1024 * 1024
SECRET_FILE = "pipeline.secret"
PLAIN_USER = b"sensorpipe"
ZAP_DOMAIN = "sensorpipe"

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


def pipeline_secret(data_dir: str | Path) -> bytes:
    """The pipeline's shared secret, made (0600) on first use. Several workers start at once: the
    file appears whole, by a hard link, or not at all, so they all read the same secret."""
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_urlsafe(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others: made 0600 (whoever read it can talk to the pipeline's"
                    " internal sockets until the file is replaced)", path)
        path.chmod(0o600)
    secret = path.read_bytes().strip()
    if not secret:
        raise OSError(f"{path} is empty: remove it and restart the pipeline to make a new one")
    return secret


_secret: bytes | None = None
_curve: curve.Keys | None = None
_authenticators: dict[int, "PipelineAuthenticator"] = {}
refused_peers = 0                  # connections refused by this process's ZAP handler (wrong secret or key)


def use_secret(secret: bytes | None) -> None:
    """The credentials this process's sockets use from now on (None: no authentication, tests only)."""
    global _secret
    _secret = secret


def use_curve(keys: curve.Keys | None) -> None:
    """The CURVE keys this process's sockets beyond loopback use from now on (None: none loaded, and
    such a socket raises CurveKeyError)."""
    global _curve
    _curve = keys


class PipelineAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, counting and logging (once) the peers it refuses."""

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        global refused_peers
        if status_code != b"200":
            refused_peers += 1
            if refused_peers == 1:
                log.warning("refused a connection to an internal socket: %s (a process without the pipeline"
                            " secret, or a CURVE key not listed; counted as refused_peers)",
                            status_text.decode(errors="replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def use_pipeline_secret(data_dir: str | Path, make: bool = False) -> None:
    """Talk to the pipeline with its secret. Workers make it on first start (``make``); the user's
    commands only read it, so check-config or firmware never create a data directory. Raises OSError
    when the secret is there but cannot be read (or, with ``make``, cannot be made)."""
    if make or (Path(data_dir) / SECRET_FILE).exists():
        use_secret(pipeline_secret(data_dir))


def _authenticator(ctx: zmq.Context) -> None:
    """One ZAP handler per context, for what this process holds: the secret (PLAIN), the keys (CURVE)."""
    key = ctx.underlying
    if key in _authenticators:
        return
    auth = PipelineAuthenticator(zmq.Context.shadow(ctx.underlying))
    auth.start()
    if _secret is not None:
        auth.configure_plain(domain=ZAP_DOMAIN, passwords={PLAIN_USER.decode(): _secret.decode()})
    if _curve is not None:
        allowed = curve.AllowedKeys(_curve)
        for domain in allowed.allowed:
            auth.configure_curve_callback(domain=domain, credentials_provider=allowed)
    _authenticators[key] = auth


def term(ctx: zmq.Context) -> None:
    """End a context made by a worker: its ZAP handler first (it holds a socket of it)."""
    auth = _authenticators.pop(ctx.underlying, None)
    if auth is not None:
        auth.stop()
    ctx.term()


def socket(ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None,
           hwm: int | None = None, max_message: int = CONTROL_MESSAGE_BYTES,
           server: bool | None = None, address: str | None = None) -> zmq.Socket:
    """A socket with what every socket needs (module docstring). It authenticates as the server side
    when it binds here (or ``server=True``: bound later), as a client otherwise. A socket bound or
    connected later names its endpoint in ``address``: beyond loopback it speaks CURVE, else PLAIN."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.maxmsgsize = max_message
    is_server = server if server is not None else bind is not None
    endpoint = bind or connect or address
    if endpoint is not None and curve.beyond_loopback(endpoint):
        if _curve is None:
            sock.close()
            raise curve.CurveKeyError(f"{endpoint} reaches beyond loopback: it needs CURVE keys"
                                      " (sensorpipe keys init; docs/security.md)")
        if is_server:
            _authenticator(ctx)
            curve.make_server(sock, _curve, endpoint)
        else:
            curve.make_client(sock, _curve)
    elif _secret is not None:
        if is_server:
            _authenticator(ctx)
            sock.zap_domain = ZAP_DOMAIN.encode()
            sock.plain_server = True
        else:
            sock.plain_username = PLAIN_USER
            sock.plain_password = _secret
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
        self["pid"] = os.getpid()       # which process: a new one tells the query worker a publisher restarted
        self.worker = worker
        self._next = 0.0
        self._published = 0

    def add(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n

    def snapshot(self) -> dict:
        """The counters to publish, with the process's refused connections (ZAP) when there were any."""
        counters = dict(self)
        if refused_peers:
            counters["refused_peers"] = refused_peers
        return counters

    def publish_due(self, live: zmq.Socket, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now >= self._next:
            self._published += 1
            self._next = now + (STARTUP_STATS_S if self._published < STARTUP_STATS else STATS_INTERVAL_S)
            try:
                live.send_multipart(envelope.stats_message(self.worker, self.snapshot()), zmq.NOBLOCK)
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
        # Not the request's fault: a bug, with its traceback in the worker's log. The reply says so in words.
        return errors.failure(errors.INTERNAL, f"the worker failed on this request (a bug; its log has the"
                                               f" details): {exc}")
