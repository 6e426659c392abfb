"""Updates over the air: the firmware files under MicroPython's unix port (ota_board.py: the board's flash is a
directory, every reset runs boot.py and main.py anew) against the live pipeline, updates pushed with
``sensorpipe firmware push`` through the commands worker and the board's own text connection."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Iterator

import pytest

from tests.firmware.harness import FAKES, FIRMWARE, HERE
from tests.firmware.live_board import LiveBoard
from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for
from workers.core import devicekeys, updates

SCRIPT = HERE / "ota_board.py"


@pytest.fixture
def server(pipeline_factory) -> Pipeline:
    p = pipeline_factory()
    p.start_all(COMMAND_ROLES)
    return p


@pytest.fixture
def boards() -> Iterator[list[LiveBoard]]:
    running: list[LiveBoard] = []
    yield running
    for board in running:
        board.close()


def flash(directory: Path, p: Pipeline, device: str, key: str | None = None, version: str = "1", **settings) -> Path:
    """A board as `sensorpipe firmware deploy` leaves it, in ``directory``."""
    shutil.copytree(FIRMWARE / "lib", directory / "lib")
    for name in ("boot.py", "main.py"):
        shutil.copy(FIRMWARE / name, directory / name)
    (directory / "version.txt").write_text(version)
    values = {"DEVICE_ID": device, "SERVER_HOST": "127.0.0.1", "TEXT_PORT": p.text_port,
              "BINARY_PORT": p.binary_port, "WIFI": [("home", "secret")], "BOOT_GRACE_S": 0, "DHT_RETRY_MS": 0,
              "MEASURE_S": 0.3, "DEVICE_KEY": key or devicekeys.ensure_key(p.data, device), "OTA_BOOTS": 2,
              "CRASH_WAIT_S": 0.1, "OTA_TRIAL_S": 30}
    values.update(settings)
    (directory / "config.py").write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return directory


def power_on(micropython_unix, directory: Path, boards: list[LiveBoard]) -> LiveBoard:
    board = LiveBoard(micropython_unix.binary, SCRIPT, cwd=directory,
                      path=(directory / "lib", FAKES, HERE, directory))
    boards.append(board)
    return board


def new_firmware(tmp_path: Path, name: str, app_prefix: str = "") -> Path:
    """A firmware directory to push: the shipped one, lib/app.py changed."""
    target = tmp_path / name
    shutil.copytree(FIRMWARE, target)
    app = target / "lib" / "app.py"
    app.write_text(app_prefix + app.read_text() + f"\nBUILD = {name!r}\n")
    return target


def push(p: Pipeline, version: str, firmware: Path, *targets: str) -> str:
    result = p.cli("firmware", "push", "--version", version, "--firmware-dir", str(firmware), *targets)
    assert result.returncode in (0, 1), result.stderr
    return result.stdout


def states(p: Pipeline) -> dict[str, dict]:
    return {s["device"]: s for s in p.command({"op": "firmware"})["devices"]}


def state_of(p: Pipeline, device: str) -> dict:
    return states(p).get(device, {})


def seen(p: Pipeline, device: str) -> bool:
    return bool(p.latest(device))


def test_good_update(server: Pipeline, micropython_unix, tmp_path: Path, boards) -> None:
    board_dir = flash(tmp_path / "board", server, "gh-1")
    board = power_on(micropython_unix, board_dir, boards)
    wait_for(lambda: seen(server, "gh-1"), message="the board's first reading")
    v2 = new_firmware(tmp_path, "v2")
    devicekeys.ensure_key(server.data, "ghost")
    board.proc.send_signal(signal.SIGSTOP)          # an update takes a second here: long enough to ask
    try:
        out = push(server, "2", v2, "--device", "gh-1", "--device", "ghost")
        shipped = len(updates.bundle_files(v2)) + 1            # and the version file
        assert f"gh-1: sending 2 ({shipped} files, " in out and "ghost: not sent: offline" in out, out
        # the server refuses a second push while this one is under way
        assert "gh-1: not sent: mid-update (sending 2)" in push(server, "2", v2, "--device", "gh-1")
        # an update's command ids are its own
        reply = server.command({"op": "send", "device": "gh-1", "id": "ota.1.gh-1.s",
                                                  "command": {"cmd": "ota_swap", "v": "2"}})
        assert not reply["ok"] and "sensorpipe firmware push" in reply["error"]
    finally:
        board.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: state_of(server, "gh-1").get("state") == "updated", timeout=60, message="updated")
    assert state_of(server, "gh-1")["version"] == "2"
    assert "boot 2 2" in board.output()                      # reset once, into version 2
    assert (board_dir / "lib" / "app.py").read_text() == (v2 / "lib" / "app.py").read_text()
    assert not (board_dir / "ota_old").exists() and not (board_dir / "ota_trial.json").exists()
    # it goes on measuring, and says which version answered
    count = server.count_rows("readings", "WHERE device = 'gh-1' AND field = 'temp'")
    wait_for(lambda: server.count_rows("readings", "WHERE device = 'gh-1' AND field = 'temp'") > count + 2,
             message="readings from version 2")
    acks = [json.loads(r[0]) for r in server.db().execute("SELECT body FROM events WHERE kind = 'cmd_ack'")]
    assert any(a.get("fw") == "2" for a in acks)
    status = server.cli("firmware", "status")
    assert "gh-1" in status.stdout and "updated" in status.stdout, status
    overall = server.cli("status")
    assert "firmware" in overall.stdout and "version 2" in overall.stdout, overall.stdout
    devices = server.cli("devices")
    assert "firmware" in devices.stdout and " 2 " in devices.stdout + " ", devices.stdout
    (board_dir / "POWER_OFF").touch()
    board.finish()


def test_corrupted_file_and_wrong_key_are_refused(server: Pipeline, micropython_unix, tmp_path: Path,
                                                  boards) -> None:
    board_dir = flash(tmp_path / "board", server, "gh-2")
    stranger_dir = flash(tmp_path / "stranger", server, "gh-3", key="ab" * 32)     # not the server's key
    board = power_on(micropython_unix, board_dir, boards)
    stranger = power_on(micropython_unix, stranger_dir, boards)
    wait_for(lambda: seen(server, "gh-2") and seen(server, "gh-3"), message="both boards")
    devicekeys.ensure_key(server.data, "gh-3")          # the server's key for it is another one
    v2 = new_firmware(tmp_path, "v2")
    push(server, "2", v2, "--device", "gh-3")
    # (two parsers may pass the acks on out of order: the manifest's reason is the one kept, when it comes)
    wait_for(lambda: state_of(server, "gh-3").get("error") == "bad signature: not from this board's server",
             timeout=30, message="gh-3 refused it")
    assert state_of(server, "gh-3")["state"] == "failed"

    # a file spoiled on its way: same size, one byte changed after the manifest was made
    bundle_file = server.data / "firmware" / "2" / "files" / "lib" / "packet.py"
    spoiled = bytearray(bundle_file.read_bytes())
    spoiled[100] ^= 0x20
    bundle_file.write_bytes(bytes(spoiled))
    push(server, "2", v2, "--device", "gh-2", "--force")
    wait_for(lambda: state_of(server, "gh-2").get("state") == "failed", timeout=60, message="gh-2 refused it")
    assert state_of(server, "gh-2")["error"] == "lib/packet.py: SHA-256 does not match the manifest"
    assert (board_dir / "version.txt").read_text() == "1"
    assert (board_dir / "lib" / "packet.py").read_text() == (FIRMWARE / "lib" / "packet.py").read_text()
    assert not (board_dir / "ota_swap.json").exists()
    assert not [line for line in board.output() if line.startswith("boot 2")]      # never reset
    for d in (board_dir, stranger_dir):
        (d / "POWER_OFF").touch()
    board.finish()
    stranger.finish()


def test_cut_connection_mid_download(server: Pipeline, micropython_unix, tmp_path: Path, boards) -> None:
    board_dir = flash(tmp_path / "board", server, "gh-4")
    board = power_on(micropython_unix, board_dir, boards)
    wait_for(lambda: seen(server, "gh-4"), message="the board's first reading")
    # A whole update takes about a second here: to cut it in the middle for sure, the board is frozen
    # while the server writes the update to its connection, and the connection is cut before it thaws.
    board.proc.send_signal(signal.SIGSTOP)
    try:
        push(server, "2", new_firmware(tmp_path, "v2"), "--device", "gh-4")
        wait_for(lambda: sum(c["status"] == "delivered" for c in commands(server, "gh-4")) > 100,
                 message="the update written to the board's connection")
        server.kill("edge:1")
    finally:
        board.proc.send_signal(signal.SIGCONT)
    st = state_of(server, "gh-4")
    assert st["state"] == "sending" and st["progress"].startswith("0/")
    server.start("edge")
    server.wait_ready()
    wait_for(lambda: state_of(server, "gh-4").get("state") == "updated", timeout=90, message="updated after all")
    assert (board_dir / "version.txt").read_text() == "2"
    # what the cut lost went again on the board's new connection
    assert max(c["attempts"] for c in commands(server, "gh-4")) >= 2
    (board_dir / "POWER_OFF").touch()
    board.finish()


def commands(p: Pipeline, device: str) -> list[dict]:
    return p.command({"op": "commands", "device": device, "limit": 1000})["commands"]


def test_version_that_crashes_on_boot_is_rolled_back(server: Pipeline, micropython_unix, tmp_path: Path,
                                                     boards) -> None:
    board_dir = flash(tmp_path / "board", server, "gh-5")
    board = power_on(micropython_unix, board_dir, boards)
    wait_for(lambda: seen(server, "gh-5"), message="the board's first reading")
    broken = new_firmware(tmp_path, "v3", app_prefix='raise RuntimeError("version 3 is broken")\n')
    push(server, "3", broken, "--device", "gh-5")
    wait_for(lambda: state_of(server, "gh-5").get("state") == "rolled_back", timeout=60, message="rolled back")
    st = state_of(server, "gh-5")
    assert st["error"] == "rolled back to 1: did not reach the server in 2 boots" and st["version"] is None
    versions = [line.split()[2] for line in board.output() if line.startswith("boot ")]
    assert versions[:4] == ["1", "3", "3", "1"], board.output()       # two boots of 3, then 1 again
    assert (board_dir / "lib" / "app.py").read_text() == (FIRMWARE / "lib" / "app.py").read_text()
    # a rollout of 3 stops there: pushing it further needs --force
    refused = server.cli("firmware", "push", "--version", "3", "--firmware-dir", str(broken), "--percent", "100")
    assert refused.returncode == 2 and "rolled back on gh-5" in refused.stderr
    (board_dir / "POWER_OFF").touch()
    board.finish()


def test_staged_rollout(server: Pipeline, micropython_unix, tmp_path: Path, boards) -> None:
    devices = ["roof-1", "roof-2", "roof-3"]
    dirs = {d: flash(tmp_path / d, server, d, MEASURE_S=0.5) for d in devices}
    for d in devices:
        power_on(micropython_unix, dirs[d], boards)
    wait_for(lambda: all(seen(server, d) for d in devices), message="three boards")
    v2 = new_firmware(tmp_path, "v2")
    out = push(server, "2", v2, "--percent", "30")                     # one board of three first
    first = [line.split(":")[0] for line in out.splitlines() if ": sending 2" in line]
    assert len(first) == 1, out
    wait_for(lambda: state_of(server, first[0]).get("state") == "updated", timeout=60, message="the first stage")
    assert {d: (dirs[d] / "version.txt").read_text() for d in devices} == \
        {d: "2" if d == first[0] else "1" for d in devices}
    out = push(server, "2", v2, "--percent", "100")                    # then the rest
    assert f"{first[0]}: not sent: already running 2" in out
    rest = [d for d in devices if d != first[0]]
    wait_for(lambda: all(state_of(server, d).get("state") == "updated" for d in rest), timeout=90,
             message="the rest")
    for d in devices:
        (dirs[d] / "POWER_OFF").touch()
    for board in boards:
        board.finish()


def test_battery_board_updates_at_a_wake_and_keeps_measuring(pipeline_factory, micropython_unix, tmp_path: Path,
                                                             boards) -> None:
    layout = (FIRMWARE / "server-config-example.toml").read_text() \
        .replace("[binary.devices.1]", "[binary.devices.7]").replace('"greenhouse-1"', '"bat-1"')
    server = pipeline_factory(extra_toml=layout)
    server.start_all(COMMAND_ROLES)
    # deep sleeps pass at once here: a wake every 1 s of the board's time, each one sending
    board_dir = flash(tmp_path / "board", server, "bat-1", TRANSPORT="binary", BATTERY=True, DEVICE_NUMBER=7,
                      MEASURE_S=1, WAKE_S=1, CMD_WAIT_MS=300, OTA_IDLE_MS=2000)
    (board_dir / "DHT_SEQUENCE").touch()
    board = power_on(micropython_unix, board_dir, boards)
    wait_for(lambda: server.latest("bat-1").get("dropped") == 0, message="the first packet and status line")
    push(server, "2", new_firmware(tmp_path, "v2"), "--device", "bat-1")
    wait_for(lambda: state_of(server, "bat-1").get("state") == "updated", timeout=60, message="updated")
    output = board.output()
    swapped = output.index("ota: swapping in 2")
    assert output[swapped + 1].startswith("slept "), output[swapped - 2:swapped + 3]   # no reset: a wake, on time
    assert any(line.startswith("boot ") and line.endswith(" 2") for line in output[swapped:])
    (board_dir / "POWER_OFF").touch()
    board.finish()
    # every reading taken before and after the update (and during it, when the download keeps the board
    # awake past MEASURE_S) reached the server: the fake sensor counts up by 0.1 per reading
    taken = [float(line.split()[1]) for line in board.output() if line.startswith("dht ")]

    def stored() -> list[float]:
        return sorted(round(v, 1) for (v,) in server.db().execute(
            "SELECT value FROM readings WHERE device = 'bat-1' AND field = 'temp'"))

    wait_for(lambda: len(stored()) >= len(taken), message="every reading stored")
    assert stored() == taken == [round(i / 10, 1) for i in range(len(taken))]
