"""Topic and reply templates, the configuration checks for MQTT, replies and webhooks, and the envelope's
confirmed inject and device messages: fast unit tests."""
from __future__ import annotations

import time
from datetime import datetime

import orjson
import pytest

from workers.core import envelope
from workers.core.config import ConfigError, from_dict
from workers.core.envelope import Ack, Conn, Downlink, Seen
from workers.core.templates import TemplateError, TopicTemplate, matches, render_reply


@pytest.mark.parametrize("template, filter_, topic, device", [
    ("sensorpipe/{device}/up", "sensorpipe/+/up", "sensorpipe/greenhouse-1/up", "greenhouse-1"),
    ("fungxi_{device}_upLink", "+", "fungxi_A1B2_upLink", "A1B2"),
    ("devices/dev-{device}/telemetry", "devices/+/telemetry", "devices/dev-42/telemetry", "42"),
    ("{device}", "+", "esp32-7", "esp32-7"),
    ("site/{device}", "site/+", "site/5c:cf:7f:a1:b2:c3", "5c:cf:7f:a1:b2:c3"),
])
def test_topic_templates(template: str, filter_: str, topic: str, device: str) -> None:
    t = TopicTemplate(template)
    assert t.filter == filter_
    assert t.device(topic) == device
    assert t.topic(device) == topic


@pytest.mark.parametrize("template, topic", [
    ("sensorpipe/{device}/up", "sensorpipe/a/b/up"),          # a device id is one level
    ("sensorpipe/{device}/up", "sensorpipe/x/down"),
    ("fungxi_{device}_upLink", "fungxi_A1_downLink"),          # our own downlink on the same filter
    ("fungxi_{device}_upLink", "fungxi__upLink"),
])
def test_topics_that_do_not_fit(template: str, topic: str) -> None:
    assert TopicTemplate(template).device(topic) is None


@pytest.mark.parametrize("template", ["sensorpipe/up", "a/{device}/{device}", "a/+/{device}", "a/#/{device}",
                                      "a/{id}/{device}"])
def test_bad_topic_templates(template: str) -> None:
    with pytest.raises(TemplateError):
        TopicTemplate(template)


def test_a_device_id_that_cannot_be_a_topic_level() -> None:
    with pytest.raises(TemplateError):
        TopicTemplate("a/{device}/down").topic("x/y")


def test_reply_template() -> None:
    before = datetime.now().replace(microsecond=0)
    out = orjson.loads(render_reply({"cmd": "heartD", "time": "{now:%Y-%m-%d %H:%M:%S}", "who": "{device}",
                                     "n": 3, "nested": {"at": "{epoch}"}, "lit": "{{x}}"}, "A1"))
    assert out["cmd"] == "heartD" and out["who"] == "A1" and out["n"] == 3 and out["lit"] == "{x}"
    assert before <= datetime.strptime(out["time"], "%Y-%m-%d %H:%M:%S") <= datetime.now()
    assert abs(int(out["nested"]["at"]) - time.time()) < 5


def test_match() -> None:
    assert matches({"cmd": "heartU"}, {"cmd": "heartU", "seq": 4})
    assert not matches({"cmd": "heartU"}, {"cmd": "heartD"})
    assert not matches({"cmd": "heartU"}, {"event": "heartU"})
    assert matches({"n": 1}, {"n": 1.0}) and not matches({"n": 1}, {"n": True})


@pytest.mark.parametrize("table, message", [
    ({"mqtt": {"subscriptions": [{"topic": "a/b"}]}}, "mqtt.subscriptions[0].topic: 'a/b' must name the device"),
    ({"mqtt": {"subscriptions": [{"topic": "a/{device}", "downlink": "a/+/x"}]}}, "mqtt.subscriptions[0].downlink"),
    ({"mqtt": {"subscriptions": [{"topic": "a/{device}", "decoder": "xml"}]}}, "unknown decoder 'xml'"),
    ({"mqtt": {"subscriptions": [{"topic": "a/{device}", "qos": 2}]}}, "mqtt.subscriptions[0].qos"),
    ({"mqtt": {"subscriptions": [{"topic": "a/{device}"}, {"topic": "a/{device}"}]}}, "names must be unique"),
    ({"mqtt": {"subscriptions": [{"topic": "a/{device}", "topics": 1}]}}, "did you mean 'topic'"),
    ({"replies": [{"match": {}, "reply": {"a": 1}}]}, "replies[0].match"),
    ({"replies": [{"match": {"cmd": "x"}, "reply": {"t": "{nope}"}}]}, "replies[0].reply: bad placeholder"),
    ({"sinks": {"webhook": {"enabled": True}}}, "sinks.webhook.hooks: the webhook sink is enabled"),
    ({"sinks": {"webhook": {"hooks": [{"url": "ftp://x"}]}}}, "sinks.webhook.hooks[0].url"),
    ({"sinks": {"webhook": {"hooks": [{"url": "http://x", "where": ["a = 1"]}]}}}, "hooks[0].where[0]"),
    ({"presence": {"offline_after_s": 0}}, "presence.offline_after_s"),
    ({"devices": {"d": {"offline_after_s": -1}}}, "devices.d.offline_after_s"),
    ({"listeners": [{"name": "mqtt:x", "bind": "127.0.0.1:1"}]}, "starting with 'mqtt:'"),
])
def test_config_errors_name_the_key(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict(table)
    assert message in str(caught.value)


def test_config_defaults_and_names() -> None:
    cfg = from_dict({"mqtt": {"subscriptions": [{"topic": "s/{device}/up"}, {"name": "f", "topic": "f_{device}"}]},
                     "devices": {"door": {"offline_after_s": 60}}, "presence": {"offline_after_s": 300}},
                    env={"SENSORPIPE_MQTT_PASSWORD": "pw", "SENSORPIPE_COMMAND": "tcp://127.0.0.1:1"})
    assert [s.listener for s in cfg.mqtt.subscriptions] == ["mqtt:s/{device}/up", "mqtt:f"]
    assert cfg.mqtt.enabled and cfg.mqtt.password == "pw" and cfg.endpoints.command == "tcp://127.0.0.1:1"
    assert cfg.offline_after_s("door") == 60 and cfg.offline_after_s("other") == 300
    assert "cmd_ack" in cfg.decoders.json.event_keys
    assert not from_dict({}).mqtt.enabled


def test_inject_from_a_dealer_and_from_a_req_socket() -> None:
    conns = [Conn(0, "mqtt:up", "s/d1/up")]
    body = envelope.pack_frames([(b'{"t":1}', 5, 0)])
    message = envelope.inject_message(conns, body, ref=42)
    for route in ([b"mqtt"], [b"\x00k\x8b", b""]):                   # DEALER; REQ (delimiter)
        got_route, ref, got_conns, got_body = envelope.parse_inject([*route, *message])
        assert (got_route, ref, got_conns, got_body) == (route, 42, conns, body)
        reply = envelope.injected_message(route, ref, 812)
        assert envelope.parse_injected(reply[len(route):]) == (42, 812, None)
    with pytest.raises(envelope.EnvelopeError):
        envelope.parse_inject([b"id", b"frames", b"{}", b""])
    with pytest.raises(envelope.EnvelopeError):
        envelope.parse_inject([b"id", envelope.INJECT, b"not json", b""])


def test_device_messages_round_trip() -> None:
    seen = [Seen("d1", 5, "text", 17, "10.0.0.1:5000")]
    acks = [Ack("d1", "c42", False, "pin 6 is not in OUTPUT_PINS")]
    replies = [Downlink("d1", "mqtt:up", 0, "s/d1/up", b'{"cmd":"heartD"}')]
    assert envelope.parse_seen_message(envelope.seen_message(seen, acks, replies)) == (seen, acks, replies)
    header = envelope.readings_message([1], b"[[],[]]", seen)[1]
    assert envelope.parse_seen(header) == seen and envelope.parse_seen(b'{"seqs":[1]}') == []
    ref, line = envelope.parse_deliver(envelope.deliver_message([b"edge"], 9, replies[0])[1:])
    assert (ref, line) == (9, replies[0])
    assert envelope.parse_delivered([b"edge", *envelope.delivered_message(9)]) == (9, None)
    assert envelope.parse_delivered([b"mqtt", *envelope.delivered_message(9, "not connected")]) == (9, "not connected")
    with pytest.raises(envelope.EnvelopeError):
        envelope.parse_seen_message([envelope.SEEN, b'{"seen":[["d"]],"acks":[],"replies":[]}'])
