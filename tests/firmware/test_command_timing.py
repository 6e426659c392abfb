"""Every command takes effect the moment the board applies it, not at the end of the schedule it was on:
the firmware files under MicroPython's unix port (timed_board.py) against the live pipeline, commands
sent through the commands worker, times read from the board's own log of what it did when."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.firmware.harness import HERE
from tests.firmware.live_board import LiveBoard, now_ms
from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for

SCRIPT = HERE / "timed_board.py"
POLL_SLACK_MS = 600          # the board reads its connection every 200 ms; the rest is the pipeline's way down


@pytest.fixture
def server(pipeline_factory) -> Pipeline:
    p = pipeline_factory(extra_toml=(HERE.parent.parent / "firmware" / "server-config-example.toml").read_text()
                         .replace("[binary.devices.1]", "[binary.devices.7]").replace('"greenhouse-1"', '"timed-1"'))
    p.start_all(COMMAND_ROLES)
    return p


def send(p: Pipeline, command: dict, command_id: str) -> dict:
    return p.command({"op": "send", "device": "timed-1", "id": command_id, "command": command})


def acked(p: Pipeline, command_id: str) -> bool:
    reply = p.command({"op": "commands", "device": "timed-1"})
    return any(c["id"] == command_id and c["status"] == "acked" for c in reply["commands"])


def test_always_on_commands_take_effect_at_once(server: Pipeline, micropython_unix, tmp_path: Path) -> None:
    board = LiveBoard(micropython_unix.binary, SCRIPT, "always-on", "127.0.0.1", str(server.text_port),
                      str(server.binary_port), cwd=tmp_path)
    try:
        wait_for(lambda: server.latest("timed-1"), message="the board's first reading")
        # on a 3 s schedule, told to measure every second
        sent_at = now_ms()
        assert send(server, {"cmd": "interval", "value": 1}, "i1")["status"] == "delivered"
        board.wait_line(lambda line: line.startswith("applied interval"), message="interval applied")
        applied = board.times("applied", "interval")[0]
        assert applied - sent_at < POLL_SLACK_MS + 1000
        wait_for(lambda: len([t for t in board.times("reading") if t > applied]) >= 3, message="three readings")
        after = [t for t in board.times("reading") if t > applied][:3]
        first_reading = board.times("reading")[0]
        # the next reading comes 1 s after the command, not when the old 3 s ran out
        assert 900 <= after[0] - applied <= 1300, (applied, after, first_reading)
        assert all(900 <= b - a <= 1300 for a, b in zip(after, after[1:])), after

        # read: measured and sent now, and the schedule counts from there
        sent_at = now_ms()
        assert send(server, {"cmd": "read"}, "r1")["status"] == "delivered"
        board.wait_line(lambda line: line.startswith("applied read"), message="read applied")
        applied = board.times("applied", "read")[0]
        wait_for(lambda: [t for t in board.times("reading") if t >= applied], message="the reading read asked for")
        assert [t for t in board.times("reading") if t >= applied][0] - applied < 300
        assert applied - sent_at < POLL_SLACK_MS + 1000

        # relay and led: switched when the line arrives, between readings
        for command, command_id in (({"cmd": "relay", "pin": 5, "on": True}, "p1"), ({"cmd": "led", "on": True}, "l1")):
            sent_at = now_ms()
            assert send(server, command, command_id)["status"] == "delivered"
            name = command["cmd"]
            board.wait_line(lambda line, name=name: line.startswith(f"applied {name}"), message=f"{name} applied")
            assert board.times("applied", name)[0] - sent_at < POLL_SLACK_MS + 1000
        wait_for(lambda: acked(server, "l1") and acked(server, "i1"), message="the acks")

        # reboot: acknowledged, then the reset comes at once, not at the next reading
        sent_at = now_ms()
        assert send(server, {"cmd": "reboot"}, "b1")["status"] == "delivered"
        output = board.finish()
        resets = board.times("reset")
        assert resets and resets[0] - board.times("applied", "reboot")[0] < 400, output
        assert resets[0] - sent_at < POLL_SLACK_MS + 1000
    finally:
        board.close()


def test_battery_commands_take_effect_at_the_wake_they_arrive(server: Pipeline, micropython_unix,
                                                             tmp_path: Path) -> None:
    board = LiveBoard(micropython_unix.binary, SCRIPT, "battery", "127.0.0.1", str(server.text_port),
                      str(server.binary_port), cwd=tmp_path)
    try:
        board.wake()                           # power-on: sends at once; MEASURE_S 60, WAKE_S 120
        wait_for(lambda: server.latest("timed-1").get("dropped") == 0, message="the first packet and status line")
        # the board is asleep: both wait on the server for its next send (wake 3)
        assert send(server, {"cmd": "interval", "value": 30}, "bi1")["status"] == "queued"
        assert send(server, {"cmd": "wake", "value": 90}, "bw1")["status"] == "queued"
        for _ in range(7):
            board.wake()
        wait_for(lambda: acked(server, "bi1") and acked(server, "bw1"), message="both acknowledged")
        # read: the wake after the one it came with sends, whatever the count says
        assert send(server, {"cmd": "read"}, "br1")["status"] == "queued"
        for _ in range(3):
            board.wake()
        # reboot: the wake it comes with ends in a reset, not a deep sleep
        assert send(server, {"cmd": "reboot"}, "bb1")["status"] == "queued"
        for _ in range(2):
            board.wake()
        output = board.finish()
        sleeps = [int(line.split()[1]) for line in output if line.startswith("slept ")]
        # wake 3 applied interval 30: its own sleep is already the new one, and every one after it
        assert all(55_000 <= ms <= 60_000 for ms in sleeps[:2]), sleeps
        assert all(25_000 <= ms <= 30_000 for ms in sleeps[2:]), sleeps
        wakes = _split_wakes(output)
        # sends at wakes 1 and 3 (every 120 s of 60), then every 90 s of 30: 6 and 9; read: 10 as well
        assert [i for i, w in enumerate(wakes, 1) if "sent" in w] == [1, 3, 6, 9, 10, 13], output
        assert [i for i, w in enumerate(wakes, 1) if "applied" in w] == [3, 9, 13]
        assert [i for i, w in enumerate(wakes, 1) if "reset" in w] == [13] and "slept" not in wakes[12]
    finally:
        board.close()


def _split_wakes(output: list[str]) -> list[set[str]]:
    wakes: list[set[str]] = [set()]
    for line in output:
        if line == "asleep":
            wakes.append(set())
        elif line.split()[:1]:
            wakes[-1].add(line.split()[0])
    return wakes[:-1]
