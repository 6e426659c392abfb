"""``sensorpipe``: run the pipeline, run one worker, ask it things, look after dead letters.

Every failure the user can act on is one line ``sensorpipe: <message>`` and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from workers.core import config as config_mod
from workers.core import curve, jetstream, paths, runtime, starts



class CommandError(Exception):
    """Printed as ``sensorpipe: <message>``; exit status 2."""


def _load(args: argparse.Namespace) -> config_mod.Config:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        raise CommandError(f"configuration: {exc}") from None
    # A command that talks to the pipeline's sockets needs its secret (docs/operations.md).
    worker = bool(getattr(args, "role", None))
    try:
        runtime.use_pipeline_secret(cfg.data_dir, make=worker)
    except OSError as exc:
        if worker:
            raise CommandError(f"the pipeline secret: {exc}") from None
        print(f"sensorpipe: cannot read {Path(cfg.data_dir) / runtime.SECRET_FILE} ({exc}): the running"
              " pipeline will not let this command in", file=sys.stderr)
    # Endpoints beyond loopback speak CURVE (workers.core.curve); load() checked the keys are there.
    try:
        runtime.use_curve(curve.for_config(cfg, config_mod.internal_endpoints(cfg).values()))
    except curve.CurveKeyError as exc:
        raise CommandError(f"CURVE keys: {exc}") from None
    return cfg


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    """Start the whole pipeline under supervisord, in the foreground."""
    cfg = _load(args)
    data = Path(cfg.data_dir).resolve()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    env = _supervisor_env(cfg)
    conf = Path(args.supervisord_conf).resolve()
    print(f"sensorpipe: starting the pipeline ({conf.name}); data and logs in {data}; Ctrl-C stops it")
    print(f"sensorpipe: devices: {', '.join(f'{lst.name} {lst.bind}' for lst in cfg.listeners)};"
          f" query: {cfg.endpoints.query}")
    supervisord = Path(sys.executable).with_name("supervisord")
    os.execve(str(supervisord), [str(supervisord), "-n", "-c", str(conf)], env)
    return 0  # not reached


def _supervisor_env(cfg: config_mod.Config) -> dict[str, str]:
    env = dict(os.environ)
    env["SENSORPIPE_CONFIG"] = str(Path(cfg.source).resolve())
    env["SENSORPIPE_DATA"] = str(Path(cfg.data_dir).resolve())
    env["SENSORPIPE_PYTHON"] = sys.executable        # the template runs ``$SENSORPIPE_PYTHON -m workers worker ROLE``
    return env


def cmd_ctl(args: argparse.Namespace) -> int:
    """supervisorctl for the running pipeline: status, restart edge, stop all, tail -f parser:parser_0..."""
    cfg = _load(args)
    conf = Path(args.supervisord_conf).resolve()
    ctl = Path(sys.executable).with_name("supervisorctl")
    os.execve(str(ctl), [str(ctl), "-c", str(conf), *(args.ctl_args or ["status"])], _supervisor_env(cfg))
    return 0  # not reached


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one worker in the foreground (what supervisord runs)."""
    cfg = _load(args)
    runtime.setup_logging(cfg.log_level)
    role = args.role
    starts.record(cfg.data_dir, f"sink:{role[5:]}" if role.startswith("sink-") else
                  runtime.worker_name(role) if role == "parser" else role)
    if role == "edge":
        from workers.processes import edge
        return edge.main(cfg)
    if role == "parser":
        from workers.processes import parser
        return parser.main(cfg)
    if role == "query":
        from workers.processes import query
        return query.main(cfg)
    if role == "rollup":
        from workers.processes import rollup
        return rollup.main(cfg)
    if role.startswith("sink-"):
        from workers.processes import sink as sinkworker
        name = role[len("sink-"):]
        if not hasattr(cfg.sinks, name):
            raise CommandError(f"no sink called {name!r}")
        return sinkworker.main(cfg, name)
    extra = WORKERS.get(role)
    if extra is None:
        raise CommandError(f"unknown worker {role!r}; known: edge, parser, query, rollup, sink-<name>"
                           f"{''.join(', ' + w for w in WORKERS)}")
    return extra(cfg)


def _query(args: argparse.Namespace, message: dict) -> dict:
    from workers.processes.query import QueryError, request

    cfg = _load(args)
    try:
        reply = request(args.endpoint or cfg.endpoints.query, message, timeout_s=args.timeout)
    except QueryError as exc:
        raise CommandError(str(exc)) from None
    if not reply.get("ok"):
        raise CommandError(reply.get("error", "the query worker said no"))
    return reply


def _when(ts_ms: int) -> str:
    age = time.time() - ts_ms / 1000
    stamp = datetime.fromtimestamp(ts_ms / 1000).isoformat(sep=" ", timespec="milliseconds")
    if age < 120:
        return f"{stamp} ({age:.0f} s ago)"
    if age < 7200:
        return f"{stamp} ({age / 60:.0f} min ago)"
    return f"{stamp} ({age / 3600:.1f} h ago)"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_latest(args: argparse.Namespace) -> int:
    """Show the newest value of each field of a device."""
    import orjson

    reply = _query(args, {"op": "latest", "device": args.device})
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
        return 0
    rows = [[name, repr(f["value"]) if isinstance(f["value"], str) else str(f["value"]), _when(f["ts"])]
            for name, f in sorted(reply["fields"].items())]
    print(f"device {reply['device']}")
    print(_table(rows, ["field", "value", "time"]))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    """List the devices the pipeline has heard from and their credentials; devices add|revoke ID."""
    import orjson

    from workers.tools import security

    if args.action == "mosquitto":
        if not args.passwords or not args.acl:
            raise CommandError("devices mosquitto: --passwords FILE and --acl FILE, the files mosquitto.conf names")
        try:
            print("\n".join(security.mosquitto_files(_load(args), Path(args.passwords), Path(args.acl))))
        except security.SecurityError as exc:
            raise CommandError(str(exc)) from None
        return 0
    if args.action in ("add", "revoke"):
        if not args.device:
            raise CommandError(f"devices {args.action}: which device? (sensorpipe devices {args.action} ID)")
        try:
            if args.action == "add":
                print("\n".join(security.devices_add(_load(args), args.device, args.may_report or [], args.replace)))
            else:
                print(security.devices_revoke(_load(args), args.device))
        except security.SecurityError as exc:
            raise CommandError(str(exc)) from None
        return 0
    reply = _query(args, {"op": "devices"})
    _add_firmware(args, reply["devices"])
    held = security.credential_column(_load(args))
    if args.json:
        for d in reply["devices"]:
            d["credential"] = held.get(d["device"], "")
        reply["credentials_never_seen"] = sorted(set(held) - {d["device"] for d in reply["devices"]})
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
        return 0
    extra_keys = sorted({k for d in reply["devices"] for k in d} - {"device", "last_seen", "online", "via", "peer"})
    rows = [[d["device"], "online" if d.get("online") else "offline", _when(d["last_seen"]),
             f"{d.get('via', '')} {d.get('peer', '')}".strip(), held.get(d["device"], "no"),
             *[str(d.get(k, "")) for k in extra_keys]]
            for d in reply["devices"]]
    seen = {d["device"] for d in reply["devices"]}
    rows += [[device, "never seen", "", "", column, *[""] * len(extra_keys)]
             for device, column in sorted(held.items()) if device not in seen]
    print(_table(rows, ["device", "presence", "last seen", "via", "credential", *extra_keys]) if rows
          else "no devices yet")
    return 0


def _firmware_states(args: argparse.Namespace) -> dict[str, dict]:
    """Each device's firmware version and update state, from the commands worker (docs/firmware.md); none
    when the commands worker does not answer."""
    from workers.processes.commands import request
    from workers.processes.query import QueryError

    try:
        reply = request(_load(args).endpoints.command, {"op": "firmware"}, timeout_s=1.0)
    except (CommandError, QueryError):
        return {}
    return {s["device"]: s for s in reply.get("devices", [])}


def _add_firmware(args: argparse.Namespace, devices: list[dict]) -> None:
    firmware = _firmware_states(args)
    for device in devices:
        st = firmware.get(device["device"])
        if st is not None:
            device["firmware"] = st["version"] or "?"
            device["update"] = (st["state"] or "") + (f" {st['target']}" if st["state"] != "updated" else "")


def _commands(args: argparse.Namespace, message: dict, timeout: float) -> dict:
    from workers.processes.commands import request
    from workers.processes.query import QueryError

    cfg = _load(args)
    try:
        return request(args.endpoint or cfg.endpoints.command, message, timeout_s=timeout)
    except QueryError as exc:
        raise CommandError(str(exc)) from None


def cmd_send(args: argparse.Namespace) -> int:
    """Send a command to a device (JSON), by whatever way it is connected; queued if it is not."""
    import orjson

    try:
        command = orjson.loads(args.command)
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"the command is not JSON: {exc}") from None
    if not isinstance(command, dict):
        raise CommandError('the command must be a JSON object, e.g. \'{"cmd":"interval","value":30}\'')
    message: dict = {"op": "send", "device": args.device, "command": command}
    if args.id:
        message["id"] = args.id
    if args.ttl is not None:
        message["ttl_s"] = args.ttl
    if args.wait:
        message["wait_s"] = args.wait
    reply = _commands(args, message, args.timeout + args.wait)
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    status = reply.get("status")
    if status is None:
        raise CommandError(reply.get("error", "the commands worker said no"))
    if status == "unknown device":
        raise CommandError(reply.get("error", f"unknown device {args.device!r}"))
    if args.json:
        return 0 if reply.get("ok") else 1
    if status == "queued":
        expires = datetime.fromtimestamp(reply["expires"] / 1000).isoformat(sep=" ", timespec="seconds")
        print(f"{reply['id']}: queued for {args.device} ({reply.get('reason', 'not connected')}); it goes when the"
              f" device next connects, until {expires}")
    elif status == "expired":
        print(f"{reply['id']}: expired before {args.device} connected")
        return 1
    else:
        print(f"{reply['id']}: {status} to {args.device}" + (f" via {reply['via']}" if reply.get("via") else ""))
    return 0


def cmd_commands(args: argparse.Namespace) -> int:
    """List the commands sent to a device (or all): queued, delivered, acknowledged, expired."""
    import orjson

    message: dict = {"op": "commands", "limit": args.limit}
    if args.device:
        message["device"] = args.device
    reply = _commands(args, message, args.timeout)
    if not reply.get("ok"):
        raise CommandError(reply.get("error", "the commands worker said no"))
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
        return 0
    rows = [[c["id"], c["device"], c["status"], _when(c["created"]),
             orjson.dumps(c["command"]).decode()[:50], c.get("error") or c.get("via") or ""]
            for c in reply["commands"]]
    print(_table(rows, ["id", "device", "status", "sent", "command", "via / error"]) if rows else "no commands")
    return 0


def cmd_forget_nats_server(args: argparse.Namespace) -> int:
    """Move the JetStream journal's replica off a NATS server that lost its store (docs/scale-out.md)."""
    import asyncio

    cfg = _load(args)
    if cfg.journal.backend != "jetstream":
        raise CommandError("[journal] backend is not jetstream: there is no stream to change")
    print(asyncio.run(jetstream.forget_server(cfg.journal, args.server)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Counters of every worker: frames, readings, rejects, and per sink written/pending/spooled."""
    import orjson

    reply = _query(args, {"op": "status"})
    firmware = _firmware_states(args)
    if firmware:
        reply["firmware"] = list(firmware.values())
    reply["deadletters"] = _deadletter_bounds(_load(args))
    journal = jetstream.status_or_error(_load(args))      # the stream, when the journal is in JetStream
    if journal is not None:
        reply["journal"] = journal
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
        return 0
    if journal is not None:
        print("\n".join(jetstream.status_lines(journal)) + "\n")
    sinks = reply.get("sinks") or {}
    if sinks:
        rows = [[name, str(s["written"]), str(s["events"]), str(s["pending"]), str(s["spooled"]),
                 str(s["dead_lettered"]), str(s["write_failures"]),
                 "no report for a while: is it running?" if s.get("stale") else s["state"]
                 + (f"; {s['dropped']} DROPPED from a full spool" if s["dropped"] else "")]
                for name, s in sinks.items()]
        print(_table(rows, ["sink", "written", "events", "pending", "spooled", "dead-lettered", "failed writes",
                            "state"]))
        print()
    for worker, counters in reply["workers"].items():
        stale = " (no report for a while: is it running?)" if counters.pop("stale", False) else ""
        looping = starts.crash_loop(counters)
        print(f"{worker}{stale}{'  ' + looping if looping else ''}")
        for key, value in sorted(counters.items()):
            print(f"  {key:28} {value}")
    if firmware:                        # the boards' versions and updates (sensorpipe firmware status)
        print("firmware")
        for version in sorted({s["version"] or "?" for s in firmware.values()}):
            print(f"  {'version ' + version:28} {sum((s['version'] or '?') == version for s in firmware.values())}"
                  " devices")
        for state in ("sending", "swapping", "confirming", "failed", "rolled_back"):
            names = sorted(d for d, s in firmware.items() if s["state"] == state)
            if names:
                print(f"  {'update ' + state:28} {', '.join(names)}")
    bounds = reply["deadletters"]
    if bounds:
        print(f"dead letters: {bounds['waiting']} waiting ({bounds['bytes']} bytes of"
              f" {bounds['max_bytes']}); deleted by [deadletters] bounds: {bounds['dropped_age']} for age,"
              f" {bounds['dropped_size']} for size")
    return 0


def _deadletter_bounds(cfg: config_mod.Config) -> dict:
    """The dead-letter store against its bounds, read from the file (they outlive every worker)."""
    from workers.core.deadletters import DeadLetterStore

    path = Path(cfg.data_dir) / "deadletters.db"
    if not path.exists():
        return {}
    store = DeadLetterStore(path)
    try:
        dropped = store.dropped()
        return {"waiting": store.count(), "bytes": store.stored_bytes(), "max_bytes": cfg.deadletters.max_bytes,
                "dropped_age": dropped.get("age", 0), "dropped_size": dropped.get("size", 0)}
    finally:
        store.close()


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(points: list[tuple[int, float]], start: int, end: int, width: int) -> str:
    """(ts, value) pairs drawn in ``width`` columns spanning [start, end): each column is the mean
    of its points, a blank where there are none, so gaps in time show as gaps."""
    if not points or end <= start or width < 1:
        return ""
    sums = [0.0] * width
    counts = [0] * width
    for ts, value in points:
        column = min(width - 1, max(0, (ts - start) * width // (end - start)))
        sums[column] += value
        counts[column] += 1
    means = [s / c if c else None for s, c in zip(sums, counts)]
    present = [m for m in means if m is not None]
    low, high = min(present), max(present)
    steps = len(SPARKS) - 1
    return "".join(" " if m is None else SPARKS[round((m - low) / (high - low) * steps) if high > low else steps // 2]
                   for m in means)


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.6e}"
    return str(value)


def cmd_history(args: argparse.Namespace) -> int:
    """A field's history: rollups of a window (--window 1m) or raw readings, as a table and a sparkline."""
    import shutil

    import orjson

    try:
        since_s = config_mod.parse_window(args.since)
    except ValueError as exc:
        raise CommandError(f"--since: {exc}") from None
    to_ms = time.time_ns() // 1_000_000
    request = {"op": "history", "device": args.device, "field": args.field, "from": to_ms - since_s * 1000,
               "to": to_ms}
    if args.window:
        request["window"] = args.window
    reply = _query(args, request)
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
        return 0
    points = reply["points"]
    what = f"{reply['window']} rollups" if reply["window"] else "readings"
    print(f"{args.device} {args.field}: {len(points)} {what} in the last {args.since}")
    if not points:
        return 0
    if not args.chart_only:
        stamp = "%Y-%m-%d %H:%M:%S" if not reply["window"] or reply["window"].endswith("s") else "%Y-%m-%d %H:%M"
        rows = [[datetime.fromtimestamp(p[0] / 1000).strftime(stamp), *(_number(v) for v in p[1:])] for p in points]
        print(_table(rows, ["time" if not reply["window"] else "window start", *reply["columns"][1:]]))
    series = "mean" if reply["window"] else "value"
    column = reply["columns"].index(series)
    values = [(p[0], p[column]) for p in points if isinstance(p[column], (int, float))]
    if values:
        # the chart spans the data, one column per window when it fits, so gaps show as blanks
        most = max(10, min(120, shutil.get_terminal_size((80, 24)).columns - 30))
        first, last = values[0][0], values[-1][0]
        if reply["window"]:
            step = config_mod.parse_window(reply["window"]) * 1000
            end = last + step
            width = min(most, (end - first) // step)
        else:
            end = last + 1
            width = min(most, len(values))
        low, high = min(v for _, v in values), max(v for _, v in values)
        clock = "%H:%M:%S" if end - first < 86_400_000 else "%Y-%m-%d %H:%M"
        print(f"\n{series} {_number(low):>9} {sparkline(values, first, end, width)} {_number(high)}")
        print(f"{'':>{len(series) + 10}} {datetime.fromtimestamp(first / 1000).strftime(clock)} .. "
              f"{datetime.fromtimestamp(end / 1000).strftime(clock)}")
    return 0


def cmd_deadletters(args: argparse.Namespace) -> int:
    """List frames and readings set aside: raw bytes, where from, why."""
    from workers.core.deadletters import DeadLetterStore

    cfg = _load(args)
    path = Path(cfg.data_dir) / "deadletters.db"
    if not path.exists():
        print("no dead letters")
        return 0
    store = DeadLetterStore(path)
    try:
        letters = store.list(limit=args.limit, include_replayed=args.all, source=args.source)
        total = store.count(include_replayed=args.all)
    finally:
        store.close()
    if args.json:
        import orjson
        print(orjson.dumps([{**d._asdict(), "raw": d.raw.decode("utf-8", "backslashreplace")} for d in letters],
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    if not letters:
        print("no dead letters" + ("" if args.all else " waiting for replay"))
        return 0
    rows = [[str(d.id), datetime.fromtimestamp(d.recv_ts / 1e9).isoformat(sep=" ", timespec="seconds"),
             d.source, d.peer or d.listener, d.device, d.reason[:60],
             repr(d.raw[:40])[2:-1] + ("..." if len(d.raw) > 40 else ""),
             "replayed" if d.replayed_ms else ""] for d in letters]
    print(_table(rows, ["id", "arrived", "source", "from", "device", "reason", "raw", ""]))
    if total > len(letters):
        print(f"... {total - len(letters)} more (--limit)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Feed dead letters through the pipeline again (after a configuration fix)."""
    from workers.core.deadletters import DeadLetterStore, ReplayError, replay

    cfg = _load(args)
    path = Path(cfg.data_dir) / "deadletters.db"
    if not path.exists():
        print("no dead letters")
        return 0
    if not args.ids and not args.all:
        raise CommandError("say which: --id N [--id M ...] or --all")
    store = DeadLetterStore(path)
    try:
        letters = store.list(limit=args.limit, ids=args.ids or None, include_replayed=bool(args.ids))
        if not letters:
            print("nothing to replay")
            return 0
        try:
            replay(store, letters, cfg.endpoints.inject, args.timeout)
        except ReplayError as exc:
            raise CommandError(str(exc)) from None
    finally:
        store.close()
    print(f"replayed {len(letters)} dead letter(s); any that fail again are listed by `sensorpipe deadletters`")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Read and check the configuration file."""
    cfg = _load(args)
    rollups = (", ".join(config_mod.window_label(s) for s in cfg.rollups.window_seconds)
               if cfg.rollups.enabled else "off")
    print(f"{cfg.source}: ok; sinks: {', '.join(cfg.sinks.enabled())}; rollups: {rollups}; "
          f"binary layouts: {', '.join(f'{n}={b.device}' for n, b in sorted(cfg.binary.items())) or 'none'}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented configuration (and its data dir) to edit: DIR/sensorpipe.toml."""
    target = Path(args.dir).resolve()
    config = target / paths.CONFIG_NAME
    if config.exists() and not args.force:
        raise CommandError(f"{config} exists; --force writes over it")
    data = target / "data"
    data.mkdir(parents=True, exist_ok=True)
    text = paths.default_config().read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("data_dir")), None)
    if line is None:
        raise CommandError("the shipped configuration has no data_dir line")   # a packaging mistake
    text = text.replace(line, f"data_dir = {json.dumps(str(data)):<22}# journal, spool, SQLite store, dead letters, logs", 1)
    config.write_text(text)
    config_mod.load(config, env={})            # what init writes must load
    print(f"sensorpipe: wrote {config} (data in {data})")
    print(f"sensorpipe: edit it, then: cd {target} && sensorpipe run   (or sensorpipe --config {config} run)")
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    """Send frames to a device port as a board would: the arguments, or the lines of stdin."""
    import socket

    cfg = _load(args)
    try:
        listener = cfg.listener(args.listener)
    except KeyError:
        raise CommandError(f"no listener {args.listener!r}; configured: "
                           f"{', '.join(lst.name for lst in cfg.listeners)}") from None
    lines = args.frames or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    host = "127.0.0.1" if listener.host in ("0.0.0.0", "", "::") else listener.host
    if bool(args.device) != bool(args.token):
        raise CommandError("feed: --device and --token go together (the hello names the device and proves it)")
    if args.token:                # the hello first: every frame after it belongs to that device
        lines = [json.dumps({"auth": {"device": args.device, "token": args.token}}), *lines]
    elif listener.auth == "required":
        raise CommandError(f"listener {listener.name} requires a hello: --device ID --token TOKEN"
                           " (sensorpipe devices add ID makes the token)")
    try:
        with socket.create_connection((host, listener.port), timeout=args.timeout) as sock:
            if listener.tls:
                import ssl
                tls = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
                sock = tls.wrap_socket(sock, server_hostname=host)
            sock.sendall("".join(line + "\n" for line in lines).encode())
            answer = b""
            if listener.tls:                  # TLS has no half-close: read the hello's answer, then hang up
                while args.token and b"\n" not in answer and (chunk := sock.recv(4096)):
                    answer += chunk
            else:
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(4096):   # wait for the edge to close our side: everything was read
                    answer += chunk
    except OSError as exc:
        raise CommandError(f"cannot send to {host}:{listener.port} ({exc}); is the pipeline running?") from None
    if args.token and not answer.startswith(b'{"auth":"ok"}'):
        raise CommandError(f"the edge refused the hello for {args.device}: {answer[:80]!r}")
    print(f"sensorpipe: sent {len(lines)} frame(s) to {listener.name} {host}:{listener.port}")
    return 0


# --------------------------------------------------------------------------- table

WORKERS: dict[str, Callable[[config_mod.Config], int]] = {}   # extra workers added by other modules


def _mqtt_worker(cfg: config_mod.Config) -> int:
    from workers.processes import mqtt
    return mqtt.main(cfg)


def _commands_worker(cfg: config_mod.Config) -> int:
    from workers.processes import commands
    return commands.main(cfg)


def _http_worker(cfg: config_mod.Config) -> int:
    from workers.processes import http
    return http.main(cfg)


WORKERS["mqtt"] = _mqtt_worker
WORKERS["commands"] = _commands_worker
WORKERS["http"] = _http_worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensorpipe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="configuration file (default: $SENSORPIPE_CONFIG, ./sensorpipe.toml, or the shipped default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=(handler.__doc__ or "").strip().split("\n")[0])
        p.set_defaults(handler=handler)
        return p

    def query_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print the reply as JSON")
        p.add_argument("--endpoint", help="query endpoint (default: from the configuration)")
        p.add_argument("--timeout", type=float, default=2.5, help="seconds to wait for an answer")

    p = add("run", cmd_run)
    p.add_argument("--supervisord-conf", default=str(paths.supervisord_template()))
    p = add("ctl", cmd_ctl)
    p.add_argument("--supervisord-conf", default=str(paths.supervisord_template()))
    p.add_argument("ctl_args", nargs=argparse.REMAINDER, help="supervisorctl arguments (default: status)")
    p = add("worker", cmd_worker)
    p.add_argument("role", help="edge | parser | query | rollup | sink-sqlite | sink-influx | sink-mongo | ...")
    p = add("latest", cmd_latest)
    p.add_argument("device")
    query_opts(p)
    p = add("devices", cmd_devices)
    p.add_argument("action", nargs="?", choices=["list", "add", "revoke", "mosquitto"], default="list")
    p.add_argument("device", nargs="?", help="the device id (add, revoke)")
    p.add_argument("--may-report", action="append", metavar="PATTERN",
                   help="add: a gateway may also report for devices matching this (e.g. 'greenhouse-*'; repeatable)")
    p.add_argument("--replace", action="store_true", help="add: make a new token for a device that has one")
    p.add_argument("--passwords", help="mosquitto: the password file to write (devices log in with id and token)")
    p.add_argument("--acl", help="mosquitto: the ACL file to write (each device: its own topics only)")
    query_opts(p)
    query_opts(add("status", cmd_status))
    p = add("history", cmd_history)
    p.add_argument("device")
    p.add_argument("field")
    p.add_argument("--window", help="rollups of this window (1m, 1h... as configured); without it, the raw readings")
    p.add_argument("--since", default="1h", help="how far back: 90s, 30m, 6h, 7d (default 1h)")
    p.add_argument("--chart-only", action="store_true", help="only the sparkline, no table")
    query_opts(p)
    p = add("send", cmd_send)
    p.add_argument("device")
    p.add_argument("command", help='a JSON object, e.g. \'{"cmd":"interval","value":30}\'')
    p.add_argument("--id", help="the command's id (default: a new one); sending the same id again is safe")
    p.add_argument("--ttl", type=float, help="seconds it may wait for the device (default [commands] expire_after_s)")
    p.add_argument("--wait", type=float, default=0.0, help="wait this long for a device that is not connected")
    query_opts(p)
    p = add("commands", cmd_commands)
    p.add_argument("device", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    query_opts(p)
    p = add("deadletters", cmd_deadletters)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--all", action="store_true", help="include the ones already replayed")
    p.add_argument("--source", help="edge | parser | sink:<name>")
    p.add_argument("--json", action="store_true")
    p = add("replay", cmd_replay)
    p.add_argument("--id", dest="ids", type=int, action="append", help="a dead letter's id (repeatable)")
    p.add_argument("--all", action="store_true", help="every dead letter not replayed yet")
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--timeout", type=float, default=3.0)
    add("check-config", cmd_check_config)
    p = add("forget-nats-server", cmd_forget_nats_server)
    p.add_argument("server", help="the server_name of a NATS server whose store was lost (docs/scale-out.md)")
    p = add("init", cmd_init)
    p.add_argument("dir", nargs="?", default=".", help="where to write sensorpipe.toml and data/ (default: here)")
    p.add_argument("--force", action="store_true", help="write over an existing sensorpipe.toml")
    p = add("feed", cmd_feed)
    p.add_argument("frames", nargs="*", help="frames to send, e.g. '{\"device\":\"d1\",\"temp\":22.6}' (default: stdin)")
    p.add_argument("--listener", default="text", help="the configured listener to send to (default: text)")
    p.add_argument("--device", help="the device to authenticate as (with --token; sensorpipe devices add)")
    p.add_argument("--token", help="its token: sends the hello first")
    p.add_argument("--ca", help="the CA certificate to trust on a TLS listener (sensorpipe certs init's ca.pem)")
    p.add_argument("--timeout", type=float, default=5.0)
    for module_name in ("workers.tools.firmware", "workers.tools.simulate", "workers.tools.security"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except (CommandError, curve.CurveKeyError) as exc:     # a key missing where a worker binds beyond loopback
        print(f"sensorpipe: {exc}", file=sys.stderr)
        return runtime.EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
