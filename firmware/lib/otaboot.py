# Over-the-air updates, the part that must work whatever else is broken: the
# swap of a verified update into place, and at every boot (boot.py) finishing
# a swap cut short, counting the boots of a new version on trial and rolling
# it back when it has not reached the server in OTA_BOOTS boots.
#
# Files on the board's flash (docs/firmware.md, "Over-the-air updates"):
#   ota_new/...      the new version's files, staged and verified (lib/ota.py)
#   ota_old/...      the files they replace, kept until the server confirms
#   ota_swap.json    the marker, written last: present = the swap must be finished
#   ota_trial.json   the new version is in place but not confirmed yet; its boots
#   ota_result.json  how the last update ended (updated / rolled_back), to report
#   version.txt      the running version (one of the update's files)
#
# Every step below can be cut by a power loss and run again from the start:
# each file is moved only when its source is still there. A version.txt, the
# firmware's own lib/ and main.py are all moved the same way; this module and
# boot.py are never updated over the air (the server refuses them), so the
# way back never depends on what is being tried. Plain MicroPython.

import os

try:
    import ujson as json
except ImportError:
    import json

NEW = "ota_new"
OLD = "ota_old"
SWAP = "ota_swap.json"
TRIAL = "ota_trial.json"
RESULT = "ota_result.json"
VERSION = "version.txt"
MAX_BOOTS = 3


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def makedirs(path):
    # the directories above path (a file name)
    parts = path.split("/")[:-1]
    for i in range(len(parts)):
        d = "/".join(parts[:i + 1])
        if not exists(d):
            os.mkdir(d)


def remove_tree(path):
    if not exists(path):
        return
    for entry in os.listdir(path):
        full = path + "/" + entry
        if os.stat(full)[0] & 0x4000:  # a directory
            remove_tree(full)
        else:
            remove(full)
    try:
        os.rmdir(path)
    except OSError:
        pass


def read_json(path):
    # None when missing or unreadable; a file cut while written leaves the .new one whole
    for name in (path, path + ".new"):
        try:
            with open(name) as f:
                doc = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            return doc
    return None


def write_json(path, doc):
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(json.dumps(doc))
    remove(path)  # FAT cannot rename over a file
    os.rename(tmp, path)


def drop_json(path):
    remove(path)
    remove(path + ".new")


def running_version():
    try:
        with open(VERSION) as f:
            return f.read().strip() or "0"
    except OSError:
        return "0"


def swap(doc):
    # Move every staged file into place, keeping the one it replaces in ota_old/.
    # doc: {"version", "prev", "files": [names], "had": [names that existed], "cmd"}
    had = doc["had"]
    for name in doc["files"]:
        staged = NEW + "/" + name
        if not exists(staged):
            continue  # moved in already
        if name in had:
            backup = OLD + "/" + name
            if exists(name):
                if exists(backup):
                    remove(name)  # the backup is the old one: what is here is half new
                else:
                    makedirs(backup)
                    os.rename(name, backup)
        else:
            remove(name)
        makedirs(name)
        os.rename(staged, name)
    trial = {"version": doc["version"], "prev": doc["prev"], "files": doc["files"], "had": had,
             "cmd": doc["cmd"], "boots": 0}
    write_json(TRIAL, trial)
    drop_json(SWAP)
    remove_tree(NEW)


def rollback(trial, reason):
    # Put the kept files back and drop the ones the update added.
    trial["rollback"] = reason
    write_json(TRIAL, trial)  # a rollback cut short goes on as one
    had = trial["had"]
    for name in trial["files"]:
        if name in had:
            backup = OLD + "/" + name
            if exists(backup):
                remove(name)
                os.rename(backup, name)
        else:
            remove(name)
    write_json(RESULT, {"version": trial["version"], "state": "rolled_back", "cmd": trial["cmd"],
                        "error": "rolled back to %s: %s" % (trial["prev"], reason)})
    drop_json(TRIAL)
    remove_tree(OLD)


def confirm(trial):
    # The server has heard from the new version: it stays.
    write_json(RESULT, {"version": trial["version"], "state": "updated", "cmd": trial["cmd"]})
    drop_json(TRIAL)
    remove_tree(OLD)


def pending_report():
    # (swap command id, error or None, version) the board still has to answer
    # after a reset, or None: a new version on trial answers on every new
    # connection until confirmed; a rollback is told once.
    trial = read_json(TRIAL)
    if trial is not None:
        return trial["cmd"], None, trial["version"]
    result = read_json(RESULT)
    if result is not None and result["state"] == "rolled_back" and not result.get("reported"):
        return result["cmd"], result.get("error"), running_version()
    return None


def rollback_reported():
    result = read_json(RESULT)
    if result is not None and result["state"] == "rolled_back":
        result["reported"] = True
        write_json(RESULT, result)


def boot(max_boots=MAX_BOOTS, log=print):
    # boot.py, at every reset and wake: finish a cut swap, count a trial boot,
    # roll back a version that used up its boots. Never raises.
    try:
        doc = read_json(SWAP)
        if doc is not None:
            log("ota: finishing the swap to %s" % doc["version"])
            swap(doc)
        trial = read_json(TRIAL)
        if trial is None:
            return
        if trial.get("rollback"):
            rollback(trial, trial["rollback"])
        elif trial["boots"] >= max_boots:
            log("ota: %s did not reach the server in %d boots: rolling back" % (trial["version"], max_boots))
            rollback(trial, "did not reach the server in %d boots" % max_boots)
        else:
            trial["boots"] += 1
            write_json(TRIAL, trial)
    except Exception as e:  # a board that boots matters more than this
        log("ota: boot: %r" % (e,))
