"""The firmware's main loop (CPython, stand-in hardware) against the server's real command path:
`sensorpipe send` -> commands worker -> edge -> the board's text connection, and the board's
acknowledgement back through the pipeline to the commands worker."""
from __future__ import annotations

import json

from tests.firmware.harness import Board, config
from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for


def statuses(p: Pipeline) -> dict[str, dict]:
    result = p.cli("commands", "greenhouse-1", "--json")
    assert result.returncode == 0, result.stderr
    return {c["id"]: c for c in json.loads(result.stdout)["commands"]}


def test_firmware_applies_and_acknowledges_commands_sent_with_sensorpipe_send(pipeline_factory, board: Board) -> None:
    p = pipeline_factory()
    p.start_all(COMMAND_ROLES)
    board.state.dht = [(20.0 + i / 10, 50.0) for i in range(60)]
    cfg = config(TEXT_PORT=p.text_port, MEASURE_S=0.2, OUTPUT_PINS=(5, 12))
    app = board.app(cfg)
    try:
        app.run(cycles=1)
        wait_for(lambda: p.latest("greenhouse-1"), message="the board's first reading")

        def sent(command: str, command_id: str) -> bool:
            result = p.cli("send", "greenhouse-1", command, "--id", command_id)
            return result.returncode == 0 and "delivered" in result.stdout

        wait_for(lambda: sent('{"cmd":"relay","pin":5,"on":true}', "r1"), message="r1 delivered")
        assert sent('{"cmd":"relay","pin":6,"on":true}', "r2")
        assert sent('{"cmd":"interval","value":1}', "r3")
        for _ in range(40):
            app.run(cycles=1)
            if {c["status"] for c in statuses(p).values()} <= {"acked", "failed"}:
                break
        got = statuses(p)
        assert got["r1"]["status"] == "acked" and got["r3"]["status"] == "acked"
        assert got["r2"]["status"] == "failed" and got["r2"]["error"] == "pin 6 is not in OUTPUT_PINS"
        assert ("pin", 5, 1) in board.state.events
        assert app.conf.MEASURE_S == 1
    finally:
        app.close()
    wait_for(lambda: p.count_rows("events", "WHERE device = 'greenhouse-1' AND kind = 'cmd_ack'") == 3,
             message="the acks stored as events")
