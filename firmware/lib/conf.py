# The board's settings: config.py (written by `sensorpipe firmware deploy`)
# over these defaults, checked once at boot. A bad value raises ValueError
# naming the key, e.g. "config.TEXT_PORT: must be 1..65535".
#
# Settings changed by the server's commands (intervals, output pins) are kept
# in SETTINGS_FILE on the board's flash and win over config.py.

try:
    import ujson as json
except ImportError:
    import json

TRANSPORTS = ("json", "kv", "binary")
DEFAULTS = (
    ("DEVICE_ID", None),
    ("DEVICE_TOKEN", None),
    ("SERVER_HOST", None),
    ("TEXT_PORT", 7000),
    ("BINARY_PORT", 7002),
    ("TRANSPORT", "json"),
    ("DEVICE_NUMBER", 1),
    ("WIFI", ()),
    ("WIFI_TIMEOUT_S", 15),
    ("WIFI_ROUNDS_BATTERY", 2),
    ("MEASURE_S", 60),
    ("BATTERY", False),
    ("WAKE_S", 600),
    ("DHT_TYPE", 22),
    ("DHT_PIN", 4),
    ("SOIL_ADC", 0),
    ("VBAT_ADC", None),
    ("VBAT_SCALE", 1.0),
    ("OUTPUT_PINS", ()),
    ("LED_PIN", None),
    ("LED_ACTIVE_LOW", True),
    ("NTP_HOST", None),
    ("CONNECT_TIMEOUT_S", 5),
    ("ACK_TIMEOUT_S", 10),
    ("CMD_WAIT_MS", 1000),
    ("BACKLOG_MAX", 100),
    ("BUFFER_RECORDS", None),
    ("BOOT_GRACE_S", 3),
    ("DHT_RETRY_MS", 2000),
    ("SETTINGS_FILE", "settings.json"),
    ("DEVICE_KEY", None),
    ("TLS_CA", None),
    ("TLS_HOST", None),
    ("OTA_BOOTS", 3),
    ("OTA_TRIAL_S", 600),
    ("OTA_IDLE_MS", 3000),
    ("CRASH_WAIT_S", 10),
)
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"


class Conf:
    pass


def load(module, settings=None):
    # settings: a dict of overrides (from SETTINGS_FILE), applied before checking.
    # Overrides that do not pass with this config.py are ignored, so a board
    # never stops on a settings file left behind by an older config.
    if settings:
        try:
            return build(module, settings)
        except ValueError:
            pass
    return build(module, None)


def build(module, settings=None):
    # Like load(), but overrides that do not pass raise ValueError.
    conf = Conf()
    for name, default in DEFAULTS:
        setattr(conf, name, getattr(module, name, default))
    if settings:
        for name in ("MEASURE_S", "WAKE_S"):
            if name in settings:
                setattr(conf, name, settings[name])
    check(conf)
    return conf


def _fail(key, why):
    raise ValueError("config.%s: %s" % (key, why))


def _int(conf, key, lo, hi, none=False):
    value = getattr(conf, key)
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or value > hi:
        _fail(key, "must be a whole number %d..%d%s" % (lo, hi, " or None" if none else ""))


def _positive(conf, key, hi):
    value = getattr(conf, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= hi:
        _fail(key, "must be a number of seconds above 0, at most %d" % hi)


def check(conf):
    device = conf.DEVICE_ID
    if not isinstance(device, str) or not 0 < len(device) <= 64:
        _fail("DEVICE_ID", "must be a name of 1..64 characters")
    for ch in device:
        if ch not in _ID_CHARS:
            _fail("DEVICE_ID", "may hold only letters, digits and . _ : -")
    token = conf.DEVICE_TOKEN
    if token is not None and (not isinstance(token, str) or not 0 < len(token) <= 128 or "\"" in token):
        _fail("DEVICE_TOKEN", "must be the token `sensorpipe devices add` printed, or None")
    if not isinstance(conf.SERVER_HOST, str) or not conf.SERVER_HOST:
        _fail("SERVER_HOST", "must be the server's host name or address")
    for key in ("TLS_CA", "TLS_HOST"):
        value = getattr(conf, key)
        if value is not None and (not isinstance(value, str) or not value):
            _fail(key, "must be a file name (TLS_CA) or a host name (TLS_HOST), or None")
    _int(conf, "TEXT_PORT", 1, 65535)
    _int(conf, "BINARY_PORT", 1, 65535)
    if conf.TRANSPORT not in TRANSPORTS:
        _fail("TRANSPORT", "must be one of json, kv, binary")
    _int(conf, "DEVICE_NUMBER", 0, 255)
    wifi = conf.WIFI
    if not isinstance(wifi, (list, tuple)):
        _fail("WIFI", "must be a list of (ssid, password) or (ssid, password, timeout_s)")
    for net in wifi:
        if (not isinstance(net, (list, tuple)) or len(net) not in (2, 3)
                or not isinstance(net[0], str) or not net[0] or not isinstance(net[1], str)
                or (len(net) == 3 and (isinstance(net[2], bool) or not isinstance(net[2], (int, float))
                                       or net[2] <= 0))):
            _fail("WIFI", "each network must be (ssid, password) or (ssid, password, timeout_s)")
    _positive(conf, "WIFI_TIMEOUT_S", 600)
    _int(conf, "WIFI_ROUNDS_BATTERY", 1, 100)
    _positive(conf, "MEASURE_S", 65535)
    if not isinstance(conf.BATTERY, bool):
        _fail("BATTERY", "must be True or False")
    if conf.BATTERY:
        if conf.TRANSPORT != "binary":
            _fail("BATTERY", "battery mode sends binary packets: set TRANSPORT = 'binary'")
        _int(conf, "MEASURE_S", 1, 65535)
        _int(conf, "WAKE_S", 1, 65535)
        if conf.WAKE_S < conf.MEASURE_S:
            _fail("WAKE_S", "must be at least MEASURE_S")
    if conf.DHT_TYPE not in (0, 11, 22):
        _fail("DHT_TYPE", "must be 11, 22 or 0 (no DHT sensor)")
    _int(conf, "DHT_PIN", 0, 255)
    _int(conf, "SOIL_ADC", 0, 255, none=True)
    if conf.VBAT_ADC != "vcc":
        _int(conf, "VBAT_ADC", 0, 255, none=True)
    if isinstance(conf.VBAT_SCALE, bool) or not isinstance(conf.VBAT_SCALE, (int, float)):
        _fail("VBAT_SCALE", "must be volts per ADC count")
    if not isinstance(conf.OUTPUT_PINS, (list, tuple)):
        _fail("OUTPUT_PINS", "must be a list of pin numbers")
    for pin in conf.OUTPUT_PINS:
        if isinstance(pin, bool) or not isinstance(pin, int) or pin < 0:
            _fail("OUTPUT_PINS", "must be a list of pin numbers")
    _int(conf, "LED_PIN", 0, 255, none=True)
    if conf.NTP_HOST is not None and not isinstance(conf.NTP_HOST, str):
        _fail("NTP_HOST", "must be a host name or None")
    _positive(conf, "CONNECT_TIMEOUT_S", 600)
    _positive(conf, "ACK_TIMEOUT_S", 600)
    _int(conf, "CMD_WAIT_MS", 0, 600000)
    _int(conf, "BACKLOG_MAX", 1, 100000)
    _int(conf, "BUFFER_RECORDS", 1, 255, none=True)
    _int(conf, "BOOT_GRACE_S", 0, 600)
    _int(conf, "DHT_RETRY_MS", 0, 60000)
    if not isinstance(conf.SETTINGS_FILE, str) or not conf.SETTINGS_FILE:
        _fail("SETTINGS_FILE", "must be a file name")
    key = conf.DEVICE_KEY
    if key is not None:
        if not isinstance(key, str) or len(key) != 64:
            _fail("DEVICE_KEY", "must be 64 hex digits (sensorpipe firmware deploy writes it) or None")
        for ch in key:
            if ch not in "0123456789abcdef":
                _fail("DEVICE_KEY", "must be 64 hex digits (sensorpipe firmware deploy writes it) or None")
    _int(conf, "OTA_BOOTS", 1, 100)
    _positive(conf, "OTA_TRIAL_S", 86400)
    _int(conf, "OTA_IDLE_MS", 100, 600000)
    _positive(conf, "CRASH_WAIT_S", 3600)


def read_settings(path):
    # {} when the file is missing or unreadable: config.py then rules.
    for name in (path, path + ".new"):
        try:
            with open(name) as f:
                doc = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            return doc
    return {}


def write_settings(path, settings):
    # Written to a new file first, so a reset halfway through leaves a whole
    # file (read_settings falls back to the new one). FAT cannot rename over an
    # existing file, so the old one is removed first.
    import os
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(json.dumps(settings))
    try:
        os.remove(path)
    except OSError:
        pass
    os.rename(tmp, path)
