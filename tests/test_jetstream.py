"""The JetStream journal (``[journal] backend = "jetstream"``) on one host: three nats-servers on
127.0.0.1 and the ordinary pipeline fixture. The cluster across hosts is tests/test_cluster.py."""
from __future__ import annotations

import json

import pytest

from tests.pipeline import Pipeline, wait_for
from tests.servers import NatsCluster
from tests.test_e2e import balcony_packet
from workers.core import config
from workers.core.options import ConfigError
from workers.core.stamps import STAMP_STEP_NS, ArrivalClock, cycle_ns


def journal_toml(cluster: NatsCluster, edge_id: int = 0, ack_wait_s: float = 3, consumers: str = "") -> str:
    servers = ", ".join(f'"{url}"' for url in cluster.urls)
    extra = f"consumers = [{consumers}]\n" if consumers else ""
    return (f'\n[journal]\nbackend = "jetstream"\nservers = [{servers}]\nedge_id = {edge_id}\n'
            f"ack_wait_s = {ack_wait_s}\n{extra}")


@pytest.mark.unit
def test_edges_never_share_a_stamp() -> None:
    clocks = [ArrivalClock(slot, 16) for slot in range(16)]
    cycle = cycle_ns(16)
    assert cycle == 4099 and cycle >= 16 * STAMP_STEP_NS
    owner: dict[int, int] = {}
    for _ in range(50):
        for slot, clock in enumerate(clocks):
            for stamp in clock.stamps(3):
                # the stamp and the 255 ns below it (a binary packet's records at interval 0) are this edge's
                assert (stamp % cycle) // STAMP_STEP_NS == slot
                for ns in (stamp, stamp - 254):
                    assert owner.setdefault(ns, slot) == slot
    one = clocks[5].stamps(100)
    assert all(b - a == cycle for a, b in zip(one, one[1:]))
    # a board's records stamped back by a whole-second interval never meet another packet's records
    assert all((k * 60 * 10**9) % cycle for k in range(1, 256))


@pytest.mark.unit
def test_journal_section_is_checked() -> None:
    base = {"journal": {"backend": "jetstream", "servers": ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223",
                                                             "nats://127.0.0.1:4224"]}}
    cfg = config.from_dict(base)
    # the rollup worker's points are the SQLite sink's rows: it consumes nothing from the journal
    assert cfg.journal.replicas == 3 and cfg.journal.all_consumers(list(cfg.consumers())) == ["sqlite"]
    own = config.from_dict({**base, "rollups": {"points_from_sqlite": False}})
    assert own.journal.all_consumers(list(own.consumers())) == ["sqlite", "rollup"]
    with pytest.raises(ConfigError, match="journal.consumers"):
        config.from_dict({"journal": {**base["journal"], "consumers": ["sqlite", "rollup"]}})
    bad = [({"servers": []}, "journal.servers"),
           ({"servers": ["127.0.0.1:4222"]}, "journal.servers[0]"),
           ({"replicas": 2}, "journal.replicas"),
           ({"servers": ["nats://a:1"]}, "journal.replicas"),
           ({"edge_id": 16}, "journal.edge_id"),
           ({"stream": "a.b"}, "journal.stream"),
           ({"consumers": ["influx"]}, "journal.consumers"),
           ({"backend": "kafka"}, "journal.backend")]
    for change, key in bad:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            config.from_dict({"journal": {**base["journal"], **change}})
    # a host without sinks is fine with jetstream (the sinks run elsewhere), not with the file journal
    no_sinks = {"sinks": {"sqlite": {"enabled": False}}, "rollups": {"enabled": False}}
    config.from_dict({**no_sinks, "journal": {**base["journal"], "consumers": ["sqlite", "rollup"]}})
    with pytest.raises(ConfigError, match="no sink is enabled"):
        config.from_dict(no_sinks)


def test_jetstream_journal_end_to_end(pipeline_factory, nats_cluster: NatsCluster) -> None:
    p: Pipeline = pipeline_factory(extra_toml=journal_toml(nats_cluster))
    p.start_all()
    for i in range(20):
        p.send(b'{"device":"js-1","ts":%d,"n":%d}\n' % (1_700_000_000_000 + i, i))
    packet = balcony_packet([(300, 30200, 25826), (301, 30300, 25832)])
    assert p.send(packet, port=p.binary_port, read_reply=1) == b"A"     # only after JetStream's quorum
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'js-1'") == 20, message="js-1 rows")
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'balcony'") == 6, message="balcony rows")
    assert p.latest("js-1") == {"n": 19}

    # A sink killed holding batches: JetStream delivers them again (ack_wait_s), stored once.
    def fed() -> int:
        return p.query({"op": "status"}).get("workers", {}).get("edge", {}).get("fed_batches", 0)

    before = wait_for(fed, message="the edge's counters")
    p.procs["sink-sqlite:1"].send_signal(19)       # SIGSTOP: it takes batches and writes nothing
    for i in range(20, 40):
        p.send(b'{"device":"js-1","ts":%d,"n":%d}\n' % (1_700_000_000_000 + i, i))
    wait_for(lambda: fed() > before, message="batches fed to the stopped sink")
    p.kill("sink-sqlite:1")
    p.start("sink-sqlite")
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'js-1'") == 40, timeout=30, message="redelivered")

    # The edge killed and restarted: it has nothing to replay; what it confirmed is in the stream.
    p.kill("edge:1")
    p.start("edge")
    wait_for(p._port_open, message="edge back")
    assert p.send(balcony_packet([(400, 30200, 25826)]), port=p.binary_port, read_reply=1) == b"A"
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'balcony'") == 9, message="after the edge restart")

    status = p.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    stream = json.loads(status.stdout)["journal"]
    assert stream["stream"] == "SENSORPIPE" and stream["replicas"] == 3
    assert {peer["name"] for peer in stream["peers"]} | {stream["leader"]} == {"n1", "n2", "n3"}
    wait_for(lambda: all(c["pending"] == 0
                         for c in json.loads(p.cli("status", "--json").stdout)["journal"]["consumers"].values()),
             timeout=20, message="every consumer caught up")
    db = p.db()
    assert db.execute("SELECT count(*), count(DISTINCT ts) FROM readings WHERE device='js-1' AND field='n'"
                      ).fetchone() == (40, 40)
    db.close()


@pytest.mark.unit
def test_authenticated_packets_once_with_shared_counters(pipeline_factory, nats_cluster: NatsCluster) -> None:
    """Authenticated binary packets with the JetStream journal: each goes under its key's message id
    and its counter to the shared KV bucket before the A; an edge restarted (SIGKILL) reads the bucket
    before the first packet of a connection, so the board's resend is answered and stored once."""
    from tests.test_security import SECURE, add_device, balcony, dead_letters, edge_counter, send_packet
    from workers.core import credentials
    p: Pipeline = pipeline_factory(extra_toml=journal_toml(nats_cluster), **SECURE)
    p.start_all()
    key = credentials.mac_key_for(add_device(p, "balcony"))
    first = credentials.sign_packet(key, balcony(700), 5)
    assert send_packet(p, first, refused=False) == b"A"
    p.kill("edge:1")
    p.start("edge")
    wait_for(p._port_open, message="edge back")
    assert send_packet(p, first, refused=False) == b"A"                  # known from the bucket
    assert send_packet(p, credentials.sign_packet(key, balcony(666), 4), refused=True) == b""   # replayed
    assert send_packet(p, credentials.sign_packet(key, balcony(701), 6), refused=False) == b"A"
    wait_for(lambda: p.latest("balcony").get("light") == 701, message="the next packet")
    wait_for(lambda: edge_counter(p, "binary_resent") == 1 and edge_counter(p, "counter_writes") >= 1,
             message="the edge's counters")
    lights = [row[0] for row in p.db().execute(
        "SELECT value FROM readings WHERE device = 'balcony' AND field = 'light' ORDER BY value")]
    assert lights == [700, 701]
    assert sum("replayed packet" in d["reason"] for d in dead_letters(p)) == 1
