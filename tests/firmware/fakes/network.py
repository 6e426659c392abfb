# Stand-in for MicroPython's network module: a station that connects to the
# networks in fakeboard.networks after a few polls, and raises "Cannot set STA
# config" on connect() while inactive, as an ESP8266 does.
import fakeboard

STA_IF = 0
AP_IF = 1


class _WLAN:
    def __init__(self, interface):
        self.interface = interface
        self._active = False
        self._ssid = None
        self._polls = 0

    def active(self, value=None):
        if value is None:
            return self._active
        self._active = bool(value)
        if not value:
            self._ssid = None

    def connect(self, ssid, password):
        fakeboard.events.append(("connect", ssid))
        if not self._active:
            raise OSError("Cannot set STA config")
        if fakeboard.spurious_connect_errors > 0:
            fakeboard.spurious_connect_errors -= 1
            raise OSError("Cannot set STA config")
        self._ssid = None
        if fakeboard.networks.get(ssid) == password:
            self._ssid = ssid
            self._polls = fakeboard.connect_polls

    def disconnect(self):
        self._ssid = None

    def isconnected(self):
        if not (self._active and self._ssid and fakeboard.wifi_up):
            return False
        if self._polls > 0:
            self._polls -= 1
            return False
        return True

    def status(self, what=None):
        if what == "rssi":
            return fakeboard.rssi
        return 1010 if self.isconnected() else 1000


_interfaces = {}


def WLAN(interface=STA_IF):
    if interface not in _interfaces:
        _interfaces[interface] = _WLAN(interface)
    return _interfaces[interface]
