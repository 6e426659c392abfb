"""The commands worker's command store alone (workers.core.commandstore), no sockets: commands and the
devices met survive a restart, open ones come back oldest first, finished ones are pruned in time."""
from __future__ import annotations

from pathlib import Path

from workers.core.commandstore import (ACKED, CANCELLED, DELIVERED, EXPIRED, QUEUED, Command, CommandStore,
                                       DeviceState, Route)


def command(command_id: str, device: str = "g1", created_ms: int = 1_000, **kw) -> Command:
    return Command(command_id, device, b'{"id":"%s","cmd":"interval","value":30}' % command_id.encode(),
                   created_ms, created_ms + 60_000, **kw)


def test_commands_survive_a_restart_and_open_ones_come_back_oldest_first(tmp_path: Path) -> None:
    store = CommandStore(tmp_path / "commands.db")
    store.save(command("c2", created_ms=2_000))
    store.save(command("c1", created_ms=1_000, state=DELIVERED, attempts=1, delivered_ms=1_500, via="text 10.0.0.7:1"))
    store.save(command("c3", created_ms=3_000, state=ACKED, done_ms=3_500))
    store.save(command("c4", device="g2", created_ms=4_000, state=EXPIRED, done_ms=64_000, error="expired"))
    store.close()

    store = CommandStore(tmp_path / "commands.db")
    assert [c.id for c in store.open_commands()] == ["c1", "c2"]
    back = store.get("c1")
    assert back == command("c1", created_ms=1_000, state=DELIVERED, attempts=1, delivered_ms=1_500,
                           via="text 10.0.0.7:1")
    assert back is not None and back.describe()["command"] == {"id": "c1", "cmd": "interval", "value": 30}
    assert store.get("nope") is None
    assert [c.id for c in store.listing(None, 10)] == ["c4", "c3", "c2", "c1"]      # newest first
    assert [c.id for c in store.listing("g2", 10)] == ["c4"]
    assert [c.id for c in store.listing(None, 2)] == ["c4", "c3"]
    store.close()


def test_saving_again_replaces_the_command(tmp_path: Path) -> None:
    store = CommandStore(tmp_path / "commands.db")
    first = command("c1")
    store.save(first)
    first.state, first.done_ms = CANCELLED, 2_000
    store.save(first)
    assert store.get("c1") == first and store.open_commands() == []
    store.close()


def test_prune_forgets_only_finished_commands_older_than_the_bound(tmp_path: Path) -> None:
    store = CommandStore(tmp_path / "commands.db")
    store.save(command("old", state=ACKED, done_ms=1_000))
    store.save(command("recent", state=ACKED, done_ms=5_000))
    store.save(command("open", state=QUEUED))
    assert store.prune(before_ms=2_000) == 1
    assert sorted(c.id for c in store.listing(None, 10)) == ["open", "recent"]
    store.close()


def test_devices_and_their_routes_survive_a_restart(tmp_path: Path) -> None:
    store = CommandStore(tmp_path / "commands.db")
    store.save_devices({"g1": DeviceState(10, Route("text", 3, "10.0.0.7:1"), acks=True),
                        "b1": DeviceState(20)})                 # seen only where commands cannot go
    store.save_devices({"g1": DeviceState(30, Route("mqtt:farm", 0, "broker"), acks=True)})
    store.close()

    store = CommandStore(tmp_path / "commands.db")
    devices = store.devices()
    assert devices == {"g1": DeviceState(30, Route("mqtt:farm", 0, "broker"), acks=True), "b1": DeviceState(20)}
    assert devices["g1"].route is not None and devices["g1"].route.mqtt
    store.close()


def test_the_commands_worker_writes_last_seen_down_when_it_moved_on_by_a_tenth(tmp_path) -> None:
    """A fleet's presence costs the commands store a row per device every offline_after_s / 10, not
    one per presence entry; new devices and new routes are written at the next save, and everything
    when the worker stops."""
    from workers.core.config import from_dict
    from workers.core.envelope import Seen
    from workers.processes.commands import Commands

    cfg = from_dict({"data_dir": str(tmp_path), "presence": {"offline_after_s": 100},
                     "devices": {"napper": {"offline_after_s": 10}}})
    s = 1_000_000_000
    worker = Commands(cfg)
    try:
        worker.on_seen([Seen("a", 100 * s, "text", 1, "p:1"), Seen("napper", 100 * s, "text", 2, "p:2")], [], [])
        worker.save_devices()
        assert {d: st.last_seen for d, st in worker.store.devices().items()} == {"a": 100 * s, "napper": 100 * s}
        worker.on_seen([Seen("a", 105 * s, "text", 1, "p:1"), Seen("napper", 101 * s, "text", 2, "p:2")], [], [])
        worker.save_devices()                 # a: 5 s on, under its 10 s; napper: 1 s, its tenth of 10 s
        assert {d: st.last_seen for d, st in worker.store.devices().items()} == {"a": 100 * s, "napper": 101 * s}
        worker.on_seen([Seen("a", 106 * s, "text", 3, "p:3")], [], [])          # another connection: at once
        worker.save_devices()
        assert worker.store.devices()["a"] == DeviceState(106 * s, Route("text", 3, "p:3"))
        worker.on_seen([Seen("a", 110 * s, "text", 3, "p:3")], [], [])
        worker.save_devices(every_last_seen=True)                               # as when stopping
        assert worker.store.devices()["a"].last_seen == 110 * s
    finally:
        worker.store.close()
        worker.updates.close()
