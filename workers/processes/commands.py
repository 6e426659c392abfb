"""The commands worker: commands down to devices, automatic replies, and where each device is reached.

Sockets:
    command   ROUTER  bind    <- clients REQ          JSON requests, one JSON reply each (docs/commands.md)
    seen      PULL    bind    <- parsers PUSH         ``seen``: where devices were seen, command acks,
                                                      automatic replies to send
    downlink  ROUTER  bind    <-> edge, MQTT DEALER   ``deliver`` a line to a device; ``delivered`` back
    live      PUB     connect -> query SUB            ``stats``

Requests::

    {"op":"send","device":"ID","command":{"cmd":"interval","value":30}}
        -> {"ok":true,"id":"c5f3a9e1","device":"ID","status":"delivered","via":"text 10.0.0.7:51234"}
    optional: "id" (else one is made), "ttl_s" (else [commands] expire_after_s), "wait_s" (wait this
    long for a device that is not connected before answering "queued")
    {"op":"commands","device":"ID","limit":50}  -> {"ok":true,"commands":[{...}, ...]}
    {"op":"cancel","id":"c5f3a9e1"}             -> {"ok":true,"id":"c5f3a9e1","status":"cancelled"}

``status`` is what happened: ``delivered`` (written to the device's connection, or published to its
downlink topic and taken by the broker), ``queued`` (the device is not connected: it gets the command
when it next shows up), ``expired``, ``unknown device`` (never seen, not in ``[devices]``: nothing
queued). The device's id is put first in the JSON it gets (``{"id":"c42","cmd":"interval",...}``).

A device is reached the way its newest frame came: the edge connection it came on (text listeners;
a binary connection takes no commands) or, for MQTT, the subscription's ``downlink`` topic while the
device is online. Commands are kept in ``<data>/commands.db`` until delivered or expired, so they
survive restarts. A device that acknowledges commands (``{"cmd_ack":"c42","ok":true}``, as the
sensorpipe firmware does) gets a command it has not acknowledged again when it comes back on a new
connection (the firmware applies an id once); one that never acknowledges gets each command once.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import zmq

from workers.core import envelope, errors, runtime, updates, worker
from workers.core.config import Config
from workers.core.commandstore import (ACKED, CANCELLED, DELIVERED, EXPIRED, FAILED, QUEUED, Command, CommandStore,
                                       DeviceState, Route)
from workers.core.envelope import Ack, Downlink, Seen

log = logging.getLogger(__name__)

REPLY_HOLD_S = 5.0              # an automatic reply waits this long for its transport's downlink
MAX_HELD_REPLIES = 10_000
DELIVERY_TIMEOUT_S = 30.0        # a transport that has not answered by then is taken as not having delivered
MAX_WAIT_S = 3600.0
ROUTE_FLUSH_S = 10.0             # new devices, new routes and last_seen due (save_devices) written this often
PRUNE_EVERY_S = 3600.0
EDGE, MQTT = b"edge", b"mqtt"    # the transports' identities on the downlink socket

UNKNOWN_DEVICE = "unknown device"


class RequestError(runtime.RequestError):
    """A bad request: answered ``{"ok": false, "error": ...}``."""


@dataclass
class Pending:
    """A delivery the transport has not answered yet."""
    deadline: float
    command_id: str | None             # None for an automatic reply
    route: Route


@dataclass
class Waiter:
    """A client waiting for its send to be answered."""
    route: list[bytes]
    command_id: str
    reply_at: float                    # monotonic: answer with the status at that time
    wait: bool                         # True: answer early only once delivered or expired
    sent: bool = field(default=False)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Commands:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.counters = runtime.Counters("commands")
        self.store = CommandStore(Path(cfg.data_dir) / "commands.db")
        self.devices = self.store.devices()
        self.open: dict[str, Command] = {c.id: c for c in self.store.open_commands()}
        self.pending: dict[int, Pending] = {}
        self.held_replies: list[tuple[float, Route, Downlink]] = []   # transport not connected yet: retried
        self.transport_waits: set[str] = set()  # queued commands whose transport was away: tried at each tick
        self.waiters: list[Waiter] = []
        self.binary_listeners = {lst.name for lst in cfg.listeners if lst.framing == "binary"}
        # last_seen alone is written down once it moved on by this much (``save_devices``)
        self.seen_refresh_ns = int(cfg.presence.offline_after_s / 10 * 1e9)
        self.seen_refresh_of = {device: int(extra.offline_after_s / 10 * 1e9)
                                for device, extra in cfg.devices.items() if extra.offline_after_s is not None}
        self._ref = 0
        self.front: zmq.Socket | None = None
        self.downlink: zmq.Socket | None = None
        self.ops: dict[str, Callable[[dict, list[bytes]], dict | None]] = {
            "send": self.op_send, "commands": self.op_commands, "cancel": self.op_cancel,
            "ping": lambda request, route: {"ok": True},
            "firmware_push": self.op_firmware_push, "firmware": self.op_firmware,
        }
        self.updates = updates.Updates(Path(cfg.data_dir), self.queue_for_update, self.cancel_queued,
                                       self.counters.add)
        self._last_created = 0

    # ------------------------------------------------------------------ requests

    def answer(self, route: list[bytes], raw: bytes) -> dict | None:
        """The reply to a request, or None when it is answered later (a send waiting for its transport).
        Never raises: a bad request gets ``{"ok": false, "error": ...}``."""
        return runtime.dispatch(raw, self.ops, self.counters, route)

    def op_send(self, request: dict, route: list[bytes]) -> dict | None:
        device = request.get("device")
        if not isinstance(device, str) or not device:
            raise RequestError('"device" must be a non-empty string')
        command = request.get("command")
        if not isinstance(command, dict):
            raise RequestError('"command" must be a JSON object, e.g. {"cmd":"interval","value":30}')
        command_id = request.get("id", command.get("id"))
        if command_id is None:
            command_id = "c" + secrets.token_hex(4)
        if isinstance(command_id, bool) or not isinstance(command_id, (str, int)) or not str(command_id):
            raise RequestError('"id" must be a non-empty string or a number')
        if updates.parse_command_id(str(command_id)):
            raise RequestError('ids "ota.*" are those of updates over the air (sensorpipe firmware push)')
        ttl_s = _number(request, "ttl_s", self.cfg.commands.expire_after_s)
        wait_s = min(_number(request, "wait_s", 0.0, zero_ok=True), MAX_WAIT_S)
        if device not in self.devices and device not in self.cfg.devices:
            self.counters.add("unknown_device")
            return {"ok": False, "device": device, "status": UNKNOWN_DEVICE, "code": errors.UNKNOWN_DEVICE,
                    "error": f"device {device!r} has never been seen and is not in [devices]: nothing queued"}
        payload = orjson.dumps({"id": command_id, **{k: v for k, v in command.items() if k != "id"}})
        command_id = str(command_id)
        existing = self.open.get(command_id) or self.store.get(command_id)
        if existing is not None:
            if existing.device != device or existing.payload != payload:
                raise RequestError(f"id {command_id!r} is already used by another command", errors.CONFLICT)
            cmd = existing                  # the same send again (its reply was lost): say how it stands
        else:
            queued = sum(1 for c in self.open.values() if c.device == device and c.state == QUEUED
                         and not updates.parse_command_id(c.id))     # an update waiting is not the user's
            if queued >= self.cfg.commands.max_queued_per_device:
                raise RequestError(f"{queued} commands already queued for {device!r}"
                                   " ([commands] max_queued_per_device)", errors.LIMIT_EXCEEDED)
            created = now_ms()
            cmd = Command(command_id, device, payload, created, created + int(ttl_s * 1000))
            self.store.save(cmd)                # durable before anything is tried
            self.open[cmd.id] = cmd
            self.counters.add("commands")
        if cmd.state == QUEUED:
            self.try_deliver(cmd)
        if cmd.inflight or (wait_s and cmd.state == QUEUED):
            at = time.monotonic() + max(wait_s, self.cfg.commands.reply_timeout_s if cmd.inflight else 0)
            self.waiters.append(Waiter(route, cmd.id, at, wait=bool(wait_s)))
            return None
        return self.status_reply(cmd)

    def op_commands(self, request: dict, route: list[bytes]) -> dict:
        device = request.get("device")
        if device is not None and (not isinstance(device, str) or not device):
            raise RequestError('"device" must be a non-empty string')
        limit = int(_number(request, "limit", 50))
        commands = []
        for stored in self.store.listing(device, limit):
            commands.append(self.open.get(stored.id, stored).describe())
        return {"ok": True, "commands": commands}

    def op_cancel(self, request: dict, route: list[bytes]) -> dict:
        command_id = request.get("id")
        if not isinstance(command_id, (str, int)) or isinstance(command_id, bool):
            raise RequestError('"id" must be a command id')
        cmd = self.open.get(str(command_id))
        if cmd is None:
            stored = self.store.get(str(command_id))
            if stored is None:
                raise RequestError(f"no command {command_id!r}", errors.NOT_FOUND)
            raise RequestError(f"command {command_id!r} is {stored.state}: only a queued one can be cancelled",
                               errors.CONFLICT)
        if cmd.state != QUEUED:
            raise RequestError(f"command {cmd.id!r} is {cmd.state}: only a queued one can be cancelled", errors.CONFLICT)
        self.finish(cmd, CANCELLED)
        return self.status_reply(cmd)

    # ------------------------------------------------------------------ updates over the air

    def op_firmware_push(self, request: dict, route: list[bytes]) -> dict:
        """``{"op":"firmware_push","version":"1.4","devices":[...]}`` or ``"percent":10``; ``"force"``."""
        devices = request.get("devices")
        percent = request.get("percent")
        if devices is not None and (not isinstance(devices, list) or not devices
                                    or not all(isinstance(d, str) and d for d in devices)):
            raise RequestError('"devices" must be a list of device ids')
        if devices is None and (isinstance(percent, bool) or not isinstance(percent, (int, float))
                                or not 0 < percent <= 100):
            raise RequestError('give "devices" or a "percent" of the fleet, 0 < percent <= 100')
        try:
            with self.store.batch():
                return self.updates.push(updates.check_version(request.get("version")), devices, percent,
                                         request.get("force") is True, self.devices, self.online)
        except updates.UpdateError as exc:           # offline, mid-update, a version that failed before
            raise RequestError(str(exc), errors.CONFLICT) from None

    def op_firmware(self, request: dict, route: list[bytes]) -> dict:
        return self.updates.describe(request.get("device"))

    def online(self, device: str) -> bool:
        state = self.devices.get(device)
        return state is not None and time.time_ns() - state.last_seen <= self.cfg.offline_after_s(device) * 1e9

    def queue_for_update(self, device: str, command_id: str, command: dict) -> None:
        """A command of an update: like a send, without the per-device bound (an update is many chunks);
        created times strictly increase, so that they go, and go again, in order."""
        created = self._last_created = max(now_ms(), self._last_created + 1)
        payload = orjson.dumps({"id": command_id, **command})
        cmd = Command(command_id, device, payload, created, created + int(self.cfg.commands.expire_after_s * 1000))
        self.store.save(cmd)
        self.open[cmd.id] = cmd
        self.counters.add("commands")
        self.try_deliver(cmd)

    def cancel_queued(self, id_prefix: str) -> None:
        for cmd in [c for c in self.open.values() if c.id.startswith(id_prefix) and c.state == QUEUED]:
            self.finish(cmd, CANCELLED)

    def status_reply(self, cmd: Command) -> dict:
        reply: dict[str, Any] = {"ok": cmd.state != EXPIRED, "id": cmd.id, "device": cmd.device, "status": cmd.state}
        if cmd.state == QUEUED:
            reply["expires"] = cmd.expires_ms
            state = self.devices.get(cmd.device)
            reply["reason"] = cmd.error or ("not connected" if state and state.route else "never seen where"
                                            " commands can reach it" if state else "never seen yet")
        elif cmd.via:
            reply["via"] = cmd.via
        if cmd.state == EXPIRED:
            reply["code"] = errors.EXPIRED
        return reply

    # ------------------------------------------------------------------ delivering

    def transport(self, route: Route) -> bytes:
        return MQTT if route.mqtt else EDGE

    def reachable(self, device: str) -> Route | None:
        state = self.devices.get(device)
        if state is None or state.route is None:
            return None
        if state.route.mqtt and time.time_ns() - state.last_seen > self.cfg.offline_after_s(device) * 1e9:
            return None                 # an MQTT device that is offline would miss the publication
        return state.route

    def send_downlink(self, route: Route, device: str, payload: bytes, command_id: str | None) -> int:
        """Hand a line to the device's transport; the ref to wait for, or 0 if the transport is away."""
        assert self.downlink is not None
        self._ref += 1
        ref = self._ref
        line = Downlink(device, route.listener, route.conn_id, route.peer, payload)
        try:
            self.downlink.send_multipart(envelope.deliver_message([self.transport(route)], ref, line), zmq.NOBLOCK)
        except zmq.ZMQError as exc:       # EHOSTUNREACH: that transport is not running; EAGAIN: it is stuck
            self.counters.add("transport_away")
            log.debug("transport %s away: %s", self.transport(route), exc)
            return 0
        self.pending[ref] = Pending(time.monotonic() + DELIVERY_TIMEOUT_S, command_id, route)
        return ref

    def try_deliver(self, cmd: Command) -> bool:
        if cmd.inflight:
            return False
        route = self.reachable(cmd.device)
        if route is None:
            return False
        cmd.inflight = self.send_downlink(route, cmd.device, cmd.payload, cmd.id)
        if not cmd.inflight:
            cmd.error = f"the {self.transport(route).decode()} worker is not running"
            self.transport_waits.add(cmd.id)    # tried again when it is, not at the device's next frame
        else:
            self.transport_waits.discard(cmd.id)
        return bool(cmd.inflight)

    def delivered(self, ref: int, error: str | None) -> None:
        pending = self.pending.pop(ref, None)
        if pending is None:
            return                          # answered after its deadline: it was retried or is moot
        if pending.command_id is None:
            self.counters.add("replies_sent" if error is None else "replies_not_delivered")
            return
        cmd = self.open.get(pending.command_id)
        if cmd is None:
            return
        cmd.inflight = 0
        if error is not None:
            self.counters.add("delivery_failures")
            cmd.error = error
            self.notify(cmd, final=False)
            return
        first = cmd.state == QUEUED
        cmd.state, cmd.error = DELIVERED, None
        cmd.attempts += 1
        cmd.delivered_ms = now_ms()
        cmd.delivered_on = (pending.route.listener, pending.route.conn_id)
        cmd.via = pending.route.describe()
        self.store.save(cmd)
        self.counters.add("delivered" if first else "delivered_again")
        log.info("command %s %s to %s via %s", cmd.id, "delivered" if first else "delivered again", cmd.device,
                 cmd.via)
        self.notify(cmd, final=True)

    def finish(self, cmd: Command, state: str, error: str | None = None) -> None:
        cmd.state, cmd.done_ms = state, now_ms()
        if error is not None:
            cmd.error = error
        self.store.save(cmd)
        self.open.pop(cmd.id, None)
        self.notify(cmd, final=True)

    def notify(self, cmd: Command, final: bool) -> None:
        """Answer the clients waiting for ``cmd``: at once when it is settled, else those not waiting."""
        for waiter in self.waiters:
            if waiter.command_id == cmd.id and not waiter.sent and (final or not waiter.wait):
                self.reply(waiter, self.status_reply(cmd))

    def reply(self, waiter: Waiter, message: dict) -> None:
        waiter.sent = True
        assert self.front is not None
        try:
            self.front.send_multipart([*waiter.route, orjson.dumps(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters.add("replies_to_clients_lost")

    # ------------------------------------------------------------------ what the parsers saw

    def on_seen(self, seen: list[Seen], acks: list[Ack], replies: list[Downlink]) -> None:
        came_back: set[str] = set()
        devices, binary, default, refresh_of = self.devices, self.binary_listeners, self.seen_refresh_ns, \
            self.seen_refresh_of
        for entry in seen:
            device = entry.device
            state = devices.get(device)
            if state is None:
                state = devices[device] = DeviceState(entry.ts, dirty=True)
                self.counters.add("new_devices")
            if entry.ts >= state.last_seen:
                state.last_seen = entry.ts
                if entry.ts - state.saved_seen >= refresh_of.get(device, default):
                    state.dirty = True
            if entry.listener in binary:     # present, but no way down on that connection
                continue
            route = state.route
            if route is None or route.conn_id != entry.conn_id or route.listener != entry.listener \
                    or route.peer != entry.peer:
                state.route = Route(entry.listener, entry.conn_id, entry.peer)
                state.dirty = True
            came_back.add(device)
        for ack in acks:
            self.on_ack(ack)
        for line in replies:
            route = Route(line.listener, line.conn_id, line.peer)
            if route.listener in self.binary_listeners or len(self.held_replies) >= MAX_HELD_REPLIES:
                self.counters.add("replies_not_delivered")
            elif not self.send_downlink(route, line.device, line.payload, None):
                # the transport is starting or restarting (its downlink not connected yet): try again
                # for a little while rather than leave a heartbeat unanswered
                self.held_replies.append((time.monotonic() + REPLY_HOLD_S, route, line))
        if came_back and self.open:
            for cmd in sorted(self.open.values(), key=lambda c: c.created_ms):
                if cmd.device in came_back:
                    self.deliver_again_or_first(cmd)

    def deliver_again_or_first(self, cmd: Command) -> None:
        if cmd.state == QUEUED:
            self.try_deliver(cmd)
            return
        state = self.devices.get(cmd.device)
        # an update's commands go only to firmware that acknowledges, which may not have said so yet
        if state is None or not (state.acks or updates.parse_command_id(cmd.id)) or state.route is None:
            return
        if cmd.delivered_on != (state.route.listener, state.route.conn_id):
            self.try_deliver(cmd)           # a new connection, and no ack yet: the firmware applies an id once

    def on_ack(self, ack: Ack) -> None:
        state = self.devices.get(ack.device)
        if state is not None and not state.acks:
            state.acks, state.dirty = True, True
        cmd = self.open.get(ack.command_id)
        if cmd is None or cmd.device != ack.device:
            self.counters.add("acks_for_unknown_commands")
            return
        self.counters.add("acked" if ack.ok else "refused_by_device")
        log.info("command %s %s by %s%s", cmd.id, "acknowledged" if ack.ok else "REFUSED", cmd.device,
                 f": {ack.error}" if ack.error else "")
        if cmd.state == QUEUED:         # acked before its delivered answer came back
            cmd.attempts += 1
            cmd.delivered_ms = now_ms()
        self.finish(cmd, ACKED if ack.ok else FAILED, ack.error)
        self.updates.on_ack(cmd.id, ack.ok, ack.error)

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        if self.held_replies:
            held, self.held_replies = self.held_replies, []
            for deadline, route, line in held:
                if self.send_downlink(route, line.device, line.payload, None):
                    continue
                if now < deadline:
                    self.held_replies.append((deadline, route, line))
                else:
                    self.counters.add("replies_not_delivered")
        waiting = sorted((c for c in self.open.values() if c.id in self.transport_waits), key=lambda c: c.created_ms) \
            if self.transport_waits else []     # (sorted is stable: those of one ms keep the order they came in)
        self.transport_waits = {c.id for c in waiting if c.state == QUEUED and not c.inflight}
        for cmd in waiting:                 # in order; one still away puts itself back and ends the round
            if cmd.id in self.transport_waits:
                self.transport_waits.discard(cmd.id)
                self.try_deliver(cmd)
                if cmd.id in self.transport_waits:
                    break
        for ref, pending in list(self.pending.items()):
            if now >= pending.deadline:
                self.delivered(ref, "the transport did not answer")
        wall = now_ms()
        for cmd in list(self.open.values()):
            if wall >= cmd.expires_ms and not cmd.inflight:
                if cmd.state == QUEUED:
                    self.counters.add("expired")
                    log.info("command %s for %s expired undelivered", cmd.id, cmd.device)
                    self.finish(cmd, EXPIRED)
                else:                   # delivered, never acknowledged: no more tries
                    cmd.done_ms = wall
                    self.store.save(cmd)
                    self.open.pop(cmd.id, None)
                self.updates.on_expired(cmd.id)
        for waiter in self.waiters:
            if not waiter.sent and now >= waiter.reply_at:
                cmd = self.open.get(waiter.command_id) or self.store.get(waiter.command_id)
                if cmd is not None:
                    self.reply(waiter, self.status_reply(cmd))
        self.waiters = [w for w in self.waiters if not w.sent]

    def save_devices(self, every_last_seen: bool = False) -> None:
        """Write down the devices that are new or changed how they are reached, and those whose
        last_seen moved on by a tenth of their offline_after_s (``every_last_seen``: by anything, as
        when stopping). A fleet's presence is then written every 90 s per device rather than every
        10 s, and a crash leaves last_seen at most that far behind."""
        dirty = {d: s for d, s in self.devices.items()
                 if s.dirty or (every_last_seen and s.last_seen != s.saved_seen)}
        if dirty:
            self.store.save_devices(dirty)
            for state in dirty.values():
                state.dirty = False
                state.saved_seen = state.last_seen

    # ------------------------------------------------------------------ loop

    def take_request(self, message: list[bytes]) -> None:
        if len(message) < 3 or message[-2] != b"":
            self.counters.add("bad_messages")     # not from a REQ socket: nowhere to answer
            return
        reply = self.answer(message[:-1], message[-1])
        if reply is not None:
            assert self.front is not None
            self.front.send_multipart([*message[:-1], orjson.dumps(reply)])

    def run(self, ctx: zmq.Context, stop: runtime.StopFlag) -> None:
        cfg = self.cfg
        self.front = front = runtime.socket(ctx, zmq.ROUTER, bind=cfg.endpoints.command)
        notices = runtime.socket(ctx, zmq.PULL, bind=cfg.endpoints.seen, hwm=10000,
                                 max_message=runtime.BATCH_MESSAGE_BYTES)
        downlink = runtime.socket(ctx, zmq.ROUTER, server=True,    # bound below, once its options are set
                                  address=cfg.endpoints.downlink)
        downlink.setsockopt(zmq.ROUTER_MANDATORY, 1)      # a transport that is not there raises, not drops
        downlink.setsockopt(zmq.ROUTER_HANDOVER, 1)       # a restarted edge takes its identity back
        downlink.bind(cfg.endpoints.downlink)
        self.downlink = downlink
        live = runtime.socket(ctx, zmq.PUB, connect=cfg.endpoints.live)
        poller = zmq.Poller()
        for sock in (front, notices, downlink):
            poller.register(sock, zmq.POLLIN)
        next_save = next_prune = 0.0
        log.info("commands: answering on %s, %d open commands, %d devices known", cfg.endpoints.command,
                 len(self.open), len(self.devices))
        try:
            while not stop:
                events = dict(poller.poll(runtime.POLL_MS))
                if downlink in events:
                    worker.drain(downlink, lambda message: self.delivered(*envelope.parse_delivered(message)),
                                 counters=self.counters, logger=log, warning="ignoring a bad downlink message: %s")
                if notices in events:
                    worker.drain(notices, lambda message: self.on_seen(*envelope.parse_seen_message(message)),
                                 counters=self.counters, logger=log, warning="ignoring a bad seen message: %s")
                if front in events:
                    worker.drain(front, self.take_request, 64)
                now = time.monotonic()
                self.tick(now)
                if now >= next_save:
                    next_save = now + ROUTE_FLUSH_S
                    self.save_devices()
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY_S
                    pruned = self.store.prune(now_ms() - int(cfg.commands.keep_done_s * 1000))
                    if pruned:
                        log.info("commands: forgot %d finished commands older than %.0f s", pruned,
                                 cfg.commands.keep_done_s)
                self.counters["open_commands"] = len(self.open)
                self.counters["updates_under_way"] = self.updates.busy()
                self.counters["devices_known"] = len(self.devices)
                self.counters.publish_due(live)
        finally:
            try:
                self.save_devices(every_last_seen=True)
            finally:
                for sock in (front, notices, downlink, live):
                    sock.close(linger=0)
                self.store.close()
                self.updates.close()
                log.info("commands: stopped")


def _number(request: dict, key: str, default: float, zero_ok: bool = False) -> float:
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
        raise RequestError(f'"{key}" must be a number {"0 or more" if zero_ok else "more than 0"}')
    return float(value)


# --------------------------------------------------------------------------- client


def request(endpoint: str, message: dict, timeout_s: float = 2.5) -> dict:
    """Ask the commands worker; raise ``QueryError`` if it does not answer (one try: a send is not
    repeated blindly, though sending the same id again is safe)."""
    from workers.processes import query

    return query.request(endpoint, message, timeout_s, retries=0, worker="commands worker",
                         hint="`sensorpipe ctl status` shows the commands worker")


def main(cfg: Config) -> int:
    return worker.serve(lambda ctx, stop: Commands(cfg).run(ctx, stop))
