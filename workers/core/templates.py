"""Templates in the configuration: MQTT topics with ``{device}`` in them, and automatic replies.

A topic template names where the device id sits in a topic::

    TopicTemplate("sensorpipe/{device}/up").filter          -> "sensorpipe/+/up"
    TopicTemplate("sensorpipe/{device}/up").device("sensorpipe/greenhouse-1/up")  -> "greenhouse-1"
    TopicTemplate("fungxi_{device}_upLink").filter          -> "+"      (the level is matched here instead)
    TopicTemplate("fungxi_{device}_downLink").topic("A1")    -> "fungxi_A1_downLink"

A reply template is a JSON object whose string values may hold ``{now:FORMAT}`` (local time, strftime),
``{utcnow:FORMAT}``, ``{epoch}`` (Unix seconds), ``{epoch_ms}`` and ``{device}``; ``{{`` and ``}}`` are
literal braces::

    render_reply({"cmd": "heartD", "time": "{now:%Y-%m-%d %H:%M:%S}"}, "A1")
        -> b'{"cmd":"heartD","time":"2026-11-22 14:03:05"}'
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any

import orjson

DEVICE = "{device}"


class TemplateError(ValueError):
    """A template that cannot work; the message says why."""


class TopicTemplate:
    def __init__(self, template: str) -> None:
        if template.count(DEVICE) != 1:
            raise TemplateError(f"{template!r} must name the device exactly once as {DEVICE}")
        if any(c in template for c in "+#") or "\x00" in template:
            raise TemplateError(f"{template!r}: no MQTT wildcards (+, #) in a template; {DEVICE} is the wildcard")
        if re.search(r"[{}]", template.replace(DEVICE, "")):
            raise TemplateError(f"{template!r}: the only placeholder is {DEVICE}")
        self.template = template
        before, after = template.split(DEVICE)
        levels = template.split("/")
        self.filter = "/".join("+" if DEVICE in level else level for level in levels)
        self._pattern = re.compile(re.escape(before) + "(?P<device>[^/+#]+?)" + re.escape(after) + r"\Z")

    def device(self, topic: str) -> str | None:
        """The device id in ``topic``, or None when the topic does not fit the template."""
        match = self._pattern.match(topic)
        return match.group("device") if match else None

    def topic(self, device: str) -> str:
        if not device or any(c in device for c in "/+#\x00"):
            raise TemplateError(f"device id {device!r} cannot be put in a topic")
        return self.template.replace(DEVICE, device)

    def __repr__(self) -> str:
        return f"TopicTemplate({self.template!r})"


def _values(device: str) -> dict[str, Any]:
    now_s = time.time()
    return {"now": datetime.fromtimestamp(now_s), "utcnow": datetime.fromtimestamp(now_s, timezone.utc),
            "epoch": int(now_s), "epoch_ms": int(now_s * 1000), "device": device}


def _render(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**values)
    if isinstance(value, dict):
        return {k: _render(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, values) for v in value]
    return value


def render_reply(template: dict[str, Any], device: str) -> bytes:
    """The reply as compact JSON, placeholders filled in now."""
    try:
        return orjson.dumps(_render(template, _values(device)))
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise TemplateError(f"bad placeholder in {template!r}: {exc!r}; known: now, utcnow, epoch, epoch_ms,"
                            " device ({{ and }} for literal braces)") from None


def matches(match: dict[str, Any], body: dict) -> bool:
    """True when every member of ``match`` is in ``body`` with the same value (1 == 1.0, True != 1)."""
    for key, want in match.items():
        if key not in body:
            return False
        have = body[key]
        if isinstance(want, bool) or isinstance(have, bool):
            if have is not want:
                return False
        elif have != want:
            return False
    return True
