"""``sensorpipe firmware``: put the sensorpipe firmware on a board, open its REPL (both with mpremote).

    sensorpipe firmware deploy --port /dev/ttyUSB0 --device-id greenhouse-1 --server 192.168.1.10:7000 \\
        --wifi home:secret [--wifi office:pass2 ...] [--transport json|kv|binary] [--battery] [--dry-run]
    sensorpipe firmware console --port /dev/ttyUSB0
    sensorpipe firmware push --version 1.4 (--device ID [--device ID2 ...] | --percent 10) [--wait S]
    sensorpipe firmware status [DEVICE]

``deploy`` writes the board's config.py from firmware/config_example.py (the values given replace the
example's, everything else keeps its documented default), checks it with the firmware's own
lib/conf.py, stages the files in one directory and runs one mpremote command::

    python -m mpremote connect PORT fs cp -r STAGE/lib : + fs cp STAGE/boot.py :boot.py \\
        + fs cp STAGE/main.py :main.py + fs cp STAGE/config.py :config.py + reset

``--dry-run`` stages the files and prints that command instead of running it. ``--tls-ca FILE`` (the
CA of ``sensorpipe certs init``, or a self-signed server certificate; PEM or DER) is staged as
``ca.der`` (MicroPython's ssl reads DER) and copied too, and config.py gets ``TLS_CA = "ca.der"``. ``deploy`` also writes
the board's ``DEVICE_KEY`` (made and kept in the server's data dir, workers/core/devicekeys.py), which
authenticates updates over the air.

``push`` sends the firmware files (main.py, lib/*.py) as a new version over the connection each board
already uses, through the commands worker (workers/core/updates.py); ``status`` shows each board's
version and update state. Every failure is one line ``sensorpipe: <message>`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import ast
import json
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from workers.core import paths
from typing import Any, Callable

FIRMWARE_DIR = paths.firmware_dir()
CONFIG_TEMPLATE = "config_example.py"
BOARD_FILES = ("boot.py", "main.py")
EXIT_ERROR = 2
_SETTING = re.compile(r"^(?P<key>[A-Z][A-Z0-9_]*) = (?P<value>.*?)(?P<comment>\s+# .*)?$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
DEEP_SLEEP_HINT = ("a board in deep sleep does not answer: press its reset button, then run this again "
                   "within its BOOT_GRACE_S (3 s)")


class FirmwareError(Exception):
    """Printed as ``sensorpipe: <message>``; exit status 2."""


# --------------------------------------------------------------------------- config.py


def board_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config.py values the command line gives, by key."""
    host, sep, port = args.server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FirmwareError(f"--server: expected HOST:PORT (the text port, 7000 by default), got {args.server!r}")
    values: dict[str, Any] = {"DEVICE_ID": args.device_id, "SERVER_HOST": host, "TEXT_PORT": int(port)}
    # no --wifi: the board keeps to the network it already knows (an ESP reconnects to it by itself)
    values["WIFI"] = [_wifi(text) for text in args.wifi or ()]
    if args.token:          # the board says hello with it and signs its binary packets (docs/security.md)
        values["DEVICE_TOKEN"] = args.token
    if args.battery:
        if args.transport not in (None, "binary"):
            raise FirmwareError("--battery sends binary packets: leave out --transport or give --transport binary")
        values["BATTERY"] = True
        values["TRANSPORT"] = "binary"
    elif args.transport:
        values["TRANSPORT"] = args.transport
    for option, key in (("binary_port", "BINARY_PORT"), ("device_number", "DEVICE_NUMBER"),
                        ("measure_interval", "MEASURE_S"), ("wake_interval", "WAKE_S")):
        if getattr(args, option) is not None:
            values[key] = getattr(args, option)
    for item in args.set or ():
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise FirmwareError(f"--set: expected KEY=VALUE with an upper-case key, got {item!r}")
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text          # a bare word is a string: --set NTP_HOST=pool.ntp.org
    return values


def _wifi(text: str) -> tuple[str, str]:
    ssid, _, password = text.partition(":")
    if not ssid:
        raise FirmwareError(f"--wifi: expected SSID:PASSWORD, got {text!r}")
    return (ssid, password)


def render_config(template: str, values: dict[str, Any]) -> str:
    """The template with the given values in place of its examples (comments kept)."""
    lines = []
    seen = set()
    for line in template.splitlines():
        match = _SETTING.match(line)
        if match and match["key"] in values:
            key = match["key"]
            seen.add(key)
            line = f"{key} = {values[key]!r}{match['comment'] or ''}"
        lines.append(line)
    unknown = sorted(set(values) - seen)
    if unknown:
        raise FirmwareError(f"unknown setting {unknown[0]} (the settings are listed in firmware/{CONFIG_TEMPLATE})")
    return "\n".join(lines) + "\n"


def check_config(text: str, firmware: Path) -> None:
    """Check config.py with the firmware's own lib/conf.py, as the board will at boot."""
    spec = importlib.util.spec_from_file_location("_sensorpipe_firmware_conf", firmware / "lib" / "conf.py")
    if spec is None or spec.loader is None:
        raise FirmwareError(f"no firmware at {firmware} (lib/conf.py is missing)")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    namespace: dict[str, Any] = {}
    exec(compile(text, "config.py", "exec"), namespace)  # noqa: S102 - our own rendering of literals
    try:
        conf.build(types.SimpleNamespace(**namespace))
    except ValueError as exc:
        raise FirmwareError(str(exc)) from None


# --------------------------------------------------------------------------- staging and mpremote


def default_stage(device_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"sensorpipe-firmware-{_SAFE_NAME.sub('_', device_id)}"


def stage_files(firmware: Path, stage: Path, config_text: str) -> None:
    """stage/ = boot.py, main.py, config.py and lib/*.py, exactly what goes on the board."""
    lib = stage / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    modules = sorted(p for p in (firmware / "lib").glob("*.py"))
    if not modules:
        raise FirmwareError(f"no firmware modules in {firmware / 'lib'}")
    wanted = {p.name for p in modules}
    for old in lib.glob("*.py"):
        if old.name not in wanted:
            old.unlink()
    for path in modules:
        shutil.copyfile(path, lib / path.name)
    for name in BOARD_FILES:
        shutil.copyfile(firmware / name, stage / name)
    (stage / "config.py").write_text(config_text)


def mpremote(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpremote", *args]


TLS_CA_FILE = "ca.der"


def stage_tls_ca(source: str | None, stage: Path) -> bool:
    """Stage the certificate the board trusts the server by as DER (True), or remove one left by an
    earlier deploy into the same stage (False)."""
    target = stage / TLS_CA_FILE
    if not source:
        target.unlink(missing_ok=True)
        return False
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise FirmwareError(f"--tls-ca: {exc.strerror}: {source}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        import ssl

        try:
            data = ssl.PEM_cert_to_DER_cert(data.decode("ascii", "replace"))
        except ValueError:
            raise FirmwareError(f"--tls-ca: {source} is not a PEM certificate") from None
    elif not data.startswith(b"\x30"):                  # DER: an ASN.1 SEQUENCE
        raise FirmwareError(f"--tls-ca: {source} is neither a PEM nor a DER certificate")
    target.write_bytes(data)
    return True


def deploy_command(port: str, stage: Path) -> list[str]:
    tls = ["+", "fs", "cp", str(stage / TLS_CA_FILE), f":{TLS_CA_FILE}"] if (stage / TLS_CA_FILE).exists() else []
    return mpremote("connect", port,
                    "fs", "cp", "-r", str(stage / "lib"), ":",
                    "+", "fs", "cp", str(stage / "boot.py"), ":boot.py",
                    "+", "fs", "cp", str(stage / "main.py"), ":main.py",
                    "+", "fs", "cp", str(stage / "config.py"), ":config.py",
                    *tls,
                    "+", "reset")


def console_command(port: str) -> list[str]:
    return mpremote("connect", port, "repl")


def check_board(port: str) -> None:
    if importlib.util.find_spec("mpremote") is None:
        raise FirmwareError(f"mpremote is not installed for {sys.executable}: pip install mpremote")
    path = port[len("port:"):] if port.startswith("port:") else port
    if "/" in path and not os.path.exists(path):
        raise FirmwareError(f"no board at {path}: is it plugged in? (`mpremote devs` lists the serial ports)")


def run_mpremote(command: list[str], port: str, interactive: bool = False) -> None:
    # stdout (progress, the REPL) goes to the terminal; stderr is read for the one-line error.
    try:
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False,
                                stdin=None if interactive else subprocess.DEVNULL)
    except OSError as exc:
        raise FirmwareError(f"could not run mpremote: {exc}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        reason = reason.removeprefix("mpremote: ")
        hint = f"; {DEEP_SLEEP_HINT}" if "raw repl" in reason.lower() else ""
        raise FirmwareError(f"mpremote failed on {port}: {reason}{hint}")


# --------------------------------------------------------------------------- commands


def _server_config(args: argparse.Namespace) -> Any:
    from workers.core import config as config_mod

    from workers.core import curve, runtime

    try:
        cfg = config_mod.load(getattr(args, "config", None))
    except config_mod.ConfigError as exc:
        raise FirmwareError(f"configuration: {exc}") from None
    try:
        runtime.use_pipeline_secret(cfg.data_dir)       # the commands worker takes only its holders
        # beyond loopback, its CURVE keys (load() checked they are there)
        runtime.use_curve(curve.for_config(cfg, config_mod.internal_endpoints(cfg).values()))
    except (OSError, curve.CurveKeyError) as exc:
        raise FirmwareError(f"cannot read the pipeline's credentials ({exc})") from None
    return cfg


def device_key(args: argparse.Namespace) -> str | None:
    """The board's DEVICE_KEY: --key, else none with --token (the board derives its update key from
    the token, and the server's old key for it is dropped), else the server's (made on first deploy;
    a dry run makes none)."""
    from workers.core import devicekeys

    if args.key:
        if not re.fullmatch(r"[0-9a-f]{64}", args.key):
            raise FirmwareError("--key: 64 lower-case hex digits")
        return args.key
    data_dir = _server_config(args).data_path
    if args.token:
        if not args.dry_run:
            try:
                devicekeys.forget(data_dir, args.device_id)
            except (devicekeys.DeviceKeyError, OSError) as exc:
                raise FirmwareError(f"device key: {exc}") from None
        return None
    try:
        if args.dry_run:
            return devicekeys.key_for(data_dir, args.device_id)
        return devicekeys.ensure_key(data_dir, args.device_id)
    except (devicekeys.DeviceKeyError, OSError) as exc:
        raise FirmwareError(f"device key: {exc}") from None


def cmd_deploy(args: argparse.Namespace) -> int:
    """Write the board's config.py, copy the firmware with mpremote, reset the board."""
    firmware = Path(args.firmware_dir)
    try:
        template = (firmware / CONFIG_TEMPLATE).read_text()
    except OSError as exc:
        raise FirmwareError(f"no firmware at {firmware}: {exc.strerror}") from None
    settings = board_settings(args)
    if not args.dry_run:
        check_board(args.port)      # before a key is made for a board that is not there
    key = device_key(args)
    if key is not None:
        settings["DEVICE_KEY"] = key
    if args.tls_ca:
        settings["TLS_CA"] = TLS_CA_FILE
    config_text = render_config(template, settings)
    check_config(config_text, firmware)
    stage = Path(args.stage) if args.stage else default_stage(args.device_id)
    stage_files(firmware, stage, config_text)
    stage_tls_ca(args.tls_ca, stage)
    command = deploy_command(args.port, stage)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(f"sensorpipe: deploying {args.device_id} to {args.port} (files staged in {stage})", flush=True)
    run_mpremote(command, args.port)
    print(f"sensorpipe: {args.device_id} deployed; `sensorpipe firmware console --port {args.port}` shows its log")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Open the board's REPL (Ctrl-] leaves it)."""
    command = console_command(args.port)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    check_board(args.port)
    run_mpremote(command, args.port, interactive=True)
    return 0


def _commands_worker(args: argparse.Namespace, message: dict, timeout: float = 5.0) -> dict:
    from workers.processes.commands import request
    from workers.processes.query import QueryError

    cfg = _server_config(args)
    try:
        reply = request(cfg.endpoints.command, message, timeout_s=timeout)
    except QueryError as exc:
        raise FirmwareError(str(exc)) from None
    if not reply.get("ok") and "error" in reply and "started" not in reply:
        raise FirmwareError(reply["error"])
    return reply


def cmd_push(args: argparse.Namespace) -> int:
    """Send a new firmware version over the air to devices, or to a percentage of the fleet first."""
    from workers.core import updates

    cfg = _server_config(args)
    try:
        manifest = updates.write_bundle(cfg.data_path, args.version, updates.bundle_files(Path(args.firmware_dir)))
    except updates.UpdateError as exc:
        raise FirmwareError(str(exc)) from None
    except OSError as exc:
        raise FirmwareError(f"firmware bundle: {exc}") from None
    message: dict[str, Any] = {"op": "firmware_push", "version": args.version, "force": args.force}
    if args.device:
        message["devices"] = args.device
    else:
        message["percent"] = args.percent
    reply = _commands_worker(args, message, timeout=30.0)     # a large fleet's chunks are queued first
    size = sum(entry[1] for entry in manifest["files"])
    for device in reply["started"]:
        print(f"{device}: sending {args.version} ({len(manifest['files'])} files, {size} bytes)")
    for device, reason in reply["refused"].items():
        print(f"{device}: not sent: {reason}")
    if not reply["started"] and not reply["refused"]:
        print(f"no device to send {args.version} to")
    status = 0 if not reply["refused"] else 1
    if args.wait and reply["started"]:
        status = max(status, _wait_for_updates(args, reply["started"], args.wait))
    return status


def _wait_for_updates(args: argparse.Namespace, devices: list[str], wait_s: float) -> int:
    import time

    from workers.core import updates

    deadline = time.monotonic() + wait_s
    states: dict[str, dict] = {}
    while True:
        states = {s["device"]: s for s in _commands_worker(args, {"op": "firmware"})["devices"]}
        if all(states.get(d, {}).get("state") not in updates.BUSY for d in devices) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    failed = 0
    for device in devices:
        st = states.get(device, {})
        print(f"{device}: {st.get('state')}" + (f" ({st['error']})" if st.get("error") else ""))
        failed += st.get("state") != updates.UPDATED
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    """Each device's firmware version and update state."""
    reply = _commands_worker(args, {"op": "firmware", **({"device": args.device} if args.device else {})})
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    rows = [[d["device"], d["version"] or "?", d["state"] or "", d["target"] or "", d["progress"] or "",
             d["error"] or ""] for d in reply["devices"]]
    if not rows:
        print("no updates yet")
        return 0
    header = ["device", "version", "update", "target", "progress", "error"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", required=True, help="the new version's name, e.g. 1.4 (letters, digits, . _ + -)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", metavar="ID", help="a device to update (repeatable)")
    who.add_argument("--percent", type=float, help="the first PERCENT of the fleet (a staged rollout: the same"
                     " devices first each time; push again with a larger percent for the rest)")
    p.add_argument("--force", action="store_true", help="push although this version failed on a board before")
    p.add_argument("--wait", type=float, metavar="S", help="wait up to S seconds for the boards to finish")
    p.add_argument("--firmware-dir", default=str(FIRMWARE_DIR), help="the firmware to send (default: the shipped one)")


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", nargs="?", help="one device (default: all)")
    p.add_argument("--json", action="store_true")


def _deploy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", default="auto", help="the board's serial port, e.g. /dev/ttyUSB0 (default: auto)")
    p.add_argument("--device-id", required=True, help="the board's device id, as the server shows it")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's text port, e.g. 192.168.1.10:7000")
    p.add_argument("--wifi", action="append", metavar="SSID:PASS", help="a Wi-Fi network (repeatable; tried in order)")
    p.add_argument("--token", help="the device's token (sensorpipe devices add ID printed it; needed where the"
                                   " server's listeners have auth = \"required\")")
    p.add_argument("--transport", choices=("json", "kv", "binary"), help="how readings are sent (default: json)")
    p.add_argument("--battery", action="store_true", help="deep sleep between readings; send every --wake-interval")
    p.add_argument("--binary-port", type=int, help="the server's binary port (default: 7002)")
    p.add_argument("--device-number", type=int, help="binary packets: the server's [binary.devices.N]")
    p.add_argument("--measure-interval", type=int, metavar="S", help="seconds between readings (default: 60)")
    p.add_argument("--wake-interval", type=int, metavar="S", help="battery: seconds between sends (default: 600)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other config.py setting, e.g. --set DHT_TYPE=11 --set OUTPUT_PINS=(5,)")
    p.add_argument("--stage", help="directory to stage the board's files in (default: a temp directory)")
    p.add_argument("--key", help="the board's DEVICE_KEY (default: the server's, made on first deploy)")
    p.add_argument("--tls-ca", metavar="FILE", help="speak TLS, trusting the server by this certificate (certs"
                   " init's ca.pem, or a self-signed server certificate); TLS_HOST=NAME with --set if the"
                   " certificate names the server otherwise than --server")
    p.add_argument("--firmware-dir", default=str(FIRMWARE_DIR), help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="stage the files and print the mpremote command only")


def _console_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", default="auto", help="the board's serial port (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="print the mpremote command only")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "deploy": (cmd_deploy, _deploy_args),
    "console": (cmd_console, _console_args),
    "push": (cmd_push, _push_args),
    "status": (cmd_status, _status_args),
}


def _reporting(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except FirmwareError as exc:
            print(f"sensorpipe: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return run


def register(subparsers: Any) -> None:
    """Add ``firmware deploy`` and ``firmware console`` to the ``sensorpipe`` command line."""
    firmware = subparsers.add_parser("firmware", help="put the firmware on a board (mpremote) or over the air",
                                     description="Put the sensorpipe firmware on a board and open its REPL, with mpremote.")
    sub = firmware.add_subparsers(dest="firmware_command", required=True, metavar="COMMAND")
    for name, (handler, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=(handler.__doc__ or "").strip().split("\n")[0])
        add_args(p)
        p.set_defaults(handler=_reporting(handler))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sensorpipe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
