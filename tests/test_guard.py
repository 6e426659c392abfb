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
