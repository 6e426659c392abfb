# The one module that touches the board: machine, network, dht, esp, the
# clock, RTC memory and deep sleep. Everything else gets the hardware through
# here, so it runs on CPython and the unix port with stand-in modules.

import gc
import sys
import time

try:
    import machine
except ImportError:
    machine = None
try:
    import network
except ImportError:
    network = None

PLATFORM = sys.platform
# bytes of RTC memory MicroPython gives to user data
RTC_BYTES = 492 if PLATFORM == "esp8266" else 2048
# the embedded ports count time from 2000-01-01
EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0
CLOCK_VALID_AFTER = 1600000000  # a clock before 2020 was never set

if hasattr(time, "ticks_ms"):
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
    sleep_ms = time.sleep_ms
else:  # CPython
    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

    def sleep_ms(ms):
        time.sleep(ms / 1000)

_sta = None
_dht = None


def boot():
    # boot.py: no access point, no vendor debug output on the UART.
    if network is not None and hasattr(network, "AP_IF"):
        try:
            network.WLAN(network.AP_IF).active(False)
        except OSError:
            pass
    try:
        import esp
        esp.osdebug(None)
    except (ImportError, AttributeError):
        pass


def unix_time():
    # Seconds since 1970, or None while the clock has not been set (no NTP yet).
    t = int(time.time()) + EPOCH_OFFSET
    return t if t > CLOCK_VALID_AFTER else None


def unix_time_ms():
    # Milliseconds since 1970, or None while the clock has not been set.
    if hasattr(time, "time_ns"):
        t = time.time_ns() // 1000000 + EPOCH_OFFSET * 1000
    else:
        t = (int(time.time()) + EPOCH_OFFSET) * 1000
    return t if t > CLOCK_VALID_AFTER * 1000 else None


def ntp_sync(host):
    try:
        import ntptime
        ntptime.host = host
        ntptime.settime()
        return True
    except Exception:  # no ntptime, no answer, bad reply: the clock stays unset
        return False


def sta():
    # The Wi-Fi station interface, or None on a board without Wi-Fi.
    global _sta
    if _sta is None and network is not None and hasattr(network, "WLAN"):
        _sta = network.WLAN(network.STA_IF)
    return _sta


def rssi():
    s = sta()
    if s is None:
        return None
    try:
        return s.status("rssi") if s.isconnected() else None
    except (OSError, ValueError, TypeError):
        return None


def mem_free():
    gc.collect()
    return gc.mem_free() if hasattr(gc, "mem_free") else None


def dht_read(kind, pin):
    # (temperature C, humidity %); OSError when the sensor does not answer.
    global _dht
    if _dht is None:
        import dht
        cls = dht.DHT11 if kind == 11 else dht.DHT22
        _dht = cls(machine.Pin(pin))
    _dht.measure()
    return _dht.temperature(), _dht.humidity()


def adc_read(pin):
    # Raw count: 0..1023 on an ESP8266 (channel 0 = A0), 0..4095 on an ESP32.
    if PLATFORM == "esp8266":
        return machine.ADC(pin).read()
    adc = machine.ADC(machine.Pin(pin))
    if hasattr(adc, "atten") and hasattr(machine.ADC, "ATTN_11DB"):
        adc.atten(machine.ADC.ATTN_11DB)  # full 0..3.3 V range
    return adc.read()


def vbat_read(source, scale):
    # Battery or supply voltage in volts; None when this board cannot read it.
    if source == "vcc":
        if PLATFORM != "esp8266":
            return None
        return machine.ADC(1).read() / 1024  # vdd33 in 1/1024 V
    return adc_read(source) * scale


def pin_write(pin, on):
    machine.Pin(pin, machine.Pin.OUT).value(1 if on else 0)


def rtc_load():
    try:
        return bytes(machine.RTC().memory())
    except (AttributeError, OSError):
        return b""


def rtc_save(blob):
    machine.RTC().memory(blob)


def woke_from_deepsleep():
    return machine is not None and hasattr(machine, "DEEPSLEEP_RESET") and \
        machine.reset_cause() == machine.DEEPSLEEP_RESET


def deepsleep(ms):
    # ESP8266: GPIO16 must be wired to RST for the board to wake.
    machine.deepsleep(ms)


def reset():
    machine.reset()


def unique_id():
    try:
        raw = machine.unique_id()
    except AttributeError:
        return None
    return ":".join("%02x" % b for b in raw)
