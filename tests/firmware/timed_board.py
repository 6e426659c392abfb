# The firmware's main loop under MicroPython's unix port, printing when things happen, for the tests
# that check a command takes effect the moment it is applied (test_command_timing.py):
#   micropython timed_board.py always-on|battery HOST TEXT_PORT BINARY_PORT
# Prints "reading MS", "applied CMD MS", "sent MS" (a battery packet), "slept MS" and "reset MS",
# MS being Unix epoch milliseconds. always-on runs until a reboot command or 30 s; battery runs one
# wake per line read from stdin (the test decides when the board wakes) until stdin closes.
import sys
import time

import fakeboard

MODE = sys.argv[1]


def now():
    return time.time_ns() // 1000000


class Config:
    DEVICE_ID = "timed-1"
    SERVER_HOST = sys.argv[2]
    TEXT_PORT = int(sys.argv[3])
    BINARY_PORT = int(sys.argv[4])
    WIFI = [("home", "secret")]
    DHT_RETRY_MS = 0
    MEASURE_S = 3
    OUTPUT_PINS = (5,)
    LED_PIN = 2
    CMD_WAIT_MS = 300


def firmware():
    app = fakeboard.reset()

    class TimedApp(app.App):
        def measure(self):
            print("reading", now())
            return app.App.measure(self)

        def apply(self, cmd, arg):
            error = app.App.apply(self, cmd, arg)
            print("applied", cmd, now())
            return error

        def send_buffer(self, buf):
            had = buf is not None and len(buf)
            app.App.send_buffer(self, buf)
            if had:
                print("sent", now())

    return TimedApp


if MODE == "always-on":
    board = firmware()(Config)
    deadline = now() + 30000

    class Stop(BaseException):
        pass

    def measure_until_deadline(measure=board.measure):
        if now() > deadline:
            raise Stop()
        return measure()

    board.measure = measure_until_deadline
    try:
        board.run()
    except fakeboard.Reset:
        print("reset", now())
    except Stop:
        print("timeout", now())
    board.close()
elif MODE == "battery":
    Config.TRANSPORT = "binary"
    Config.BATTERY = True
    Config.DEVICE_NUMBER = 7
    Config.MEASURE_S = 60
    Config.WAKE_S = 120
    while sys.stdin.readline():
        try:
            firmware()(Config).wake()
        except fakeboard.DeepSleep as sleep:
            print("slept", sleep.ms)
        except fakeboard.Reset:
            print("reset", now())
        print("asleep")
