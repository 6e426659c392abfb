# The firmware's pure logic, checked the same way under CPython and under real
# MicroPython (WebAssembly port, unix port): plain asserts, no pytest, nothing
# CPython-only. run_all() prints "ok NAME" per check and "out NAME HEX" for
# bytes the tests compare across implementations.

import struct

import commands
import conf
import packet
import ringbuf
import wifi

OUT = []


def out(name, data):
    OUT.append((name, data))


# ----------------------------------------------------------------- packet

def check_number():
    cases = ((0, "0"), (512, "512"), (-5, "-5"), (22.6, "22.6"), (-22.6, "-22.6"),
             (3.0, "3"), (0.0, "0"), (-0.0004, "0"), (0.9999, "1"), (1.25, "1.25"),
             (3.7126, "3.713"), (-0.5, "-0.5"), (True, "1"))
    for value, text in cases:
        assert packet.number(value) == text, (value, packet.number(value), text)


READING = [("temp", 22.6), ("humi", 52.0), ("soil", 512), ("vbat", 3.712)]
FAILED = [("temp", None), ("humi", None), ("soil", 498), ("vbat", float("nan"))]


def check_json_line():
    line = packet.json_line("greenhouse-1", READING + [("rssi", -61)], 1732260000123)
    assert line == (b'{"device":"greenhouse-1","temp":22.6,"humi":52,"soil":512,"vbat":3.712,'
                    b'"rssi":-61,"ts":1732260000123}\n'), line
    line = packet.json_line("greenhouse-1", FAILED)
    assert line == b'{"device":"greenhouse-1","temp":null,"humi":null,"soil":498,"vbat":null}\n', line
    out("json", line)


def check_kv_line():
    line = packet.kv_line("5c:cf:7f:a1:b2:c3", READING, 1732260000123)
    assert line == (b"temp: 22.6; humi: 52; soil: 512; vbat: 3.712; ts: 1732260000123; "
                    b"from 5c:cf:7f:a1:b2:c3\n"), line
    line = packet.kv_line("d1", FAILED)
    assert line == b"temp: nan; humi: nan; soil: 498; vbat: nan; from d1\n", line
    out("kv", line)


def check_record():
    rec = packet.record(READING)
    assert rec == struct.pack("<hHHH", 226, 520, 512, 3712), rec
    assert packet.record(FAILED) == struct.pack("<hHHH", -32768, 0xFFFF, 498, 0xFFFF)
    assert packet.record([("temp", -12.35), ("humi", 99.95)]) == struct.pack("<hHHH", -124, 1000, 0xFFFF, 0xFFFF)
    # out of range is clamped, never confused with the missing value
    assert packet.record([("temp", -5000.0), ("soil", 70000)]) == struct.pack("<hHHH", -32767, 0xFFFF, 0xFFFE, 0xFFFF)
    assert packet.unpack_record(rec) == [("temp", 22.6), ("humi", 52.0), ("soil", 512), ("vbat", 3.712)]
    assert packet.unpack_record(packet.record(FAILED))[0] == ("temp", None)
    out("record", rec)


def check_binary_packet():
    records = packet.record(READING) + packet.record(FAILED)
    data = packet.binary_packet(7, records, 600, 60)
    assert data[:9] == struct.pack("<HHHBBB", 16, 600, 60, 8, 7, 2), data[:9]
    assert data[9:] == records
    assert len(data) == packet.HEADER_SIZE + 16
    try:
        packet.binary_packet(7, records[:-1], 600, 60)
        assert False, "half a record accepted"
    except ValueError:
        pass
    try:
        packet.binary_packet(7, packet.record(READING) * 256, 600, 60)
        assert False, "256 records accepted"
    except ValueError:
        pass
    assert packet.binary_packet(1, b"", 0.2, 70000)[2:6] == struct.pack("<HH", 1, 0xFFFF)
    out("packet", data)


def check_ack_line():
    assert packet.ack_line("g1", "c42") == b'{"device":"g1","cmd_ack":"c42","ok":true}\n'
    assert packet.ack_line("g1", 7, "unknown command") == \
        b'{"device":"g1","cmd_ack":7,"ok":false,"error":"unknown command"}\n'
    assert packet.ack_line("g1", None, 'a "q"\\\n') == \
        b'{"device":"g1","cmd_ack":null,"ok":false,"error":"a \\"q\\"\\\\\\u000a"}\n'


# ----------------------------------------------------------------- ringbuf

def rec(i):
    return bytes([i & 0xFF]) * 8


def check_ringbuf_drops_oldest():
    buf = ringbuf.RingBuffer(8, 3)
    for i in range(5):
        buf.append(rec(i))
    assert len(buf) == 3 and buf.dropped == 2
    assert buf.records() == rec(2) + rec(3) + rec(4)
    buf.clear()
    assert len(buf) == 0 and buf.records() == b"" and buf.dropped == 2
    buf.append(rec(9))
    assert buf.records() == rec(9)
    try:
        buf.append(b"short")
        assert False, "short record accepted"
    except ValueError:
        pass


def check_ringbuf_serializes():
    buf = ringbuf.RingBuffer(8, 4)
    for i in range(6):
        buf.append(rec(i))
    buf.meta = 3
    blob = buf.to_bytes()
    assert len(blob) == ringbuf.HEAD_SIZE + 4 * 8
    back = ringbuf.RingBuffer.from_bytes(blob, 8, 4)
    assert back.records() == buf.records() and back.dropped == 2 and back.meta == 3
    # a smaller capacity keeps the newest and counts the rest as dropped
    small = ringbuf.RingBuffer.from_bytes(blob, 8, 2)
    assert small.records() == rec(4) + rec(5) and small.dropped == 4
    out("rtc", blob)


def check_ringbuf_rejects_garbage():
    buf = ringbuf.RingBuffer(8, 4)
    buf.append(rec(1))
    blob = buf.to_bytes()
    assert ringbuf.RingBuffer.from_bytes(b"", 8, 4) is None
    assert ringbuf.RingBuffer.from_bytes(None, 8, 4) is None
    assert ringbuf.RingBuffer.from_bytes(blob, 6, 4) is None  # another record size
    assert ringbuf.RingBuffer.from_bytes(blob[:-1], 8, 4) is None  # cut short
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    assert ringbuf.RingBuffer.from_bytes(bytes(flipped), 8, 4) is None
    assert ringbuf.RingBuffer.from_bytes(bytes(range(64)), 8, 4) is None


def check_ringbuf_fits_rtc():
    assert ringbuf.capacity_for(492, 8) == 59  # ESP8266
    assert ringbuf.capacity_for(2048, 8) == 254  # ESP32
    assert ringbuf.capacity_for(4096, 8) == 255
    buf = ringbuf.RingBuffer(8, ringbuf.capacity_for(492, 8))
    for i in range(100):
        buf.append(rec(i))
    assert len(buf.to_bytes()) <= 492 and buf.dropped == 41


def check_backlog():
    log = ringbuf.Backlog(2)
    for item in (b"a", b"b", b"c"):
        log.append(item)
    assert len(log) == 2 and log.dropped == 1 and log.peek() == b"b"
    assert log.pop() == b"b" and log.pop() == b"c" and len(log) == 0


# ----------------------------------------------------------------- commands

def parse_error(line, pins=(5,), led=None):
    try:
        commands.parse(line, pins, led)
    except commands.CommandError as e:
        return e.cmd_id, e.reason
    raise AssertionError("accepted: %r" % (line,))


def check_commands_parse():
    assert commands.parse('{"id":"c42","cmd":"interval","value":30}') == ("c42", "interval", 30)
    assert commands.parse(b'{"id":"c45","cmd":"wake","value":900}\r') == ("c45", "wake", 900)
    assert commands.parse('{"id":"c43","cmd":"relay","pin":5,"on":true}', (5, 12)) == ("c43", "relay", (5, True))
    assert commands.parse('{"id":"c46","cmd":"led","on":false}', (), 2) == ("c46", "led", False)
    assert commands.parse('{"id":"c47","cmd":"read"}') == ("c47", "read", None)
    assert commands.parse('{"id":"c44","cmd":"reboot"}') == ("c44", "reboot", None)
    assert commands.parse('{"cmd":"reboot"}') == (None, "reboot", None)


def check_commands_refuse():
    assert parse_error('{"id":"c1","cmd":"selfdestruct"}') == ("c1", "unknown command")
    assert parse_error('{"id":"c2"}') == ("c2", "no cmd")
    assert parse_error('{"id":"c3","cmd":"interval","value":0}')[0] == "c3"
    assert parse_error('{"id":"c3","cmd":"interval","value":70000}')[0] == "c3"
    assert parse_error('{"id":"c3","cmd":"interval","value":"30"}')[0] == "c3"
    assert parse_error('{"id":"c3","cmd":"interval","value":true}')[0] == "c3"
    assert parse_error('{"id":"c4","cmd":"relay","pin":6,"on":true}') == ("c4", "pin 6 is not in OUTPUT_PINS")
    assert parse_error('{"id":"c4","cmd":"relay","pin":5,"on":1}')[0] == "c4"
    assert parse_error('{"id":"c5","cmd":"led","on":true}') == ("c5", "no LED_PIN configured")
    assert parse_error("not json") == (None, "not a JSON object")
    assert parse_error("[1,2]") == (None, "not a JSON object")
    assert parse_error(b"\xff\xfe")[0] is None
    assert parse_error('{"id":[1],"cmd":"x"}') == (None, "unknown command")


def check_commands_recent():
    recent = commands.Recent(2)
    for cmd_id in ("a", "b", "c"):
        recent.add(cmd_id)
    assert not recent.seen("a") and recent.seen("b") and recent.seen("c")
    recent.add(None)
    assert not recent.seen(None)


# ----------------------------------------------------------------- conf

class Config:
    DEVICE_ID = "greenhouse-1"
    SERVER_HOST = "192.168.1.10"


def with_(**values):
    class C(Config):
        pass
    for key in values:
        setattr(C, key, values[key])
    return C


def conf_error(**values):
    try:
        conf.build(with_(**values))
    except ValueError as e:
        return str(e)
    raise AssertionError("accepted: %r" % (values,))


def check_conf_defaults():
    c = conf.load(Config)
    assert c.TEXT_PORT == 7000 and c.BINARY_PORT == 7002 and c.TRANSPORT == "json"
    assert c.MEASURE_S == 60 and c.WAKE_S == 600 and not c.BATTERY and c.WIFI == ()
    assert c.DHT_TYPE == 22 and c.SOIL_ADC == 0 and c.VBAT_ADC is None


def check_conf_refuses():
    assert conf_error(DEVICE_ID="") == "config.DEVICE_ID: must be a name of 1..64 characters"
    assert conf_error(DEVICE_ID="a b").startswith("config.DEVICE_ID:")
    assert conf_error(DEVICE_ID='a"b').startswith("config.DEVICE_ID:")
    assert conf_error(SERVER_HOST=None).startswith("config.SERVER_HOST:")
    assert conf_error(TEXT_PORT=0) == "config.TEXT_PORT: must be a whole number 1..65535"
    assert conf_error(TRANSPORT="mqtt").startswith("config.TRANSPORT:")
    assert conf_error(WIFI=[("home",)]).startswith("config.WIFI:")
    assert conf_error(WIFI="home").startswith("config.WIFI:")
    assert conf_error(WIFI=[("home", "pw", 0)]).startswith("config.WIFI:")
    assert conf_error(MEASURE_S=0).startswith("config.MEASURE_S:")
    assert conf_error(BATTERY=True).startswith("config.BATTERY:")  # needs binary
    assert conf_error(BATTERY=True, TRANSPORT="binary", MEASURE_S=60, WAKE_S=30).startswith("config.WAKE_S:")
    assert conf_error(DHT_TYPE=21).startswith("config.DHT_TYPE:")
    assert conf_error(VBAT_ADC="adc").startswith("config.VBAT_ADC:")
    assert conf_error(OUTPUT_PINS=(5, "x")).startswith("config.OUTPUT_PINS:")
    assert conf_error(BUFFER_RECORDS=256).startswith("config.BUFFER_RECORDS:")
    c = conf.build(with_(WIFI=[("a", "b"), ("c", "", 5)], TRANSPORT="binary", BATTERY=True,
                         MEASURE_S=60, WAKE_S=600, VBAT_ADC="vcc", OUTPUT_PINS=[5]))
    assert c.BATTERY and c.WIFI[1][2] == 5


def check_conf_settings():
    c = conf.load(Config, {"MEASURE_S": 30, "pins": {"5": True}})
    assert c.MEASURE_S == 30
    # settings that do not fit this config.py are ignored, never fatal
    battery = with_(TRANSPORT="binary", BATTERY=True, MEASURE_S=60, WAKE_S=600)
    assert conf.load(battery, {"MEASURE_S": 900}).MEASURE_S == 60
    try:
        conf.build(battery, {"MEASURE_S": 900})
        assert False, "WAKE_S < MEASURE_S accepted"
    except ValueError as e:
        assert str(e).startswith("config.WAKE_S:")


# ----------------------------------------------------------------- wifi

class Clock:
    def __init__(self):
        self.now = 0

    def ticks_ms(self):
        return self.now

    def ticks_diff(self, a, b):
        return a - b

    def ticks_add(self, a, b):
        return a + b

    def sleep_ms(self, ms):
        self.now += ms


class Station:
    # answers: ssid -> polls before connected (None: never)
    def __init__(self, clock, answers, busy=0):
        self.clock = clock
        self.answers = answers
        self.busy = busy
        self.on = False
        self.ssid = None
        self.since = 0
        self.calls = []

    def active(self, value=None):
        if value is None:
            return self.on
        self.on = value

    def connect(self, ssid, password):
        self.calls.append(ssid)
        if not self.on:
            raise OSError("Cannot set STA config")
        if self.busy:
            self.busy -= 1
            raise OSError("Cannot set STA config")
        self.ssid = ssid
        self.since = self.clock.now

    def disconnect(self):
        self.ssid = None

    def isconnected(self):
        wait = self.answers.get(self.ssid)
        return self.ssid is not None and wait is not None and self.clock.now - self.since >= wait


def check_wifi_order_and_timeouts():
    clock = Clock()
    sta = Station(clock, {"second": 300})
    link = wifi.Wifi(sta, [("first", "x", 2), ("second", "y")], 5, clock)
    assert link.up()
    assert sta.on and sta.calls == ["first", "second"] and link.ssid == "second"
    assert 2300 <= clock.now <= 2500, clock.now  # 2 s on "first", then 0.3 s


def check_wifi_backoff():
    clock = Clock()
    sta = Station(clock, {})
    link = wifi.Wifi(sta, [("a", "x")], 1, clock)
    assert not link.up() and link.backoff.delay_ms == 1000
    assert not link.up() and len(sta.calls) == 1  # still backing off: no new round
    clock.now += 1000
    assert not link.up() and link.backoff.delay_ms == 2000 and len(sta.calls) == 2
    clock.now += 2000
    sta.answers["a"] = 0
    assert link.up() and link.backoff.delay_ms == 0
    assert wifi.Wifi(None, [], 1, clock).up()  # no Wi-Fi on this board: always up


def check_wifi_sta_config_error():
    clock = Clock()
    sta = Station(clock, {"a": 0}, busy=1)
    link = wifi.Wifi(sta, [("a", "x")], 1, clock)
    assert link.up() and sta.calls == ["a", "a"]


def check_wifi_up_within():
    clock = Clock()
    sta = Station(clock, {})
    link = wifi.Wifi(sta, [("a", "x")], 1, clock)
    assert not link.up_within(3)
    assert len(sta.calls) == 3 and clock.now >= 3000 + 1000 + 2000


CHECKS = [
    check_number, check_json_line, check_kv_line, check_record, check_binary_packet, check_ack_line,
    check_ringbuf_drops_oldest, check_ringbuf_serializes, check_ringbuf_rejects_garbage,
    check_ringbuf_fits_rtc, check_backlog,
    check_commands_parse, check_commands_refuse, check_commands_recent,
    check_conf_defaults, check_conf_refuses, check_conf_settings,
    check_wifi_order_and_timeouts, check_wifi_backoff, check_wifi_sta_config_error, check_wifi_up_within,
]


def hexlify(data):
    return "".join("%02x" % b for b in data)


def run_all():
    for check in CHECKS:
        check()
        print("ok", check.__name__)
    for name, data in OUT:
        print("out", name, hexlify(data))
