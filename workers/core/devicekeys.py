"""Per-device secrets: ``<data>/device-keys.json``, ``{"device id": "64 hex digits"}``, readable by the
server's user only. ``sensorpipe firmware deploy`` writes a board's key into its config.py
(``DEVICE_KEY``); the server signs update manifests with it (HMAC-SHA256, docs/firmware.md).

Kept in this one small module so that general device credentials can replace it later.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

KEYS_FILE = "device-keys.json"
KEY_BYTES = 32


class DeviceKeyError(Exception):
    """The keys file cannot be read or written."""


def _path(data_dir: Path | str) -> Path:
    return Path(data_dir) / KEYS_FILE


def _read(path: Path) -> dict[str, str]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DeviceKeyError(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise DeviceKeyError(f"{path}: not a JSON object")
    return doc


def key_for(data_dir: Path | str, device: str) -> str | None:
    """The device's key (hex), or None if it has none."""
    return _read(_path(data_dir)).get(device)


def devices_with_keys(data_dir: Path | str) -> set[str]:
    return set(_read(_path(data_dir)))


def ensure_key(data_dir: Path | str, device: str) -> str:
    """The device's key, made (and kept) on first use."""
    path = _path(data_dir)
    keys = _read(path)
    if device in keys:
        return keys[device]
    keys[device] = secrets.token_hex(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f, indent=1, sort_keys=True)
    os.replace(tmp, path)              # whole or not at all: a key a board holds is never lost
    return keys[device]


def sign(key_hex: str, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` with the device's key, hex (what firmware/lib/ota.py checks)."""
    return hmac.new(bytes.fromhex(key_hex), message, hashlib.sha256).hexdigest()
