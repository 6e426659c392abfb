"""The firmware's side of device credentials (firmware/lib/devauth.py): the same hello and MAC as the
server's workers/core/credentials.py, and a board on MicroPython's unix port writing through a pipeline
whose listeners require credentials (text hello, signed battery packets)."""
from __future__ import annotations

import socket
import sqlite3
import struct
import threading

import pytest

from tests.firmware.harness import FIRMWARE, HERE
from tests.pipeline import Pipeline, wait_for
from workers.core import credentials

LAYOUT_TOML = (FIRMWARE / "server-config-example.toml").read_text() \
    .replace("[binary.devices.1]", "[binary.devices.7]").replace('"greenhouse-1"', '"plot-7"')


def test_the_board_signs_and_greets_as_the_server_checks(firmware_path, tmp_path) -> None:
    import devauth

    token = "Zp8-example-token_0123456789abcdef"
    packet = struct.pack("<HHHBBB", 8, 600, 60, 8, 7, 1) + bytes(range(8))
    key = devauth.mac_key(token)
    assert key == credentials.mac_key_for(token)
    assert devauth.sign(packet, key, 5) == credentials.sign_packet(key, packet, 5)
    assert credentials.parse_hello(devauth.hello_line("plot-7", token).rstrip(b"\n")) == ("plot-7", token)
    counter = tmp_path / "auth_counter"
    assert [devauth.next_counter(str(counter)) for _ in range(3)] == [1, 2, 3]
    assert counter.read_text() == "3"


def test_the_kept_packet_survives_fat_and_a_reset_between_its_writes(firmware_path, tmp_path, monkeypatch) -> None:
    """FAT (the ESP8266's flash) cannot rename over a file: the kept packet is rewritten all the same,
    and a reset after the old file was removed and before the new one was renamed loses nothing."""
    import os

    import devauth

    def fat_rename(src: str, dst: str) -> None:
        if os.path.exists(dst):
            raise OSError(17, "EEXIST")
        os.replace(src, dst)

    monkeypatch.setattr(os, "rename", fat_rename)
    path = str(tmp_path / "auth_pending")
    devauth.keep(b"sealed-1", 0, path)
    devauth.keep(b"sealed-1", 1, path)                  # unanswered once: written again, over the old one
    assert devauth.pending(path) == (b"sealed-1", 1)
    os.replace(path, path + ".new")                     # the reset: old removed, new not renamed yet
    assert devauth.pending(path) == (b"sealed-1", 1)
    devauth.answered(path)
    assert devauth.pending(path) == (None, 0) and not os.listdir(tmp_path)


def readings(p: Pipeline, device: str) -> list[float]:
    if not (p.data / "sensorpipe.db").exists():
        return []
    db = p.db()
    try:
        return [r[0] for r in db.execute("SELECT value FROM readings WHERE device = ? AND field = 'temp' ORDER BY ts",
                                         (device,))]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def test_on_the_unix_port_against_required_credentials(pipeline_factory, micropython_unix, tmp_path) -> None:
    p = pipeline_factory(extra_toml=LAYOUT_TOML, auth="required")
    p.start_all()
    tokens = {}
    for device in ("unix-1", "plot-7"):
        result = p.cli("devices", "add", device)
        assert result.returncode == 0, result.stderr
        tokens[device] = result.stdout.strip().splitlines()[-1]
    script = HERE / "auth_board.py"
    ports = ("127.0.0.1", str(p.text_port), str(p.binary_port))

    output = micropython_unix.run(script, "json", *ports, "unix-1", tokens["unix-1"], cwd=tmp_path).splitlines()
    assert output[-1] == "json 0", output
    wait_for(lambda: readings(p, "unix-1") == [20.0, 20.1, 20.2], message="the hello'd board's readings")

    output = micropython_unix.run(script, "battery", *ports, "plot-7", tokens["plot-7"], cwd=tmp_path).splitlines()
    assert output[-1] == "counter 2", output
    wait_for(lambda: sorted(readings(p, "plot-7")) == pytest.approx([10.0, 10.1, 10.2]), message="signed packets' readings")


class AckDropper:
    """A TCP proxy in front of the binary port that forwards the first packet and drops the edge's A for
    it (the board's connection closed instead): the server journaled what the board never heard of."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.dropped = 0
        self.packets: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                board, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._relay, args=(board, self.connections == 1), daemon=True).start()

    def _relay(self, board: socket.socket, drop: bool) -> None:
        with board, socket.create_connection(("127.0.0.1", self.upstream), timeout=10) as edge:
            board.settimeout(10)
            edge.settimeout(10)
            data = board.recv(65536)
            self.packets.append(data)
            edge.sendall(data)
            reply = edge.recv(1)
            if drop:
                self.dropped += reply == b"A"
                return                       # closed without the A
            board.sendall(reply)

    def close(self) -> None:
        self.server.close()


def test_a_packet_without_its_ack_goes_again_byte_for_byte(pipeline_factory, micropython_unix, tmp_path) -> None:
    p = pipeline_factory(extra_toml=LAYOUT_TOML, auth="required")
    p.start_all()
    result = p.cli("devices", "add", "plot-7")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    proxy = AckDropper(p.binary_port)
    try:
        output = micropython_unix.run(HERE / "auth_board.py", "resend", "127.0.0.1", str(p.text_port),
                                      str(proxy.port), "plot-7", token, cwd=tmp_path).splitlines()
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert [line for line in output if line.startswith(("wake", "counter"))] == [
        "wake 1 pending 38", "wake 2 pending 38", "wake 3 pending none", "counter 2"], output   # 1 + 9 + 8 + 20
    first, again, new = proxy.packets
    assert again == first and new != first                 # the same bytes, then a packet of its own
    wait_for(lambda: sorted(readings(p, "plot-7")) == pytest.approx([30.0, 30.1, 30.2]), message="each reading once")
    # the edge's counters reach the query worker with its next stats message
    wait_for(lambda: p.query({"op": "status"})["workers"].get("edge", {}).get("binary_resent") == 1,
             message="the resend counted (binary_resent)")
