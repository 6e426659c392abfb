"""The house's layering (pyproject.toml, [tool.importlinter]): tools above processes above the
configuration above the plugins, and the shared library never reaching up. import-linter reads the
imports without running them, so a late import inside a function counts as much as one at the top."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), "import-linter is in the test extra: pip install -e '.[test]'"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_configuration_imports_without_the_sinks_servers_clients() -> None:
    # Every worker reads the configuration; only a sink's own worker needs its server's client.
    code = ("import sys, workers.core.config; "
            "print(sorted(m for m in ('influxdb_client', 'pymongo', 'httpx', 'zmq') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
