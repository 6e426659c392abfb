"""Device credentials: who may write as which device. The store and every check on it.

A credential belongs to one device id. It is a random token, shown once when it is made
(``sensorpipe devices add ID``); the store keeps only what checks it:

- ``token_hash``: scrypt of the token with a per-credential salt (what the text port's hello checks);
- ``mosquitto_hash``: the token as Mosquitto's password file keeps it (PBKDF2-SHA512, salted), so
  ``sensorpipe devices mosquitto`` can write the broker's password file without the token;
- ``mac_key``: SHA-256 of ``MAC_KEY_LABEL + token``, the key of the binary port's packet MAC. A MAC is
  checked with the key itself, so this one is kept as it is: whoever reads the store can forge binary
  packets (not text hellos). The file is 0600 in the data dir; docs/security.md says so.

A gateway credential (``may_report``: shell patterns such as ``greenhouse-*``) may also report
readings for the devices those patterns match: boards that relay others (``from <MAC>`` lines, LoRa).

The store is one SQLite file, ``<data>/credentials.db``, written by the ``sensorpipe devices``
command and read by the edge, which notices changes (a revocation) by SQLite's ``data_version``.
The binary port's replay counters live in the same file (table ``mac_counters``), written by the edge.

Names: this is the general credential store. Keys made for other purposes (signing firmware
manifests) belong here too, as other columns of ``credentials`` or rows of a table of their own.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

STORE_NAME = "credentials.db"
TOKEN_BYTES = 24                    # 192 bits of randomness, 32 URL-safe characters
SCRYPT_N = 2 ** 12                  # ~15 ms per check on this machine's cores; the edge caches a success
SCRYPT_R = 8
SCRYPT_P = 1
MAC_KEY_LABEL = b"sensorpipe-mac-key:"
MAC_BYTES = 16                      # HMAC-SHA256 truncated to 128 bits
COUNTER = struct.Struct("<I")
PACKET_TRAILER = COUNTER.size + MAC_BYTES     # what an authenticated binary packet adds after its records
MOSQUITTO_ITERATIONS = 101          # mosquitto_passwd's default; the token is random, so a slow hash adds nothing
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    device      TEXT PRIMARY KEY,
    salt        BLOB NOT NULL,
    token_hash  BLOB NOT NULL,
    scrypt_n    INTEGER NOT NULL,
    mac_key     BLOB NOT NULL,
    may_report  TEXT NOT NULL DEFAULT '',     -- patterns, one per line
    created     REAL NOT NULL,
    mosquitto_hash TEXT NOT NULL DEFAULT ''   -- the token as Mosquitto's password file holds it
);
CREATE TABLE IF NOT EXISTS mac_counters (
    device      TEXT PRIMARY KEY,
    counter     INTEGER NOT NULL
);
"""


class CredentialError(ValueError):
    """A credential that cannot be made or changed (a bad device id, one that exists already...)."""


@dataclass(frozen=True)
class Credential:
    device: str
    salt: bytes
    token_hash: bytes
    scrypt_n: int
    mac_key: bytes
    may_report: tuple[str, ...]
    created: float
    mosquitto_hash: str = ""

    def verify(self, token: str) -> bool:
        """Whether ``token`` is this credential's (costs one scrypt: run it off the event loop)."""
        return hmac.compare_digest(hash_token(token, self.salt, self.scrypt_n), self.token_hash)

    def may_write_as(self, device: str) -> bool:
        """Whether a connection holding this credential may report readings for ``device``."""
        return device == self.device or any(fnmatch.fnmatchcase(device, p) for p in self.may_report)


def may_write_as(authenticated: str, patterns: Iterable[str], device: str) -> bool:
    """``Credential.may_write_as`` for what a connection carries (its device and patterns)."""
    return device == authenticated or any(fnmatch.fnmatchcase(device, p) for p in patterns)


def hash_token(token: str, salt: bytes, n: int = SCRYPT_N) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, dklen=32)


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """``password`` as Mosquitto 2's password file keeps it: ``$7$<iterations>$<salt>$<PBKDF2-SHA512>``
    (what ``mosquitto_passwd`` writes), so a device logs in to the broker with its id and token."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mac_key_for(token: str) -> bytes:
    """The binary MAC key a board derives from its token (firmware: the same two lines)."""
    return hashlib.sha256(MAC_KEY_LABEL + token.encode()).digest()


def packet_mac(key: bytes, signed: bytes) -> bytes:
    """The MAC of an authenticated binary packet: HMAC-SHA256 over header + records + counter,
    truncated to ``MAC_BYTES``."""
    return hmac.new(key, signed, hashlib.sha256).digest()[:MAC_BYTES]


def sign_packet(key: bytes, packet: bytes, counter: int) -> bytes:
    """A seed-style packet (header + records) made authenticated: ``+ counter u32 LE + MAC``."""
    signed = packet + COUNTER.pack(counter)
    return signed + packet_mac(key, signed)


def open_packet(key: bytes, framed: bytes) -> tuple[bytes, int] | None:
    """(the seed-style packet, its counter) when the MAC is right, else None."""
    if len(framed) < PACKET_TRAILER:
        return None
    signed, mac = framed[:-MAC_BYTES], framed[-MAC_BYTES:]
    if not hmac.compare_digest(packet_mac(key, signed), mac):
        return None
    (counter,) = COUNTER.unpack_from(signed, len(signed) - COUNTER.size)
    return signed[:-COUNTER.size], counter


def parse_hello(frame: bytes) -> tuple[str, str] | None:
    """(device, token) from the text port's first frame ``{"auth":{"device":"ID","token":"SECRET"}}``."""
    import orjson

    try:
        hello = orjson.loads(frame)
        auth = hello["auth"]
        device, token = auth["device"], auth["token"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(device, str) or not isinstance(token, str) or not device or not token:
        return None
    return device, token


class CredentialStore:
    """``<data>/credentials.db``. Open it, use it from one thread, close it."""

    def __init__(self, data_dir: str | os.PathLike[str], busy_timeout_s: float = 10.0) -> None:
        self.path = Path(data_dir) / STORE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():          # created 0600 before SQLite writes a byte of it
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add(self, device: str, may_report: Iterable[str] = (), replace: bool = False) -> str:
        """Make ``device``'s credential; the token, which is not kept anywhere."""
        if not DEVICE_ID.match(device):
            raise CredentialError(f"device id {device!r}: letters, digits and _ . : @ - only, at most 128")
        patterns = tuple(p.strip() for p in may_report if p.strip())
        for pattern in patterns:
            if "\n" in pattern:
                raise CredentialError(f"pattern {pattern!r}: one line each")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        while token.startswith("-"):        # one in 64 would read as an option: `feed --token -x…` fails
            token = secrets.token_urlsafe(TOKEN_BYTES)
        salt = os.urandom(16)
        row = (device, salt, hash_token(token, salt), SCRYPT_N, mac_key_for(token), "\n".join(patterns), time.time(),
               mosquitto_hash(token))
        try:
            self.db.execute(f"INSERT {'OR REPLACE ' if replace else ''}INTO credentials VALUES (?,?,?,?,?,?,?,?)", row)
        except sqlite3.IntegrityError:
            raise CredentialError(f"device {device} has a credential already; revoke it first, or --replace") from None
        self.db.execute("DELETE FROM mac_counters WHERE device = ?", (device,))   # a new key starts counting anew
        return token

    def revoke(self, device: str) -> bool:
        """Forget ``device``'s credential; False when it had none."""
        cursor = self.db.execute("DELETE FROM credentials WHERE device = ?", (device,))
        self.db.execute("DELETE FROM mac_counters WHERE device = ?", (device,))
        return cursor.rowcount > 0

    def get(self, device: str) -> Credential | None:
        row = self.db.execute("SELECT * FROM credentials WHERE device = ?", (device,)).fetchone()
        return _credential(row) if row else None

    def all(self) -> list[Credential]:
        return [_credential(r) for r in self.db.execute("SELECT * FROM credentials ORDER BY device")]

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT device, counter FROM mac_counters"))

    def save_counters(self, counters: dict[str, int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO mac_counters VALUES (?, ?)", counters.items())

    def data_version(self) -> int:
        """Changes when another connection (``sensorpipe devices``) changed the store: the edge reloads then."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])


def _credential(row: tuple) -> Credential:
    device, salt, token_hash, n, mac_key, may_report, created, mosquitto = row
    return Credential(device, salt, token_hash, n, mac_key, tuple(p for p in may_report.split("\n") if p), created,
                      mosquitto)
