# The firmware with a DEVICE_TOKEN under MicroPython's unix port, against a pipeline whose listeners
# require credentials (the hello on the text port, the MAC on binary packets):
#   micropython auth_board.py json|battery HOST TEXT_PORT BINARY_PORT DEVICE TOKEN
import sys

import fakeboard

MODE = sys.argv[1]


class Config:
    DEVICE_ID = sys.argv[5]
    DEVICE_TOKEN = sys.argv[6]
    SERVER_HOST = sys.argv[2]
    TEXT_PORT = int(sys.argv[3])
    BINARY_PORT = int(sys.argv[4])
    WIFI = [("home", "secret")]
    DHT_RETRY_MS = 0
    MEASURE_S = 0.2
    CMD_WAIT_MS = 200


def firmware():
    return fakeboard.reset()



def battery_board():
    # Device number 7, a measurement a minute, awake every two minutes.
    Config.TRANSPORT = "binary"
    Config.BATTERY = True
    Config.DEVICE_NUMBER = 7
    Config.MEASURE_S = 60
    Config.WAKE_S = 120


if MODE == "json":
    fakeboard.dht = [(20.0 + i / 10, 50.0 + i) for i in range(3)]
    board = firmware().App(Config)
    board.run(3)
    board.close()
    print("json", len(board.backlog))
elif MODE == "battery":
    battery_board()
    fakeboard.dht = [(10.0 + i / 10, 60.0) for i in range(3)]
    for _ in range(3):  # sends at wakes 1 and 3
        try:
            firmware().main(Config)
        except fakeboard.DeepSleep as sleep:
            print("slept", sleep.ms)
    with open("auth_counter") as f:
        print("counter", f.read())
elif MODE == "resend":
    # BINARY_PORT is a proxy that drops the A of the first packet (the server journaled it): the
    # packet stays on flash and goes again, byte for byte, before the next one is sealed.
    battery_board()
    Config.ACK_TIMEOUT_S = 2
    fakeboard.dht = [(30.0 + i / 10, 60.0) for i in range(3)]
    for wake in range(3):  # sends at wakes 1 (A lost) and 3 (the kept packet again, then a new one)
        try:
            firmware().main(Config)
        except fakeboard.DeepSleep:
            pass
        try:
            with open("auth_pending", "rb") as f:
                print("wake", wake + 1, "pending", len(f.read()))
        except OSError:
            print("wake", wake + 1, "pending none")
    with open("auth_counter") as f:
        print("counter", f.read())
