"""The edge's guard alone (workers/core/guard.py): connection limits and the rate limit, with stand-in
connections and transports on a real asyncio loop; no sockets, no workers."""
from __future__ import annotations

import asyncio
import dataclasses

from workers.core import config as config_mod
from workers.core import runtime
from workers.core.envelope import Conn
from workers.core.guard import Guard


class Transport:
    def __init__(self) -> None:
        self.reading = True
        self.closed = False
        self.written = b""

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        self.written += data


class Connection:
    """What the guard uses of the edge's DeviceConnection."""

    def __init__(self, listener: config_mod.Listener, address: str, n: int) -> None:
        self.listener = listener
        self.conn = Conn(n, listener.name, f"{address}:{40000 + n}")
        self.transport = Transport()
        self.binary = False
        self.closed = False
        self.session = None
        self.edge = self

    paused = False

    def close(self) -> None:
        self.transport.closed = True


def make(tmp_path, **listener: object) -> tuple[Guard, config_mod.Listener]:
    cfg = config_mod.from_dict({"data_dir": str(tmp_path),
                                "listeners": [{"name": "text", "bind": "127.0.0.1:7000", "auth": "off", **listener}]})
    cfg = dataclasses.replace(cfg, edge=dataclasses.replace(cfg.edge, max_connections=5))
    return Guard(cfg, runtime.Counters("edge")), cfg.listeners[0]


def test_limits_per_address_and_in_all(tmp_path) -> None:
    async def run() -> None:
        guard, listener = make(tmp_path, max_connections_per_address=2)
        made = [Connection(listener, "10.0.0.1", n) for n in range(3)]
        assert [guard.admit(c) for c in made] == [True, True, False]
        assert made[2].transport.closed and guard.counters["refused_address_limit"] == 1
        guard.release(made[0])
        again = Connection(listener, "10.0.0.1", 9)
        assert guard.admit(again)                                # a place was freed
        others = [Connection(listener, f"10.0.1.{n}", 10 + n) for n in range(4)]
        assert [guard.admit(c) for c in others] == [True, True, True, False]   # 5 in all
        assert guard.counters["refused_total_limit"] == 1
        guard.release(made[2])                                   # refused: never counted, releasing is harmless
        assert guard.total == 5
        guard.close()

    asyncio.run(run())


def test_over_the_rate_reading_stops_then_resumes(tmp_path) -> None:
    async def run() -> None:
        guard, listener = make(tmp_path, max_frames_per_s=100)
        conn = Connection(listener, "10.0.0.1", 1)
        assert guard.admit(conn)
        frames = [b"x"] * 80
        assert guard.screen(conn, frames, [])[0] == frames       # within the second's allowance
        assert conn.transport.reading
        assert guard.screen(conn, frames, [])[0] == frames       # over it: kept, but reading stops
        assert not conn.transport.reading and guard.counters["rate_limited"] == 1
        assert not guard.may_resume(conn)                        # the edge's own resume leaves it paused
        deadline = asyncio.get_running_loop().time() + 2
        while not conn.transport.reading and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert conn.transport.reading                            # ~0.6 s of excess drained
        assert guard.may_resume(conn)
        guard.release(conn)
        guard.close()

    asyncio.run(run())


def test_counter_log_keeps_the_newest_counter_per_key(tmp_path) -> None:
    """The known counters beside the file journal: the highest per device under its key; a line for a
    new key (``devices add --replace``) starts it anew; a torn last line is ignored; compacted to one."""
    from workers.core.guard import COUNTER_LOG_COMPACT_BYTES, CounterLog

    path = tmp_path / "counters.log"
    log = CounterLog(path)
    log.write({"a": (3, "k1"), "b": (1, "k1")})
    log.write({"a": (5, "k1")})
    log.write({"b": (1, "k2")})                 # b's token replaced: counting anew under k2
    log.sync()
    with open(path, "ab") as fh:
        fh.write(b'{"a": [9, "k')                # torn by a crash: never answered
    assert CounterLog.load(path) == {"a": (5, "k1"), "b": (1, "k2")}
    log.size = COUNTER_LOG_COMPACT_BYTES
    log.compact({"a": (5, "k1"), "b": (1, "k2")})
    log.write({"a": (6, "k1")})
    log.close()
    assert CounterLog.load(path) == {"a": (6, "k1"), "b": (1, "k2")}
    assert len(path.read_bytes().splitlines()) == 2


def test_owed_is_gone_only_when_every_sender_is() -> None:
    from workers.core.guard import Owed

    first, resend = Connection.__new__(Connection), Connection.__new__(Connection)
    first.closed = resend.closed = False
    owed = Owed(first, "balcony", 7)
    owed.conns.append(resend)                   # the board sent it again on a new connection
    first.closed = True                         # ... after it gave up on the first one
    assert not owed.gone()                      # still published: the resend waits for it
    resend.closed = True
    assert owed.gone()


def test_kv_keys_never_collide() -> None:
    from workers.core.jetstream import kv_key

    assert kv_key("greenhouse-7") == "greenhouse-7"
    assert kv_key("a.b") == "a=2eb" and kv_key("a=2eb") == "a=3d2eb" and kv_key("ü x") == "=c3=bc=20x"
