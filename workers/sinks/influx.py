r"""InfluxDB through its v2 write API (InfluxDB 1.8+, 2.x, 3.x; VictoriaMetrics takes it unchanged).

One reading becomes one line of line protocol; the device id is a tag, the reading's tags (the
device's configured tags such as ``place=balcony``, and those a line-protocol board sent) are tags,
its fields are fields::

    Reading("balcony", 1732260000000000000, {"temperature": 21.5, "ok": True}, {"place": "balcony"})
        -> sensors,device=balcony,place=balcony temperature=21.5,ok=true 1732260000

The measurement is ``measurement`` unless the reading has a tag named ``measurement_tag`` (the
line-protocol decoder keeps the board's measurement there). Rollups from the rollup worker
(docs/rollups.md) go to that measurement with the window appended, one point per window start, its
fields ``<field>_count|min|max|mean|last``; a corrected window is written again at the same point,
which replaces it::

    sensors_1m,device=balcony temperature_count=60i,temperature_min=21.1,...,temperature_last=21.5 1732260000 The lines of a batch go in one
gzip-compressed request (``batch_size``, 5,000 by default, the size InfluxDB recommends), with the
coarsest precision (s, ms, us, ns) that keeps every timestamp of the batch exact. Events are not time
series: this sink does not take them (SQLite and MongoDB keep them).

Escaping: every name and value a device sends is escaped, never trusted, so no input can end a line
or add a tag, a field or a point: in the measurement ``\``, ``,`` and space; in tag keys and values
also ``=``; in field keys also ``"`` (InfluxDB reads ``\"`` back as ``"``, VictoriaMetrics keeps the
backslash); in string values ``\`` and ``"``. Newline, carriage return and tab cannot be carried by
line protocol outside string values: they are written as the two characters ``\n``, ``\r``, ``\t``
(string values get ``\n`` and ``\r`` written so too, because VictoriaMetrics and some proxies cut lines
at every newline, quoted or not). A tag with an empty value is left out (line protocol has no empty
tag). A reading line protocol cannot carry at all (an empty field name, NaN or infinity, an integer
outside 64 bits with ``integers = "integer"``, an empty device id) makes the batch ``PermanentError``:
the outbox isolates it as a dead letter, the rest is written.

Failures: 400 and 422 (the server refused the data as invalid) -> ``PermanentError``; 413 ->
``BatchTooLarge``; 429, 5xx, timeouts and refused connections -> ``TransientError`` with the server's
Retry-After; 401, 403 and 404 (bad token, missing bucket) are mistakes in the configuration, not in
the data: ``TransientError`` too, so the readings wait in the spool until the configuration is fixed.
The client's own batching and retries are off: the outbox owns both.
"""
from __future__ import annotations

import email.utils
import logging
import math
import time
import zlib
from typing import TYPE_CHECKING

import urllib3
from influxdb_client import InfluxDBClient, WriteService
from influxdb_client.rest import ApiException

from workers.core.envelope import ROLLUP_TAG
from workers.sinks import Batch, BatchTooLarge, PermanentError, TransientError
from workers.sinks.options import InfluxOptions

if TYPE_CHECKING:
    from workers.core.config import Config

log = logging.getLogger(__name__)

# Escapes per part of a line (str.translate tables).
MEASUREMENT_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", " ": "\\ ", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
KEY_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\r": "\\r",
                             "\t": "\\t"})                     # tag keys and values
FIELD_KEY_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\r": "\\r",
                                   "\t": "\\t", '"': '\\"'})     # a bare " would open a string value
STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})

PRECISIONS = ((1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "us"), (1, "ns"))
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
GZIP_LEVEL = 1               # a fifth of level 9's CPU for a few percent more bytes
KEY_CACHE_MAX = 50_000       # escaped names remembered; a device inventing names cannot grow it forever
PERMANENT_STATUS = (400, 422)
CONFIG_STATUS = (401, 403, 404)


class Unencodable(ValueError):
    """A reading line protocol cannot carry."""


def escape_key(name: str) -> str:
    return name.translate(KEY_ESCAPES)


def escape_string(value: str) -> str:
    return '"' + value.translate(STRING_ESCAPES) + '"'


def precision_of(timestamps: list[int]) -> tuple[int, str]:
    """The coarsest (divisor, name) that keeps every timestamp exact."""
    common = math.gcd(*timestamps) if timestamps else 0
    for divisor, name in PRECISIONS:
        if common % divisor == 0:
            return divisor, name
    return 1, "ns"  # not reached: every integer is a multiple of 1


class LineBuilder:
    """Readings -> line protocol. Escaped names and each device's tag prefix are cached: most lines
    of a batch come from a few devices with the same tags and field names."""

    def __init__(self, opts: InfluxOptions) -> None:
        self.measurement = opts.measurement.translate(MEASUREMENT_ESCAPES)
        self.measurement_tag = opts.measurement_tag
        self.device_tag = escape_key(opts.device_tag)
        self.skip_tags = {opts.device_tag, opts.measurement_tag, ROLLUP_TAG}
        self.floats = opts.integers == "float"
        self.keys: dict[str, str] = {}
        self.prefixes: dict[str, tuple[dict[str, str], str]] = {}    # device -> (its tags, "meas,device=x,...")

    def lines(self, readings: list, divisor: int) -> list[str]:
        """One line per reading. Raises Unencodable naming the first reading that cannot be written."""
        out = []
        append = out.append
        keys = self.keys
        prefixes = self.prefixes
        floats = self.floats
        if len(keys) > KEY_CACHE_MAX:
            keys.clear()
        if len(prefixes) > KEY_CACHE_MAX:
            prefixes.clear()
        for device, ts, fields, tags in readings:
            cached = prefixes.get(device)
            if cached is None or cached[0] != tags:
                cached = prefixes[device] = (tags, self._prefix(device, tags))
            parts = []
            for name, value in fields.items():
                key = keys.get(name)
                if key is None:
                    if not name:
                        raise Unencodable(f"device {device!r}: a field has an empty name")
                    key = keys[name] = name.translate(FIELD_KEY_ESCAPES)
                kind = type(value)
                if kind is float:
                    if value - value != 0.0:
                        raise Unencodable(f"device {device!r}: field {name!r} is {value}, which line protocol"
                                          " cannot carry")
                    parts.append(f"{key}={value!r}")
                elif kind is int:
                    if floats:
                        try:
                            parts.append(f"{key}={float(value)!r}")
                        except OverflowError:
                            raise Unencodable(f"device {device!r}: field {name!r} is too large a number") from None
                    elif INT64_MIN <= value <= INT64_MAX:
                        parts.append(f"{key}={value}i")
                    else:
                        raise Unencodable(f"device {device!r}: field {name!r} = {value} does not fit 64 bits")
                elif kind is bool:
                    parts.append(f"{key}=true" if value else f"{key}=false")
                elif kind is str:
                    parts.append(f'{key}="{value.translate(STRING_ESCAPES)}"')
                else:
                    raise Unencodable(f"device {device!r}: field {name!r} has a value of type {kind.__name__}")
            if not parts:
                raise Unencodable(f"device {device!r}: a reading without fields")
            append(f"{cached[1]} {','.join(parts)} {ts // divisor}")
        return out

    def _prefix(self, device: str, tags: dict[str, str]) -> str:
        if not device:
            raise Unencodable("a reading with an empty device id")
        measurement = self.measurement
        named = tags.get(self.measurement_tag) if self.measurement_tag else None
        if named:
            measurement = named.translate(MEASUREMENT_ESCAPES)
        window = tags.get(ROLLUP_TAG)       # the parser drops this tag from devices: only rollups have it
        if window:
            measurement += "_" + window.translate(MEASUREMENT_ESCAPES)
        pairs = [(self.device_tag, escape_key(device))]
        for key, value in tags.items():
            if key in self.skip_tags or value == "" or key == "":
                continue
            pairs.append((escape_key(key), escape_key(str(value))))
        pairs.sort()  # InfluxDB parses sorted tags fastest, and a series is the same whatever the order
        return measurement + "".join(f",{k}={v}" for k, v in pairs)


class InfluxSink:
    name = "influx"
    takes_events = False
    takes_rollups = True

    def __init__(self, opts: InfluxOptions) -> None:
        self.opts = opts
        self.builder = LineBuilder(opts)
        self.client: InfluxDBClient | None = None
        self.service: WriteService | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> "InfluxSink":
        return cls(cfg.sinks.influx)

    def connect(self) -> None:
        """Make the client; no request yet, so a server that is away does not stop the worker."""
        opts = self.opts
        self.client = InfluxDBClient(
            url=opts.url, token=opts.token or None, org=opts.org,
            timeout=(opts.connect_timeout_s * 1000, opts.timeout_s * 1000),
            verify_ssl=opts.verify_ssl, retries=False, enable_gzip=False)
        # The write service of the official client, called directly: WriteApi would gzip at level 9
        # (five times the CPU) and adds nothing the outbox does not do already.
        self.service = WriteService(self.client.api_client)
        log.info("influx: writing to %s, bucket %r, org %r", opts.url, opts.bucket, opts.org)

    def encode(self, batch: Batch) -> tuple[bytes, str]:
        """The request body (line protocol, not yet compressed) and its precision."""
        divisor, precision = precision_of([r.ts for r in batch.readings])
        try:
            lines = self.builder.lines(batch.readings, divisor)
        except Unencodable as exc:
            raise PermanentError(f"influx: {exc}") from None
        return "\n".join(lines).encode(), precision

    def write(self, batch: Batch) -> None:
        if not batch.readings:
            return
        if self.service is None:
            raise TransientError("influx: not connected")
        body, precision = self.encode(batch)
        headers = {}
        if self.opts.gzip:
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)     # 31: gzip framing
            body = compressor.compress(body) + compressor.flush()
            headers["content_encoding"] = "gzip"
        try:
            self.service.post_write(org=self.opts.org, bucket=self.opts.bucket, body=body, precision=precision,
                                    content_type="text/plain; charset=utf-8", **headers)
        except ApiException as exc:
            raise _classify(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(f"influx: {self.opts.url} unreachable: {exc}") from None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self.service = None


def _classify(exc: ApiException) -> Exception:
    status = exc.status or 0
    message = f"influx: HTTP {status}: {str(getattr(exc, 'message', '') or exc.reason or '')[:300]}"
    if status in PERMANENT_STATUS:
        return PermanentError(message)
    if status == 413:
        return BatchTooLarge(message)
    if status in CONFIG_STATUS:
        hint = {401: "check the token", 403: "the token may not write to this bucket",
                404: "check org and bucket"}[status]
        return TransientError(f"{message} ({hint}; readings are kept until it is fixed)")
    return TransientError(message, retry_after=retry_after(exc.headers))


def retry_after(headers: object) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None if absent."""
    if headers is None:
        return None
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if not value:
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
