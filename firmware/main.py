# Runs after boot.py: the sensorpipe firmware (lib/app.py).
#
# After a power-on or reset (not a deep-sleep wake) it waits BOOT_GRACE_S
# first, so `mpremote` / Ctrl-C can reach the REPL before a battery board goes
# back to deep sleep. A crash is printed, then the board resets (always on) or
# sleeps until the next reading (battery), rather than stopping for good.
import sys

import hw

try:
    import config
except ImportError:
    config = None

if config is None:
    print("sensorpipe: no config.py: run `sensorpipe firmware deploy`")
else:
    if not hw.woke_from_deepsleep():
        hw.sleep_ms(getattr(config, "BOOT_GRACE_S", 3) * 1000)
    try:
        import app

        app.main(config)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if hasattr(sys, "print_exception"):
            sys.print_exception(e)
        else:
            print("sensorpipe: %r" % (e,))
        if getattr(config, "BATTERY", False):
            hw.deepsleep(getattr(config, "MEASURE_S", 60) * 1000)
        hw.sleep_ms(int(getattr(config, "CRASH_WAIT_S", 10) * 1000))
        hw.reset()
