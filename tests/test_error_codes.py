"""Failed replies carry a stable code (workers.core.errors) beside the message, and every code is in
docs/query-protocol.md. Workers are built without sockets: the requests go straight to ``answer``."""
from __future__ import annotations

import re
from pathlib import Path

import orjson

from workers.core import errors, runtime
from workers.core.config import from_dict
from tests.pipeline import REPO


def test_dispatch_sorts_failures_by_code() -> None:
    counters = runtime.Counters("test")

    def refuse(request: dict) -> dict:
        raise runtime.RequestError('"device" must be a non-empty string')

    def busted(request: dict) -> dict:
        return {}["missing"]

    ops = {"refuse": refuse, "busted": busted, "ping": lambda request: {"ok": True}}
    cases = [(b"nope", errors.BAD_REQUEST), (b"[1]", errors.BAD_REQUEST), (b"x" * (runtime.MAX_REQUEST_BYTES + 1),
             errors.BAD_REQUEST), (b'{"op":"fly"}', errors.UNKNOWN_OP), (b'{"op":"refuse"}', errors.INVALID_ARGUMENT),
             (b'{"op":"busted"}', errors.INTERNAL)]
    for raw, code in cases:
        reply = runtime.dispatch(raw, ops, counters)
        assert reply["ok"] is False and reply["code"] == code and reply["error"], (raw[:20], reply)
    assert runtime.dispatch(b'{"op":"ping"}', ops, counters) == {"ok": True}


def test_query_replies(tmp_path: Path) -> None:
    from workers.processes.query import QueryWorker

    worker = QueryWorker(from_dict({"data_dir": str(tmp_path), "query": {"history_max_points": 3}}))

    def ask(**request: object) -> dict:
        return orjson.loads(worker.answer(orjson.dumps(request)))

    assert ask(op="latest", device="nobody")["code"] == errors.UNKNOWN_DEVICE
    assert ask(op="latest")["code"] == errors.INVALID_ARGUMENT
    assert ask(op="history", device="g1", field="temp", window="5m")["code"] == errors.NOT_FOUND
    assert ask(op="history", device="g1", field="temp")["code"] == errors.UNAVAILABLE       # no store yet
    assert ask(op="history", device="g1", field="temp", window="often")["code"] == errors.INVALID_ARGUMENT


def test_commands_replies(tmp_path: Path) -> None:
    from workers.processes.commands import Commands

    worker = Commands(from_dict({"data_dir": str(tmp_path), "devices": {"planned": {}},
                                 "commands": {"max_queued_per_device": 1}}))

    def ask(raw: dict) -> dict:
        reply = worker.answer([b"client", b""], orjson.dumps(raw))
        assert reply is not None
        return reply

    try:
        assert ask({"op": "send"})["code"] == errors.INVALID_ARGUMENT
        assert ask({"op": "send", "device": "nobody", "command": {"cmd": "led"}})["code"] == errors.UNKNOWN_DEVICE
        assert ask({"op": "cancel", "id": "x"})["code"] == errors.NOT_FOUND
        assert ask({"op": "send", "device": "planned", "command": {"cmd": "led"}, "id": "a"})["status"] == "queued"
        assert ask({"op": "send", "device": "planned", "command": {"cmd": "off"}, "id": "a"})["code"] == errors.CONFLICT
        full = ask({"op": "send", "device": "planned", "command": {"cmd": "off"}, "id": "b"})
        assert full["code"] == errors.LIMIT_EXCEEDED and "max_queued_per_device" in full["error"]
    finally:
        worker.store.close()


def test_every_code_is_documented() -> None:
    doc = (REPO / "docs" / "query-protocol.md").read_text()
    table = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.MULTILINE))
    assert table == set(errors.CODES)
