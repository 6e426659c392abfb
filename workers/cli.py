"""``sensorpipe``: run the pipeline, run one worker, ask it things, look after dead letters.

Every failure the user can act on is one line ``sensorpipe: <message>`` and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from workers import config as config_mod
from workers import runtime

REPO = Path(__file__).resolve().parent.parent


class CommandError(Exception):
    """Printed as ``sensorpipe: <message>``; exit status 2."""


def _load(args: argparse.Namespace) -> config_mod.Config:
    try:
        return config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        raise CommandError(f"configuration: {exc}") from None


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
    if role == "edge":
        from workers import edge
        return edge.main(cfg)
    if role == "parser":
        from workers import parser
        return parser.main(cfg)
    if role == "query":
        from workers import query
        return query.main(cfg)
    if role.startswith("sink-"):
        from workers import sinkworker
        name = role[len("sink-"):]
        if not hasattr(cfg.sinks, name):
            raise CommandError(f"no sink called {name!r}")
        return sinkworker.main(cfg, name)
    extra = WORKERS.get(role)
    if extra is None:
        raise CommandError(f"unknown worker {role!r}; known: edge, parser, query, sink-<name>, {', '.join(WORKERS)}")
    return extra(cfg)


def _query(args: argparse.Namespace, message: dict) -> dict:
    from workers.query import QueryError, request

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
    """List the devices the pipeline has heard from."""
    import orjson

    reply = _query(args, {"op": "devices"})
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
        return 0
    extra_keys = sorted({k for d in reply["devices"] for k in d} - {"device", "last_seen"})
    rows = [[d["device"], _when(d["last_seen"]), *[str(d.get(k, "")) for k in extra_keys]] for d in reply["devices"]]
    print(_table(rows, ["device", "last seen", *extra_keys]) if rows else "no devices yet")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Counters of every worker: frames, readings, rejects, and per sink written/pending/spooled."""
    import orjson

    reply = _query(args, {"op": "status"})
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
        return 0
    for worker, counters in reply["workers"].items():
        stale = " (no report for a while: is it running?)" if counters.pop("stale", False) else ""
        print(f"{worker}{stale}")
        for key, value in sorted(counters.items()):
            print(f"  {key:28} {value}")
    return 0


def cmd_deadletters(args: argparse.Namespace) -> int:
    """List frames and readings set aside: raw bytes, where from, why."""
    from workers.deadletters import DeadLetterStore

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
    import zmq

    from workers import envelope
    from workers.deadletters import DeadLetterStore

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
        conns: list[envelope.Conn] = []
        index: dict[tuple[str, str], int] = {}
        frames = []
        for d in letters:
            key = (d.listener, d.peer)
            if key not in index:
                index[key] = len(conns)
                conns.append(envelope.Conn(0, d.listener, d.peer))
            frames.append((d.raw, d.recv_ts, index[key]))
        ctx = zmq.Context()
        try:
            sock = runtime.socket(ctx, zmq.PUSH, connect=cfg.endpoints.inject)
            try:
                if not sock.poll(int(args.timeout * 1000), zmq.POLLOUT):
                    raise CommandError(f"the edge does not answer at {cfg.endpoints.inject}: is the pipeline running?")
                sock.send_multipart(envelope.inject_message(conns, envelope.pack_frames(frames)))
            finally:
                sock.close(linger=int(args.timeout * 1000))
        finally:
            ctx.term()
        store.mark_replayed([d.id for d in letters])
    finally:
        store.close()
    print(f"replayed {len(letters)} dead letter(s); any that fail again are listed by `sensorpipe deadletters`")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Read and check the configuration file."""
    cfg = _load(args)
    print(f"{cfg.source}: ok; sinks: {', '.join(cfg.sinks.enabled())}; "
          f"binary layouts: {', '.join(f'{n}={b.device}' for n, b in sorted(cfg.binary.items())) or 'none'}")
    return 0


# --------------------------------------------------------------------------- table

WORKERS: dict[str, Callable[[config_mod.Config], int]] = {}   # extra workers added by other modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensorpipe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="configuration file (default: $SENSORPIPE_CONFIG or deploy/sensorpipe.toml)")
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
    p.add_argument("--supervisord-conf", default=str(REPO / "supervisord.conf"))
    p = add("ctl", cmd_ctl)
    p.add_argument("--supervisord-conf", default=str(REPO / "supervisord.conf"))
    p.add_argument("ctl_args", nargs=argparse.REMAINDER, help="supervisorctl arguments (default: status)")
    p = add("worker", cmd_worker)
    p.add_argument("role", help="edge | parser | query | sink-sqlite | sink-influx | sink-mongo | ...")
    p = add("latest", cmd_latest)
    p.add_argument("device")
    query_opts(p)
    query_opts(add("devices", cmd_devices))
    query_opts(add("status", cmd_status))
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
    for module_name in ("workers.firmware_cli", "workers.simulate"):
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
    except CommandError as exc:
        print(f"sensorpipe: {exc}", file=sys.stderr)
        return runtime.EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
