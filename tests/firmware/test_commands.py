"""Commands from the server, applied and acknowledged by the firmware's main loop (CPython, stand-in
hardware). The server side of commands is not built yet, so a plain TCP server (plainserver.py) plays it:
it writes the commands on the board's text connection once the board has sent its first line."""
from __future__ import annotations

import json
from typing import Iterator

import pytest

from tests.firmware.harness import Board, config
from tests.firmware.plainserver import PlainServer


@pytest.fixture
def server() -> Iterator[PlainServer]:
    srv = PlainServer()
    yield srv
    srv.close()


def run_until(app, srv: PlainServer, predicate, cycles: int = 40) -> None:
    """Run the main loop a reading at a time until the server has seen what it waits for."""
    for _ in range(cycles):
        app.run(cycles=1)
        with srv._lock:
            if predicate(srv):
                return
    raise AssertionError(f"not seen after {cycles} readings; lines: {srv.lines!r}")


def acks(srv: PlainServer) -> dict:
    out = {}
    for line in srv.lines:
        doc = json.loads(line)
        if "cmd_ack" in doc:
            out[doc["cmd_ack"]] = doc
    return out


def test_commands_are_applied_and_acknowledged(server: PlainServer, board: Board) -> None:
    server.send_commands(
        b'{"id":"c1","cmd":"interval","value":1}',
        b'{"id":"c2","cmd":"relay","pin":5,"on":true}',
        b'{"id":"c3","cmd":"led","on":true}',
        b'{"id":"c4","cmd":"selfdestruct"}',
        b'{"id":"c5","cmd":"relay","pin":6,"on":true}',
        b'{"id":"c2","cmd":"relay","pin":5,"on":true}',      # sent again: acknowledged, not applied twice
        b'{"id":"c6","cmd":"interval","value":0}',
        b"garbage",
    )
    cfg = config(TEXT_PORT=server.text_port, MEASURE_S=0.2, OUTPUT_PINS=(5, 12), LED_PIN=2)
    app = board.app(cfg)
    run_until(app, server, lambda s: len(acks(s)) == 7)
    app.close()
    got = acks(server)
    assert got["c1"] == {"device": "greenhouse-1", "cmd_ack": "c1", "ok": True}
    assert got["c2"]["ok"] and got["c3"]["ok"]
    assert got["c4"] == {"device": "greenhouse-1", "cmd_ack": "c4", "ok": False, "error": "unknown command"}
    assert got["c5"]["error"] == "pin 6 is not in OUTPUT_PINS"
    assert got["c6"]["error"] == "value must be whole seconds, 1..65535"
    assert got[None] == {"device": "greenhouse-1", "cmd_ack": None, "ok": False, "error": "not a JSON object"}
    assert [line for line in server.lines if b'"cmd_ack":"c2"' in line] == [
        b'{"device":"greenhouse-1","cmd_ack":"c2","ok":true}'] * 2
    assert [e for e in board.state.events if e[0] == "pin"] == [("pin", 5, 1), ("pin", 2, 0)]  # LED active-low
    assert app.conf.MEASURE_S == 1
    assert board.settings == {"MEASURE_S": 1, "pins": {"5": True}, "led": True}

    # after a reset the board keeps what the server set
    board.state.events.clear()
    again = board.app(cfg)
    assert again.conf.MEASURE_S == 1
    again.restore_outputs()
    assert board.state.events == [("pin", 5, 1), ("pin", 2, 0)]


def test_reboot_is_acknowledged_first(server: PlainServer, board: Board) -> None:
    server.send_commands(b'{"id":"c9","cmd":"reboot"}')
    app = board.app(config(TEXT_PORT=server.text_port, MEASURE_S=0.2))
    with pytest.raises(board.state.Reset):
        app.run(cycles=40)
    server.wait(lambda s: acks(s).get("c9"))
    assert acks(server)["c9"]["ok"] is True
    assert board.state.resets == 1


def test_read_measures_at_once(server: PlainServer, board: Board) -> None:
    server.send_commands(b'{"id":"r1","cmd":"read"}')
    app = board.app(config(TEXT_PORT=server.text_port, MEASURE_S=600))
    app.run(cycles=1)
    server.wait(lambda s: s.lines)
    app.run(cycles=1)                                   # comes at once on `read`, not after 600 s
    server.wait(lambda s: len([line for line in s.lines if b'"temp"' in line]) == 2)
    app.close()
    assert acks(server)["r1"]["ok"] is True


def test_battery_board_takes_commands_after_its_packet(server: PlainServer, board: Board) -> None:
    server.send_commands(b'{"id":"b1","cmd":"interval","value":120}', b'{"id":"b2","cmd":"read"}')
    cfg = config(DEVICE_ID="plot-7", TRANSPORT="binary", BATTERY=True, DEVICE_NUMBER=7, MEASURE_S=60,
                 WAKE_S=600, TEXT_PORT=server.text_port, BINARY_PORT=server.binary_port, CMD_WAIT_MS=500)
    first = board.wake(cfg)
    assert 115_000 <= first <= 120_000                 # the new interval counts from now
    server.wait(lambda s: len(acks(s)) == 2)
    assert len(server.packets) == 1
    status = json.loads(server.lines[0])
    assert status == {"device": "plot-7", "rssi": -61, "dropped": 0}
    assert board.settings == {"MEASURE_S": 120}
    second = board.wake(cfg)                             # `read`: this wake sends again
    assert 115_000 <= second <= 120_000
    server.wait(lambda s: len(s.packets) == 2)
    header = server.packets[1][:9]
    assert header == bytes.fromhex("0800" "5802" "7800" "08" "07" "01")   # wake 600 s, measure 120 s


def test_battery_board_without_ack_keeps_its_records(server: PlainServer, board: Board) -> None:
    server.ack = False
    board.state.dht = [(20.0 + i, 50.0) for i in range(5)]
    cfg = config(DEVICE_ID="plot-7", TRANSPORT="binary", BATTERY=True, DEVICE_NUMBER=7, MEASURE_S=60,
                 WAKE_S=120, TEXT_PORT=server.text_port, BINARY_PORT=server.binary_port, ACK_TIMEOUT_S=0.3)
    for _ in range(3):                                   # sends at wakes 1 and 3: no ack either time
        board.wake(cfg)
    assert [p[8] for p in server.packets] == [1, 3]     # record counts: nothing was cleared
    server.ack = True
    board.wake(cfg)
    board.wake(cfg)
    assert [p[8] for p in server.packets] == [1, 3, 5]
    assert server.packets[2][9:11] == (200).to_bytes(2, "little", signed=True)   # the oldest, 20.0 C, still there
