"""CURVE between workers beyond loopback (issue 15): keys from ``sensorpipe keys init``, a refusal
to start without them, and two hosts made of network namespaces. Host A runs the edge, query,
commands, SQLite sink and rollup workers on a private address; host B runs the only parser and a
client program. A listed client key gets answers and can send a command, an unlisted key and a
plaintext client get nothing, and the refusals are counted."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zmq

from tests.netns import Hosts, two_hosts
from tests.pipeline import REPO, Pipeline, wait_for
from workers.core import config as config_mod
from workers.core import curve, runtime
from workers.processes import query as query_mod

def test_which_endpoints_reach_beyond_loopback() -> None:
    assert not curve.beyond_loopback("tcp://127.0.0.1:5555")
    assert not curve.beyond_loopback("tcp://127.3.4.5:5555")
    assert not curve.beyond_loopback("tcp://localhost:5555")
    assert not curve.beyond_loopback("tcp://[::1]:5555")
    assert not curve.beyond_loopback("ipc:///run/sensorpipe/frames")
    assert not curve.beyond_loopback("inproc://frames")
    for endpoint in ("tcp://10.1.2.3:5555", "tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://eth0:5555",
                     "tcp://[fd00::1]:5555", "tcp://collector.lan:5555", "tcp://127.0.0.1;10.1.2.3:5555"):
        assert curve.beyond_loopback(endpoint), endpoint


def test_a_config_beyond_loopback_is_refused_without_keys_and_keys_init_makes_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = tmp_path / "sensorpipe.toml"
    path.write_text(f'data_dir = "{data}"\n[endpoints]\nquery = "tcp://10.20.30.40:5560"\n')
    with pytest.raises(config_mod.ConfigError, match=r"endpoints.query: beyond loopback, so CURVE is required"
                                                     r".*server.key: no such file.*sensorpipe keys init"):
        config_mod.load(path)
    made = subprocess.run([sys.executable, "-m", "workers", "--config", str(path), "keys", "init",
                           "--client", "dashboard"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    keys = data / "curve"
    files = sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file())
    assert files == ["clients/dashboard.key", "clients/dashboard.key_secret", "server.key", "server.key_secret",
                     "worker.key", "worker.key_secret"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.rglob("*") if p.is_file())
    public, _ = curve.read_pair(keys / "clients" / "dashboard.key", need_secret=False)
    assert public.decode() in made.stdout.splitlines()[-2]          # printed, to paste into [curve] clients
    cfg = config_mod.load(path)
    assert cfg.curve.identity == "worker"
    again = subprocess.run([sys.executable, "-m", "workers", "--config", str(path), "keys", "init"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "there already" in again.stdout                          # never replaced by accident
    assert curve.read_pair(keys / "clients" / "dashboard.key", need_secret=False)[0] == public
    path.write_text(path.read_text() + '[curve]\nclients = ["not a key"]\n')
    with pytest.raises(config_mod.ConfigError, match="not a key"):
        config_mod.load(path)


# --------------------------------------------------------------------------- two hosts


class TwoHostPipeline(Pipeline):
    """Pipeline's configuration with every endpoint and the listeners on host A's address."""

    def __init__(self, tmp: Path, hosts: Hosts) -> None:
        super().__init__(tmp)
        self.hosts = hosts
        self.config_path.write_text(self.config_path.read_text().replace("127.0.0.1", hosts.addr_a))
        self.query_endpoint = self.query_endpoint.replace("127.0.0.1", hosts.addr_a)
        self.command_endpoint = self.command_endpoint.replace("127.0.0.1", hosts.addr_a)

    def start_on(self, host: str, role: str, config: Path) -> str:
        name = self._name(role)
        env = {**os.environ, "SUPERVISOR_PROCESS_NAME": name.replace(":", "_"), "PYTHONUNBUFFERED": "1"}
        with open(self.logs / f"{name.replace(':', '_')}.log", "ab") as log:
            self.procs[name] = self.hosts.popen(
                host, [sys.executable, "-m", "workers", "--config", str(config), "worker", role],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return name


@pytest.mark.servers                    # starts worker processes, in namespaces it makes
def test_curve_across_two_hosts_listed_key_answers_unlisted_and_plaintext_get_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with two_hosts() as hosts:
        p = TwoHostPipeline(tmp_path / "a", hosts)
        failed = True
        try:
            made = p.cli("keys", "init", "--client", "listed", "--client", "unlisted")
            assert made.returncode == 0, made.stderr
            keys = p.data / "curve"
            # The listed client's public key goes into the configuration as text (one file for every host).
            listed = curve.read_pair(keys / "clients" / "listed.key", need_secret=False)[0].decode()
            p.config_path.write_text(p.config_path.read_text() + f'\n[curve]\nclients = ["{listed}"]\n')
            # Host B gets what a host that only connects needs: the server's public key, the workers' pair.
            host_b = tmp_path / "b"
            (host_b / "data" / "curve").mkdir(parents=True)
            for name in ("server.key", "worker.key", "worker.key_secret"):
                shutil.copy2(keys / name, host_b / "data" / "curve" / name)
            config_b = host_b / "sensorpipe.toml"
            config_b.write_text(p.config_path.read_text().replace(str(p.data), str(host_b / "data")))
            for role in ("query", "sink-sqlite", "rollup", "commands", "edge"):
                p.start_on(hosts.a, role, p.config_path)
            p.start_on(hosts.b, "parser", config_b)
            # The client on host B: its own pair and the server's public key, nothing else.
            client = tmp_path / "client" / "curve"
            (client / "clients").mkdir(parents=True)
            shutil.copy2(keys / "server.key", client / "server.key")
            for name in ("listed", "unlisted"):
                shutil.copy2(keys / "clients" / f"{name}.key_secret", client / "clients" / f"{name}.key_secret")
            args = {"keys": str(client.parent), "text": [hosts.addr_a, p.text_port],
                    "query": p.query_endpoint, "command": p.command_endpoint,
                    "inject": config_mod.load(p.config_path).endpoints.inject}
            run = hosts.run(hosts.b, [sys.executable, "-c", "from tests.test_curve import client; client()",
                                      json.dumps(args)], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stdout + run.stderr
            seen = json.loads(run.stdout.splitlines()[-1])
            assert seen["listed_latest"]["fields"]["temp"]["value"] == 21.5
            assert seen["listed_command"] == {"ok": True}
            assert seen["delivered"] == {"id": "c1", "cmd": "relay", "on": True}
            assert seen["unlisted_query"] is None and seen["unlisted_command"] is None
            assert seen["plaintext_query"] is None
            assert seen["listed_key_on_a_worker_socket"] is None
            assert all(n >= 1 for n in seen["refused"].values()), seen["refused"]   # edge: the listed key
            assert p.count_rows(where="WHERE device = 'remote-1'") >= 1      # stored by way of B's parser
            failed = False
        finally:
            p.stop_all()
            if failed:
                print(p.log_text())


def client() -> None:
    """Host B's side (run in its namespace): a device, the listed client, the unlisted one, and a
    plaintext one. Prints one JSON line of what each got."""
    args = json.loads(sys.argv[1])
    keys_dir = Path(args["keys"])

    def as_client(name: str | None) -> None:
        runtime.use_curve(None if name is None else
                          curve.load(keys_dir, "curve", f"clients/{name}", (), ()))

    last_error: list[str] = []

    def ask(endpoint: str, message: dict, timeout: float = 2.0) -> dict | None:
        try:
            return query_mod.request(endpoint, message, timeout_s=timeout, retries=0)
        except query_mod.QueryError as exc:
            last_error[:] = [str(exc)]
            return None

    out: dict = {}
    deadline = time.monotonic() + 30
    while True:                                      # the edge may not listen yet
        try:
            device = socket.create_connection(tuple(args["text"]), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    as_client("listed")
    reply = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:               # a device streaming until the pipeline is up
        device.sendall(b'{"device":"remote-1","temp":21.5}\n')
        reply = ask(args["query"], {"op": "latest", "device": "remote-1"}, timeout=0.5)
        if reply and reply.get("ok") and reply.get("fields"):
            out["listed_latest"] = reply
            break
    else:
        raise SystemExit(f"no latest value for remote-1 in 60 s: {reply or last_error}")
    out["listed_command"] = ask(args["command"], {"op": "ping"})
    # The commands worker knows the device once a parser's notice reached it, which may come after
    # the query worker has its reading: sent again (the same id is safe) until it is known.
    deadline = time.monotonic() + 30
    while True:
        sent = ask(args["command"], {"op": "send", "device": "remote-1", "id": "c1",
                                     "command": {"cmd": "relay", "on": True}, "wait_s": 10}, timeout=12)
        if (sent or {}).get("code") != "unknown_device" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    device.settimeout(20)
    buffer = b""
    try:
        while b"\n" not in buffer:
            buffer += device.recv(4096)
    except TimeoutError:
        raise SystemExit(f"command c1 not delivered in 20 s: send said {sent}; now "
                         f"{ask(args['command'], {'op': 'commands', 'device': 'remote-1'})}") from None
    out["delivered"] = orjson.loads(buffer.split(b"\n", 1)[0])
    # The listed key is a client's: the workers' own sockets (here the edge's inject socket) refuse it.
    # It stays connected (ZeroMQ keeps retrying the handshake) until the refusal has been counted.
    intruder_ctx = zmq.Context()
    intruder = runtime.socket(intruder_ctx, zmq.DEALER, connect=args["inject"])
    intruder.send_multipart([b"", b"x"])
    out["listed_key_on_a_worker_socket"] = intruder.recv_multipart() if intruder.poll(1500) else None
    as_client("unlisted")
    out["unlisted_query"] = ask(args["query"], {"op": "ping"})
    out["unlisted_command"] = ask(args["command"], {"op": "ping"})
    ctx = zmq.Context()                              # a plaintext client (runtime.socket would refuse to make it)
    try:
        plain = ctx.socket(zmq.REQ)
        plain.linger = 0
        plain.connect(args["query"])
        plain.send(b'{"op":"ping"}')
        out["plaintext_query"] = plain.recv() if plain.poll(2000) else None
        plain.close()
    finally:
        ctx.term()
    as_client("listed")
    deadline = time.monotonic() + 20

    def refused() -> dict:
        workers = (ask(args["query"], {"op": "status"}) or {}).get("workers", {})
        return {name: workers.get(name, {}).get("refused_peers", 0) for name in ("query", "commands", "edge")}

    while time.monotonic() < deadline and not all(refused().values()):
        time.sleep(0.1)
    out["refused"] = refused()
    intruder.close()
    intruder_ctx.term()
    device.close()
    print(json.dumps(out))
