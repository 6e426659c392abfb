# The firmware's main loop under MicroPython's unix port, with the stand-in machine/network/dht
# modules (tests/firmware/fakes on MICROPYPATH), sending to a real server:
#   micropython unix_board.py json|battery HOST TEXT_PORT BINARY_PORT
# Prints one line per reading taken ("json N") or per wake ("slept MS").
import sys

import fakeboard

MODE = sys.argv[1]


class Config:
    DEVICE_ID = "unix-1"
    SERVER_HOST = sys.argv[2]
    TEXT_PORT = int(sys.argv[3])
    BINARY_PORT = int(sys.argv[4])
    WIFI = [("office", "nope", 0.2), ("home", "secret")]
    DHT_RETRY_MS = 0
    MEASURE_S = 0.2
    CMD_WAIT_MS = 200


def firmware():
    return fakeboard.reset()


if MODE == "json":
    fakeboard.dht = [(20.0 + i / 10, 50.0 + i) for i in range(5)]
    board = firmware().App(Config)
    board.run(5)
    board.close()
    print("json", len(board.backlog))
elif MODE == "battery":
    Config.DEVICE_ID = "plot-7"
    Config.TRANSPORT = "binary"
    Config.BATTERY = True
    Config.DEVICE_NUMBER = 7
    Config.MEASURE_S = 60
    Config.WAKE_S = 120
    fakeboard.dht = [(10.0 + i / 10, 60.0) for i in range(5)]
    for _ in range(5):  # sends at wakes 1, 3 and 5
        try:
            firmware().main(Config)
        except fakeboard.DeepSleep as sleep:
            print("slept", sleep.ms)
