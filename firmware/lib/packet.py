# What the board sends: JSON lines, `key: value;` lines and binary packets.
#
# A reading is a list of (name, value) pairs, in a fixed order (MicroPython's
# dicts do not keep insertion order); value None means the sensor read failed.
# Numbers are formatted here, not by json/repr, so a line is the same bytes on
# CPython, the unix port and a board with double-precision floats.
#
# Binary packet (the server's binary port): a 9-byte little-endian header
#   <HHHBBB  data_length, wake_interval_s, measure_interval_s,
#            bytes_per_record, device_number, record_count
# then record_count records, oldest first. One record (RECORD, 8 bytes):
#   i16 temp * 10   (MISSING_I16 = failed read)
#   u16 humi * 10   (MISSING_U16 = failed read)
#   u16 soil raw ADC count
#   u16 vbat in mV
# firmware/server-config-example.toml is the matching server layout.

import struct

HEADER = "<HHHBBB"
HEADER_SIZE = 9
RECORD = "<hHHH"
RECORD_SIZE = 8
MAX_RECORDS = 255  # record_count is one byte
MISSING_I16 = -32768
MISSING_U16 = 0xFFFF

# (reading name, struct code, multiplier, missing raw value), in record order
FIELDS = (
    ("temp", "h", 10, MISSING_I16),
    ("humi", "H", 10, MISSING_U16),
    ("soil", "H", 1, MISSING_U16),
    ("vbat", "H", 1000, MISSING_U16),
)
_RANGE = {"h": (-32767, 32767), "H": (0, 0xFFFE)}  # the missing value is never a reading

FLOAT_DIGITS = 3
ACK = b"A"


def number(value):
    # An int stays an int; a float gets at most FLOAT_DIGITS decimals, rounded
    # half away from zero, trailing zeros cut: 22.6 -> "22.6", 3.0 -> "3".
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    scaled = value * 1000
    n = int(scaled + 0.5) if scaled >= 0 else -int(-scaled + 0.5)
    sign = "-" if n < 0 else ""
    n = abs(n)
    whole = str(n // 1000)
    frac = str(n % 1000)
    frac = ("000" + frac)[-FLOAT_DIGITS:].rstrip("0")
    if not frac:
        return "0" if n == 0 else sign + whole
    return sign + whole + "." + frac


def _usable(value):
    # NaN and infinities are failed reads too
    return value is not None and value == value and value not in (float("inf"), float("-inf"))


def json_line(device_id, reading, ts=None):
    parts = ['{"device":"', device_id, '"']
    for name, value in reading:
        parts.append(',"%s":%s' % (name, number(value) if _usable(value) else "null"))
    if ts is not None:
        parts.append(',"ts":%d' % ts)
    parts.append("}\n")
    return "".join(parts).encode()


def kv_line(device_id, reading, ts=None):
    parts = []
    for name, value in reading:
        parts.append("%s: %s" % (name, number(value) if _usable(value) else "nan"))
    if ts is not None:
        parts.append("ts: %d" % ts)
    parts.append("from " + device_id)
    return ("; ".join(parts) + "\n").encode()


def record(reading):
    # The reading's sensor fields packed as one RECORD; absent or failed -> missing.
    values = {}
    for name, value in reading:
        values[name] = value
    raw = []
    for name, code, mult, missing in FIELDS:
        value = values.get(name)
        if not _usable(value):
            raw.append(missing)
            continue
        scaled = value * mult
        n = int(scaled + 0.5) if scaled >= 0 else -int(-scaled + 0.5)
        lo, hi = _RANGE[code]
        raw.append(lo if n < lo else hi if n > hi else n)
    return struct.pack(RECORD, raw[0], raw[1], raw[2], raw[3])


def unpack_record(data, offset=0):
    # RECORD -> [(name, value or None)], the inverse of record() (for logs and tests).
    raw = struct.unpack_from(RECORD, data, offset)
    out = []
    for i in range(len(FIELDS)):
        name, code, mult, missing = FIELDS[i]
        r = raw[i]
        out.append((name, None if r == missing else (r if mult == 1 else r / mult)))
    return out


def binary_packet(device_number, records, wake_s, measure_s, record_size=RECORD_SIZE):
    # records: bytes of whole records, oldest first.
    count = len(records) // record_size
    if count * record_size != len(records):
        raise ValueError("records are not whole")
    if count > MAX_RECORDS:
        raise ValueError("more than %d records" % MAX_RECORDS)
    header = struct.pack(HEADER, len(records), _u16(wake_s), _u16(measure_s),
                         record_size, device_number, count)
    return header + records


def _u16(seconds):
    n = int(seconds + 0.5)
    return 1 if n < 1 else 0xFFFF if n > 0xFFFF else n


def ack_line(device_id, cmd_id, error=None):
    # {"device":"ID","cmd_ack":"c42","ok":true} or ...,"ok":false,"error":"..."}
    line = '{"device":"%s","cmd_ack":%s,"ok":%s' % (
        device_id, _json_str(cmd_id), "true" if error is None else "false")
    if error is not None:
        line += ',"error":' + _json_str(error)
    return (line + "}\n").encode()


def _json_str(text):
    if text is None:
        return "null"
    if isinstance(text, int) and not isinstance(text, bool):
        return str(text)  # a numeric command id is echoed as a number
    out = ['"']
    for ch in str(text):
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch < " ":
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
