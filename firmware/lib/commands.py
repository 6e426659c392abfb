# Commands from the server: one JSON object per line on the text connection.
#
#   {"id":"c42","cmd":"interval","value":30}        measure every 30 s
#   {"id":"c45","cmd":"wake","value":900}           battery mode: send every 900 s
#   {"id":"c43","cmd":"relay","pin":5,"on":true}    switch an output pin (OUTPUT_PINS)
#   {"id":"c46","cmd":"led","on":false}             the board's LED (LED_PIN)
#   {"id":"c47","cmd":"read"}                       measure and send now
#   {"id":"c44","cmd":"reboot"}                     acknowledge, then reset
#   {"cmd":"ota",...} and ota_chunk, ota_swap, ota_confirm: an update over the
#   air (lib/ota.py checks them further)
#
# parse() checks a line and returns (id, cmd, arg); a bad line raises
# CommandError, whose ack says why. The board answers every line with
# packet.ack_line(). docs/firmware.md is the reference.

try:
    import ujson as json
except ImportError:
    import json

MAX_SECONDS = 0xFFFF  # the binary header's intervals are u16
OTA_COMMANDS = ("ota", "ota_chunk", "ota_swap", "ota_confirm")


class CommandError(Exception):
    def __init__(self, cmd_id, reason):
        super().__init__(reason)
        self.cmd_id = cmd_id
        self.reason = reason


def parse(line, output_pins=(), led_pin=None):
    if isinstance(line, (bytes, bytearray)):
        try:
            line = line.decode()
        except UnicodeError:
            raise CommandError(None, "not UTF-8")
    try:
        doc = json.loads(line)
    except ValueError:
        raise CommandError(None, "not a JSON object")
    if not isinstance(doc, dict):
        raise CommandError(None, "not a JSON object")
    cmd_id = doc.get("id")
    if cmd_id is not None and not isinstance(cmd_id, (str, int)):
        cmd_id = None
    cmd = doc.get("cmd")
    if cmd in ("interval", "wake"):
        value = doc.get("value")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > MAX_SECONDS:
            raise CommandError(cmd_id, "value must be whole seconds, 1..%d" % MAX_SECONDS)
        return cmd_id, cmd, value
    if cmd == "relay":
        pin = doc.get("pin")
        on = doc.get("on")
        if isinstance(pin, bool) or not isinstance(pin, int):
            raise CommandError(cmd_id, "pin must be a number")
        if pin not in output_pins:
            raise CommandError(cmd_id, "pin %d is not in OUTPUT_PINS" % pin)
        if not isinstance(on, bool):
            raise CommandError(cmd_id, "on must be true or false")
        return cmd_id, cmd, (pin, on)
    if cmd == "led":
        on = doc.get("on")
        if led_pin is None:
            raise CommandError(cmd_id, "no LED_PIN configured")
        if not isinstance(on, bool):
            raise CommandError(cmd_id, "on must be true or false")
        return cmd_id, cmd, on
    if cmd in ("read", "reboot"):
        return cmd_id, cmd, None
    if cmd in OTA_COMMANDS:
        version = doc.get("v")
        if not isinstance(version, str) or not 0 < len(version) <= 32:
            raise CommandError(cmd_id, "v must be a version of 1..32 characters")
        if cmd == "ota_chunk":
            for key in ("f", "o"):
                if isinstance(doc.get(key), bool) or not isinstance(doc.get(key), int) or doc.get(key) < 0:
                    raise CommandError(cmd_id, "%s must be a whole number" % key)
            if not isinstance(doc.get("d"), str):
                raise CommandError(cmd_id, "d must be base64")
        return cmd_id, cmd, doc
    if cmd is None:
        raise CommandError(cmd_id, "no cmd")
    raise CommandError(cmd_id, "unknown command")


class Recent:
    # The ids of the last few commands applied: a command the server sends again
    # (its ack was lost) is acknowledged again but not applied twice.

    def __init__(self, size=8):
        self.size = size
        self.ids = []

    def seen(self, cmd_id):
        return cmd_id is not None and cmd_id in self.ids

    def add(self, cmd_id):
        if cmd_id is None:
            return
        self.ids.append(cmd_id)
        if len(self.ids) > self.size:
            self.ids.pop(0)
