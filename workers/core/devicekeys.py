"""The key that signs a board's update manifests (HMAC-SHA256, docs/firmware.md).

One secret per device: a board deployed with its credential's token (``sensorpipe devices add``)
derives the key from it, ``HMAC-SHA256(mac_key, "sensorpipe-ota-key")`` where ``mac_key`` is the
binary port's key (``SHA-256("sensorpipe-mac-key:" + token)``, which the credential store keeps, so
the server can derive the same key without the token). The old form is still read and wins while it
is there: ``<data>/device-keys.json``, ``{"device id": "64 hex digits"}`` (0600), a separate key that
``sensorpipe firmware deploy`` made for a board without a token and wrote into its config.py
(``DEVICE_KEY``). Deploying a board with its token drops its old key (``forget``).
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
OTA_KEY_LABEL = b"sensorpipe-ota-key"          # firmware/lib/devauth.py derives the same


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


def ota_key_from_mac_key(mac_key: bytes) -> str:
    """The update key a board derives from its token, from the credential's MAC key (hex)."""
    return hmac.new(mac_key, OTA_KEY_LABEL, hashlib.sha256).hexdigest()


def _credential_keys(data_dir: Path | str) -> dict[str, str]:
    from workers.core.credentials import STORE_NAME, CredentialStore

    if not (Path(data_dir) / STORE_NAME).exists():
        return {}
    store = CredentialStore(data_dir)
    try:
        return {c.device: ota_key_from_mac_key(c.mac_key) for c in store.all()}
    finally:
        store.close()


def key_for(data_dir: Path | str, device: str) -> str | None:
    """The device's key (hex): its old DEVICE_KEY if it has one, else the one derived from its
    credential; None if it has neither."""
    old = _read(_path(data_dir)).get(device)
    return old if old is not None else _credential_keys(data_dir).get(device)


def devices_with_keys(data_dir: Path | str) -> set[str]:
    return set(_read(_path(data_dir))) | set(_credential_keys(data_dir))


def forget(data_dir: Path | str, device: str) -> bool:
    """Drop ``device``'s old key (it was deployed with its token and derives its key); False if none."""
    path = _path(data_dir)
    keys = _read(path)
    if keys.pop(device, None) is None:
        return False
    _write(path, keys)
    return True


def ensure_key(data_dir: Path | str, device: str) -> str:
    """The device's key, made (and kept) on first use."""
    path = _path(data_dir)
    keys = _read(path)
    if device in keys:
        return keys[device]
    keys[device] = secrets.token_hex(KEY_BYTES)
    _write(path, keys)
    return keys[device]


def _write(path: Path, keys: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f, indent=1, sort_keys=True)
    os.replace(tmp, path)              # whole or not at all: a key a board holds is never lost


def sign(key_hex: str, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` with the device's key, hex (what firmware/lib/ota.py checks)."""
    return hmac.new(bytes.fromhex(key_hex), message, hashlib.sha256).hexdigest()
