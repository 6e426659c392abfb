"""One TOML file, parsed into frozen dataclasses and checked once at start.

The shipped default is ``deploy/sensorpipe.toml``; ``--config PATH`` or ``SENSORPIPE_CONFIG`` selects
another. Environment variables override the data directory (``SENSORPIPE_DATA``) and the listener
ports (``SENSORPIPE_TEXT_PORT``, ``SENSORPIPE_BINARY_PORT``) and the query endpoint
(``SENSORPIPE_QUERY``), and the database sinks' addresses and secrets (``SINK_ENV``:
``SENSORPIPE_INFLUX_URL``, ``SENSORPIPE_INFLUX_TOKEN``, ``SENSORPIPE_INFLUX_ORG``,
``SENSORPIPE_INFLUX_BUCKET``, ``SENSORPIPE_MONGO_URL``, ``SENSORPIPE_MONGO_DATABASE``). A bad key or
value raises ``ConfigError`` naming it, e.g. ``sinks.sqlite.batch_size: expected an integer, got 'many'``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Each decoder and sink owns its options and their checks; this module composes them (the names it
# had before stay importable from here).
from workers.core import curve, paths
from workers.core.jetstream import JournalOptions
from workers.core.options import ConfigError
from workers.core.templates import TemplateError, TopicTemplate, render_reply
from workers.decoders import REGISTRY as DECODERS
from workers.decoders.binary import BINARY_TYPES, BinaryDevice, BinaryField, check_layouts  # noqa: F401
from workers.decoders.influx import InfluxOptions as InfluxDecoder
from workers.decoders.json import JsonOptions as JsonDecoder
from workers.sinks.options import Hook  # noqa: F401
from workers.sinks.options import InfluxOptions as InfluxSink
from workers.sinks.options import MongoOptions as MongoSink
from workers.sinks.options import SinkOptions as SinkCommon
from workers.sinks.options import SqliteOptions as SqliteSink
from workers.sinks.options import WebhookOptions as WebhookSink
from workers.sinks.options import redact_url  # noqa: F401

DEFAULT_DATA_DIR = "./data"
DEFAULT_MAX_FRAME_BYTES = 64 * 1024
DEFAULT_QUERY_ENDPOINT = "tcp://127.0.0.1:5560"
DEFAULT_HISTORY_MAX_POINTS = 10_000
DEFAULT_ROLLUP_GRACE_S = 30.0                 # longer than the edge's redelivery, so a crash is no correction
DEFAULT_ROLLUP_CORRECT_FOR_S = 6 * 3600.0
ROLLUP = "rollup"                             # the rollup worker's name in acks, like a sink's name
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_COMMAND_ENDPOINT = "tcp://127.0.0.1:5561"
DEFAULT_BATCH_MAX_DELAY_MS = 20.0               # BENCHMARKS.md, "Steady fleet": what it costs and saves
DEFAULT_OFFLINE_AFTER_S = 900.0                  # silent this long: offline (a battery board wakes every 600 s)
DEFAULT_MQTT_MAX_FRAME_BYTES = 1024 * 1024
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_DEADLETTER_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_DEADLETTER_MAX_AGE_DAYS = 30.0
DEFAULT_MAX_DEVICES = 100_000
DEFAULT_BATCH_TRIES = 3

# --------------------------------------------------------------------------- sections


class Bound:
    """Something that listens on ``bind`` ("host:port")."""
    bind: str

    @property
    def host(self) -> str:
        return self.bind.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.bind.rsplit(":", 1)[1])


@dataclass(frozen=True)
class Listener(Bound):
    name: str
    bind: str                                     # "host:port"
    framing: Literal["auto", "lines", "binary"] = "auto"
    decoder: str = "auto"                         # a name in workers.decoders.REGISTRY
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    idle_timeout_s: float = 600.0
    max_connections: int = 20000
    default_device: str = ""                      # device id when a frame names none ("" = peer IP)
    # Device security (docs/security.md): credentials, TLS and the limits that keep one peer from
    # costing the others.
    auth: Literal["required", "off"] = "required"  # required: a hello (text) or a MAC (binary) first
    auth_timeout_s: float = 10.0                  # the hello, and a TLS handshake, must come this soon
    max_connections_per_address: int = 64
    max_frames_per_s: float = 1000.0              # per connection; above it the edge stops reading (0 = no limit)
    tls_cert: str = ""                            # PEM files; with both set the listener speaks TLS only
    tls_key: str = ""
    tls_client_ca: str = ""                       # set: clients must show a certificate this CA signed

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True)
class Endpoints:
    """Internal ZeroMQ endpoints. Who binds what is documented in docs/architecture.md."""
    frames: str = "tcp://127.0.0.1:5555"          # edge PUSH (bind) -> parsers PULL (connect)
    acks: str = "tcp://127.0.0.1:5556"            # sinks PUSH (connect) -> edge PULL (bind)
    inject: str = "tcp://127.0.0.1:5558"          # replay REQ / MQTT DEALER (connect) -> edge ROUTER (bind)
    live: str = "tcp://127.0.0.1:5557"            # parsers/workers PUB (connect) -> query SUB (bind)
    query: str = DEFAULT_QUERY_ENDPOINT           # clients REQ -> query ROUTER (bind)
    command: str = DEFAULT_COMMAND_ENDPOINT       # clients REQ -> commands ROUTER (bind)
    seen: str = "tcp://127.0.0.1:5562"            # parsers PUSH (connect) -> commands PULL (bind)
    downlink: str = "tcp://127.0.0.1:5563"        # commands ROUTER (bind) <-> edge, MQTT DEALER (connect)
    stream: str = "tcp://127.0.0.1:5564"          # query PUB (bind) -> http SUB (connect): readings, live


@dataclass(frozen=True)
class Curve:
    """CURVE keys for internal endpoints beyond loopback (workers.core.curve, docs/security.md)."""
    keys_dir: str = "curve"                       # relative to the data directory; sensorpipe keys init fills it
    identity: str = "worker"                      # the keypair this host presents: worker, or clients/NAME
    clients: tuple[str, ...] = ()                 # may also ask query and commands: Z85 public keys or .key files


@dataclass(frozen=True)
class Edge:
    batch_max_frames: int = 2000
    batch_max_delay_ms: float = DEFAULT_BATCH_MAX_DELAY_MS     # text frames wait at most this for a batch
    ack_max_delay_ms: float = 5.0                 # a batch holding frames someone waits on (a binary
                                                  # board's A, an injector's answer) waits at most this
    journal_segment_bytes: int = 16 * 1024 * 1024
    journal_max_bytes: int = 1024 * 1024 * 1024   # at the bound the edge stops reading devices
    fsync: Literal["batch", "interval", "never"] = "interval"
    fsync_interval_ms: float = 200.0
    redeliver_after_s: float = 15.0               # unacknowledged batches are sent again after this
    max_inflight_batches: int = 100_000           # more than this unacknowledged: stop reading devices
    max_partial_bytes: int = 16 * 1024 * 1024     # unfinished frames held over all connections (docs/protocols.md)
    max_connections: int = 50_000                 # device connections in all, every listener together


@dataclass(frozen=True)
class Device:
    tags: dict[str, str] = field(default_factory=dict)
    offline_after_s: float | None = None          # None: [presence] offline_after_s


@dataclass(frozen=True)
class Decoders:
    json: JsonDecoder = JsonDecoder()
    influx: InfluxDecoder = InfluxDecoder()


@dataclass(frozen=True)
class Sinks:
    sqlite: SqliteSink = SqliteSink()
    influx: InfluxSink = InfluxSink()
    mongo: MongoSink = MongoSink()
    webhook: WebhookSink = WebhookSink()

    def enabled(self) -> dict[str, SinkCommon]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name).enabled}


@dataclass(frozen=True)
class Rollups:
    """Per-device window aggregates (docs/rollups.md). Fed by the parsers like a sink."""
    enabled: bool = True
    endpoint: str = "tcp://127.0.0.1:5575"        # PULL endpoint the rollup worker binds
    path: str = "rollups.db"                      # its state, relative to the data directory
    windows: tuple[str, ...] = ("1m",)            # "30s", "1m", "15m", "1h", "1d": each a multiple of the next smaller
    grace_s: float = DEFAULT_ROLLUP_GRACE_S       # a window closes this long after its end
    correct_for_s: float = DEFAULT_ROLLUP_CORRECT_FOR_S   # late readings still correct a closed window
    # With the SQLite sink on, its ``readings`` table is the set of points and the sink marks the
    # windows it touches; the parsers then do not feed the rollup worker at all (docs/rollups.md).
    points_from_sqlite: bool = True

    @property
    def window_seconds(self) -> tuple[int, ...]:
        """The window sizes in seconds, smallest first."""
        return tuple(sorted(parse_window(w) for w in self.windows))


@dataclass(frozen=True)
class Query:
    restore_from: Literal["auto", "sqlite", "mongo", "none"] = "auto"
    resync_after_s: float = 5.0                   # a second restore after start closes the restart gap
    history_max_points: int = DEFAULT_HISTORY_MAX_POINTS   # a history request over this is refused


@dataclass(frozen=True)
class Http(Bound):
    """The HTTP worker: REST API, live streams, dashboard, /metrics (docs/web.md)."""
    enabled: bool = True
    bind: str = "127.0.0.1:8080"                  # "host:port"; beyond this machine, set tokens
    read_tokens: tuple[str, ...] = ()             # may read; none at all (here and in the file): open
    admin_tokens: tuple[str, ...] = ()            # may also send commands and replay dead letters
    tokens_file: str = "http-tokens.toml"         # more tokens, relative to the data directory, if it exists
    cors_origins: tuple[str, ...] = ()            # e.g. ["https://app.example"], or ["*"]
    request_timeout_s: float = 2.5                # one request to the query or commands worker
    sink_failing_for_s: float = 60.0              # /readyz fails once an enabled sink has failed this long
    stream_queue: int = 256                       # chunks held per live-stream client before it is cut off


@dataclass(frozen=True)
class MqttSubscription:
    """Uplink topics to take readings from, and the device's downlink topic (docs/mqtt.md)."""
    topic: str                                    # template: "sensorpipe/{device}/up", "fungxi_{device}_upLink"
    downlink: str = ""                            # template for commands and replies: "sensorpipe/{device}/down"
    name: str = ""                                # default: the topic template; frames come from "mqtt:<name>"
    decoder: str = "auto"
    qos: int = 1
    max_frame_bytes: int = DEFAULT_MQTT_MAX_FRAME_BYTES

    @property
    def listener(self) -> str:
        return f"mqtt:{self.name}"


@dataclass(frozen=True)
class Mqtt:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "sensorpipe"                 # fixed: the broker keeps this session while we are away
    protocol: Literal["5", "3.1.1"] = "5"
    receive_maximum: int = 1000                   # MQTT 5: unacknowledged messages the broker may send at once
    session_expiry_s: int = 7 * 86400             # MQTT 5: how long the broker keeps the session while we are away
    username: str = ""
    password: str = ""                            # or SENSORPIPE_MQTT_PASSWORD
    keepalive_s: int = 60
    tls: bool = False
    ca_file: str = ""                             # "" with tls: the system's CA certificates
    cert_file: str = ""                           # client certificate, if the broker asks for one
    key_file: str = ""
    tls_insecure: bool = False                    # do not check the broker's host name (testing only)
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    take_retained: bool = False                   # retained messages replayed on subscribing are old news
    subscriptions: tuple[MqttSubscription, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.subscriptions)


@dataclass(frozen=True)
class Presence:
    offline_after_s: float = DEFAULT_OFFLINE_AFTER_S


@dataclass(frozen=True)
class Commands:
    expire_after_s: float = 86400.0               # a command not delivered by then expires
    reply_timeout_s: float = 2.0                  # send: wait this long for the transport before saying "queued"
    max_queued_per_device: int = 100
    keep_done_s: float = 7 * 86400.0              # finished commands stay listed this long


@dataclass(frozen=True)
class Reply:
    """An automatic answer on the downlink: heartbeats (docs/commands.md)."""
    match: dict[str, Any]                         # top-level members the uplink event must have
    reply: dict[str, Any]                         # string values may hold {now:%Y-%m-%d %H:%M:%S}, {device}...
    name: str = ""
    store: bool = False                           # keep the matched event too (heartbeats are not kept)


@dataclass(frozen=True)
class Events:
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES   # a larger event is set aside whole, never truncated


@dataclass(frozen=True)
class DeadLetters:
    """Bounds on ``<data>/deadletters.db``: past either, the oldest letters are deleted and counted."""
    max_bytes: int = DEFAULT_DEADLETTER_MAX_BYTES     # raw bytes kept
    max_age_days: float = DEFAULT_DEADLETTER_MAX_AGE_DAYS


@dataclass(frozen=True)
class Limits:
    """Bounds on what devices can make the pipeline hold (docs/durability.md, "Bad data")."""
    max_devices: int = DEFAULT_MAX_DEVICES            # frames of further devices become dead letters
    batch_tries: int = DEFAULT_BATCH_TRIES            # a worker failing this often on a batch sets it aside


@dataclass(frozen=True)
class Config:
    data_dir: str = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    listeners: tuple[Listener, ...] = (
        Listener(name="text", bind="0.0.0.0:7000"),
        Listener(name="binary", bind="0.0.0.0:7002", framing="binary", decoder="binary"),
    )
    endpoints: Endpoints = Endpoints()
    curve: Curve = Curve()
    edge: Edge = Edge()
    journal: JournalOptions = JournalOptions()     # file (this host) or jetstream (docs/scale-out.md)
    decoders: Decoders = Decoders()
    binary: dict[int, BinaryDevice] = field(default_factory=dict)   # device_number -> layout
    devices: dict[str, Device] = field(default_factory=dict)        # device id -> extra tags
    sinks: Sinks = Sinks()
    rollups: Rollups = Rollups()
    query: Query = Query()
    http: Http = Http()
    mqtt: Mqtt = Mqtt()
    presence: Presence = Presence()
    commands: Commands = Commands()
    replies: tuple[Reply, ...] = ()
    events: Events = Events()
    deadletters: DeadLetters = DeadLetters()
    limits: Limits = Limits()
    source: str = ""                              # the file this came from, for messages

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def consumers(self) -> dict[str, str]:
        """Who must acknowledge every batch, name -> PULL endpoint: the enabled sinks and the rollup
        worker (unless its points are the SQLite sink's rows). Parsers push readings to each; the edge
        keeps a batch until each has acknowledged it."""
        out = {name: sink.endpoint for name, sink in self.sinks.enabled().items()}
        if self.rollups.enabled and not self.rollups_from_sqlite:
            out[ROLLUP] = self.rollups.endpoint
        return out

    @property
    def rollups_from_sqlite(self) -> bool:
        """The rollup points are the SQLite sink's rows (that sink marks the windows it touches)."""
        return self.rollups.enabled and self.rollups.points_from_sqlite and self.sinks.sqlite.enabled

    def listener(self, name: str) -> Listener:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)

    def offline_after_s(self, device: str) -> float:
        extra = self.devices.get(device)
        if extra is not None and extra.offline_after_s is not None:
            return extra.offline_after_s
        return self.presence.offline_after_s


# --------------------------------------------------------------------------- loading


def load(path: str | os.PathLike[str] | None = None, env: typing.Mapping[str, str] | None = None,
         keys: bool = True) -> Config:
    """Read, check and return the configuration; raise ConfigError naming the bad key. ``keys=False``
    skips the check that CURVE keys exist (for ``sensorpipe keys init``, which makes them)."""
    env = os.environ if env is None else env
    path = paths.config_path(path, env)
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return from_dict(table, env=env, source=str(path), keys=keys)


def from_dict(table: dict[str, Any], env: typing.Mapping[str, str] | None = None, source: str = "",
              keys: bool = True) -> Config:
    env = {} if env is None else env
    table = dict(table)
    if "listeners" in table and isinstance(table["listeners"], dict):
        # [listeners.text] form as well as [[listeners]]
        table["listeners"] = [{"name": k, **v} for k, v in table["listeners"].items()]
    cfg = _build(Config, table, "")
    cfg = _apply_env(cfg, env)
    cfg = _fill_names(dataclasses.replace(cfg, source=source))
    _check(cfg)
    if keys:
        _check_curve_keys(cfg)
    return cfg


# Database addresses and secrets are often set by the environment (containers, systemd credentials)
# rather than written in the file: these variables win over [sinks.influx] and [sinks.mongo].
SINK_ENV: dict[str, dict[str, str]] = {
    "influx": {"SENSORPIPE_INFLUX_URL": "url", "SENSORPIPE_INFLUX_TOKEN": "token",
               "SENSORPIPE_INFLUX_ORG": "org", "SENSORPIPE_INFLUX_BUCKET": "bucket"},
    "mongo": {"SENSORPIPE_MONGO_URL": "url", "SENSORPIPE_MONGO_DATABASE": "database"},
}


def _fill_names(cfg: Config) -> Config:
    """Names left out default to what they name: the topic template, the URL."""
    subs = tuple(s if s.name else dataclasses.replace(s, name=s.topic) for s in cfg.mqtt.subscriptions)
    hooks = tuple(h if h.name else dataclasses.replace(h, name=h.url) for h in cfg.sinks.webhook.hooks)
    replies = tuple(r if r.name else dataclasses.replace(r, name=f"replies[{i}]") for i, r in enumerate(cfg.replies))
    return dataclasses.replace(
        cfg, mqtt=dataclasses.replace(cfg.mqtt, subscriptions=subs), replies=replies,
        sinks=dataclasses.replace(cfg.sinks, webhook=dataclasses.replace(cfg.sinks.webhook, hooks=hooks)))


def _apply_env(cfg: Config, env: typing.Mapping[str, str]) -> Config:
    if env.get("SENSORPIPE_DATA"):
        cfg = dataclasses.replace(cfg, data_dir=env["SENSORPIPE_DATA"])
    ports = {"text": env.get("SENSORPIPE_TEXT_PORT"), "binary": env.get("SENSORPIPE_BINARY_PORT")}
    listeners = []
    for listener in cfg.listeners:
        port = ports.get(listener.name)
        if port:
            listener = dataclasses.replace(listener, bind=f"{listener.host}:{port}")
        listeners.append(listener)
    cfg = dataclasses.replace(cfg, listeners=tuple(listeners))
    if env.get("SENSORPIPE_QUERY"):
        cfg = dataclasses.replace(cfg, endpoints=dataclasses.replace(cfg.endpoints, query=env["SENSORPIPE_QUERY"]))
    if env.get("SENSORPIPE_COMMAND"):
        cfg = dataclasses.replace(cfg, endpoints=dataclasses.replace(cfg.endpoints, command=env["SENSORPIPE_COMMAND"]))
    if env.get("SENSORPIPE_MQTT_PASSWORD"):
        cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, password=env["SENSORPIPE_MQTT_PASSWORD"]))
    sinks = cfg.sinks
    for sink_name, overrides in SINK_ENV.items():
        changes = {key: env[var] for var, key in overrides.items() if env.get(var)}
        if changes:
            sinks = dataclasses.replace(sinks, **{sink_name: dataclasses.replace(getattr(sinks, sink_name), **changes)})
    return dataclasses.replace(cfg, sinks=sinks)


def _check(cfg: Config) -> None:
    names = [listener.name for listener in cfg.listeners]
    if len(set(names)) != len(names):
        raise ConfigError(f"listeners: names must be unique, got {names}")
    for i, listener in enumerate(cfg.listeners):
        key = f"listeners[{i}] ({listener.name})"
        host, _, port = listener.bind.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"{key}.bind: expected 'host:port', got {listener.bind!r}")
        if listener.decoder not in DECODERS:
            raise ConfigError(f"{key}.decoder: unknown decoder {listener.decoder!r}; known: {sorted(DECODERS)}")
        if listener.max_frame_bytes < 16:
            raise ConfigError(f"{key}.max_frame_bytes: must be at least 16")
        if listener.name.startswith("mqtt:"):
            raise ConfigError(f"{key}.name: names starting with 'mqtt:' are the MQTT subscriptions'")
        if listener.auth not in ("required", "off"):
            raise ConfigError(f"{key}.auth: expected required|off, got {listener.auth!r}")
        if bool(listener.tls_cert) != bool(listener.tls_key):
            raise ConfigError(f"{key}.tls_cert, tls_key: set both (PEM files) or neither")
        if listener.tls_client_ca and not listener.tls_cert:
            raise ConfigError(f"{key}.tls_client_ca: needs tls_cert and tls_key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(listener, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{key}.{name}: no such file {path!r} (sensorpipe certs init makes them)")
    check_layouts(cfg.binary)
    for name in ("batch_max_delay_ms", "ack_max_delay_ms"):
        value = getattr(cfg.edge, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1000:
            raise ConfigError(f"edge.{name}: expected milliseconds from 0 to 1000, got {value!r}")
    if cfg.edge.fsync not in ("batch", "interval", "never"):
        raise ConfigError(f"edge.fsync: expected batch|interval|never, got {cfg.edge.fsync!r}")
    for name, sink in cfg.sinks.enabled().items():
        sink.check_common(f"sinks.{name}")
    cfg.journal.check("journal", list(cfg.consumers()))
    if cfg.rollups_from_sqlite and "rollup" in cfg.journal.consumers:
        # it would never acknowledge, and the stream is trimmed only below every consumer's floor
        raise ConfigError('journal.consumers: "rollup" consumes nothing while its points are the SQLite sink\'s'
                          ' rows ([rollups] points_from_sqlite, the default); remove it from the list')
    if not cfg.sinks.enabled() and cfg.journal.backend == "file":   # (jetstream: the sinks may be elsewhere)
        raise ConfigError("sinks: no sink is enabled; readings would have nowhere to go")
    cfg.sinks.influx.check("sinks.influx")
    cfg.sinks.mongo.check("sinks.mongo")
    _check_rollups(cfg.rollups)
    if cfg.query.history_max_points < 1:
        raise ConfigError("query.history_max_points: must be at least 1")

    _check_mqtt(cfg, DECODERS)
    _check_commands(cfg)
    cfg.sinks.webhook.check("sinks.webhook")
    _check_http(cfg.http)
    _check_endpoints(cfg)


def _check_http(http: Http) -> None:
    host, _, port = http.bind.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"http.bind: expected 'host:port', got {http.bind!r}")
    for name in ("request_timeout_s", "sink_failing_for_s"):
        if getattr(http, name) <= 0:
            raise ConfigError(f"http.{name}: must be more than 0")
    if http.stream_queue < 1:
        raise ConfigError("http.stream_queue: must be at least 1")


def internal_endpoints(cfg: Config) -> dict[str, str]:
    """Every internal endpoint in use, by its key in the file."""
    bound = {f"endpoints.{key}": value for key, value in dataclasses.asdict(cfg.endpoints).items()}
    bound.update({f"sinks.{name}.endpoint": sink.endpoint for name, sink in cfg.sinks.enabled().items()})
    if cfg.rollups.enabled:
        bound["rollups.endpoint"] = cfg.rollups.endpoint
    return bound


def _check_endpoints(cfg: Config) -> None:
    """Each internal endpoint is bound by one worker: two names for one address is a mistake."""
    owner: dict[str, str] = {}
    for key, endpoint in internal_endpoints(cfg).items():
        if endpoint in owner:
            raise ConfigError(f"{key}: {endpoint} is {owner[endpoint]} already; each endpoint needs its own port")
        owner[endpoint] = key


def _check_curve_keys(cfg: Config) -> None:
    """An endpoint beyond loopback is CURVE only: refuse to start without the keys it needs."""
    beyond = [key for key, endpoint in internal_endpoints(cfg).items() if curve.beyond_loopback(endpoint)]
    if not beyond:
        return
    try:
        curve.load(cfg.data_dir, cfg.curve.keys_dir, cfg.curve.identity, cfg.curve.clients, ())
    except curve.CurveKeyError as exc:
        raise ConfigError(f"{beyond[0]}: beyond loopback, so CURVE is required, and its keys are missing:"
                          f" {exc}") from None


def parse_window(text: str) -> int:
    """``"90s"``, ``"1m"``, ``"1h"``, ``"1d"`` -> seconds; ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text) if isinstance(text, str) else None
    if match is None or int(match[1]) == 0:
        raise ValueError(f"expected a duration like 30s, 1m, 1h or 1d, got {text!r}")
    return int(match[1]) * WINDOW_UNITS[match[2]]


def window_label(seconds: int) -> str:
    """60 -> ``"1m"``, 90 -> ``"90s"``: the largest unit that divides, so one size has one name."""
    for unit, size in sorted(WINDOW_UNITS.items(), key=lambda item: -item[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise ValueError(seconds)


def _check_rollups(rollups: Rollups) -> None:
    if not rollups.windows:
        raise ConfigError("rollups.windows: list at least one window, e.g. [\"1m\"] (or enabled = false)")
    sizes = []
    for i, text in enumerate(rollups.windows):
        try:
            sizes.append(parse_window(text))
        except ValueError as exc:
            raise ConfigError(f"rollups.windows[{i}]: {exc}") from None
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"rollups.windows: the same size twice in {list(rollups.windows)}")
    ordered = sorted(sizes)
    for smaller, larger in zip(ordered, ordered[1:]):
        if larger % smaller:
            raise ConfigError(f"rollups.windows: {window_label(larger)} is not a multiple of "
                              f"{window_label(smaller)}; each window is built from whole windows of the next "
                              "smaller size")
    if rollups.grace_s < 0:
        raise ConfigError("rollups.grace_s: must not be negative")
    if rollups.correct_for_s < 0:
        raise ConfigError("rollups.correct_for_s: must not be negative")
    if rollups.enabled and not rollups.endpoint:
        raise ConfigError("rollups.endpoint: required")


def _check_mqtt(cfg: Config, decoders: dict) -> None:
    names = [s.name for s in cfg.mqtt.subscriptions]
    if len(set(names)) != len(names):
        raise ConfigError(f"mqtt.subscriptions: names must be unique, got {names}")
    if not 0 < cfg.mqtt.port < 65536:
        raise ConfigError(f"mqtt.port: expected 1..65535, got {cfg.mqtt.port}")
    if not cfg.mqtt.client_id:
        raise ConfigError("mqtt.client_id: required (the broker keeps the session under it)")
    for i, sub in enumerate(cfg.mqtt.subscriptions):
        key = f"mqtt.subscriptions[{i}]"
        for name in ("topic", "downlink"):
            template = getattr(sub, name)
            if name == "downlink" and not template:
                continue
            try:
                TopicTemplate(template)
            except TemplateError as exc:
                raise ConfigError(f"{key}.{name}: {exc}") from None
        if sub.decoder not in decoders:
            raise ConfigError(f"{key}.decoder: unknown decoder {sub.decoder!r}; known: {sorted(decoders)}")
        if sub.qos not in (0, 1):
            raise ConfigError(f"{key}.qos: 0 or 1 (1 is what makes the broker keep messages while we are away)")
        if sub.max_frame_bytes < 16:
            raise ConfigError(f"{key}.max_frame_bytes: must be at least 16")
    if not 1 <= cfg.mqtt.receive_maximum <= 65535:
        raise ConfigError(f"mqtt.receive_maximum: 1..65535, got {cfg.mqtt.receive_maximum}")
    if cfg.mqtt.session_expiry_s < 1:
        raise ConfigError("mqtt.session_expiry_s: at least 1 (0 would end the session, and its messages,"
                          " at every disconnect)")
    for number, name in ((cfg.mqtt.reconnect_min_s, "reconnect_min_s"), (cfg.mqtt.reconnect_max_s, "reconnect_max_s")):
        if number <= 0:
            raise ConfigError(f"mqtt.{name}: must be more than 0")


def _check_commands(cfg: Config) -> None:
    if cfg.presence.offline_after_s <= 0:
        raise ConfigError("presence.offline_after_s: must be more than 0")
    for device, extra in cfg.devices.items():
        if extra.offline_after_s is not None and extra.offline_after_s <= 0:
            raise ConfigError(f"devices.{device}.offline_after_s: must be more than 0")
    if cfg.commands.expire_after_s <= 0:
        raise ConfigError("commands.expire_after_s: must be more than 0")
    if cfg.commands.max_queued_per_device < 1:
        raise ConfigError("commands.max_queued_per_device: must be at least 1")
    for i, rule in enumerate(cfg.replies):
        if not rule.match:
            raise ConfigError(f"replies[{i}].match: at least one member to match, e.g. {{ cmd = \"heartU\" }}")
        try:
            render_reply(rule.reply, "device")
        except TemplateError as exc:
            raise ConfigError(f"replies[{i}].reply: {exc}") from None
    if cfg.events.max_event_bytes < 1:
        raise ConfigError("events.max_event_bytes: must be at least 1")
    if cfg.deadletters.max_bytes < 1024:
        raise ConfigError("deadletters.max_bytes: must be at least 1024")
    if not cfg.deadletters.max_age_days > 0:
        raise ConfigError("deadletters.max_age_days: must be more than 0")
    if cfg.limits.max_devices < 1:
        raise ConfigError("limits.max_devices: must be at least 1")
    if cfg.limits.batch_tries < 1:
        raise ConfigError("limits.batch_tries: must be at least 1")


def _build(cls: Any, value: Any, key: str) -> Any:
    """Build ``cls`` (a dataclass or a typing form) from TOML ``value``, naming ``key`` on error."""
    if cls is Any:                                # free-form (a reply template): taken as written
        return value
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'top level'}: expected a table, got {value!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
        kwargs = {}
        for name, item in value.items():
            sub = f"{key}.{name}" if key else name
            if cls is Config and name == "binary":
                item = item.get("devices", item) if isinstance(item, dict) else item
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {sorted(known)}"
                raise ConfigError(f"{sub}: unknown key{extra}")
            kwargs[name] = _build(hints[name], item, sub)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{key or 'top level'}: {exc}") from None
    if origin is Literal:
        if value not in typing.get_args(cls):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(cls))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(cls)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = typing.get_args(cls)[0]
        return tuple(_build(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        key_type, item_type = typing.get_args(cls)
        out = {}
        for k, item in value.items():
            if key_type is int:
                try:
                    k = int(k)
                except ValueError:
                    raise ConfigError(f"{key}.{k}: expected a number as key") from None
            out[k] = _build(item_type, item, f"{key}.{k}")
        return out
    if cls is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if cls is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if cls is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if cls is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {cls!r}")
