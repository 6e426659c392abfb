# Runs first at every reset and deep-sleep wake: finish or undo an update over
# the air (lib/otaboot.py, never itself updated over the air), then no access
# point and no vendor debug output on the UART. (lib/ is on sys.path on every
# MicroPython port.)
import otaboot

try:
    import config

    _boots = getattr(config, "OTA_BOOTS", otaboot.MAX_BOOTS)
except Exception:  # no config.py yet, or a broken one: main.py says so
    _boots = otaboot.MAX_BOOTS
otaboot.boot(_boots)

import hw

hw.boot()
