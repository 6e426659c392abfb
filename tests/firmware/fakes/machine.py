# Stand-in for MicroPython's machine module (ESP8266/ESP32 subset the firmware uses).
import fakeboard

PWRON_RESET = fakeboard.PWRON_RESET
SOFT_RESET = fakeboard.SOFT_RESET
DEEPSLEEP_RESET = fakeboard.DEEPSLEEP_RESET


class Pin:
    IN = 0
    OUT = 1

    def __init__(self, id, mode=-1, pull=-1):
        self.id = id

    def value(self, v=None):
        if v is None:
            return fakeboard.pins.get(self.id, 0)
        fakeboard.pins[self.id] = v
        fakeboard.events.append(("pin", self.id, v))


class ADC:
    ATTN_11DB = 3

    def __init__(self, source):
        self.id = source.id if isinstance(source, Pin) else source

    def atten(self, value):
        pass

    def read(self):
        value = fakeboard.adc.get(self.id)
        if value is None:
            raise OSError(5)
        return value


class RTC:
    def memory(self, data=None):
        if data is None:
            return fakeboard.rtc
        if len(data) > fakeboard.rtc_limit:
            raise ValueError("buffer too long")
        fakeboard.rtc = bytes(data)


def deepsleep(ms=0):
    fakeboard.deepsleeps.append(ms)
    fakeboard.reset_cause = DEEPSLEEP_RESET
    raise fakeboard.DeepSleep(ms)


def reset():
    fakeboard.resets += 1
    fakeboard.reset_cause = SOFT_RESET
    raise fakeboard.Reset()


def reset_cause():
    return fakeboard.reset_cause


def unique_id():
    return b"\x5c\xcf\x7f\xa1\xb2\xc3"
