# Stand-in for MicroPython's dht module: readings come from fakeboard.dht.
import fakeboard


class _DHT:
    def __init__(self, pin):
        self.pin = pin
        self._t = None
        self._h = None

    def measure(self):
        value = fakeboard.next_dht()
        if value is None:
            raise OSError(110)  # ETIMEDOUT, what a silent DHT gives
        self._t, self._h = value

    def temperature(self):
        return self._t

    def humidity(self):
        return self._h


class DHT11(_DHT):
    pass


class DHT22(_DHT):
    pass
