"""A battery board that stays awake for an update longer than MEASURE_S keeps measuring on time: the main
loop under CPython (stand-in hardware), its text connection and clock replaced by a script of what the
server writes and how long each line takes to come."""
from __future__ import annotations

import base64
import hashlib
import importlib

from tests.firmware.harness import Board, config
from workers.core import devicekeys, updates

KEY = "5a" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def ticks_ms(self) -> int:
        return self.now


class ScriptedLink:
    """The text connection: each call to lines() takes ``step_ms`` of the board's clock and gives the next line."""

    def __init__(self, clock: Clock, script: list[bytes], step_ms: int) -> None:
        self.clock, self.script, self.step_ms = clock, list(script), step_ms
        self.sent: list[bytes] = []
        self.open_ = False

    def connected(self) -> bool:
        return self.open_

    def open(self) -> None:
        self.open_ = True

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def lines(self, wait_ms: int) -> list[bytes]:
        self.clock.now += min(self.step_ms, wait_ms) if self.script else wait_ms
        return [self.script.pop(0)] if self.script else []

    def close(self) -> None:
        self.open_ = False


def update_lines(device: str, content: bytes) -> list[bytes]:
    files = [["lib/extra.py", len(content), hashlib.sha256(content).hexdigest()]]
    sig = devicekeys.sign(KEY, updates.manifest_message(device, "2", files))
    out = [updates_line({"id": "m", "cmd": "ota", "v": "2", "files": files, "sig": sig})]
    for n, offset in enumerate(range(0, len(content), 384)):
        out.append(updates_line({"id": n, "cmd": "ota_chunk", "v": "2", "f": 0, "o": offset,
                                 "d": base64.b64encode(content[offset:offset + 384]).decode()}))
    out.append(updates_line({"id": "s", "cmd": "ota_swap", "v": "2"}))
    return out


def updates_line(doc: dict) -> bytes:
    import json
    return json.dumps(doc).encode()


def test_battery_board_measures_on_time_while_an_update_keeps_it_awake(board: Board) -> None:
    cfg = config(DEVICE_ID="plot-7", TRANSPORT="binary", BATTERY=True, DEVICE_NUMBER=7, MEASURE_S=1, WAKE_S=1,
                 CMD_WAIT_MS=300, OTA_IDLE_MS=2000, DEVICE_KEY=KEY)
    board.state.dht = [(i / 10, 50.0) for i in range(100)]
    clock = Clock()
    lines = update_lines("plot-7", b"# padding\n" * 300)            # 3000 bytes: 8 chunks, each line slow to come
    app = board.app(cfg)
    hw = app.hw
    hw.ticks_ms = clock.ticks_ms
    hw.sleep_ms = lambda ms: setattr(clock, "now", clock.now + ms)
    app.started_at = app.next_at = clock.now
    link = ScriptedLink(clock, lines, step_ms=250)
    app.text = link
    app.send_buffer = lambda buf: buf.clear()                       # the packet: acknowledged
    ringbuf = importlib.import_module("ringbuf")
    try:
        app.wake()
    except board.state.DeepSleep as sleep:
        slept = sleep.ms
    else:
        raise AssertionError("no deep sleep")
    awake = clock.now - 1_000_000
    assert awake >= 2000                                            # 10 lines, 200 ms each at least
    buf = ringbuf.RingBuffer.from_bytes(board.state.rtc, 8, 255)
    # the wake's own reading went in the packet; one more for each whole MEASURE_S it stayed awake
    assert len(buf) == awake // 1000
    # and the sleep ends at the next reading's time
    assert slept == 1000 - awake % 1000 or slept == 1000, (slept, awake)
    assert (board.workdir / "lib" / "extra.py").read_bytes() == b"# padding\n" * 300
    assert not any(b'"cmd_ack":"s"' in line for line in link.sent)   # answered after the wake, by 2
