# Runs first at every reset: no access point, no vendor debug output on the
# UART. (lib/ is on sys.path on every MicroPython port.)
import hw

hw.boot()
