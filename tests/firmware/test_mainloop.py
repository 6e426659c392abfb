"""The firmware's whole main loop under CPython, with stand-in machine/network/dht modules, against the
real pipeline (edge, parsers, SQLite sink, query worker) over real TCP: readings come back through the
query endpoint and the SQLite store. Battery mode runs across simulated deep sleeps (RTC memory is
kept, everything else is imported anew), and the server goes away for a while."""
from __future__ import annotations

import importlib
import sqlite3

import pytest

from tests.firmware.harness import FIRMWARE, HERE, Board, config
from tests.pipeline import Pipeline, wait_for

LAYOUT_TOML = (FIRMWARE / "server-config-example.toml").read_text() \
    .replace("[binary.devices.1]", "[binary.devices.7]").replace('"greenhouse-1"', '"plot-7"')


@pytest.fixture
def server(pipeline_factory) -> Pipeline:
    p = pipeline_factory(extra_toml=LAYOUT_TOML)
    p.start_all()
    return p


def rows(p: Pipeline, device: str, field: str) -> list[tuple[int, float]]:
    if not (p.data / "sensorpipe.db").exists():
        return []
    db = p.db()
    try:
        return db.execute("SELECT ts, value FROM readings WHERE device = ? AND field = ? ORDER BY ts",
                          (device, field)).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def events(p: Pipeline, device: str, kind: str) -> list[str]:
    db = p.db()
    try:
        return [r[0] for r in db.execute("SELECT body FROM events WHERE device = ? AND kind = ? ORDER BY ts",
                                         (device, kind))]
    finally:
        db.close()


def temps(start: float, n: int) -> list[tuple[float, float]]:
    return [(round(start + i / 10, 1), 40.0 + i) for i in range(n)]


def rtc_records(board: Board) -> int:
    ringbuf = importlib.import_module("ringbuf")
    buf = ringbuf.RingBuffer.from_bytes(board.state.rtc, 8, 255)
    return len(buf)


# ------------------------------------------------------------------ always on

@pytest.mark.parametrize("transport, device", [("json", "greenhouse-1"), ("kv", "5c:cf:7f:a1:b2:c3")])
def test_text_board(server: Pipeline, board: Board, transport: str, device: str) -> None:
    board.state.dht = [None, None] + temps(21.0, 3)      # the first reading: the DHT does not answer (twice)
    board.state.adc = {0: 498}
    board.state.networks = {"home": "secret"}
    cfg = config(DEVICE_ID=device, TRANSPORT=transport, TEXT_PORT=server.text_port, MEASURE_S=0.2,
                 WIFI=[("office", "nope", 0.3), ("home", "secret")])
    app = board.app(cfg)
    app.run(cycles=4)
    app.close()

    wait_for(lambda: server.latest(device).get("temp") == 21.2, message="the last reading")
    assert server.latest(device) == {"temp": 21.2, "humi": 42.0, "soil": 498, "rssi": -61}
    wait_for(lambda: len(rows(server, device, "soil")) == 4, message="four soil rows")
    assert [v for _, v in rows(server, device, "temp")] == [21.0, 21.1, 21.2]
    assert events(server, device, "failed_read") == ['{"fields":["temp","humi"]}']
    # Wi-Fi: the first network was tried first, and the station activated before connecting
    assert [e for e in board.state.events if e[0] == "connect"] == [("connect", "office"), ("connect", "home")]


def test_binary_board_always_on(server: Pipeline, board: Board) -> None:
    board.state.dht = temps(18.0, 3)
    cfg = config(DEVICE_ID="plot-7", TRANSPORT="binary", DEVICE_NUMBER=7, TEXT_PORT=server.text_port,
                 BINARY_PORT=server.binary_port, MEASURE_S=1, VBAT_ADC=0, VBAT_SCALE=0.0075)
    board.state.adc = {0: 500}
    app = board.app(cfg)
    app.run(cycles=3)
    app.close()
    wait_for(lambda: len(rows(server, "plot-7", "temp")) == 3, message="three binary readings")
    assert [v for _, v in rows(server, "plot-7", "temp")] == pytest.approx([18.0, 18.1, 18.2])
    latest = server.latest("plot-7")
    assert latest["humi"] == pytest.approx(42.0) and latest["soil"] == 500
    assert latest["vbat"] == pytest.approx(3.75)
    assert latest["rssi"] == -61 and latest["dropped"] == 0       # the status line


def test_server_and_wifi_away_for_a_while(server: Pipeline, board: Board) -> None:
    board.state.dht = temps(10.0, 12)
    cfg = config(TEXT_PORT=server.text_port, MEASURE_S=0.2, WIFI_TIMEOUT_S=0.2)
    app = board.app(cfg)
    app.run(cycles=2)
    wait_for(lambda: len(rows(server, "greenhouse-1", "temp")) == 2, message="first two readings")

    server.stop("edge:1")
    app.run(cycles=3)
    board.state.wifi_up = False
    app.run(cycles=3)
    assert len(app.backlog) == 6 and app.backlog.dropped == 0
    board.state.wifi_up = True
    server.start("edge")
    server.wait_ready()
    sent = 8
    deadline_cycles = 60
    while len(app.backlog) and deadline_cycles:
        app.run(cycles=1)
        sent += 1
        deadline_cycles -= 1
    assert not len(app.backlog), "the backlog was never delivered"
    app.close()
    wait_for(lambda: len(rows(server, "greenhouse-1", "temp")) == sent, message="every reading")
    values = [v for _, v in rows(server, "greenhouse-1", "temp")]
    # one reading per cycle: 8 held while away, then however many cycles the backlog took to go
    # (the fake sensor repeats its last value after the 12th)
    expected = [t for t, _ in temps(10.0, 12)]
    assert values == (expected + expected[-1:] * sent)[:sent]


def test_backlog_bound_drops_oldest_and_says_so(server: Pipeline, board: Board) -> None:
    board.state.dht = temps(30.0, 80)
    cfg = config(TEXT_PORT=server.text_port, MEASURE_S=0.2, BACKLOG_MAX=3)
    app = board.app(cfg)
    server.stop("edge:1")
    app.run(cycles=5)
    assert len(app.backlog) == 3 and app.backlog.dropped == 2
    server.start("edge")
    server.wait_ready()
    taken = 5
    while len(app.backlog) and taken < 60:   # until the server backoff lets it through
        app.run(cycles=1)
        taken += 1
    dropped = app.backlog.dropped
    app.close()
    assert not len(app.backlog) and dropped >= 2
    wait_for(lambda: len(rows(server, "greenhouse-1", "temp")) == taken - dropped, message="what was kept")
    values = [v for _, v in rows(server, "greenhouse-1", "temp")]
    assert values == [t for t, _ in temps(30.0, taken)][dropped:]        # the oldest went, nothing else
    assert server.latest("greenhouse-1")["dropped"] == dropped


# ------------------------------------------------------------------ battery

def battery_config(server: Pipeline, **values) -> type:
    base = dict(DEVICE_ID="plot-7", TRANSPORT="binary", BATTERY=True, DEVICE_NUMBER=7, MEASURE_S=60,
                WAKE_S=180, TEXT_PORT=server.text_port, BINARY_PORT=server.binary_port, CMD_WAIT_MS=200,
                WIFI_TIMEOUT_S=0.2)
    base.update(values)
    return config(**base)


def test_battery_board_across_deep_sleeps(server: Pipeline, board: Board) -> None:
    cfg = battery_config(server)
    board.state.dht = temps(20.0, 7)
    sleeps = [board.wake(cfg) for _ in range(7)]       # sends at wakes 1 (power-on), 4 and 7
    assert all(55_000 <= ms <= 60_000 for ms in sleeps), sleeps
    assert rtc_records(board) == 0                       # all acknowledged
    wait_for(lambda: len(rows(server, "plot-7", "temp")) == 7, message="seven readings")
    by_value = sorted(rows(server, "plot-7", "temp"), key=lambda r: r[1])
    assert [v for _, v in by_value] == pytest.approx([20.0, 20.1, 20.2, 20.3, 20.4, 20.5, 20.6])
    gaps = [b[0] - a[0] for a, b in zip(by_value, by_value[1:])]
    minute = 60_000_000_000
    assert gaps[1] == gaps[2] == gaps[4] == gaps[5] == minute    # back-computed within each packet
    latest = server.latest("plot-7")
    assert latest["temp"] == pytest.approx(20.6) and latest["rssi"] == -61 and latest["dropped"] == 0


def test_battery_board_keeps_readings_while_the_server_is_down(server: Pipeline, board: Board) -> None:
    cfg = battery_config(server, WAKE_S=120, BUFFER_RECORDS=4)
    board.state.dht = temps(5.0, 11)
    board.wake(cfg)                                      # power-on: reading 1 sent at once
    wait_for(lambda: len(rows(server, "plot-7", "temp")) == 1, message="the first reading")
    server.stop("edge:1")
    for wake in range(2, 10):                            # sends fail at wakes 3, 5, 7, 9
        board.state.wifi_up = wake != 5                  # ... and at 5 Wi-Fi is gone too
        board.wake(cfg)
    assert rtc_records(board) == 4
    server.start("edge")
    server.wait_ready()
    board.wake(cfg)                                      # wake 10: no send
    assert rtc_records(board) == 4
    board.wake(cfg)                                      # wake 11: one packet with the newest four
    assert rtc_records(board) == 0
    wait_for(lambda: len(rows(server, "plot-7", "temp")) == 5, message="five readings")
    assert sorted(v for _, v in rows(server, "plot-7", "temp")) == pytest.approx([5.0, 5.7, 5.8, 5.9, 6.0])
    wait_for(lambda: server.latest("plot-7").get("dropped") == 6, message="six dropped, reported")


# ------------------------------------------------------------------ MicroPython's unix port

def test_unchanged_on_the_unix_port(server: Pipeline, micropython_unix, tmp_path) -> None:
    """The same firmware files under real MicroPython (unix port), against the same real pipeline."""
    script = HERE / "unix_board.py"
    ports = ("127.0.0.1", str(server.text_port), str(server.binary_port))
    output = micropython_unix.run(script, "json", *ports, cwd=tmp_path).splitlines()
    assert output[-1] == "json 0" and "wifi: connected to home" in output
    wait_for(lambda: len(rows(server, "unix-1", "temp")) == 5, message="five readings from the unix port")
    assert [v for _, v in rows(server, "unix-1", "temp")] == [20.0, 20.1, 20.2, 20.3, 20.4]
    latest = server.latest("unix-1")
    assert latest["humi"] == 54 and latest["rssi"] == -61 and latest["mem_free"] > 0   # gc.mem_free is real here

    output = micropython_unix.run(script, "battery", *ports, cwd=tmp_path).splitlines()
    sleeps = [line for line in output if line.startswith("slept ")]
    assert len(sleeps) == 5 and all(55_000 <= int(line.split()[1]) <= 60_000 for line in sleeps), sleeps
    wait_for(lambda: len(rows(server, "plot-7", "temp")) == 5, message="five battery readings")
    assert sorted(v for _, v in rows(server, "plot-7", "temp")) == pytest.approx([10.0, 10.1, 10.2, 10.3, 10.4])
    assert server.latest("plot-7")["dropped"] == 0


def test_boot_and_main_on_the_unix_port(server: Pipeline, micropython_unix, tmp_path) -> None:
    """boot.py and main.py as a board runs them after power-on, with a config.py as deploy writes it."""
    (tmp_path / "config.py").write_text(
        f'DEVICE_ID = "plot-7"\nSERVER_HOST = "127.0.0.1"\nTEXT_PORT = {server.text_port}\n'
        f'BINARY_PORT = {server.binary_port}\nTRANSPORT = "binary"\nBATTERY = True\nDEVICE_NUMBER = 7\n'
        'WIFI = [("home", "secret")]\nBOOT_GRACE_S = 0\nCMD_WAIT_MS = 100\n')
    (tmp_path / "power_on.py").write_text(
        f'exec(open("{FIRMWARE}/boot.py").read())\n'
        "try:\n"
        f'    exec(open("{FIRMWARE}/main.py").read())\n'
        "except BaseException as e:\n"
        '    print("ended with", type(e).__name__, e.args[0])\n')
    output = micropython_unix.run(tmp_path / "power_on.py", cwd=tmp_path,
                                  path=(FIRMWARE / "lib", HERE / "fakes", tmp_path)).splitlines()
    assert output[-1].startswith("ended with DeepSleep 5") and "wifi: connected to home" in output, output
    wait_for(lambda: server.latest("plot-7").get("dropped") == 0, message="the first reading and status line")
    assert server.latest("plot-7")["temp"] == 21.5
