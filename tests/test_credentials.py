"""The credential store and its checks, alone (no workers): workers/core/credentials.py."""
from __future__ import annotations

import base64
import stat
import struct

import pytest

from workers.core import credentials
from workers.core.credentials import CredentialError, CredentialStore


@pytest.fixture
def store(tmp_path):
    s = CredentialStore(tmp_path)
    yield s
    s.close()


def test_a_token_is_checked_by_its_hash_and_never_kept(store: CredentialStore, tmp_path) -> None:
    token = store.add("greenhouse-1")
    assert len(token) >= 32
    credential = store.get("greenhouse-1")
    assert credential is not None and credential.verify(token)
    assert not credential.verify(token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not credential.verify("")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("credentials.db"))
    assert token.encode() not in raw
    assert stat.S_IMODE((tmp_path / "credentials.db").stat().st_mode) == 0o600


def test_add_twice_revoke_replace(store: CredentialStore) -> None:
    first = store.add("d1")
    with pytest.raises(CredentialError, match="has a credential already"):
        store.add("d1")
    second = store.add("d1", replace=True)
    credential = store.get("d1")
    assert credential is not None and credential.verify(second) and not credential.verify(first)
    assert store.revoke("d1") and store.get("d1") is None
    assert not store.revoke("d1")


@pytest.mark.parametrize("device", ["", "has space", "a/b", "x" * 200, "ümlaut", "-leading"])
def test_bad_device_ids_are_refused(store: CredentialStore, device: str) -> None:
    with pytest.raises(CredentialError, match="device id"):
        store.add(device)


def test_gateway_patterns(store: CredentialStore) -> None:
    store.add("gw-1", may_report=["greenhouse-*", "5c:cf:7f:*"])
    gateway = store.get("gw-1")
    assert gateway is not None and gateway.may_report == ("greenhouse-*", "5c:cf:7f:*")
    assert gateway.may_write_as("gw-1") and gateway.may_write_as("greenhouse-12")
    assert gateway.may_write_as("5c:cf:7f:a1:b2:c3")
    assert not gateway.may_write_as("barn-1") and not gateway.may_write_as("GREENHOUSE-1")
    store.add("plain")
    plain = store.get("plain")
    assert plain is not None and plain.may_write_as("plain") and not plain.may_write_as("greenhouse-1")
    assert [c.device for c in store.all()] == ["gw-1", "plain"]


def test_packet_mac_and_counter() -> None:
    key = credentials.mac_key_for("secret-token")
    packet = struct.pack("<HHHBBB", 6, 600, 60, 6, 1, 1) + struct.pack("<HHH", 300, 30200, 25826)
    signed = credentials.sign_packet(key, packet, 41)
    assert len(signed) == len(packet) + credentials.PACKET_TRAILER
    assert credentials.open_packet(key, signed) == (packet, 41)
    assert credentials.open_packet(credentials.mac_key_for("other"), signed) is None
    forged = bytearray(signed)
    forged[10] ^= 1                                      # a record byte changed in flight
    assert credentials.open_packet(key, bytes(forged)) is None
    recount = packet + struct.pack("<I", 42) + signed[-credentials.MAC_BYTES:]   # counter bumped, old MAC
    assert credentials.open_packet(key, recount) is None
    assert credentials.open_packet(key, b"short") is None


def test_counters_survive_a_reopen(tmp_path) -> None:
    store = CredentialStore(tmp_path)
    store.add("balcony")
    store.save_counters({"balcony": 17})
    store.close()
    store = CredentialStore(tmp_path)
    assert store.counters() == {"balcony": 17}
    store.add("balcony", replace=True)                   # a new key counts anew
    assert store.counters() == {}
    store.close()


@pytest.mark.parametrize("frame, expected", [
    (b'{"auth":{"device":"d1","token":"t"}}', ("d1", "t")),
    (b'{"auth":{"device":"d1"}}', None),
    (b'{"auth":"d1"}', None),
    (b'{"auth":{"device":1,"token":"t"}}', None),
    (b'{"auth":{"device":"","token":"t"}}', None),
    (b'{"device":"d1","temp":1}', None),
    (b"Soil: 512", None),
    (b"[1,2]", None),
])
def test_parse_hello(frame: bytes, expected) -> None:
    assert credentials.parse_hello(frame) == expected


def test_mosquitto_hash_is_what_mosquitto_passwd_writes() -> None:
    # mosquitto_passwd -b FILE dev1 secret wrote this line (Mosquitto 2.0.11)
    line = "$7$101$AEGKoHzziTfjUjuU$xwk9GKLipfn3dlgWNmPV7tsYmLk/MBWeBXJX71mFeNz2Qhuw2SaqDhVNumhuxYk7jG5rUAcHLsYDUKNubpFApw=="
    salt = base64.b64decode(line.split("$")[3])
    assert credentials.mosquitto_hash("secret", salt) == line


@pytest.mark.parametrize("listener, message", [
    ({"auth": "maybe"}, "auth: expected required|off"),
    ({"tls_cert": "/nonexistent/cert.pem"}, "set both"),
    ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}, "no such file"),
    ({"tls_client_ca": "/nonexistent/ca.pem"}, "needs tls_cert"),
])
def test_listener_security_settings_are_checked(listener: dict, message: str) -> None:
    from workers.core import config

    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({"listeners": [{"name": "text", "bind": "127.0.0.1:7000", **listener}]})
    default = config.from_dict({"listeners": [{"name": "text", "bind": "127.0.0.1:7000"}]})
    assert default.listeners[0].auth == "required"          # secure unless a file says otherwise


def test_a_token_never_starts_with_a_dash(store: CredentialStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # `sensorpipe feed --token -x…` would take it for an option: such a draw is made again
    draws = iter(["-starts-like-an-option-000000000", "Zp8-fine-token_0123456789abcdefg"])
    monkeypatch.setattr(credentials.secrets, "token_urlsafe", lambda n: next(draws))
    assert store.add("dash-1") == "Zp8-fine-token_0123456789abcdefg"
