"""The pieces of an update both sides must agree on, byte for byte: the signed manifest text and its
HMAC (firmware/lib/ota.py under CPython, the server's workers/core/updates.py and devicekeys.py), the
update's command ids, the stable order of a staged rollout, and the bundle's checks."""
from __future__ import annotations

import hashlib
import hmac
import importlib
from pathlib import Path

import pytest

from workers.core import devicekeys, updates

FILES = [["lib/app.py", 12034, "9f" * 32], ["version.txt", 3, "ab" * 32]]


def test_manifest_and_hmac_agree(firmware_path) -> None:
    ota = importlib.import_module("ota")
    message = updates.manifest_message("greenhouse-1", "1.4", FILES)
    assert ota.manifest_message("greenhouse-1", "1.4", FILES) == message
    assert message == (b"sensorpipe-ota-1\ngreenhouse-1\n1.4\nlib/app.py 12034 " + b"9f" * 32
                       + b"\nversion.txt 3 " + b"ab" * 32 + b"\n")
    for key in (b"k" * 32, b"k" * 64, b"k" * 100):            # shorter than, as long as, longer than a block
        assert ota.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()
    key = "0f" * 32
    assert ota.hexdigest(ota.hmac_sha256(bytes.fromhex(key), message)) == devicekeys.sign(key, message)


def test_command_ids_round_trip() -> None:
    assert updates.parse_command_id(updates.command_id("8e1100d", "gh.1:a-b", "163")) == ("8e1100d", "gh.1:a-b", "163")
    assert updates.parse_command_id("c42") is None
    assert updates.parse_command_id("ota.x") is None


def test_staged_rollout_order_is_stable() -> None:
    fleet = [f"roof-{i}" for i in range(20)]
    first = sorted(fleet, key=updates.stage_order)[:2]
    assert sorted(reversed(fleet), key=updates.stage_order)[:5][:2] == first


def test_bundle_checks(tmp_path: Path) -> None:
    with pytest.raises(updates.UpdateError, match="boot.py is not updated over the air"):
        updates.write_bundle(tmp_path, "2", {"boot.py": b"x = 1\n"})
    with pytest.raises(updates.UpdateError, match="lib/app.py does not compile"):
        updates.write_bundle(tmp_path, "2", {"lib/app.py": b"def broken(:\n"})
    with pytest.raises(updates.UpdateError, match="version"):
        updates.write_bundle(tmp_path, "1 4", {"lib/app.py": b"x = 1\n"})
    manifest = updates.write_bundle(tmp_path, "2", {"lib/app.py": b"x = 1\n"})
    assert [f[0] for f in manifest["files"]] == ["lib/app.py", "version.txt"]
    assert updates.write_bundle(tmp_path, "2", {"lib/app.py": b"x = 1\n"}) == manifest      # the same again
    with pytest.raises(updates.UpdateError, match="pushed before with other files"):
        updates.write_bundle(tmp_path, "2", {"lib/app.py": b"x = 2\n"})
    assert updates.read_bundle(tmp_path, "2")[1] == {"lib/app.py": b"x = 1\n", "version.txt": b"2"}


def test_device_keys_are_kept_private(tmp_path: Path) -> None:
    key = devicekeys.ensure_key(tmp_path, "greenhouse-1")
    assert len(key) == 64 and devicekeys.ensure_key(tmp_path, "greenhouse-1") == key
    assert devicekeys.key_for(tmp_path, "greenhouse-2") is None
    assert (tmp_path / devicekeys.KEYS_FILE).stat().st_mode & 0o077 == 0
