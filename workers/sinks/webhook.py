"""The webhook sink: selected events POSTed as JSON to web services (docs/webhooks.md).

Each ``[[sinks.webhook.hooks]]`` picks events by device, kind and conditions on the event's members,
and POSTs each one (or, with ``batch = true``, the batch's) to its URL::

    POST /door HTTP/1.1
    Content-Type: application/json
    Idempotency-Key: 5b0c8a1f6e2d4c3a

    {"id":"5b0c8a1f6e2d4c3a","hook":"door","device":"door-1","kind":"verifiedRecordU",
     "ts":1732260000123,"time":"2024-11-22T07:20:00.123Z","body":{"cmd":"verifiedRecordU","data":[...]}}

The answer sorts the failure for the shared outbox: 2xx is done; a timeout, a connection error, 408,
429 and 5xx are transient (retried with backoff, Retry-After honoured, spooled, dead letters after
``max_attempts``); 413 splits the batch; any other answer is permanent (the event is set aside as a
dead letter at once). Delivery is at least once: ``id`` (and ``Idempotency-Key``) is the same on
every attempt, so a receiver can drop a repeat. An event a hook has taken is not POSTed to it again
when the outbox retries the batch for another hook (remembered for the last ``REMEMBER`` events).

Conditions (``where``) are ``NAME OP VALUE`` with ``==  !=  <  <=  >  >=``. NAME is a member of the
event at any depth (``verifiedCode`` finds ``{"data":[{"verifiedCode":0}]}``), or a dotted path from
such a member (``data.personType``); lists are looked into. VALUE is JSON (``0``, ``"1"``, ``true``,
``null``) or a bare word. A number and a string holding a number compare as numbers (door controllers
send ``"personType":"1"``). The condition holds when any value found satisfies it.
"""
from __future__ import annotations

import email.utils
import hashlib
import logging
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import httpx
import orjson

from workers.core.envelope import Event
from workers.sinks import Batch, BatchTooLarge, PermanentError, TransientError
from workers.sinks.conditions import Condition, ConditionError, parse_condition  # noqa: F401 (also its API)
from workers.sinks.options import Hook

if TYPE_CHECKING:
    from workers.core.config import Config

log = logging.getLogger(__name__)

REMEMBER = 100_000                 # (hook, event id) pairs taken, so a retried batch is not sent twice
USER_AGENT = "sensorpipe-webhook"


def event_id(event: Event) -> str:
    """Stable across attempts and restarts: the key the stores keep an event by."""
    return hashlib.blake2b(orjson.dumps([event.device, event.ts, event.kind]), digest_size=8).hexdigest()


def event_payload(event: Event, hook: str) -> dict:
    ms = event.ts // 1_000_000
    stamp = datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"id": event_id(event), "hook": hook, "device": event.device, "kind": event.kind, "ts": ms,
            "time": stamp, "body": event.body}


class Route:
    """One configured hook, its conditions parsed."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        self.devices = set(hook.devices)
        self.kinds = set(hook.kinds)
        self.where = [parse_condition(c) for c in hook.where]

    def takes(self, event: Event) -> bool:
        return ((not self.devices or event.device in self.devices)
                and (not self.kinds or event.kind in self.kinds)
                and all(c.holds(event.body) for c in self.where))


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class WebhookSink:
    name = "webhook"
    takes_readings = False

    def __init__(self, hooks: Sequence[Hook], timeout_s: float = 10.0) -> None:
        self.routes = [Route(h) for h in hooks]
        self.timeout_s = timeout_s
        self.client: httpx.Client | None = None
        self.taken: OrderedDict[tuple[str, str], None] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: Config) -> "WebhookSink":
        return cls(cfg.sinks.webhook.hooks, cfg.sinks.webhook.timeout_s)

    def connect(self) -> None:
        self.client = httpx.Client(timeout=self.timeout_s, follow_redirects=False,
                                   headers={"User-Agent": USER_AGENT})

    def write(self, batch: Batch) -> None:
        """Every hook gets its events even when another refuses or is away. A refusal is raised first
        (the outbox then isolates the refused event; the others are not POSTed twice), else the first
        hook that was away."""
        refused: PermanentError | BatchTooLarge | None = None
        away: TransientError | None = None
        for route in self.routes:
            try:
                self._write_route(route, batch.events)
            except (PermanentError, BatchTooLarge) as exc:
                refused = refused or exc
            except TransientError as exc:
                away = away or exc
        if refused is not None:
            raise refused
        if away is not None:
            raise away

    def _write_route(self, route: Route, batch_events: list[Event]) -> None:
        name = route.hook.name
        events = [e for e in batch_events if route.takes(e) and (name, event_id(e)) not in self.taken]
        if not events:
            return
        if route.hook.batch:
            self._post(route.hook, {"events": [event_payload(e, name) for e in events]}, None)
            self._remember(name, events)
            return
        for event in events:
            payload = event_payload(event, name)
            self._post(route.hook, payload, payload["id"])
            self._remember(name, [event])

    def _remember(self, hook: str, events: list[Event]) -> None:
        for event in events:
            self.taken[(hook, event_id(event))] = None
        while len(self.taken) > REMEMBER:
            self.taken.popitem(last=False)

    def _post(self, hook: Hook, payload: dict, key: str | None) -> None:
        assert self.client is not None
        headers = {"Content-Type": "application/json", **hook.headers}
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            response = self.client.post(hook.url, content=orjson.dumps(payload), headers=headers)
        except httpx.TimeoutException:
            raise TransientError(f"{hook.name}: no answer in {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:         # refused, reset, DNS: the service is away
            raise TransientError(f"{hook.name}: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        text = f"{hook.name}: HTTP {status} {response.reason_phrase}: {response.text[:200]!r}"
        if status in (408, 429) or status >= 500:
            raise TransientError(text, retry_after(response.headers.get("Retry-After")))
        if status == 413:
            raise BatchTooLarge(text)
        raise PermanentError(text)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
