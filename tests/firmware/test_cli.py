"""``sensorpipe firmware deploy|console``: the exact mpremote commands, the board's config.py, and one
clear line (exit status 2) for every failure. A stand-in mpremote (tests/firmware/fake_mpremote, first on
PYTHONPATH) records what it was asked and fails on request."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.firmware.harness import FIRMWARE, HERE, REPO
from workers.tools import firmware as firmware_cli

FAKE_MPREMOTE = HERE / "fake_mpremote"


def deploy_args(stage: Path, *extra: str) -> list[str]:
    return ["firmware", "deploy", "--port", "/dev/ttyUSB0", "--device-id", "greenhouse-1",
            "--server", "192.168.1.10:7000", "--wifi", "home:secret", "--wifi", "office:pa:ss",
            "--stage", str(stage), *extra]


def sensorpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def load_config(path: Path) -> types.SimpleNamespace:
    namespace: dict = {}
    exec(path.read_text(), namespace)
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if k.isupper()})


def test_dry_run_prints_the_exact_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage = tmp_path / "stage"
    assert firmware_cli.main(deploy_args(stage, "--dry-run")) == 0
    py = sys.executable
    assert capsys.readouterr().out == (
        f"{py} -m mpremote connect /dev/ttyUSB0 fs cp -r {stage}/lib : + fs cp {stage}/boot.py :boot.py"
        f" + fs cp {stage}/main.py :main.py + fs cp {stage}/config.py :config.py + reset\n")
    # the staged files are exactly what goes on the board
    assert sorted(p.name for p in (stage / "lib").iterdir()) == sorted(p.name for p in (FIRMWARE / "lib").glob("*.py"))
    assert (stage / "main.py").read_bytes() == (FIRMWARE / "main.py").read_bytes()
    cfg = load_config(stage / "config.py")
    assert (cfg.DEVICE_ID, cfg.SERVER_HOST, cfg.TEXT_PORT) == ("greenhouse-1", "192.168.1.10", 7000)
    assert cfg.WIFI == [("home", "secret"), ("office", "pa:ss")]
    assert cfg.TRANSPORT == "json" and cfg.BATTERY is False and cfg.MEASURE_S == 60   # the example's defaults


def test_battery_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage = tmp_path / "stage"
    args = deploy_args(stage, "--battery", "--device-number", "7", "--measure-interval", "300",
                       "--wake-interval", "3600", "--binary-port", "7102", "--set", "DHT_TYPE=11",
                       "--set", "OUTPUT_PINS=(5, 12)", "--set", "NTP_HOST=pool.ntp.org", "--dry-run")
    assert firmware_cli.main(args) == 0
    cfg = load_config(stage / "config.py")
    assert (cfg.BATTERY, cfg.TRANSPORT, cfg.DEVICE_NUMBER, cfg.MEASURE_S, cfg.WAKE_S, cfg.BINARY_PORT) == \
        (True, "binary", 7, 300, 3600, 7102)
    assert (cfg.DHT_TYPE, cfg.OUTPUT_PINS, cfg.NTP_HOST) == (11, (5, 12), "pool.ntp.org")
    assert "WAKE_S = 3600  # battery: send the buffered readings this often" in (stage / "config.py").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--server", "no-port"], "sensorpipe: --server: expected HOST:PORT (the text port, 7000 by default), got 'no-port'"),
    (["--device-id", "green house"], "sensorpipe: config.DEVICE_ID: may hold only letters, digits and . _ : -"),
    (["--battery", "--transport", "kv"],
     "sensorpipe: --battery sends binary packets: leave out --transport or give --transport binary"),
    (["--battery", "--measure-interval", "600", "--wake-interval", "60"],
     "sensorpipe: config.WAKE_S: must be at least MEASURE_S"),
    (["--set", "COLOUR=1"], "sensorpipe: unknown setting COLOUR (the settings are listed in firmware/config_example.py)"),
    (["--set", "TEXT_PORT=99999"], "sensorpipe: config.TEXT_PORT: must be a whole number 1..65535"),
    (["--wifi", ":nossid"], "sensorpipe: --wifi: expected SSID:PASSWORD, got ':nossid'"),
])
def test_bad_settings_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    result = sensorpipe(*deploy_args(tmp_path / "stage", "--dry-run"), *extra)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")


def test_missing_board_is_one_line(tmp_path: Path) -> None:
    args = deploy_args(tmp_path / "stage")
    args[args.index("/dev/ttyUSB0")] = "/dev/ttyNOSUCHBOARD"
    result = sensorpipe(*args)
    assert result.returncode == 2
    assert result.stderr == ("sensorpipe: no board at /dev/ttyNOSUCHBOARD: is it plugged in? "
                             "(`mpremote devs` lists the serial ports)\n")
    result = sensorpipe("firmware", "console", "--port", "/dev/ttyNOSUCHBOARD")
    assert result.returncode == 2 and result.stderr.startswith("sensorpipe: no board at /dev/ttyNOSUCHBOARD")


@pytest.fixture
def fake_mpremote(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    log = tmp_path / "mpremote.log"
    port = tmp_path / "ttyUSB0"            # a "serial port" that exists
    port.touch()
    env = {"PYTHONPATH": f"{FAKE_MPREMOTE}{os.pathsep}{REPO}", "FAKE_MPREMOTE_LOG": str(log),
           "SENSORPIPE_DATA": str(tmp_path / "data")}     # where deploy keeps the device key
    return env, log, port


def test_deploy_runs_mpremote(tmp_path: Path, fake_mpremote) -> None:
    env, log, port = fake_mpremote
    stage = tmp_path / "stage"
    args = deploy_args(stage)
    args[args.index("/dev/ttyUSB0")] = str(port)
    result = sensorpipe(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "cp /stage/lib/app.py" in result.stdout          # mpremote's own progress is shown
    [argv] = [json.loads(line) for line in log.read_text().splitlines()]
    assert argv == ["connect", str(port), "fs", "cp", "-r", f"{stage}/lib", ":",
                    "+", "fs", "cp", f"{stage}/boot.py", ":boot.py", "+", "fs", "cp", f"{stage}/main.py", ":main.py",
                    "+", "fs", "cp", f"{stage}/config.py", ":config.py", "+", "reset"]

    result = sensorpipe("firmware", "console", "--port", str(port), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(log.read_text().splitlines()[-1]) == ["connect", str(port), "repl"]


@pytest.mark.parametrize("stderr, message", [
    ("mpremote: failed to access {port} (it may be in use by another program)\n",
     "failed to access {port} (it may be in use by another program)"),
    ("Traceback (most recent call last):\n  File \"x\", line 1\n"
     "mpremote.transport.TransportError: could not enter raw repl\n",
     "mpremote.transport.TransportError: could not enter raw repl; " + firmware_cli.DEEP_SLEEP_HINT),
    ("", "exit status 1"),
])
def test_mpremote_failure_is_one_line(tmp_path: Path, fake_mpremote, stderr: str, message: str) -> None:
    env, log, port = fake_mpremote
    args = deploy_args(tmp_path / "stage")
    args[args.index("/dev/ttyUSB0")] = str(port)
    result = sensorpipe(*args, env={**env, "FAKE_MPREMOTE_FAIL": stderr.format(port=port)})
    assert result.returncode == 2
    assert result.stderr == f"sensorpipe: mpremote failed on {port}: {message.format(port=port)}\n"
    assert "Traceback" not in result.stderr
