"""The edge's gatekeeper: who may connect, who a connection is, how fast it may send.

The edge calls it at four places: a connection is made (``admit``: limits, TLS, the hello deadline),
frames were cut from its bytes (``screen``: the hello, the binary MAC, the rate), the connection is
gone (``release``), and once a second (``tick``: revocations, replay counters). Everything it
refuses is counted in the edge's counters (``sensorpipe status``); docs/security.md says what each
protects against.

- **Text hello** (listener ``auth = "required"``): the first frame must be
  ``{"auth":{"device":"ID","token":"SECRET"}}``. It is answered ``{"auth":"ok"}`` and every later
  frame belongs to that device (carried in the frames' ``Conn``, checked by the parser), or
  ``{"auth":"denied"}`` and the connection is closed. The token's scrypt runs in a thread, never on
  the event loop; a success is remembered (a SHA-256 of the token), so a board that reconnects every
  minute costs one scrypt per edge start. Nothing a connection sends before its hello is stored.
- **Binary MAC**: on an authenticated binary listener a packet is the seed-style packet, then a u32
  counter and a 16-byte HMAC-SHA256 (``credentials.sign_packet``). The device is the one its device
  number's layout names. (device, counter) is the packet's idempotency key: against the highest
  counter known *journaled* for the device, a lower one is a replay (refused: no ``A``, a dead letter
  through the edge's reject path); the same one is the board sending again a packet whose ``A`` it
  missed (answered ``A``, stored nothing, ``binary_resent``); a higher one is journaled and becomes
  the known counter once the journal confirmed it. A resend that arrives while the original is still
  being journaled here waits for it (``Owed``: one packet, every connection waiting for its ``A``).
  The known counters outlive a restart: beside the file journal (``CounterLog``, fsynced with it), in
  a replicated KV bucket with the JetStream journal (``jetstream.SharedCounters``, read before the
  first packet of each connection: the board may have been on another edge since).
- **TLS**: the TCP connection counts against the limits first, then the handshake runs under the
  hello deadline; a peer that sends plain text or never finishes is closed and counted.
- **Limits**: connections in all (``[edge] max_connections``) and per source address
  (``max_connections_per_address``); a rate per connection (``max_frames_per_s``) above which the edge
  stops reading it for as long as the excess takes to drain (the device waits in its TCP buffer:
  backpressure, nothing is dropped).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from workers.core import credentials
from workers.core.config import Config, Listener
from workers.core.credentials import Credential, CredentialStore
from workers.core.framing import PACKET_HEADER

if TYPE_CHECKING:
    from workers.core.jetstream import SharedCounters
    from workers.core.runtime import Counters

log = logging.getLogger(__name__)

AUTH_OK = b'{"auth":"ok"}\n'
AUTH_DENIED = b'{"auth":"denied"}\n'
MAX_VERIFYING = 16              # scrypt checks in flight at once; more hellos are denied (counted)
COUNTERS_SAVE_S = 1.0           # how often accepted replay counters are written down
RELOAD_CHECK_S = 1.0            # how often the credential store is checked for changes (revocations)
LOG_EVERY_S = 10.0
COUNTER_LOG_COMPACT_BYTES = 1024 * 1024   # the counter log is rewritten (one line) past this


class Owed:
    """A binary packet read from a board and not answered yet: every connection waiting for its ``A``
    (the one it came on, then any that sent it again meanwhile, or sent a copy of the newest packet
    behind it) and, authenticated, its idempotency key (device, counter)."""

    __slots__ = ("conns", "device", "counter", "tag", "pos")

    def __init__(self, conn: Any, device: str = "", counter: int = -1, tag: str = "") -> None:
        self.conns = [conn]
        self.device = device
        self.counter = counter
        self.tag = tag               # the device's key (``key_tag``): a new key counts from the start
        self.pos = -1                # where its frame is in the edge's pending batch

    def gone(self) -> bool:
        """Nobody waits for it any more: every connection that sent it closed."""
        return all(c.closed for c in self.conns)


class CounterLog:
    """The known counters beside the file journal (``<data>/journal/counters.log``): a line
    ``{"device": [counter, key tag]}`` per batch that journaled authenticated packets, written after the
    batch and before its ``A``s, fsynced with the journal (``Journal.companion``): an edge restarted a
    moment after an ``A`` knows that packet, so the board sending it again is answered, not stored
    twice. The key tag (4 bytes of the key's SHA-256) drops a counter of a key since replaced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.dirty = False

    @staticmethod
    def load(path: Path) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return out
        for line in data.splitlines():
            try:
                for device, (counter, tag) in orjson.loads(line).items():
                    if counter > out.get(device, (-1, ""))[0] or out.get(device, (-1, ""))[1] != tag:
                        out[device] = (int(counter), str(tag))
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
                continue                 # a line torn by a crash: it was never answered
        return out

    def write(self, entries: dict[str, tuple[int, str]]) -> None:
        line = orjson.dumps(entries) + b"\n"
        os.write(self.fd, line)
        self.size += len(line)
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            os.fdatasync(self.fd)
            self.dirty = False

    def compact(self, entries: dict[str, tuple[int, str]]) -> None:
        """Rewrite as one line (atomically) once it has grown past ``COUNTER_LOG_COMPACT_BYTES``."""
        if self.size < COUNTER_LOG_COMPACT_BYTES:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = orjson.dumps(entries) + b"\n"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = len(data)
        self.dirty = False

    def close(self) -> None:
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1


def key_tag(mac_key: bytes) -> str:
    """Names a device's key without giving anything of it away (8 hex digits of its SHA-256)."""
    return hashlib.sha256(mac_key).hexdigest()[:8]


class Session:
    """What the guard knows about one connection."""

    __slots__ = ("address", "device", "hello_pending", "held", "tokens", "last_refill", "rate_timer",
                 "deadline_timer", "tls_pending", "eof", "owed", "looked_up")

    def __init__(self, address: str, rate: float) -> None:
        self.address = address
        self.device = ""                      # the device it authenticated as
        self.hello_pending = False            # the hello is being checked: later frames wait in ``held``
        self.held: list[bytes] = []
        self.tokens = rate                    # the rate limit's bucket: one second's worth of frames
        self.last_refill = time.monotonic()
        self.rate_timer: asyncio.TimerHandle | None = None
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.tls_pending = False
        self.eof = False                      # the peer hung up while its hello was being checked
        self.owed: list[Owed] = []            # binary: the packets of the last screen (the edge takes them)
        self.looked_up = False                # its device's known counter read from the shared counters


class Guard:
    def __init__(self, cfg: Config, counters: "Counters") -> None:
        self.cfg = cfg
        self.counters = counters
        self.needs_store = any(lst.auth == "required" for lst in cfg.listeners)
        # A short busy timeout: the store is read on the event loop (WAL: readers wait only in rare cases).
        self.store: CredentialStore | None = CredentialStore(cfg.data_dir, busy_timeout_s=0.5) \
            if self.needs_store else None
        self.credentials: dict[str, Credential] = {}
        self.verified: dict[str, bytes] = {}          # device -> SHA-256 of a token scrypt accepted
        self.mac_counters: dict[str, int] = {}        # device -> the highest counter known journaled
        self.flying: dict[tuple[str, int], Owed] = {}  # (device, counter) read, being journaled here
        self.counter_log: CounterLog | None = None    # file journal: the known counters beside it
        self.shared: SharedCounters | None = None     # jetstream journal: the known counters of every edge
        self._lookups: set[asyncio.Future] = set()
        self._tags: dict[bytes, str] = {}             # mac key -> key_tag
        self._counters_dirty = False
        self._store_version = -1
        self.by_address: Counter[str] = Counter()
        self.total = 0
        self.authenticated: dict[str, set[Any]] = {}  # device -> its connections (closed on revocation)
        self.verifying = 0
        self.tls_contexts = {lst.name: _tls_context(lst) for lst in cfg.listeners if lst.tls}
        self._next_save = self._next_reload = 0.0
        self._handshakes: set[asyncio.Future] = set()
        self._last_logged: dict[str, float] = {}
        if self.store is not None:
            self.mac_counters = self.store.counters()
            self.reload()

    def keep_counters_beside(self, journal_dir: Path) -> None:
        """File journal: the known counters are written beside it (``CounterLog``), and read back here."""
        if self.store is None:
            return
        path = journal_dir / "counters.log"
        for device, (counter, tag) in CounterLog.load(path).items():
            credential = self.credentials.get(device)
            if credential is not None and key_tag(credential.mac_key) == tag \
                    and counter > self.mac_counters.get(device, -1):
                self.mac_counters[device] = counter
                self._counters_dirty = True
        self.counter_log = CounterLog(path)

    # ------------------------------------------------------------------ the store

    def reload(self) -> None:
        """Read the credentials again if the store changed; close connections whose credential went."""
        if self.store is None:
            return
        version = self.store.data_version()
        if version == self._store_version:
            return
        self._store_version = version
        fresh = {c.device: c for c in self.store.all()}
        for device, old in self.credentials.items():
            new = fresh.get(device)
            if new is None or new.token_hash != old.token_hash or new.may_report != old.may_report:
                self.verified.pop(device, None)
                if new is None or new.mac_key != old.mac_key:
                    self.mac_counters.pop(device, None)     # a new key counts from the start
                for conn in list(self.authenticated.get(device, ())):
                    self.counters.add("closed_revoked")
                    log.info("closing %s: the credential of %s was revoked or replaced", conn.conn.peer, device)
                    conn.close()
        self.credentials = fresh
        self.counters["credentials"] = len(fresh)

    def _fresh(self) -> None:
        """Reload now if the store changed: cheap when it did not (one PRAGMA), and a device added a
        moment ago is known at once."""
        try:
            self.reload()
        except Exception as exc:          # sqlite3 errors: keep the credentials we have
            self.counters.add("credential_store_errors")
            self._log("credential_store_errors", "could not read the credential store: %r", exc)

    def tick(self, now: float) -> None:
        if now >= self._next_reload:
            self._next_reload = now + RELOAD_CHECK_S
            self._fresh()
            if self.counter_log is not None and self.counter_log.size >= COUNTER_LOG_COMPACT_BYTES:
                try:
                    self.counter_log.compact({d: (c, key_tag(self.credentials[d].mac_key))
                                              for d, c in self.mac_counters.items() if d in self.credentials})
                except OSError as exc:
                    log.warning("could not compact the counter log: %r", exc)
        if self._counters_dirty and now >= self._next_save:
            self._next_save = now + COUNTERS_SAVE_S
            self.save_counters()

    def save_counters(self) -> None:
        if self.store is None or not self._counters_dirty:
            return
        try:
            self.store.save_counters(self.mac_counters)
            self._counters_dirty = False
        except Exception as exc:
            self.counters.add("credential_store_errors")
            log.warning("could not write the binary replay counters: %r", exc)

    def close(self) -> None:
        self.save_counters()
        if self.counter_log is not None:
            self.counter_log.close()
        if self.store is not None:
            self.store.close()

    # ------------------------------------------------------------------ the idempotency keys

    def journaled(self, owed: list[Owed]) -> None:
        """These packets are journaled (the file appended, or JetStream confirmed): their counters are
        known now, before any ``A`` goes out. With the file journal they are written beside it."""
        changed: dict[str, tuple[int, str]] = {}
        for item in owed:
            if not item.device:
                continue
            self.flying.pop((item.device, item.counter), None)
            if item.counter > self.mac_counters.get(item.device, -1):
                self.mac_counters[item.device] = item.counter
                self._counters_dirty = True
                if item.tag:
                    changed[item.device] = (item.counter, item.tag)
        if changed and self.counter_log is not None:
            try:
                self.counter_log.write(changed)
            except OSError as exc:      # the journal has the packets; a restart may store a resend twice
                self.counters.add("counter_log_errors")
                log.warning("could not write the known counters beside the journal: %r", exc)

    def not_journaled(self, owed: Owed) -> None:
        """Left out (every connection that sent it closed): a resend is journaled anew."""
        if owed.device:
            self.flying.pop((owed.device, owed.counter), None)

    def sync_counter_log(self) -> None:
        """Called with the journal's fsync (``Journal.companion``)."""
        if self.counter_log is not None:
            self.counter_log.sync()

    # ------------------------------------------------------------------ connections

    def admit(self, conn: Any) -> bool:
        """A new connection: within the limits? Starts its TLS handshake and its hello deadline."""
        listener: Listener = conn.listener
        address = conn.conn.peer.rsplit(":", 1)[0]
        if self.total >= self.cfg.edge.max_connections:
            self._refuse(conn, "refused_total_limit", f"{self.total} connections in all")
            return False
        if self.by_address[address] >= listener.max_connections_per_address:
            self._refuse(conn, "refused_address_limit", f"{address} has {self.by_address[address]} connections")
            return False
        session = conn.session = Session(address, listener.max_frames_per_s)
        # Nothing to hello, check or charge: ``screen`` would pass every frame on as it is, so the edge
        # takes them without asking (a fleet's every read).
        conn.unscreened = listener.auth != "required" and listener.max_frames_per_s <= 0
        self.by_address[address] += 1
        self.total += 1
        loop = asyncio.get_running_loop()
        if listener.auth == "required" or listener.tls:
            session.deadline_timer = loop.call_later(listener.auth_timeout_s, self._deadline, conn)
        if listener.tls:
            session.tls_pending = True
            conn.transport.pause_reading()          # the ClientHello is for the TLS layer, not the framer
            task = asyncio.ensure_future(self._start_tls(conn, self.tls_contexts[listener.name]))
            self._handshakes.add(task)            # held: the loop keeps only a weak reference to a task
            task.add_done_callback(self._handshakes.discard)
        return True

    def release(self, conn: Any) -> None:
        session: Session | None = getattr(conn, "session", None)
        if session is None:
            return
        conn.session = None
        conn.unscreened = False
        self.total -= 1
        self.by_address[session.address] -= 1
        if self.by_address[session.address] <= 0:
            del self.by_address[session.address]
        for timer in (session.rate_timer, session.deadline_timer):
            if timer is not None:
                timer.cancel()
        if session.device:
            conns = self.authenticated.get(session.device)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.authenticated[session.device]

    def _refuse(self, conn: Any, counter: str, why: str) -> None:
        self.counters.add(counter)
        self._log(counter, "refusing a connection from %s: %s", conn.conn.peer, why)
        conn.transport.abort()

    def _deadline(self, conn: Any) -> None:
        session: Session | None = conn.session
        if session is None or conn.closed:
            return
        session.deadline_timer = None
        if session.tls_pending:
            return                                # start_tls's own timeout (the same) counts it
        if conn.listener.auth == "required" and not session.device and not session.hello_pending:
            self.counters.add("auth_timeouts")
            self._log("auth_timeouts", "closing %s: no hello within %s s", conn.conn.peer,
                      conn.listener.auth_timeout_s)
            conn.close()

    async def _start_tls(self, conn: Any, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        raw = conn.transport
        try:
            tls = await loop.start_tls(raw, conn, context, server_side=True,
                                       ssl_handshake_timeout=conn.listener.auth_timeout_s)
        except Exception as exc:          # SSLError, a reset, the handshake timeout: all the peer's doing
            self.counters.add("tls_failed")
            self._log("tls_failed", "TLS handshake with %s failed: %r", conn.conn.peer, exc)
            raw.abort()
            return
        session: Session | None = conn.session
        if session is None or tls is None:        # gone while shaking hands
            return
        session.tls_pending = False
        conn.transport = tls
        self.counters.add("tls_handshakes")
        if getattr(conn.edge, "paused", False):
            tls.pause_reading()
        if session.deadline_timer is None and conn.listener.auth == "required" and not session.device:
            self._deadline(conn)                   # the handshake took the whole deadline

    # ------------------------------------------------------------------ frames

    def screen(self, conn: Any, frames: list[bytes], rejects: list[tuple[str, bytes]]
               ) -> tuple[list[bytes], list[tuple[str, bytes]]]:
        """What of a read may go on to the journal: the hello taken out, binary MACs checked and
        stripped, frames held while the hello is checked. Also applies the rate limit."""
        session: Session | None = conn.session
        if session is None:
            return [], []
        if frames and conn.listener.max_frames_per_s > 0:
            self._charge(conn, session, len(frames))
        if conn.listener.auth != "required":
            return frames, rejects
        if conn.binary:
            passed, refused = self._screen_packets(conn, session, frames)
            return passed, rejects + refused
        if session.device:
            return frames, rejects
        if session.hello_pending:
            session.held.extend(frames)
            if conn.transport is not None:
                conn.transport.pause_reading()
            return [], []
        if not frames:
            return [], []                        # framing rejects before any hello: stored nowhere
        self._hello(conn, session, frames[0])
        if session.hello_pending:
            session.held.extend(frames[1:])
            return [], []
        return (frames[1:], rejects) if session.device else ([], [])

    def _hello(self, conn: Any, session: Session, frame: bytes) -> None:
        hello = credentials.parse_hello(frame)
        if hello is None:
            self._deny(conn, "auth_missing", "its first frame is not a hello")
            return
        device, token = hello
        self._fresh()
        credential = self.credentials.get(device)
        if credential is None:
            self._deny(conn, "auth_denied", f"no credential for {device!r}")
            return
        digest = hashlib.sha256(token.encode()).digest()
        known = self.verified.get(device)
        if known is not None and hmac.compare_digest(known, digest):
            self._authenticated(conn, session, credential)
            return
        if self.verifying >= MAX_VERIFYING:
            self._deny(conn, "auth_busy", f"{self.verifying} hellos are being checked already")
            return
        self.verifying += 1
        session.hello_pending = True
        if conn.transport is not None:
            conn.transport.pause_reading()
        future = asyncio.get_running_loop().run_in_executor(None, credential.verify, token)
        future.add_done_callback(lambda f: self._verified(conn, session, credential, digest, f))

    def _verified(self, conn: Any, session: Session, credential: Credential, digest: bytes,
                  future: asyncio.Future) -> None:
        self.verifying -= 1
        session.hello_pending = False
        ok = not future.cancelled() and future.exception() is None and future.result()
        if conn.closed or conn.session is not session:
            return
        current = self.credentials.get(credential.device)
        if not ok or current is None or current.token_hash != credential.token_hash:   # revoked meanwhile
            session.held = []
            self._deny(conn, "auth_denied", f"wrong token for {credential.device!r}")
            return
        self.verified[credential.device] = digest
        self._authenticated(conn, session, credential)
        held, session.held = session.held, []
        if held:
            conn.edge.accept(conn, held, [])
        if session.eof:
            conn.close()
            return
        if conn.transport is not None and not conn.transport.is_closing() and not getattr(conn.edge, "paused", False) \
                and session.rate_timer is None:
            conn.transport.resume_reading()

    def _authenticated(self, conn: Any, session: Session, credential: Credential) -> None:
        session.device = credential.device
        conn.conn = conn.conn._replace(device=credential.device, may_report=credential.may_report)
        if not conn.binary and conn.listener.max_frames_per_s <= 0:
            conn.unscreened = True              # a text connection's later frames are its device's as they are
        self.authenticated.setdefault(credential.device, set()).add(conn)
        self.counters.add("auth_ok")
        if not conn.binary and conn.transport is not None:
            conn.transport.write(AUTH_OK)

    def _deny(self, conn: Any, counter: str, why: str) -> None:
        self.counters.add(counter)
        self._log(counter, "denying %s on %s: %s", conn.conn.peer, conn.listener.name, why)
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(AUTH_DENIED)
        conn.close()

    def _screen_packets(self, conn: Any, session: Session, frames: list[bytes]
                        ) -> tuple[list[bytes], list[tuple[str, bytes]]]:
        """Authenticated binary packets: check each MAC and counter; pass on the seed-style packets (their
        ``Owed`` in ``session.owed``), and the refused ones as rejects (dead letters, never acknowledged).
        With shared counters, the first packet of a connection waits until its device's entry is read."""
        passed: list[bytes] = []
        refused: list[tuple[str, bytes]] = []
        if not frames:
            return passed, refused
        self._fresh()
        if self.shared is not None and not session.looked_up:
            if session.hello_pending:
                session.held.extend(frames)
                return passed, refused
            device = self._device_of(frames[0])
            if device is not None:
                self._look_up(conn, session, device, frames)
                return passed, refused
        for framed in frames:
            reason = None
            number, layout = self._layout_of(framed)
            credential = self.credentials.get(layout.device) if layout is not None else None
            opened = credentials.open_packet(credential.mac_key, framed) if credential is not None else None
            known = self.mac_counters.get(layout.device, -1) if layout is not None else -1
            if layout is None:
                reason, counter_name = f"authenticated packet from device number {number}, which has no layout", "binary_unknown"
            elif credential is None:
                reason, counter_name = f"no credential for {layout.device!r} (device number {number})", "binary_no_credential"
            elif opened is None:
                reason, counter_name = f"bad MAC for {layout.device!r}", "binary_bad_mac"
            elif opened[1] < known:
                reason, counter_name = (f"replayed packet for {layout.device!r}: counter {opened[1]} is below "
                                        f"{known}, journaled already"), "binary_replayed"
            elif session.device and session.device != layout.device:
                reason, counter_name = f"a second device ({layout.device!r}) on {session.device!r}'s connection", "binary_mixed"
            if reason is not None:
                self.counters.add(counter_name)
                refused.append((reason, framed[:4096]))
                continue
            assert opened is not None and credential is not None
            if not session.device:
                self._authenticated(conn, session, credential)
            counter = opened[1]
            if counter == known:                 # journaled: its A was lost; answer it, store nothing
                self.counters.add("binary_resent")
                conn.edge.answer_resent(conn)
                continue
            flying = self.flying.get((credential.device, counter))
            if flying is not None:               # the original is being journaled here: wait for it
                self.counters.add("binary_resent_waiting")
                conn.edge.wait_for(conn, flying)
                continue
            owed = Owed(conn, credential.device, counter, self._tag(credential))
            self.flying[(credential.device, counter)] = owed
            session.owed.append(owed)
            passed.append(opened[0])
        return passed, refused

    def _tag(self, credential: Credential) -> str:
        tag = self._tags.get(credential.mac_key)
        if tag is None:
            tag = self._tags[credential.mac_key] = key_tag(credential.mac_key)
        return tag

    def _layout_of(self, framed: bytes) -> tuple[int, Any]:
        """A packet's device number and its ``[binary]`` layout (None: no such layout)."""
        number = PACKET_HEADER.unpack_from(framed)[4] if len(framed) >= PACKET_HEADER.size else -1
        return number, self.cfg.binary.get(number)

    def _device_of(self, framed: bytes) -> str | None:
        layout = self._layout_of(framed)[1]
        return layout.device if layout is not None and layout.device in self.credentials else None

    def _look_up(self, conn: Any, session: Session, device: str, frames: list[bytes]) -> None:
        """Read ``device``'s known counter from the shared counters, then screen ``frames`` (and what
        came meanwhile). Reading stops until then; a cluster that does not answer closes the
        connection unanswered (the board sends again later)."""
        assert self.shared is not None
        session.hello_pending = True
        session.held.extend(frames)
        if conn.transport is not None:
            conn.transport.pause_reading()
        task = asyncio.ensure_future(self.shared.get(device, self._tag(self.credentials[device])))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        task.add_done_callback(lambda f: self._looked_up(conn, session, device, f))

    def _looked_up(self, conn: Any, session: Session, device: str, future: asyncio.Future) -> None:
        session.hello_pending = False
        held, session.held = session.held, []
        if conn.closed or conn.session is not session:
            return
        if future.cancelled() or future.exception() is not None:
            self.counters.add("binary_counter_lookup_failed")
            self._log("binary_counter_lookup_failed", "closing %s unanswered: cannot read %s's known counter (%r)",
                      conn.conn.peer, device, None if future.cancelled() else future.exception())
            conn.close()
            return
        session.looked_up = True
        known = future.result()
        if known > self.mac_counters.get(device, -1):
            self.mac_counters[device] = known
        passed, refused = self._screen_packets(conn, session, held)
        if passed or refused:
            conn.edge.accept(conn, passed, refused)
        if session.eof:
            conn.close_after_answers()
            return
        if conn.transport is not None and not conn.transport.is_closing() and not getattr(conn.edge, "paused", False) \
                and session.rate_timer is None and not conn.close_when_answered:
            conn.transport.resume_reading()

    def _charge(self, conn: Any, session: Session, count: int) -> None:
        rate = conn.listener.max_frames_per_s
        now = time.monotonic()
        session.tokens = min(rate, session.tokens + (now - session.last_refill) * rate) - count
        session.last_refill = now
        if session.tokens < 0 and session.rate_timer is None and conn.transport is not None:
            self.counters.add("rate_limited")
            conn.transport.pause_reading()
            session.rate_timer = asyncio.get_running_loop().call_later(-session.tokens / rate, self._unthrottle, conn)

    def _unthrottle(self, conn: Any) -> None:
        session: Session | None = conn.session
        if session is None:
            return
        session.rate_timer = None
        if conn.transport is not None and not conn.transport.is_closing() and not session.hello_pending \
                and not getattr(conn.edge, "paused", False):
            conn.transport.resume_reading()

    def hold_after_eof(self, conn: Any) -> bool:
        """True (keep the connection open) when the peer hung up while its hello is checked: what it
        sent after the hello is taken, and the answer written, once the check is done."""
        session: Session | None = conn.session
        if session is not None and session.hello_pending:
            session.eof = True
            return True
        return False

    def may_resume(self, conn: Any) -> bool:
        """Whether the edge may resume reading ``conn`` after its own pause (not while throttled)."""
        session: Session | None = conn.session
        return session is not None and session.rate_timer is None and not session.hello_pending \
            and not session.tls_pending

    def may_command(self, conn: Any, device: str) -> bool:
        """Commands for ``device`` go on ``conn`` only if it authenticated as it (or may report for it)."""
        if conn.listener.auth != "required":
            return True
        return bool(conn.conn.device) and credentials.may_write_as(conn.conn.device, conn.conn.may_report, device)

    def _log(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_logged.get(key, 0.0) >= LOG_EVERY_S:
            self._last_logged[key] = now
            log.info(message, *args)


def _tls_context(listener: Listener) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(listener.tls_cert, listener.tls_key)
    if listener.tls_client_ca:
        context.load_verify_locations(listener.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
