"""The MQTT worker: device messages from a broker into the pipeline, commands and replies back out.

Sockets:
    inject    DEALER  connect -> edge ROUTER         ``inject`` the messages received; ``injected`` once
                                                     the edge has journaled them
    downlink  DEALER  connect <-> commands ROUTER    ``deliver``: publish to the device's downlink topic;
                                                     answered ``delivered`` once the broker has it
    live      PUB     connect -> query SUB           ``stats``
Plus one MQTT connection (paho-mqtt 2.x, MQTT 5 or 3.1.1), driven from this worker's poll loop: no thread.

Each ``[[mqtt.subscriptions]]`` subscribes to its topic template with ``{device}`` made a wildcard
(``sensorpipe/{device}/up`` -> ``sensorpipe/+/up``); a message's device id is read from its topic, and
its payload is a frame from listener ``mqtt:<name>`` (the subscription's decoder), peer = the topic.

Nothing is lost between the broker and the journal: the session is persistent (MQTT 5: ``clean_start
= False`` and ``session_expiry_s``; 3.1.1: ``clean_session = False``; under a fixed ``client_id``) and
QoS 1 messages are acknowledged to the broker (PUBACK) only after the edge has answered ``injected``.
MQTT 5 also tells the broker how many unacknowledged messages it may send at once (``receive_maximum``).
Mind the broker's own per-client queue: Mosquitto DROPS messages beyond ``max_queued_messages`` (1000
by default) even for a connected client, when a burst comes faster than the worker drains it (about
20 000 messages/s measured here): see docs/mqtt.md. A message the worker held when it stopped or died is sent
again by the broker, and so are the ones published while the worker was away (Mosquitto keeps up to
``max_queued_messages``, 1000 by default, per session). A message may therefore arrive twice (at least
once); the stores keep readings by (device, field, timestamp), so one with its own timestamp is
stored once. The worker exits 0 at once when no subscription is configured.
"""
from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import zmq
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from workers.core import envelope, runtime, worker
from workers.core.config import Config, MqttSubscription
from workers.core.envelope import Conn
from workers.core.templates import TemplateError, TopicTemplate

log = logging.getLogger(__name__)

MAX_INJECTS_IN_FLIGHT = 8        # inject messages the edge has not answered yet
MAX_FRAMES_PER_INJECT = 1000
MAX_RECEIVED = 20_000            # messages held for the edge before the worker stops reading the broker
READS_PER_ROUND = 500            # MQTT packets read (at most READ_BUDGET_S) before the worker injects them
READ_BUDGET_S = 0.01
INJECT_TIMEOUT_S = 10.0          # no answer from the edge by then: send the same frames again
STOP_WAIT_S = 3.0                # on stop, wait this long for the edge to confirm what was sent
CONNECT_TIMEOUT_S = 5.0
LOG_EVERY_S = 10.0


class Subscription(NamedTuple):
    config: MqttSubscription
    uplink: TopicTemplate
    downlink: TopicTemplate | None


class Received(NamedTuple):
    payload: bytes
    recv_ts: int
    listener: str
    topic: str
    mid: int                      # 0 for QoS 0: nothing to acknowledge
    reject: str | None


@dataclass
class Inject:
    message: list[bytes]
    mids: list[int]
    sent_at: float
    frames: int
    tries: int = 1


class MqttWorker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.counters = runtime.Counters("mqtt")
        self.subscriptions = [Subscription(s, TopicTemplate(s.topic), TopicTemplate(s.downlink) if s.downlink else None)
                              for s in self.cfg.mqtt.subscriptions]
        self.by_listener = {s.config.listener: s for s in self.subscriptions}
        self.v5 = cfg.mqtt.protocol == "5"
        self.client = self._make_client()
        self.connected = False
        self.session_started = False       # connected once: later connections use reconnect()
        self.stopping = False
        self.next_connect = 0.0
        self.backoff = worker.Backoff(self.cfg.mqtt.reconnect_min_s, self.cfg.mqtt.reconnect_max_s)
        self.received: list[Received] = []
        self.injects: dict[int, Inject] = {}
        self.confirming: set[int] = set()   # mids sent to the edge, not answered yet
        self.ack_later: set[int] = set()    # mids journaled while the broker was away: ack when it sends again
        self.publishing: dict[int, int] = {}  # downlink publication mid -> deliver ref
        self.last_ms: dict[str, int] = {}
        self._ref = 0
        self._last_logged: dict[str, float] = {}
        self.inject_sock: zmq.Socket | None = None
        self.downlink_sock: zmq.Socket | None = None

    # ------------------------------------------------------------------ the broker

    def _make_client(self) -> paho.Client:
        opts = self.cfg.mqtt
        if self.v5:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=opts.client_id, protocol=paho.MQTTv5,
                                 manual_ack=True)
        else:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=opts.client_id, clean_session=False,
                                 protocol=paho.MQTTv311, manual_ack=True)
        client.connect_timeout = CONNECT_TIMEOUT_S
        if opts.username:
            client.username_pw_set(opts.username, opts.password or None)
        if opts.tls:
            client.tls_set(ca_certs=opts.ca_file or None, certfile=opts.cert_file or None,
                           keyfile=opts.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(opts.tls_insecure)
        client.on_socket_open = self.on_socket_open
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_message = self.on_message
        client.on_publish = self.on_publish
        return client

    def connect(self, now: float) -> None:
        opts = self.cfg.mqtt
        try:
            if self.session_started:
                self.client.reconnect()
            elif self.v5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = opts.session_expiry_s
                properties.ReceiveMaximum = opts.receive_maximum
                self.client.connect(opts.host, opts.port, opts.keepalive_s, clean_start=False, properties=properties)
                self.session_started = True
            else:
                self.client.connect(opts.host, opts.port, opts.keepalive_s)
                self.session_started = True
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._retry_later(now, f"cannot connect to the broker at {opts.host}:{opts.port}: {exc}")

    def _retry_later(self, now: float, why: str) -> None:
        delay = self.backoff.failed()
        self.next_connect = now + delay
        self.counters.add("connect_failures")
        self._log_sometimes("connect", logging.WARNING, "%s; next try in %.1f s", why, delay)

    def on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Small packets back to back (a PUBACK, then a reply's PUBLISH) would otherwise wait for the
        # broker's delayed ACK: a heartbeat's answer took 90 ms instead of a few.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._retry_later(time.monotonic(), f"the broker refused the connection: {reason}")
            client.disconnect()
            return
        self.connected = True
        self.backoff.reset()
        if not flags.session_present:
            self.ack_later.clear()           # a new session: the broker will not send those again
        subs = list(dict.fromkeys((s.uplink.filter, s.config.qos) for s in self.subscriptions))
        if self.v5:          # noLocal: our own downlink publications do not come back to us
            client.subscribe([(f, SubscribeOptions(qos=q, noLocal=True)) for f, q in subs])
        else:
            client.subscribe(subs)
        self.counters.add("connects")
        log.info("mqtt: connected to %s:%d as %s (session %s); subscribed to %s", self.cfg.mqtt.host,
                 self.cfg.mqtt.port, self.cfg.mqtt.client_id, "resumed" if flags.session_present else "new",
                 ", ".join(f for f, _ in subs))

    def on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self.connected
        self.connected = False
        if was and not self.stopping:
            self.counters.add("disconnects")
            log.warning("mqtt: lost the broker (%s); reconnecting", reason)
        self.next_connect = time.monotonic() + self.backoff.delay()

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self.take(message)
        except Exception:  # a bug on one message must not stop the others (it is acked: nothing re-sends it)
            log.exception("mqtt: failed on a message from %r", message.topic)
            self.counters.add("failed_messages")
            self.ack(message.mid, message.qos)

    def take(self, message: paho.MQTTMessage) -> None:
        mid = message.mid if message.qos > 0 else 0
        if mid and mid in self.ack_later:      # journaled already; the broker sends it again after a reconnect
            self.ack_later.discard(mid)
            self.ack(mid, message.qos)
            self.counters.add("resent_already_journaled")
            return
        if mid and mid in self.confirming:     # on its way to the journal: acknowledged when confirmed
            self.counters.add("resent_on_the_way")
            return
        topic = message.topic
        match = self.match(topic)
        if match is None:                      # e.g. our own downlink, when it fits the uplink filter
            self.counters.add("other_topics")
            self.ack(mid, message.qos)
            return
        sub, device = match
        if message.retain and not self.cfg.mqtt.take_retained:
            self.counters.add("retained_skipped")
            self.ack(mid, message.qos)
            return
        payload = message.payload
        if not payload:
            self.counters.add("empty_messages")
            self.ack(mid, message.qos)
            return
        reject = None
        if len(payload) > sub.config.max_frame_bytes:
            reject = f"message longer than {sub.config.max_frame_bytes} bytes (mqtt max_frame_bytes)"
            self.counters.add("oversized_messages")
        self.received.append(Received(payload, self.next_ts(device), sub.config.listener, topic, mid, reject))
        if mid:
            self.confirming.add(mid)
        self.counters.add("messages")

    def match(self, topic: str) -> tuple[Subscription, str] | None:
        for sub in self.subscriptions:
            device = sub.uplink.device(topic)
            if device is not None:
                return sub, device
        return None

    def next_ts(self, device: str) -> int:
        """Arrival time in ns, strictly increasing per device (1 ms apart at least), like the edge's."""
        now_ms = time.time_ns() // 1_000_000
        last = self.last_ms.get(device, 0)
        now_ms = now_ms if now_ms > last else last + 1
        self.last_ms[device] = now_ms
        return now_ms * 1_000_000

    def ack(self, mid: int, qos: int = 1) -> None:
        if not mid:
            return
        if not self.connected:
            self.ack_later.add(mid)
            return
        self.client.ack(mid, qos)
        self.counters.add("acked")

    def on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        ref = self.publishing.pop(mid, None)
        if ref is not None:
            self.answer_delivery(ref, None)

    # ------------------------------------------------------------------ the edge

    def send_injects(self, now: float) -> None:
        assert self.inject_sock is not None
        while self.received and len(self.injects) < MAX_INJECTS_IN_FLIGHT:
            chunk, self.received = self.received[:MAX_FRAMES_PER_INJECT], self.received[MAX_FRAMES_PER_INJECT:]
            conns: list[Conn] = []
            index: dict[tuple[str, str], int] = {}
            frames = []
            for item in chunk:
                key = (item.listener, item.topic)
                if key not in index:
                    index[key] = len(conns)
                    conns.append(Conn(0, item.listener, item.topic))
                if item.reject is not None:
                    frames.append(envelope.reject_frame(item.reject, item.payload, item.recv_ts, index[key]))
                else:
                    frames.append((item.payload, item.recv_ts, index[key]))
            self._ref += 1
            message = envelope.inject_message(conns, envelope.pack_frames(frames), self._ref)
            self.injects[self._ref] = Inject(message, [i.mid for i in chunk if i.mid], now, len(chunk))
            self._send_inject(message)

    def _send_inject(self, message: list[bytes]) -> None:
        assert self.inject_sock is not None
        try:
            self.inject_sock.send_multipart(message, zmq.NOBLOCK)
        except zmq.Again:                 # the edge is away: sent again after INJECT_TIMEOUT_S
            self.counters.add("inject_not_sent")

    def on_injected(self, message: list[bytes]) -> None:
        ref, seq, error = envelope.parse_injected(message)
        inject = self.injects.pop(ref, None)
        if inject is None:
            return                        # answered twice (it was sent again): done already
        if error is not None:             # the edge found the message malformed: a bug, not bad input
            log.error("mqtt: the edge refused %d frames: %s", inject.frames, error)
            self.counters.add("injects_refused")
        self.counters.add("injected_frames", inject.frames)
        for mid in inject.mids:
            self.confirming.discard(mid)
            self.ack(mid)

    def resend_injects(self, now: float) -> None:
        for inject in self.injects.values():
            if now - inject.sent_at >= INJECT_TIMEOUT_S:
                inject.sent_at, inject.tries = now, inject.tries + 1
                self.counters.add("injects_sent_again")
                self._log_sometimes("inject", logging.WARNING, "mqtt: the edge has not confirmed %d frames in"
                                    " %.0f s: sending them again (is the edge running?)", inject.frames,
                                    INJECT_TIMEOUT_S)
                self._send_inject(inject.message)

    # ------------------------------------------------------------------ downlink

    def on_deliver(self, message: list[bytes]) -> None:
        ref, line = envelope.parse_deliver(message)
        sub = self.by_listener.get(line.listener)
        if sub is None:
            self.answer_delivery(ref, f"no MQTT subscription {line.listener!r}")
            return
        if sub.downlink is None:
            self.answer_delivery(ref, f"subscription {sub.config.name!r} has no downlink topic")
            return
        if not self.connected:
            self.answer_delivery(ref, "not connected to the broker")
            return
        try:
            topic = sub.downlink.topic(line.device)
        except TemplateError as exc:
            self.answer_delivery(ref, str(exc))
            return
        info = self.client.publish(topic, line.payload, qos=sub.config.qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.answer_delivery(ref, f"publish failed: {paho.error_string(info.rc)}")
            return
        self.counters.add("published")
        if info.is_published():
            self.answer_delivery(ref, None)
        else:
            self.publishing[info.mid] = ref

    def answer_delivery(self, ref: int, error: str | None) -> None:
        assert self.downlink_sock is not None
        try:
            self.downlink_sock.send_multipart(envelope.delivered_message(ref, error), zmq.NOBLOCK)
        except zmq.Again:
            self.counters.add("delivery_answers_lost")

    # ------------------------------------------------------------------ loop

    def _log_sometimes(self, key: str, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_logged.get(key, 0.0) >= LOG_EVERY_S:
            self._last_logged[key] = now
            log.log(level, msg, *args)

    def pump(self, timeout_ms: int) -> None:
        """One round: wait for the broker, the edge and the commands worker, and serve them."""
        assert self.inject_sock is not None and self.downlink_sock is not None
        poller = zmq.Poller()
        poller.register(self.inject_sock, zmq.POLLIN)
        poller.register(self.downlink_sock, zmq.POLLIN)
        sock = self.client.socket()
        if sock is not None:
            flags = (zmq.POLLIN if len(self.received) < MAX_RECEIVED else 0) | \
                    (zmq.POLLOUT if self.client.want_write() else 0)
            if flags:
                poller.register(sock, flags)
        events = dict(poller.poll(timeout_ms))
        if sock is not None:
            ready = events.get(sock.fileno(), 0) | events.get(sock, 0)
            if ready & zmq.POLLIN:
                self.read_all()
            if self.client.socket() is not None and self.client.want_write():
                self.client.loop_write()
        if self.client.socket() is not None:
            self.client.loop_misc()
        if self.inject_sock in events:
            worker.drain(self.inject_sock, self.on_injected, counters=self.counters, logger=log,
                         warning="mqtt: ignoring a bad reply from the edge: %s")
        if self.downlink_sock in events:
            worker.drain(self.downlink_sock, self.on_deliver, counters=self.counters, logger=log,
                         warning="mqtt: ignoring a bad deliver message: %s")
        if self.client.want_write() and self.client.socket() is not None:
            self.client.loop_write()                # acks and publications made above go out now

    def read_all(self) -> None:
        """What the broker has sent so far (within a bound), so that it goes to the edge in one inject:
        paho's loop_read() takes one packet per call."""
        deadline = time.monotonic() + READ_BUDGET_S
        for _ in range(READS_PER_ROUND):
            if time.monotonic() > deadline:
                return
            sock = self.client.socket()
            if sock is None or len(self.received) >= MAX_RECEIVED:
                return
            self.client.loop_read()
            sock = self.client.socket()
            if sock is None:
                return
            pending = getattr(sock, "pending", None)         # TLS: bytes already decrypted are not seen by select
            if not (pending and pending()) and not select.select([sock], [], [], 0)[0]:
                return

    def run(self, ctx: zmq.Context, stop: runtime.StopFlag) -> None:
        cfg = self.cfg
        self.inject_sock = runtime.socket(ctx, zmq.DEALER, connect=cfg.endpoints.inject, hwm=MAX_INJECTS_IN_FLIGHT * 4)
        downlink = runtime.socket(ctx, zmq.DEALER, address=cfg.endpoints.downlink)
        downlink.setsockopt(zmq.ROUTING_ID, b"mqtt")
        downlink.connect(cfg.endpoints.downlink)
        self.downlink_sock = downlink
        live = runtime.socket(ctx, zmq.PUB, connect=cfg.endpoints.live)
        log.info("mqtt: broker %s:%d, subscriptions: %s", cfg.mqtt.host, cfg.mqtt.port,
                 "; ".join(f"{s.config.name}: {s.uplink.filter} ({s.config.decoder})" for s in self.subscriptions))
        try:
            while not stop:
                now = time.monotonic()
                if self.client.socket() is None and now >= self.next_connect:
                    self.connect(now)
                self.pump(runtime.POLL_MS)        # wakes at once for the broker, the edge's answers, deliveries
                now = time.monotonic()
                self.send_injects(now)
                self.resend_injects(now)
                self.counters["held_messages"] = len(self.received)
                self.counters["injects_in_flight"] = len(self.injects)
                self.counters["connected"] = int(self.connected)
                self.counters.publish_due(live)
            self.drain()
        finally:
            self.stopping = True
            try:
                if self.client.socket() is not None:
                    self.client.disconnect()
                    self.client.loop_write()
            except (OSError, ssl.SSLError):
                pass
            for sock in (self.inject_sock, downlink, live):
                sock.close(linger=0)
            log.info("mqtt: stopped; %d messages not confirmed by the edge stay with the broker",
                     len(self.confirming) + sum(1 for r in self.received if r.mid))

    def drain(self) -> None:
        """On stop: have the edge journal what was received, and acknowledge it, for a moment."""
        deadline = time.monotonic() + STOP_WAIT_S
        while (self.received or self.injects) and time.monotonic() < deadline and self.connected:
            self.send_injects(time.monotonic())
            self.pump(50)


def main(cfg: Config) -> int:
    if not cfg.mqtt.enabled:
        log.info("mqtt: no [[mqtt.subscriptions]] in %s; nothing to do", cfg.source)
        return runtime.EXIT_OK
    return worker.serve(lambda ctx, stop: MqttWorker(cfg).run(ctx, stop))
