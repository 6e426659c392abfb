# Device credentials on the board (docs/security.md): the text port's hello
# and the MAC on binary packets, both from DEVICE_TOKEN (the token
# `sensorpipe devices add ID` printed). Pure logic, no hardware.
#
#   text:   {"auth":{"device":"ID","token":"TOKEN"}} first, answered {"auth":"ok"}
#   binary: packet + counter (u32 LE) + HMAC-SHA256(key, packet + counter)[:16]
#           key = SHA-256("sensorpipe-mac-key:" + TOKEN)
#   updates: manifests signed with HMAC-SHA256(key, "sensorpipe-ota-key"), the
#           same key, so a board holds one secret (a DEVICE_KEY deployed
#           before tokens still wins while config.py has it)
#
# The counter must grow across deep sleep and resets: it is kept in a small
# file on flash and written before the packet goes out, so a number is never
# used twice (one write per wake).
#
# (device, counter) is the packet's idempotency key on the server: a sealed
# packet that got no `A` is kept on flash (PENDING_FILE, so it survives deep
# sleep and resets) and sent again byte for byte, same counter, before any
# new records are sealed; the server answers a packet it journaled already
# with `A` and stores nothing (docs/protocols.md). Cleared after its `A`.

import hashlib
import struct

try:
    import ujson as json
except ImportError:
    import json

MAC_KEY_LABEL = b"sensorpipe-mac-key:"
OTA_KEY_LABEL = b"sensorpipe-ota-key"
MAC_BYTES = 16
TRAILER_SIZE = 4 + MAC_BYTES  # the counter and the MAC behind the packet
COUNTER_FILE = "auth_counter"
PENDING_FILE = "auth_pending"
PENDING_TRIES_MAX = 20  # unanswered on a made connection this often: set aside (a key changed?)
AUTH_OK = b'{"auth":"ok"}'


def hello_line(device, token):
    return json.dumps({"auth": {"device": device, "token": token}}).encode() + b"\n"


def mac_key(token):
    return hashlib.sha256(MAC_KEY_LABEL + token.encode()).digest()


def hmac_sha256(key, msg):
    # RFC 2104 over hashlib.sha256 (MicroPython has no hmac module)
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    pad = bytearray(64)
    pad[:len(key)] = key
    inner = bytearray(64)
    outer = bytearray(64)
    for i in range(64):
        inner[i] = pad[i] ^ 0x36
        outer[i] = pad[i] ^ 0x5C
    h = hashlib.sha256(bytes(inner))
    h.update(msg)
    o = hashlib.sha256(bytes(outer))
    o.update(h.digest())
    return o.digest()


def sign(packet, key, counter):
    signed = packet + struct.pack("<I", counter)
    return signed + hmac_sha256(key, signed)[:MAC_BYTES]


def next_counter(path=COUNTER_FILE):
    # The next packet's counter, written down before it is used.
    try:
        with open(path) as f:
            last = int(f.read().strip() or 0)
    except (OSError, ValueError):
        last = 0
    with open(path, "w") as f:
        f.write(str(last + 1))
    return last + 1


def seal(conf, packet, path=COUNTER_FILE):
    # The packet as the binary port takes it: signed when the board has a token.
    if not conf.DEVICE_TOKEN:
        return packet
    return sign(packet, mac_key(conf.DEVICE_TOKEN), next_counter(path))


def pending(path=PENDING_FILE):
    # (the sealed packet waiting for its `A`, how often it went unanswered),
    # or (None, 0). The new file is read when a reset came between removing
    # the old one and renaming the new (see keep).
    for name in (path, path + ".new"):
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if len(data) >= 2:
            return data[1:], data[0]
    return None, 0


def keep(data, tries=0, path=PENDING_FILE):
    # Written whole to a new file, then renamed: a reset mid-write never
    # leaves half a packet (it would never be answered). FAT (the ESP8266's
    # default) cannot rename over a file, so the old one is removed first.
    import os
    with open(path + ".new", "wb") as f:
        f.write(bytes([min(tries, 255)]) + data)
    _remove(path)
    os.rename(path + ".new", path)


def answered(path=PENDING_FILE):
    _remove(path)
    _remove(path + ".new")


def _remove(path):
    import os
    try:
        os.remove(path)
    except OSError:
        pass


def ota_key(conf):
    # The key (hex) update manifests are checked with, or None: lib/ota.py.
    if conf.DEVICE_KEY:
        return conf.DEVICE_KEY
    if not conf.DEVICE_TOKEN:
        return None
    try:
        import ubinascii as binascii
    except ImportError:
        import binascii
    return binascii.hexlify(hmac_sha256(mac_key(conf.DEVICE_TOKEN), OTA_KEY_LABEL)).decode()


def hello(conf):
    # The text connection's first line, or None without a token.
    if not conf.DEVICE_TOKEN:
        return None
    return hello_line(conf.DEVICE_ID, conf.DEVICE_TOKEN)
