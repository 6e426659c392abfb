"""The firmware's pure logic (packets, lines, the buffer, commands, config, Wi-Fi order) under CPython,
under real MicroPython 1.27 (WebAssembly, in node) and under MicroPython's unix port, with the same
checks (tests/firmware/pure_checks.py); the bytes each one builds must be identical."""
from __future__ import annotations

import importlib

import pytest

from tests.firmware.harness import HERE

RUN_ALL = "import pure_checks\npure_checks.run_all()\n"
CHECK_NAMES = [line.split("def ", 1)[1].split("(")[0] for line in (HERE / "pure_checks.py").read_text().splitlines()
               if line.startswith("def check_")]


def cpython_outputs() -> list[str]:
    checks = importlib.import_module("pure_checks")
    checks.OUT.clear()
    for check in checks.CHECKS:
        check()
    return [f"out {name} {data.hex()}" for name, data in checks.OUT]


def assert_all_passed(stdout: str, expected_out: list[str]) -> None:
    lines = stdout.splitlines()
    assert [line for line in lines if line.startswith("ok ")] == [f"ok {name}" for name in CHECK_NAMES], stdout
    assert [line for line in lines if line.startswith("out ")] == expected_out


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_cpython(firmware_path: None, name: str) -> None:
    getattr(importlib.import_module("pure_checks"), name)()


def test_every_check_is_listed(firmware_path: None) -> None:
    assert [check.__name__ for check in importlib.import_module("pure_checks").CHECKS] == CHECK_NAMES


def test_micropython_webassembly(micropython, firmware_modules: dict[str, str], firmware_path: None) -> None:
    stdout = micropython(RUN_ALL, modules=firmware_modules)
    assert_all_passed(stdout, cpython_outputs())


def test_micropython_unix_port(micropython_unix, firmware_path: None, tmp_path) -> None:
    script = tmp_path / "run_checks.py"
    script.write_text(RUN_ALL)
    stdout = micropython_unix.run(script)
    assert_all_passed(stdout, cpython_outputs())
