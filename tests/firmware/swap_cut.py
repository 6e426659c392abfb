# A power cut at one step of an update's swap or rollback, then the next boot, under MicroPython's unix
# port; the board's flash is the current directory (test_ota_power_cut.py prepares it):
#   micropython swap_cut.py swap|rollback|boot K      (boot: only the boot)
# The K-th change to the flash (rename, remove, mkdir, rmdir) does not happen: the power goes instead.
# Prints "cut" or "done", then boots (boot.py's otaboot.boot) and prints "booted VERSION".
import os
import sys

PHASE = sys.argv[1]
CUT_AT = int(sys.argv[2])


class PowerCut(BaseException):
    pass


class FlakyFlash:
    # os as the update code sees it, until the power goes
    def __init__(self):
        self.changes = 0

    def _change(self):
        if self.changes == CUT_AT:
            raise PowerCut()
        self.changes += 1

    def rename(self, a, b):
        self._change()
        os.rename(a, b)

    def remove(self, path):
        self._change()
        os.remove(path)

    def mkdir(self, path):
        self._change()
        os.mkdir(path)

    def rmdir(self, path):
        self._change()
        os.rmdir(path)

    def stat(self, path):
        return os.stat(path)

    def listdir(self, path):
        return os.listdir(path)


import otaboot  # noqa: E402
import ota  # noqa: E402

flaky = FlakyFlash()
otaboot.os = flaky
ota.os = flaky
try:
    if PHASE == "boot":
        pass
    elif PHASE == "swap":
        ota.Updater("cut-1", None, log=lambda msg: None).swap("2", "u.cut-1.s")
    else:
        trial = otaboot.read_json(otaboot.TRIAL)
        otaboot.rollback(trial, "did not reach the server in 3 boots")
    print("done")
except PowerCut:
    print("cut")

# the power comes back: a fresh boot
otaboot.os = os
ota.os = os
del sys.modules["otaboot"]
import otaboot  # noqa: E402,F811

otaboot.boot(3, log=lambda msg: None)
print("booted", otaboot.running_version())
