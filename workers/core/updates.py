"""Updates over the air, the server's side: firmware bundles, rollouts, each device's version and update state.

It runs inside the commands worker (workers/processes/commands.py), which owns the sockets: an update is an
ordinary series of commands to the board (docs/firmware.md, "Over-the-air updates")::

    ota.<rollout>.<device>.m      {"cmd":"ota","v":"1.4","files":[[name,size,sha256],...],"sig":HMAC}
    ota.<rollout>.<device>.0..N   {"cmd":"ota_chunk","v":"1.4","f":FILE,"o":OFFSET,"d":BASE64}
    ota.<rollout>.<device>.s      {"cmd":"ota_swap","v":"1.4"}     acked by the new version after its reset
    ota.<rollout>.<device>.c      {"cmd":"ota_confirm","v":"1.4"}  made when the swap is acked

so they are queued, delivered, delivered again on a new connection and acknowledged like any command, by
whatever way the board is connected. Each device's state moves on with the acks::

    sending -> swapping -> confirming -> updated
       \\-> failed (refused by the board, a file that does not match)   \\-> rolled_back (the board's own)

Bundles: ``<data>/firmware/<version>/`` holds the files and ``manifest.json``, written by
``sensorpipe firmware push``. States: ``<data>/firmware.db``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from workers.core import devicekeys

CHUNK_BYTES = 384               # base64 makes 512: a command line well under the firmware's 2048
BUNDLES_DIR = "firmware"
MANIFEST = "manifest.json"
VERSION_FILE = "version.txt"    # in every bundle: the version the board reports
PROTECTED = ("boot.py", "config.py", "lib/otaboot.py", "settings.json")   # the way back; the board's own
MAX_FILE = 131072               # as firmware/lib/ota.py
MAX_FILES = 32
_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")
_VERSION = re.compile(r"[A-Za-z0-9._+-]{1,32}")

SENDING, SWAPPING, CONFIRMING = "sending", "swapping", "confirming"
UPDATED, FAILED, ROLLED_BACK = "updated", "failed", "rolled_back"
BUSY = (SENDING, SWAPPING, CONFIRMING)

SCHEMA = """
CREATE TABLE IF NOT EXISTS firmware (
    device TEXT PRIMARY KEY, version TEXT, target TEXT, state TEXT, rollout TEXT, chunks INTEGER NOT NULL,
    acked INTEGER NOT NULL, updated_ms INTEGER NOT NULL, error TEXT
) WITHOUT ROWID;
"""


class UpdateError(Exception):
    """A push that cannot be made: answered ``{"ok": false, "error": ...}``."""


# --------------------------------------------------------------------------- bundles


def check_version(version: object) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise UpdateError("version: 1..32 letters, digits and . _ + -")
    return version


def check_file_name(name: str) -> None:
    if not _NAME.fullmatch(name) or ".." in name or len(name) > 64:
        raise UpdateError(f"{name!r}: a file name on the board is NAME or DIR/NAME (letters, digits, . _ -)")
    if name in PROTECTED:
        raise UpdateError(f"{name} is not updated over the air (the board's own, or the way back from a bad"
                          " update): change it over USB with `sensorpipe firmware deploy`")


def bundle_files(firmware_dir: Path) -> dict[str, bytes]:
    """What a push of a firmware directory sends: main.py and lib/*.py, minus what is never updated."""
    files: dict[str, bytes] = {}
    main = firmware_dir / "main.py"
    if main.exists():
        files["main.py"] = main.read_bytes()
    for path in sorted((firmware_dir / "lib").glob("*.py")):
        name = f"lib/{path.name}"
        if name not in PROTECTED:
            files[name] = path.read_bytes()
    if not files:
        raise UpdateError(f"no firmware files in {firmware_dir} (main.py, lib/*.py)")
    return files


def write_bundle(data_dir: Path, version: str, files: dict[str, bytes]) -> dict:
    """Check the files and keep them under ``<data>/firmware/<version>/``; returns the manifest."""
    check_version(version)
    files = {**files, VERSION_FILE: version.encode()}
    if len(files) > MAX_FILES:
        raise UpdateError(f"{len(files)} files: at most {MAX_FILES}")
    entries = []
    for name, content in sorted(files.items()):
        check_file_name(name)
        if len(content) > MAX_FILE:
            raise UpdateError(f"{name}: {len(content)} bytes, at most {MAX_FILE}")
        if name.endswith(".py"):
            try:                # a file that does not even compile would only crash the board
                compile(content, name, "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as exc:
                raise UpdateError(f"{name} does not compile: {exc}") from None
        entries.append([name, len(content), hashlib.sha256(content).hexdigest()])
    where = Path(data_dir) / BUNDLES_DIR / version
    existing = where / MANIFEST
    manifest = {"version": version, "files": entries}
    if existing.exists():
        if json.loads(existing.read_text()) != manifest:
            raise UpdateError(f"version {version} was pushed before with other files: give the new ones a new version")
        return manifest
    for name, content in files.items():
        target = where / "files" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    existing.write_text(json.dumps(manifest, indent=1))      # last: a bundle with a manifest is whole
    return manifest


def read_bundle(data_dir: Path, version: str) -> tuple[list[list], dict[str, bytes]]:
    where = Path(data_dir) / BUNDLES_DIR / check_version(version)
    try:
        manifest = json.loads((where / MANIFEST).read_text())
        files = {name: (where / "files" / name).read_bytes() for name, _, _ in manifest["files"]}
    except (OSError, ValueError, KeyError) as exc:
        raise UpdateError(f"no firmware bundle {version} in {where.parent}: push it with `sensorpipe firmware"
                          f" push --version {version}` ({exc})") from None
    return manifest["files"], files


def manifest_message(device: str, version: str, files: Iterable[list]) -> bytes:
    """What the manifest's signature covers, byte for byte as firmware/lib/ota.py builds it."""
    lines = ["sensorpipe-ota-1", device, version, *(f"{name} {size} {sha}" for name, size, sha in files)]
    return ("\n".join(lines) + "\n").encode()


def command_id(rollout: str, device: str, part: str) -> str:
    return f"ota.{rollout}.{device}.{part}"


def parse_command_id(cmd_id: str) -> tuple[str, str, str] | None:
    if not cmd_id.startswith("ota."):
        return None
    _, rollout, rest = cmd_id.split(".", 2) if cmd_id.count(".") >= 3 else ("", "", "")
    device, _, part = rest.rpartition(".")
    return (rollout, device, part) if rollout and device and part else None


def stage_order(device: str) -> str:
    """Devices in a rollout's order: the first P percent stay the first P percent for the same fleet."""
    return hashlib.sha256(device.encode()).hexdigest()


# --------------------------------------------------------------------------- state


@dataclass
class FirmwareState:
    device: str
    version: str | None = None          # what it runs, as far as the server knows
    target: str | None = None           # the version of its last update
    state: str | None = None
    rollout: str | None = None
    chunks: int = 0
    acked: int = 0
    updated_ms: int = 0
    error: str | None = None

    def describe(self) -> dict:
        return {"device": self.device, "version": self.version, "target": self.target, "state": self.state,
                "progress": f"{self.acked}/{self.chunks}" if self.state == SENDING else None,
                "rollout": self.rollout, "updated": self.updated_ms or None, "error": self.error}


class UpdateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def all(self) -> dict[str, FirmwareState]:
        return {row[0]: FirmwareState(*row) for row in self.db.execute("SELECT * FROM firmware")}

    def save(self, st: FirmwareState) -> None:
        self.db.execute("INSERT OR REPLACE INTO firmware VALUES (?,?,?,?,?,?,?,?,?)",
                        (st.device, st.version, st.target, st.state, st.rollout, st.chunks, st.acked,
                         st.updated_ms, st.error))

    def close(self) -> None:
        self.db.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Updates:
    """Rollouts and each device's update state; ``queue(device, id, command)`` and ``cancel(prefix)`` are the
    commands worker's."""

    def __init__(self, data_dir: Path, queue: Callable[[str, str, dict], None],
                 cancel: Callable[[str], None], count: Callable[[str], None]) -> None:
        self.data_dir = Path(data_dir)
        self.queue = queue
        self.cancel = cancel
        self.count = count
        self.store = UpdateStore(self.data_dir / "firmware.db")
        self.states = self.store.all()
        self.failed_at: dict[str, int] = {}     # the step whose refusal failed a device's update

    # ------------------------------------------------------------------ pushing

    def push(self, version: str, devices: list[str] | None, percent: float | None, force: bool,
             fleet: Iterable[str], online: Callable[[str], bool]) -> dict:
        """Start the update to ``version`` on the given devices, or on the first ``percent`` of the fleet."""
        files, contents = read_bundle(self.data_dir, version)
        if not force:
            bad = [s for s in self.states.values() if s.target == version and s.state in (FAILED, ROLLED_BACK)]
            if bad:
                raise UpdateError(f"{version} {bad[0].state.replace('_', ' ')} on {bad[0].device} ({bad[0].error}):"
                                  " look into it, or push again with --force")
        if devices is None:
            # the fleet: the boards the server has heard from and holds a key for (sensorpipe firmware)
            ordered = sorted(set(fleet) & devicekeys.devices_with_keys(self.data_dir), key=stage_order)
            stage = ordered[:math.ceil(len(ordered) * (percent or 100) / 100)]
        else:
            stage = list(dict.fromkeys(devices))
        started: list[str] = []
        refused: dict[str, str] = {}
        rollout = f"{now_ms():x}"[-7:]
        for device in stage:
            reason = self.refusal(device, version, online)
            if reason is not None:
                refused[device] = reason
                continue
            self.start(rollout, device, version, files, contents)
            started.append(device)
        return {"ok": bool(started) or not refused, "rollout": rollout, "version": version, "started": started,
                "refused": refused, "stage": len(stage)}

    def refusal(self, device: str, version: str, online: Callable[[str], bool]) -> str | None:
        st = self.states.get(device)
        if st is not None and st.state in BUSY:
            return f"mid-update ({st.state} {st.target})"
        if st is not None and st.version == version:
            return f"already running {version}"
        if devicekeys.key_for(self.data_dir, device) is None:
            return "no device key: deploy it with `sensorpipe firmware deploy` first"
        if not online(device):
            return "offline"
        return None

    def start(self, rollout: str, device: str, version: str, files: list[list], contents: dict[str, bytes]) -> None:
        key = devicekeys.key_for(self.data_dir, device)
        assert key is not None
        sig = devicekeys.sign(key, manifest_message(device, version, files))
        chunks = []
        for index, (name, _, _) in enumerate(files):
            content = contents[name]
            # an empty file still gets one (empty) chunk, so that it exists on the board
            for offset in range(0, len(content), CHUNK_BYTES) if content else (0,):
                chunks.append({"cmd": "ota_chunk", "v": version, "f": index, "o": offset,
                               "d": base64.b64encode(content[offset:offset + CHUNK_BYTES]).decode()})
        previous = self.states.get(device)
        st = FirmwareState(device, previous.version if previous else None, version, SENDING, rollout,
                           len(chunks), 0, now_ms())
        self.states[device] = st
        self.store.save(st)
        self.queue(device, command_id(rollout, device, "m"), {"cmd": "ota", "v": version, "files": files, "sig": sig})
        for n, chunk in enumerate(chunks):
            self.queue(device, command_id(rollout, device, str(n)), chunk)
        self.queue(device, command_id(rollout, device, "s"), {"cmd": "ota_swap", "v": version})
        self.count("updates_started")

    # ------------------------------------------------------------------ what the boards said

    def _state_for(self, cmd_id: str) -> tuple[FirmwareState, str] | None:
        parsed = parse_command_id(cmd_id)
        if parsed is None:
            return None
        rollout, device, part = parsed
        st = self.states.get(device)
        if st is None or st.rollout != rollout:
            return None
        return st, part

    def on_ack(self, cmd_id: str, ok: bool, error: str | None) -> None:
        found = self._state_for(cmd_id)
        if found is None:
            return
        st, part = found
        rank = -1 if part == "m" else int(part) if part.isdigit() else 1 << 30
        if not ok and st.state == FAILED and rank < self.failed_at.get(st.device, rank):
            # Two parsers may pass acks on out of order. The earliest step's refusal is the cause of the
            # later ones ("no download under way", a file short at the swap), so it is the error kept.
            self.failed_at[st.device] = rank
            st.error = error
            self.store.save(st)
            return
        if st.state not in BUSY:
            return                          # answered again, or after the update ended
        if part == "s":
            if ok:
                st.version, st.state, st.error = st.target, CONFIRMING, None
                self.queue(st.device, command_id(st.rollout or "", st.device, "c"),
                           {"cmd": "ota_confirm", "v": st.target})
            else:
                self.fail(st, error, ROLLED_BACK if (error or "").startswith("rolled back") else FAILED)
                return
        elif part == "c":
            if ok:
                st.state = UPDATED
                self.count("updates_done")
            else:
                self.fail(st, error, FAILED)
                return
        elif st.state != SENDING:
            return                          # a chunk answered again after the swap
        elif not ok:
            self.fail(st, error, FAILED, rank)
            return
        elif part != "m":
            st.acked = min(st.acked + 1, st.chunks)
        st.updated_ms = now_ms()
        self.store.save(st)

    def on_expired(self, cmd_id: str) -> None:
        found = self._state_for(cmd_id)
        if found is not None and found[0].state in BUSY:
            self.fail(found[0], "expired before the board took it", FAILED)

    def fail(self, st: FirmwareState, error: str | None, state: str, rank: int = 1 << 30) -> None:
        self.failed_at[st.device] = rank
        st.state, st.error, st.updated_ms = state, error or state, now_ms()
        self.store.save(st)
        self.count("updates_rolled_back" if state == ROLLED_BACK else "updates_failed")
        self.cancel(command_id(st.rollout or "", st.device, ""))

    # ------------------------------------------------------------------ reading

    def describe(self, device: str | None = None) -> dict:
        states = [s.describe() for d, s in sorted(self.states.items()) if device is None or d == device]
        return {"ok": True, "devices": states}

    def busy(self) -> int:
        return sum(1 for s in self.states.values() if s.state in BUSY)

    def close(self) -> None:
        self.store.close()
