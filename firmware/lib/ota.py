# Over-the-air updates, the download: a manifest authenticated with the
# board's DEVICE_KEY, chunks written into ota_new/ and checked against the
# manifest's SHA-256, and the swap (lib/otaboot.py) once everything is there.
# The commands that carry them (docs/firmware.md, "Over-the-air updates"):
#
#   {"id":"u1.gh-1.m","cmd":"ota","v":"1.4","files":[["lib/app.py",12034,"<sha256 hex>"],...],
#    "sig":"<HMAC-SHA256 hex of manifest_message()>"}
#   {"id":"u1.gh-1.3","cmd":"ota_chunk","v":"1.4","f":0,"o":768,"d":"<base64, 384 bytes at most>"}
#   {"id":"u1.gh-1.s","cmd":"ota_swap","v":"1.4"}        verify all, swap, reset; acked after the reset
#   {"id":"u1.gh-1.c","cmd":"ota_confirm","v":"1.4"}     the server heard the new version: keep it
#
# Each chunk is written at its offset, so a chunk sent again (after a cut
# connection) or a file cut by a power loss is simply written over. Plain
# MicroPython: hashlib.sha256 and binascii, no hmac module.

import hashlib
import os

try:
    import ubinascii as binascii
except ImportError:
    import binascii

import otaboot
from devauth import hmac_sha256  # noqa: F401 (also this module's API)

STATE = "ota_state.json"  # the manifest being downloaded
MAX_FILE = 131072  # bytes; more than an ESP8266's flash filesystem wants in one file
MAX_FILES = 32
BLOCK = 256  # hashing reads this much at a time (ESP8266 RAM)
PROTECTED = ("boot.py", "config.py", "lib/otaboot.py", "settings.json")
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/"


class OtaError(Exception):
    pass


def manifest_message(device_id, version, files):
    # What the signature covers: the device, the version and every file, one a line.
    lines = ["sensorpipe-ota-1", device_id, version]
    for name, size, sha in files:
        lines.append("%s %d %s" % (name, size, sha))
    return ("\n".join(lines) + "\n").encode()


def hexdigest(digest):
    return binascii.hexlify(digest).decode()


def same(a, b):
    # compared in a time that does not depend on where they differ
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= ord(a[i]) ^ ord(b[i])
    return diff == 0


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            h.update(block)
    return hexdigest(h.digest())


def file_size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return 0


def check_name(name):
    if not isinstance(name, str) or not name or len(name) > 64 or name[0] == "/" or ".." in name:
        raise OtaError("bad file name %r" % (name,))
    for ch in name:
        if ch not in NAME_CHARS:
            raise OtaError("bad file name %r" % (name,))
    if name in PROTECTED or name.startswith(otaboot.NEW + "/") or name.startswith(otaboot.OLD + "/"):
        raise OtaError("%s is not updated over the air" % name)


class Updater:
    Error = OtaError  # for callers that import this module lazily

    def __init__(self, device_id, key_hex, log=print):
        self.device_id = device_id
        self.key = binascii.unhexlify(key_hex) if key_hex else None
        self.log = log
        self.state = otaboot.read_json(STATE)

    def busy(self):
        # a download under way (the board should stay awake for it)
        return self.state is not None

    def manifest(self, doc):
        if self.key is None:
            raise OtaError("no DEVICE_TOKEN (or DEVICE_KEY) in config.py: deploy the board again")
        version = doc["v"]
        files = doc["files"]
        if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
            raise OtaError("files: 1..%d expected" % MAX_FILES)
        for entry in files:
            if not isinstance(entry, list) or len(entry) != 3:
                raise OtaError("files: [name, size, sha256] expected")
            check_name(entry[0])
            if isinstance(entry[1], bool) or not isinstance(entry[1], int) or not 0 <= entry[1] <= MAX_FILE:
                raise OtaError("%s: size must be 0..%d" % (entry[0], MAX_FILE))
            if not isinstance(entry[2], str) or len(entry[2]) != 64:
                raise OtaError("%s: sha256 must be 64 hex digits" % entry[0])
        expected = hexdigest(hmac_sha256(self.key, manifest_message(self.device_id, version, files)))
        if not same(expected, str(doc.get("sig") or "")):
            raise OtaError("bad signature: not from this board's server")
        if otaboot.read_json(otaboot.TRIAL) is not None:
            raise OtaError("version %s is still on trial" % otaboot.running_version())
        if version == otaboot.running_version():
            raise OtaError("already running %s" % version)
        if self.state is not None and self.state["v"] == version and self.state["files"] == files:
            return  # the same update again: carry on where it stopped
        otaboot.drop_json(STATE)
        otaboot.remove_tree(otaboot.NEW)
        otaboot.remove_tree(otaboot.OLD)
        self.state = {"v": version, "files": files}
        otaboot.write_json(STATE, self.state)
        os.mkdir(otaboot.NEW)
        self.log("ota: downloading %s (%d files)" % (version, len(files)))

    def _under_way(self, version):
        if self.state is None or self.state["v"] != version:
            raise OtaError("no download of %s under way" % version)

    def chunk(self, version, index, offset, data_b64):
        self._under_way(version)
        files = self.state["files"]
        if not 0 <= index < len(files):
            raise OtaError("no file %d" % index)
        name, size, sha = files[index]
        try:
            data = binascii.a2b_base64(data_b64)
        except ValueError:
            raise OtaError("chunk is not base64")
        path = otaboot.NEW + "/" + name
        have = file_size(path)
        if offset > have:
            raise OtaError("%s: chunk at %d but %d bytes so far" % (name, offset, have))
        if offset + len(data) > size:
            raise OtaError("%s: chunk goes past %d bytes" % (name, size))
        otaboot.makedirs(path)
        with open(path, "r+b" if otaboot.exists(path) else "wb") as f:
            f.seek(offset)
            f.write(data)
        if offset + len(data) == size and file_sha256(path) != sha:
            otaboot.remove(path)
            raise OtaError("%s: SHA-256 does not match the manifest" % name)

    def swap(self, version, cmd_id):
        # Verify every file, write the marker, swap. Returns normally only when
        # the board should now reset into the new version.
        self._under_way(version)
        for name, size, sha in self.state["files"]:
            path = otaboot.NEW + "/" + name
            if file_size(path) != size:
                raise OtaError("%s: %d of %d bytes" % (name, file_size(path), size))
            if file_sha256(path) != sha:
                otaboot.remove(path)
                raise OtaError("%s: SHA-256 does not match the manifest" % name)
        names = [entry[0] for entry in self.state["files"]]
        had = [name for name in names if otaboot.exists(name)]
        otaboot.remove_tree(otaboot.OLD)
        doc = {"version": version, "prev": otaboot.running_version(), "files": names, "had": had, "cmd": cmd_id}
        otaboot.write_json(otaboot.SWAP, doc)  # the marker, last: from here boot.py finishes the swap
        otaboot.drop_json(STATE)
        self.state = None
        self.log("ota: swapping in %s" % version)
        otaboot.swap(doc)

    def outcome(self, version):
        # For a swap or confirm sent again: (done, error) from what the board has.
        trial = otaboot.read_json(otaboot.TRIAL)
        if trial is not None and trial["version"] == version:
            return True, None
        result = otaboot.read_json(otaboot.RESULT)
        if result is not None and result["version"] == version and result["state"] == "rolled_back":
            return True, result.get("error")
        if otaboot.running_version() == version:
            return True, None
        return False, None

    def confirm(self, version):
        trial = otaboot.read_json(otaboot.TRIAL)
        if trial is not None and trial["version"] == version:
            otaboot.confirm(trial)
            self.log("ota: %s confirmed" % version)
            return
        if otaboot.running_version() != version:
            raise OtaError("not running %s" % version)
