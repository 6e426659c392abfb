# The firmware with TLS_CA set under MicroPython's unix port, against a pipeline whose text listener
# speaks only TLS and requires credentials:
#   micropython tls_board.py live|refused HOST TEXT_PORT BINARY_PORT DEVICE TOKEN CA_DER
# live: measures every 0.2 s and prints "reading" and "applied CMD" lines until killed (at most 60 s).
# refused: three readings against a server its certificate does not trust; prints "backlog N".
import sys

import fakeboard

# ssl is a frozen module of the unix port; MICROPYPATH (set by the tests) leaves ".frozen" off the path
if ".frozen" not in sys.path:
    sys.path.append(".frozen")

MODE = sys.argv[1]


class Config:
    DEVICE_ID = sys.argv[5]
    DEVICE_TOKEN = sys.argv[6]
    TLS_CA = sys.argv[7]
    SERVER_HOST = sys.argv[2]
    TEXT_PORT = int(sys.argv[3])
    BINARY_PORT = int(sys.argv[4])
    WIFI = [("home", "secret")]
    DHT_RETRY_MS = 0
    MEASURE_S = 0.2
    CMD_WAIT_MS = 200


def firmware():
    app = fakeboard.reset()

    class PrintingApp(app.App):
        def measure(self):
            print("reading")
            return app.App.measure(self)

        def apply(self, cmd, arg):
            error = app.App.apply(self, cmd, arg)
            print("applied", cmd)
            return error

    return PrintingApp


fakeboard.dht = [(20.0 + i / 10, 50.0) for i in range(300)]
board = firmware()(Config)
if MODE == "live":
    board.run(300)
else:
    board.run(3)
    print("backlog", len(board.backlog))
board.close()
