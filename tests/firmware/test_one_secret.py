"""One secret per device (issue 15): a board deployed with its credential's token checks update
manifests with a key derived from it, and the server derives the same key from what its credential
store keeps, so no separate DEVICE_KEY is made; a DEVICE_KEY deployed before tokens still wins while
both sides hold it."""
from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

from tests.firmware.test_cli import deploy_args, load_config
from tests.firmware.test_ota import boards  # noqa: F401 (a fixture)
from workers.core import devicekeys, updates
from workers.core.credentials import CredentialStore, mac_key_for
from workers.tools import firmware as firmware_cli

FILES = [["lib/app.py", 12034, "9f" * 32], ["version.txt", 3, "ab" * 32]]


def board_conf(**values) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{"DEVICE_ID": "gh-1", "DEVICE_TOKEN": None, "DEVICE_KEY": None, **values})


def test_the_update_key_comes_from_the_token_on_both_sides(firmware_path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    devauth = importlib.import_module("devauth")
    ota = importlib.import_module("ota")
    data = tmp_path / "data"
    store = CredentialStore(data)
    try:
        token = store.add("gh-1")
    finally:
        store.close()
    key = devicekeys.key_for(data, "gh-1")
    assert key == devauth.ota_key(board_conf(DEVICE_TOKEN=token))
    assert "gh-1" in devicekeys.devices_with_keys(data)
    assert not (data / devicekeys.KEYS_FILE).exists()                 # no second secret was made
    # a manifest the server signs is one the board accepts
    monkeypatch.chdir(tmp_path)
    sig = devicekeys.sign(key, updates.manifest_message("gh-1", "2", FILES))
    board = ota.Updater("gh-1", devauth.ota_key(board_conf(DEVICE_TOKEN=token)), lambda *_: None)
    board.manifest({"v": "2", "files": FILES, "sig": sig})
    with pytest.raises(ota.OtaError, match="bad signature"):
        ota.Updater("gh-1", devauth.ota_key(board_conf(DEVICE_TOKEN=token + "x")), lambda *_: None) \
            .manifest({"v": "3", "files": FILES, "sig": sig})

    # the old form: a board deployed with a DEVICE_KEY keeps it, and the server signs with it
    old = devicekeys.ensure_key(data, "gh-1")
    assert devicekeys.key_for(data, "gh-1") == old == devauth.ota_key(board_conf(DEVICE_TOKEN=token, DEVICE_KEY=old))
    assert devicekeys.forget(data, "gh-1") and not devicekeys.forget(data, "gh-1")
    assert devicekeys.key_for(data, "gh-1") == key
    store = CredentialStore(data)
    try:
        store.revoke("gh-1")
    finally:
        store.close()
    assert devicekeys.key_for(data, "gh-1") is None                   # revoked: no updates either
    assert devauth.ota_key(board_conf()) is None


def test_deploy_with_a_token_writes_no_device_key(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    assert firmware_cli.main(deploy_args(stage, "--token", "Zp8-example-token_0123456789abcdef", "--dry-run")) == 0
    cfg = load_config(stage / "config.py")
    assert cfg.DEVICE_TOKEN == "Zp8-example-token_0123456789abcdef" and cfg.DEVICE_KEY is None


def test_an_update_over_the_air_with_the_token_alone(pipeline_factory, micropython_unix, tmp_path: Path,
                                                     boards) -> None:
    from tests.firmware.test_ota import flash, new_firmware, power_on, push, state_of
    from tests.pipeline import COMMAND_ROLES, wait_for

    server = pipeline_factory(auth="required")
    server.start_all(COMMAND_ROLES)
    made = server.cli("devices", "add", "gh-7")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    board_dir = flash(tmp_path / "board", server, "gh-7", DEVICE_TOKEN=token, DEVICE_KEY=None)
    devicekeys.forget(server.data, "gh-7")       # flash() made an old key; deploy --token drops it so
    power_on(micropython_unix, board_dir, boards)
    wait_for(lambda: server.latest("gh-7"), message="the board's first reading, after its hello")
    out = push(server, "2", new_firmware(tmp_path, "v2"), "--device", "gh-7")
    assert "gh-7: sending 2" in out, out
    wait_for(lambda: state_of(server, "gh-7").get("state") == "updated", timeout=60, message="updated")
    assert devicekeys.key_for(server.data, "gh-7") == devicekeys.ota_key_from_mac_key(mac_key_for(token))
