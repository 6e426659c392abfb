# Wi-Fi station: a list of networks tried in order, each with its own timeout;
# a round that connects to none is retried after a backoff (1 s, 2 s, 4 s ...
# up to BACKOFF_MAX_MS), without blocking the caller in between.
#
# `sta` is a network.WLAN(STA_IF) (or None when the board has no Wi-Fi, as on
# the unix port: then the link is taken to be up); `clock` gives ticks_ms,
# ticks_diff and sleep_ms (the hw module), so this runs anywhere.

BACKOFF_FIRST_MS = 1000
BACKOFF_MAX_MS = 300000
POLL_MS = 100


class Backoff:
    def __init__(self, clock, first_ms=BACKOFF_FIRST_MS, max_ms=BACKOFF_MAX_MS):
        self.clock = clock
        self.first_ms = first_ms
        self.max_ms = max_ms
        self.delay_ms = 0
        self.not_before = None

    def ready(self):
        return self.not_before is None or self.clock.ticks_diff(self.not_before, self.clock.ticks_ms()) <= 0

    def failed(self):
        self.delay_ms = self.first_ms if self.delay_ms == 0 else min(self.delay_ms * 2, self.max_ms)
        self.not_before = self.clock.ticks_add(self.clock.ticks_ms(), self.delay_ms)

    def succeeded(self):
        self.delay_ms = 0
        self.not_before = None

    def wait(self):
        # Sleep until ready (for callers with nothing else to do).
        if self.not_before is not None:
            left = self.clock.ticks_diff(self.not_before, self.clock.ticks_ms())
            if left > 0:
                self.clock.sleep_ms(left)


class Wifi:
    def __init__(self, sta, networks, timeout_s, clock, log=None):
        self.sta = sta
        self.networks = networks
        self.timeout_ms = int(timeout_s * 1000)
        self.clock = clock
        self.backoff = Backoff(clock)
        self.log = log or _no_log
        self.ssid = None

    def isconnected(self):
        return self.sta is None or self.sta.isconnected()

    def up(self):
        # True when connected; else, unless backing off, one round over the networks.
        if self.isconnected():
            self.backoff.succeeded()
            return True
        if not self.backoff.ready():
            return False
        if self.connect_round():
            self.backoff.succeeded()
            return True
        self.backoff.failed()
        self.log("wifi: no network answered; next round in %d ms" % self.backoff.delay_ms)
        return False

    def up_within(self, rounds):
        # Up to `rounds` rounds, sleeping through the backoff between them
        # (battery mode: then give up until the next wake).
        for i in range(rounds):
            if i:
                self.backoff.wait()
            if self.up():
                return True
        return False

    def connect_round(self):
        if not self.networks:
            return False
        # Activating first avoids "OSError: Cannot set STA config", which an
        # inactive interface raises on connect().
        self.sta.active(True)
        for net in self.networks:
            ssid, password = net[0], net[1]
            timeout_ms = int(net[2] * 1000) if len(net) > 2 else self.timeout_ms
            if self._try(ssid, password, timeout_ms):
                self.ssid = ssid
                self.log("wifi: connected to %s" % ssid)
                return True
            self.log("wifi: %s did not connect within %d ms" % (ssid, timeout_ms))
        return False

    def _try(self, ssid, password, timeout_ms):
        try:
            self.sta.connect(ssid, password)
        except OSError as e:
            # Still busy with an earlier attempt, or not active yet: reset the
            # station state once and try again.
            self.log("wifi: connect(%s) said %r; retrying once" % (ssid, e))
            self.sta.active(True)
            try:
                self.sta.disconnect()
            except OSError:
                pass
            self.clock.sleep_ms(POLL_MS)
            try:
                self.sta.connect(ssid, password)
            except OSError:
                return False
        start = self.clock.ticks_ms()
        while self.clock.ticks_diff(self.clock.ticks_ms(), start) < timeout_ms:
            if self.sta.isconnected():
                return True
            self.clock.sleep_ms(POLL_MS)
        if self.sta.isconnected():
            return True
        try:
            self.sta.disconnect()
        except OSError:
            pass
        return False


def _no_log(msg):
    pass
