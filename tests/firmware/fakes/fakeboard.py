# The state behind the stand-in machine, network and dht modules: what the
# sensors will read, which Wi-Fi networks answer, RTC memory, pins, and the
# deep sleeps and resets the firmware asked for. Tests set and read it.
# Runs on CPython and on MicroPython's unix port.


class DeepSleep(BaseException):
    # machine.deepsleep(): the board's RAM is gone; the test runs main again.
    def __init__(self, ms):
        super().__init__(ms)
        self.ms = ms


class Reset(BaseException):
    pass


class PowerOff(BaseException):
    # the test took the power away (a file POWER_OFF in the board's directory)
    pass


def power_check():
    try:
        import os
        os.stat("POWER_OFF")
    except OSError:
        return
    raise PowerOff()


PWRON_RESET = 0
DEEPSLEEP_RESET = 5
SOFT_RESET = 4


def clear():
    global dht, adc, rtc, rtc_limit, pins, networks, wifi_up, connect_polls
    global spurious_connect_errors, rssi, reset_cause, deepsleeps, resets, events
    dht = [(21.5, 45.0)]  # (temp, humi) per read, None = no answer; the last one repeats
    adc = {0: 512}  # channel/pin -> count; None = OSError
    rtc = b""
    rtc_limit = 2048
    pins = {}
    networks = {"home": "secret"}  # ssid -> password of the networks in range
    wifi_up = True
    connect_polls = 2  # isconnected() calls before a connect succeeds
    spurious_connect_errors = 0  # connect() calls that fail although active
    rssi = -61
    reset_cause = PWRON_RESET
    deepsleeps = []
    resets = 0
    events = []


def next_dht():
    power_check()
    if len(dht) > 1:
        return dht.pop(0)
    return dht[0]



# The firmware's modules and the stand-ins for the board's own: dropped by reset()
FIRMWARE = ("app", "commands", "conf", "devauth", "hw", "link", "ota", "otaboot", "packet", "ringbuf", "wifi",
            "machine", "network", "dht")


def reset():
    # As after a reset: RAM is gone (every firmware module imported afresh), only this module (the
    # hardware) keeps its state. Returns the firmware's app module.
    import sys
    for name in FIRMWARE:
        if name in sys.modules:
            del sys.modules[name]
    return __import__("app")


clear()
