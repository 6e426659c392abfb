"""``sensorpipe devices mosquitto``: Mosquitto's password and ACL files from the credential store, on a
real Mosquitto broker (no anonymous access): each device publishes only on its own uplink and reads
only its own downlink; a wrong token is refused; the MQTT worker's account reads and writes them all."""
from __future__ import annotations

import os
import queue
import signal
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.pipeline import wait_for
from tests.servers import ServerProcess, free_port, port_accepts, require, unique_name
from workers.tools import cli

CONFIG = """
data_dir = "{data}"

[mqtt]
port = {port}
username = "sensorpipe"
password = "worker-secret"

[[mqtt.subscriptions]]
name = "up"
topic = "{prefix}/{{device}}/up"
downlink = "{prefix}/{{device}}/down"
"""


class Broker:
    def __init__(self, workdir: Path, port: int, passwords: Path, acl: Path) -> None:
        self.host, self.port = "127.0.0.1", port
        config = workdir / "mosquitto.conf"
        config.write_text(f"listener {self.port} {self.host}\nallow_anonymous false\npassword_file {passwords}\n"
                          f"acl_file {acl}\nlog_dest stderr\nlog_type all\nuser root\n")
        self.process = ServerProcess("mosquitto", ["mosquitto", "-c", str(config)], workdir / "mosquitto.log",
                                     lambda: port_accepts(self.port, self.host))


class Client:
    def __init__(self, broker: Broker, username: str, password: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: queue.Queue[int] = queue.Queue()
        self.connected: queue.Queue[bool] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique_name(username),
                                  protocol=paho.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.acks.put(mid)
        self.client.on_connect = lambda c, u, flags, reason, props: self.connected.put(not reason.is_failure)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.ok = self.connected.get(timeout=10)

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            self.client.subscribe(topic, qos=1)
            self.acks.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def received(self, until: bytes) -> list[tuple[str, bytes]]:
        """Messages up to and including the one whose payload is ``until`` (a marker sent last: the broker
        keeps one publisher's order, so whatever was refused before it would have come first)."""
        out = []
        while True:
            topic, payload = self.messages.get(timeout=10)
            out.append((topic, payload))
            if payload == until:
                return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, str, Broker]]:
    require("mosquitto")
    prefix = unique_name("sp")
    port = free_port()
    config = tmp_path / "sensorpipe.toml"
    config.write_text(CONFIG.format(data=tmp_path / "data", port=port, prefix=prefix))
    broker = Broker(tmp_path, port, tmp_path / "passwords", tmp_path / "acl")
    yield config, prefix, broker
    broker.process.stop()


def can_log_in(broker: Broker, username: str, password: str) -> bool:
    client = Client(broker, username, password)
    client.close()
    return client.ok


def run_cli(config: Path, *args: str, capsys: pytest.CaptureFixture) -> str:
    assert cli.main(["--config", str(config), *args]) == 0
    return capsys.readouterr().out


def test_each_device_only_its_own_topics(setup, capsys) -> None:
    config, prefix, broker = setup
    dev1 = run_cli(config, "devices", "add", "dev1", capsys=capsys).strip().splitlines()[-1]
    dev2 = run_cli(config, "devices", "add", "dev2", capsys=capsys).strip().splitlines()[-1]
    out = run_cli(config, "devices", "mosquitto", "--passwords", str(config.parent / "passwords"),
                  "--acl", str(config.parent / "acl"), capsys=capsys)
    assert "allow_anonymous false" in out and "wrote 3 accounts" in out
    assert (config.parent / "passwords").stat().st_mode & 0o077 == 0
    broker.process.start()

    worker = Client(broker, "sensorpipe", "worker-secret")
    assert worker.ok
    worker.subscribe(f"{prefix}/+/up")
    one = Client(broker, "dev1", dev1)
    two = Client(broker, "dev2", dev2)
    assert one.ok and two.ok
    assert not can_log_in(broker, "dev1", dev2)               # someone else's token
    assert not can_log_in(broker, "dev1", "")
    assert not can_log_in(broker, "nobody", dev1)

    # uplinks: a device's own topic only
    one.publish(f"{prefix}/dev1/up", b"mine")
    one.publish(f"{prefix}/dev2/up", b"forged")
    one.publish(f"{prefix}/dev1/up", b"marker")
    assert [p for _, p in worker.received(until=b"marker")] == [b"mine", b"marker"]

    # downlinks: a device reads only its own, whatever it subscribes to
    one.subscribe(f"{prefix}/dev1/down", f"{prefix}/dev2/down", f"{prefix}/+/down")
    worker.publish(f"{prefix}/dev2/down", b"for dev2")
    worker.publish(f"{prefix}/dev1/down", b"for dev1")
    assert one.received(until=b"for dev1") == [(f"{prefix}/dev1/down", b"for dev1")]

    # revoked, the files written again and the broker told: dev2 is out
    run_cli(config, "devices", "revoke", "dev2", capsys=capsys)
    run_cli(config, "devices", "mosquitto", "--passwords", str(config.parent / "passwords"),
            "--acl", str(config.parent / "acl"), capsys=capsys)
    assert "dev2" not in (config.parent / "passwords").read_text() + (config.parent / "acl").read_text()
    for client in (worker, one, two):
        client.close()
    os.kill(broker.process.pid, signal.SIGHUP)                # Mosquitto reads the files again
    wait_for(lambda: not can_log_in(broker, "dev2", dev2), message="dev2 refused after the reload")
    assert can_log_in(broker, "dev1", dev1)
