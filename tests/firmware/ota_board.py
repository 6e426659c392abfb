# A board's life under MicroPython's unix port: its flash is the current directory (boot.py, main.py,
# lib/, config.py, version.txt), and every power-on or reset runs boot.py then main.py with every
# module imported anew, as a real board does. For the update tests (test_ota.py):
#   micropython ota_board.py [MAX_BOOTS]
# Prints "boot N VERSION" at each boot (after boot.py), "reset", "slept MS" (battery), and stops at MAX_BOOTS or when
# the test creates POWER_OFF in the directory (checked at every reading).
import os
import sys

import fakeboard

MAX_BOOTS = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
KEEP = ("fakeboard", "ota_board")


def version():
    try:
        with open("version.txt") as f:
            return f.read().strip()
    except OSError:
        return "0"


def purge():
    for name in list(sys.modules):
        if name not in KEEP and name not in ("sys", "os", "builtins", "micropython", "gc", "time"):
            del sys.modules[name]


try:
    os.stat("DHT_SEQUENCE")  # every reading a new value: the test sees any that went missing
    fakeboard.dht = [(i / 10, 50.0) for i in range(3000)]
    _next_dht = fakeboard.next_dht

    def counted_dht():
        value = _next_dht()
        print("dht", value[0])
        return value

    fakeboard.next_dht = counted_dht
except OSError:
    pass

boots = 0
while boots < MAX_BOOTS:
    boots += 1
    purge()
    try:
        exec(open("boot.py").read(), {"__name__": "__main__"})
        print("boot", boots, version())      # what boot.py left in place
        exec(open("main.py").read(), {"__name__": "__main__"})
        print("main returned")
        break
    except fakeboard.Reset:
        print("reset")
    except fakeboard.DeepSleep as sleep:
        print("slept", sleep.ms)
    except fakeboard.PowerOff:
        print("power off")
        break
