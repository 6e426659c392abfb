"""The wheel as a user installs it: built from this checkout, installed (not editable) into a new venv
outside it, then run from another directory with nothing but the installed ``sensorpipe`` command.

It proves that the default configuration, the supervisord template and the firmware ship as package data
and that no command looks for the checkout. pip's own cache is reused, so this takes seconds, not a
download.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.pipeline import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.servers      # pip and a whole pipeline under supervisord


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv outside the checkout with the wheel installed; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "data", "build", "*.egg-info", "__pycache__", "node_modules", "results"))
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)],
                   check=True, capture_output=True, timeout=180)
    wheel = next(dist.glob("sensorpipe-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True, symlinks=True)
    bin_dir = env_dir / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return bin_dir


def _on_free_ports(config: Path) -> dict[str, int]:
    """Every port of the written configuration moved to a free one (a test never takes a fixed port)."""
    text = config.read_text()
    taken: dict[str, int] = {}

    def move(match: re.Match[str]) -> str:
        taken[match.group(0)] = port = free_port()
        return f"127.0.0.1:{port}"

    config.write_text(re.sub(r"(?:0\.0\.0\.0|127\.0\.0\.1):\d+", move, text))
    return taken


def _logs(home: Path, tmp_path: Path) -> str:
    """The end of `sensorpipe run`'s output and of every worker's log, for a failure's message."""
    logs = [tmp_path / "run.log", *sorted((home / "data").rglob("*.log"))]
    return "\n".join(f"==== {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.is_file())


def test_installed_wheel_runs_the_pipeline_from_anywhere(installed: Path, tmp_path: Path) -> None:
    home = tmp_path / "greenhouse"
    home.mkdir()
    # Nothing from the checkout: no PYTHONPATH, no SENSORPIPE_* the test run might carry.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENSORPIPE_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{installed}{os.pathsep}{env.get('PATH', '')}"

    def sensorpipe(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(installed / "sensorpipe"), *args], cwd=home, env=env,
                              capture_output=True, text=True, timeout=timeout)

    init = sensorpipe("init")
    assert init.returncode == 0, init.stderr
    config = home / "sensorpipe.toml"
    assert config.is_file() and (home / "data").is_dir()
    ports = _on_free_ports(config)
    assert "0.0.0.0:7000" in ports, "the text listener of the written configuration"

    check = sensorpipe("check-config")
    assert check.returncode == 0, check.stderr
    assert "sensorpipe.toml: ok" in check.stdout and "sinks: sqlite" in check.stdout

    add = sensorpipe("devices", "add", "greenhouse-1")     # the shipped listeners require a credential
    assert add.returncode == 0, add.stderr
    token = add.stdout.strip().splitlines()[-1]

    log = open(tmp_path / "run.log", "wb")
    run = subprocess.Popen([str(installed / "sensorpipe"), "run"], cwd=home, env=env,
                           stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        last: list[str] = []

        def fed() -> bool:
            feed = sensorpipe("feed", "--device", "greenhouse-1", "--token", token, '{"temp":22.6,"humi":52}',
                              timeout=10)
            last[:] = [feed.stderr]
            return feed.returncode == 0

        # The first feed may come before the edge listens: retried until the deadline.
        try:
            wait_for(fed, timeout=60, interval=0.5, message="sensorpipe feed to reach the edge")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast feed: {last}\n{_logs(home, tmp_path)}") from None

        def latest() -> dict | None:
            reply = sensorpipe("latest", "greenhouse-1", "--json", timeout=10)
            if reply.returncode != 0:
                return None
            fields = json.loads(reply.stdout).get("fields", {})
            return fields if "temp" in fields else None

        try:
            fields = wait_for(latest, timeout=60, interval=0.5, message="the reading from sensorpipe latest")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_logs(home, tmp_path)}") from None
        ctl = sensorpipe("ctl", "status")                     # supervisorctl from the installed package
        assert "edge" in ctl.stdout and "RUNNING" in ctl.stdout, ctl.stdout + ctl.stderr
        assert fields["temp"]["value"] == 22.6 and fields["humi"]["value"] == 52
        assert (home / "data" / "sensorpipe.db").is_file(), "the SQLite store in the data dir init wrote"
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait(10)
    assert run.returncode == 0, (tmp_path / "run.log").read_text(errors="replace")[-4000:]

    # The firmware ships too: staged for a board from the installed package, without a board.
    stage = tmp_path / "stage"
    deploy = sensorpipe("firmware", "deploy", "--device-id", "greenhouse-1", "--server", "127.0.0.1:7000",
                        "--stage", str(stage), "--dry-run")
    assert deploy.returncode == 0, deploy.stderr
    assert {"boot.py", "main.py", "config.py"} <= {p.name for p in stage.iterdir()}
    assert (stage / "lib" / "packet.py").is_file()

    # And the systemd unit docs/operations.md tells the user to copy.
    unit = subprocess.run([str(installed / "python"), "-c",
                           "from workers.core import paths; print(paths.shipped('deploy', 'sensorpipe.service'))"],
                          cwd=home, env=env, capture_output=True, text=True, timeout=30)
    assert "ExecStart=" in Path(unit.stdout.strip()).read_text()
