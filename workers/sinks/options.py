"""Each sink's options (``[sinks.<name>]``) and their checks; the configuration composes them.

They live apart from the sinks themselves because a sink module imports its server's client
(influxdb-client, pymongo, httpx: most of a second), and every worker reads the configuration while
only a sink's own worker talks to its server. ``check(key)`` raises ``ConfigError`` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from workers.core.options import ConfigError
from workers.sinks.conditions import ConditionError, parse_condition


@dataclass(frozen=True)
class SinkOptions:
    """What every sink has: the outbox's batching, spool and retries (``workers.core.outbox``)."""
    enabled: bool = False
    endpoint: str = ""                            # PULL endpoint the sink binds
    batch_size: int = 5000
    flush_interval_ms: float = 200.0
    spool_max_bytes: int = 512 * 1024 * 1024
    spool_full: Literal["block", "drop-oldest"] = "block"
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    fsync: bool = True                            # fsync spool files before acknowledging
    max_attempts: int = 0                         # a spooled batch failing this often goes to dead letters (0: never)

    def check_common(self, key: str) -> None:
        """The outbox's options of an enabled sink."""
        if self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size: must be at least 1")
        if not self.endpoint:
            raise ConfigError(f"{key}.endpoint: required")

    def check(self, key: str) -> None:
        """What is particular to this sink (the common options are checked by ``check_common``)."""


@dataclass(frozen=True)
class SqliteOptions(SinkOptions):
    enabled: bool = True
    endpoint: str = "tcp://127.0.0.1:5571"
    path: str = "sensorpipe.db"                   # relative to the data directory


@dataclass(frozen=True)
class InfluxOptions(SinkOptions):
    """InfluxDB (1.8+, 2.x, 3.x) or VictoriaMetrics through the v2 write API; docs/databases.md."""
    endpoint: str = "tcp://127.0.0.1:5572"
    url: str = "http://127.0.0.1:8086"            # env SENSORPIPE_INFLUX_URL
    token: str = ""                               # env SENSORPIPE_INFLUX_TOKEN; 1.8: "user:password"
    org: str = "sensorpipe"                       # env SENSORPIPE_INFLUX_ORG; 1.8: ignored
    bucket: str = "sensors"                       # env SENSORPIPE_INFLUX_BUCKET; 1.8: "db/retention"
    measurement: str = "sensors"                  # for readings that name no measurement
    measurement_tag: str = "measurement"          # a reading tag naming its measurement ("" = never)
    device_tag: str = "device"                    # the tag that carries the device id
    integers: Literal["float", "integer"] = "float"   # float: a field keeps one type when a device
                                                      # sends 22 one time and 22.5 the next
    gzip: bool = True
    timeout_s: float = 10.0                       # a whole write request
    connect_timeout_s: float = 2.0
    verify_ssl: bool = True

    def check(self, key: str) -> None:
        if not self.enabled:
            return
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url: expected http://host:port or https://..., got {self.url!r}")
        if not self.measurement:
            raise ConfigError(f"{key}.measurement: must not be empty")
        if not self.device_tag:
            raise ConfigError(f"{key}.device_tag: must not be empty")
        if not self.bucket:
            raise ConfigError(f"{key}.bucket: must not be empty")


@dataclass(frozen=True)
class MongoOptions(SinkOptions):
    """MongoDB through pymongo: collections latest, events, readings (optional); docs/databases.md."""
    endpoint: str = "tcp://127.0.0.1:5573"
    url: str = "mongodb://127.0.0.1:27017"        # env SENSORPIPE_MONGO_URL (credentials go here)
    database: str = "sensorpipe"                  # env SENSORPIPE_MONGO_DATABASE
    store_readings: bool = False                  # readings history; time series belong in InfluxDB
    timeout_s: float = 10.0                       # one write
    connect_timeout_s: float = 2.0                # finding the server: how long a write waits when it is away

    def check(self, key: str) -> None:
        if not self.enabled:
            return
        if not self.url.startswith(("mongodb://", "mongodb+srv://")):
            raise ConfigError(f"{key}.url: expected mongodb://host:port/..., got {redact_url(self.url)!r}")
        if not self.database or any(c in self.database for c in '/\\. "$\0'):
            raise ConfigError(f"{key}.database: {self.database!r} is not a MongoDB database name")
        if self.url.startswith("mongodb://"):      # (+srv needs DNS to check: left to the sink)
            # pymongo's URI parser, imported only when the MongoDB sink is enabled (it is not light).
            from pymongo.errors import ConfigurationError, InvalidURI
            from pymongo.uri_parser import parse_uri
            try:
                parse_uri(self.url)
            except (ConfigurationError, InvalidURI, ValueError) as exc:
                raise ConfigError(f"{key}.url: {exc}") from None


@dataclass(frozen=True)
class Hook:
    """One webhook: the events it takes and where they go (docs/webhooks.md)."""
    url: str
    name: str = ""                                # default: the URL
    devices: tuple[str, ...] = ()                 # empty: every device
    kinds: tuple[str, ...] = ()                   # event kinds ("verifiedRecordU"); empty: every kind
    where: tuple[str, ...] = ()                   # conditions that must all hold: "verifiedCode == 0"
    headers: dict[str, str] = field(default_factory=dict)
    batch: bool = False                           # false: one POST per event; true: {"events": [...]} per batch


@dataclass(frozen=True)
class WebhookOptions(SinkOptions):
    endpoint: str = "tcp://127.0.0.1:5574"
    batch_size: int = 100
    max_attempts: int = 10
    timeout_s: float = 10.0
    hooks: tuple[Hook, ...] = ()

    def check(self, key: str) -> None:
        if self.max_attempts < 0:
            raise ConfigError(f"{key}.max_attempts: 0 (retry for ever) or more")
        if self.enabled and not self.hooks:
            raise ConfigError(f"{key}.hooks: the webhook sink is enabled but has no [[{key}.hooks]]")
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.hooks: names must be unique, got {names}")
        for i, hook in enumerate(self.hooks):
            hook_key = f"{key}.hooks[{i}]"
            if not hook.url.startswith(("http://", "https://")):
                raise ConfigError(f"{hook_key}.url: expected an http:// or https:// URL, got {hook.url!r}")
            for j, condition in enumerate(hook.where):
                try:
                    parse_condition(condition)
                except ConditionError as exc:
                    raise ConfigError(f"{hook_key}.where[{j}]: {exc}") from None


def redact_url(url: str) -> str:
    """``url`` without the password, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        credentials, _, host = rest.partition("@")
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url
