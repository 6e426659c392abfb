"""The MongoDB sink against a real MongoDB wire-protocol server (mongoeco), read back with pymongo.

mongoeco's inserts slow down as a collection grows, so every test uses its own small database.
"""
from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from tests.pipeline import Pipeline, free_port, wait_for
from tests.servers import Mongo, unique_name
from tests.sinktools import BASE_TS_MS, OutboxHarness, restart_with_full_spool, send_readings, sink_status
from workers.core import config as config_mod
from workers.core.config import MongoSink as MongoOptions
from workers.core.envelope import Event, Reading, Seen, Stats, rollup_reading
from workers.processes.query import LatestValues, restore_from_mongo
from workers.sinks import Batch, PermanentError, TransientError
from workers.sinks.mongo import MongoSink, escape_document, escape_key, unescape_document, unescape_key

T0 = BASE_TS_MS * 1_000_000
S = 1_000_000_000


def sink_for(url: str, database: str, **options: object) -> MongoSink:
    sink = MongoSink(MongoOptions(enabled=True, url=url, database=database, connect_timeout_s=1.0, **options))
    sink.connect()
    return sink


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, stored", [
    ("temp", "temp"), ("temp.c", "temp%2Ec"), ("$where", "%24where"), ("100%", "100%25"), ("", "%"),
    ("a\x00b", "a%00b"), ("%24", "%2524"), ("%", "%25"), ("Küche.温度", "Küche%2E温度"),
])
def test_names_are_escaped_reversibly(name: str, stored: str) -> None:
    assert escape_key(name) == stored
    assert unescape_key(stored) == name


def test_escaping_round_trips_any_name() -> None:
    rng = random.Random(7)
    alphabet = "ab.$%\x00 é温2F"
    for _ in range(5000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        key = escape_key(name)
        assert "." not in key and "$" not in key and "\x00" not in key and key
        assert unescape_key(key) == name
    body = {"a.b": [{"$x": 1}, {"": {"%": 2}}], "ok": "$not-a-key.value"}
    assert escape_document(body) == {"a%2Eb": [{"%24x": 1}, {"%": {"%25": 2}}], "ok": "$not-a-key.value"}
    assert unescape_document(escape_document(body)) == body


# --------------------------------------------------------------------------- a real server


def test_latest_one_document_per_device_and_older_never_wins(mongo: Mongo) -> None:
    database = unique_name("latest")
    sink = sink_for(mongo.url, database)
    sink.write(Batch([Reading("d1", T0 + 2 * S, {"temp": 22.5, "humi": 50}, {}),
                      Reading("d1", T0 + 1 * S, {"temp": 99.0, "door": "open"}, {}),    # older, same batch
                      Reading("d2", T0, {"temp": 10.0}, {})], []))
    sink.write(Batch([Reading("d1", T0 + 0 * S, {"temp": -1.0, "humi": -1}, {})], []))      # older, later batch
    sink.write(Batch([Reading("d1", T0 + 3 * S, {"humi": 51}, {})], []))                     # newer
    with mongo.client() as client:
        docs = {d["_id"]: d for d in client[database]["latest"].find()}
    assert set(docs) == {"d1", "d2"}
    fields = docs["d1"]["fields"]
    assert (fields["temp"]["value"], fields["temp"]["ts"]) == (22.5, T0 + 2 * S)
    assert (fields["humi"]["value"], fields["humi"]["ts"]) == (51, T0 + 3 * S)
    assert (fields["door"]["value"], fields["door"]["ts"]) == ("open", T0 + 1 * S)
    assert int(docs["d1"]["last_seen"].timestamp() * 1000) == BASE_TS_MS + 3000
    assert int(fields["humi"]["time"].timestamp() * 1000) == BASE_TS_MS + 3000


def test_device_strings_are_values_never_operators(mongo: Mongo) -> None:
    database = unique_name("inject")
    sink = sink_for(mongo.url, database, store_readings=True)
    hostile = {"$set": 1.0, "a.b": 2.0, "": 3.0, "x": "$fields", "y": "$$ROOT", "100%": 4.0}
    sink.write(Batch([Reading("dev.$1", T0, dict(hostile), {"pl.ace": "$x"})],
                     [Event("dev.$1", T0, "scan", {"$where": "1", "card.no": [{"$gt": ""}]})]))
    with mongo.client() as client:
        db = client[database]
        latest = db["latest"].find_one({"_id": "dev.$1"})
        assert {unescape_key(k): v["value"] for k, v in latest["fields"].items()} == hostile
        reading = db["readings"].find_one({"device": "dev.$1"})
        assert {unescape_key(k): v for k, v in reading["fields"].items()} == hostile
        assert unescape_document(reading["tags"]) == {"pl.ace": "$x"}
        event = db["events"].find_one({"device": "dev.$1"})
        assert unescape_document(event["body"]) == {"$where": "1", "card.no": [{"$gt": ""}]}


def test_events_and_history_are_stored_once_however_often_written(mongo: Mongo) -> None:
    database = unique_name("once")
    sink = sink_for(mongo.url, database, store_readings=True)
    scans = [Event("door-1", T0, "verifiedRecordU", {"cmd": "verifiedRecordU", "card": 1}),
             Event("door-1", T0, "verifiedRecordU", {"cmd": "verifiedRecordU", "card": 2}),  # same instant, other card
             Event("door-1", T0 + S, "failed_read", {"fields": ["temp"]})]
    readings = [Reading("d", T0 + i * S, {"n": i, "t": i / 2}, {"place": "x"}) for i in range(20)]
    for _ in range(3):      # redelivered batches
        sink.write(Batch(readings, scans))
    sink.write(Batch([Reading("d", T0, {"extra": 1.0}, {})], []))     # same instant, another field
    with mongo.client() as client:
        db = client[database]
        assert db["events"].count_documents({}) == 3
        assert sorted(e["body"]["card"] for e in db["events"].find({"kind": "verifiedRecordU"})) == [1, 2]
        assert db["readings"].count_documents({}) == 20
        first = db["readings"].find_one({"device": "d", "ts": T0})
        assert first["fields"] == {"n": 0, "t": 0.0, "extra": 1.0} and first["tags"] == {"place": "x"}
        names = {c: {tuple(i["key"].items()) for i in db[c].list_indexes()} for c in ("latest", "events", "readings")}
    assert (("last_seen", -1),) in names["latest"]
    assert (("device", 1), ("time", -1)) in names["events"] and (("kind", 1), ("time", -1)) in names["events"]
    assert (("device", 1), ("time", -1)) in names["readings"]


def test_rollups_one_document_per_window_and_a_correction_replaces_it(mongo: Mongo) -> None:
    database = unique_name("rollups")
    sink = sink_for(mongo.url, database)
    assert sink.takes_rollups
    first = rollup_reading("balcony", "1m", T0, {"temperature": Stats(60, 21.0, 22.0, 21.5, 21.9),
                                                 "hum.rel": Stats(60, 50, 52, 51.0, 52)})
    corrected = rollup_reading("balcony", "1m", T0, {"temperature": Stats(61, 20.5, 22.0, 21.4, 21.9)})
    for batch in ([first], [first], [corrected]):
        sink.write(Batch(batch, []))
    with mongo.client() as client:
        db = client[database]
        docs = {d["field"]: d for d in db["rollups"].find({"device": "balcony", "window": "1m"})}
        assert set(docs) == {"temperature", "hum.rel"}
        assert {k: docs["temperature"][k] for k in ("start", "count", "min", "max", "mean", "last")} == {
            "start": T0, "count": 61, "min": 20.5, "max": 22.0, "mean": 21.4, "last": 21.9}
        assert docs["hum.rel"]["count"] == 60
        assert db["latest"].count_documents({}) == 0                  # a rollup is not a device's reading
        keys = {tuple(i["key"].items()) for i in db["rollups"].list_indexes()}
    assert (("device", 1), ("field", 1), ("window", 1), ("time", -1)) in keys


def test_presence_is_the_newest_arrival_whatever_the_order(mongo: Mongo) -> None:
    database = unique_name("presence")
    sink = MongoSink(MongoOptions(enabled=True, url=mongo.url, database=database, connect_timeout_s=1.0),
                     offline_after_s=lambda device: 60.0 if device == "door-1" else 900.0)
    sink.connect()
    newer = Seen("door-1", T0 + S, "mqtt:doors", 0, "fungxi_door-1_upLink")
    older = Seen("door-1", T0, "text", 7, "10.0.0.7:51234")
    sink.write(Batch([], [], [newer, Seen("gh-1", T0, "text", 8, "10.0.0.8:4000")]))
    sink.write(Batch([], [], [older]))                                  # a batch redelivered late
    with mongo.client() as client:
        docs = {d["_id"]: d for d in client[database]["devices"].find()}
    assert {k: docs["door-1"][k] for k in ("seen_ts", "via", "peer", "offline_after_s")} == {
        "seen_ts": T0 + S, "via": "mqtt:doors", "peer": "fungxi_door-1_upLink", "offline_after_s": 60.0}
    assert docs["door-1"]["last_seen"].timestamp() * 1000 == BASE_TS_MS + 1000
    assert docs["gh-1"]["via"] == "text" and docs["gh-1"]["offline_after_s"] == 900.0


def test_readings_history_is_off_by_default(mongo: Mongo) -> None:
    database = unique_name("nohistory")
    sink_for(mongo.url, database).write(Batch([Reading("d", T0, {"n": 1}, {})], []))
    with mongo.client() as client:
        assert "readings" not in client[database].list_collection_names()
        assert client[database]["latest"].count_documents({}) == 1


def test_what_mongodb_cannot_store_becomes_a_dead_letter(mongo: Mongo, tmp_path: Path) -> None:
    database = unique_name("refused")
    sink = sink_for(mongo.url, database)
    with pytest.raises(PermanentError):
        sink.write(Batch([Reading("d", T0, {"n": 2 ** 70}, {})], []))
    # JSON (orjson) lets a device send up to 2**64 - 1; BSON stops at 2**63 - 1
    too_big = 2 ** 63 + 5
    harness = OutboxHarness(sink, MongoOptions(enabled=True), tmp_path)
    good = [Reading(f"d{i}", T0 + i, {"n": i}, {}) for i in range(6)]
    harness.outbox.add([1], good[:3] + [Reading("huge", T0, {"n": too_big}, {})] + good[3:], [])
    harness.outbox.flush()
    assert harness.acked == [1]
    [letter] = harness.dead()
    assert letter.device == "huge" and f'"n":{too_big}'.encode() in letter.raw
    with mongo.client() as client:
        assert sorted(d["_id"] for d in client[database]["latest"].find()) == [f"d{i}" for i in range(6)]
    harness.close()


def test_a_server_that_is_away_is_transient(mongo: Mongo) -> None:
    sink = sink_for(f"mongodb://127.0.0.1:{free_port()}", unique_name("away"))
    with pytest.raises(TransientError, match="unreachable"):
        sink.write(Batch([Reading("d", T0, {"n": 1}, {})], []))


def test_the_query_worker_restores_latest_values_from_mongo(mongo: Mongo) -> None:
    database = unique_name("restore")
    sink_for(mongo.url, database).write(Batch([Reading("d1", T0, {"temp.c": 21.5, "ok": True}, {}),
                                               Reading("d2", T0 + S, {"n": 3}, {})], []))
    cfg = config_mod.from_dict({"sinks": {"mongo": {"enabled": True, "url": mongo.url, "database": database}}})
    latest = LatestValues()
    assert restore_from_mongo(cfg, latest) == 3
    assert {d: latest.fields(d) for d in latest.newest} == {"d1": {"temp.c": (21.5, T0), "ok": (True, T0)},
                                                            "d2": {"n": (3, T0 + S)}}


# --------------------------------------------------------------------------- in the pipeline


def mongo_toml(url: str, database: str, endpoint_port: int) -> str:
    return f"""
[sinks.mongo]
enabled = true
endpoint = "tcp://127.0.0.1:{endpoint_port}"
url = "{url}"
database = "{database}"
store_readings = true
flush_interval_ms = 50
retry_initial_s = 0.2
retry_max_s = 1.0
connect_timeout_s = 0.5
"""


ROLES = ("query", "sink-sqlite", "sink-mongo", "parser", "parser", "edge")


def test_every_reading_survives_a_mongo_outage_and_a_sink_restart(pipeline_factory, mongo: Mongo) -> None:
    database = unique_name("outage")
    pipeline: Pipeline = pipeline_factory(extra_toml=mongo_toml(mongo.url, database, free_port()),
                                          rollups="enabled = false")      # ROLES start no rollup worker
    pipeline.start_all(ROLES)
    devices = ["m-a", "m-b"]

    def stored() -> list[dict]:
        with mongo.client(serverSelectionTimeoutMS=500) as client:
            return list(client[database]["readings"].find({}, {"device": 1, "ts": 1, "fields": 1}))

    send_readings(pipeline, devices, range(0, 40))
    wait_for(lambda: len(stored()) == 80, timeout=30, message="the first readings in MongoDB")

    mongo.stop()
    send_readings(pipeline, devices, range(40, 80))
    wait_for(lambda: sink_status(pipeline, "mongo").get("spooled", 0) >= 80, timeout=30,
             message="readings spooled while MongoDB is away")
    wait_for(lambda: pipeline.count_rows("readings") == 320, message="SQLite kept flowing meanwhile (2 fields x 160)")

    restart_with_full_spool(pipeline, "mongo")
    send_readings(pipeline, devices, range(80, 120))
    wait_for(lambda: pipeline.count_rows("readings") == 480, timeout=30, message="SQLite still flowing")

    mongo.start()
    wait_for(lambda: len(stored()) == 240, timeout=60, message="every reading in MongoDB")
    docs = stored()
    keys = [(d["device"], d["ts"]) for d in docs]
    assert len(set(keys)) == len(keys) == 240                 # exactly once per (device, timestamp)
    assert set(keys) == {(dev, (BASE_TS_MS + i * 1000) * 1_000_000) for dev in devices for i in range(120)}
    for d in docs:
        i = (d["ts"] // 1_000_000 - BASE_TS_MS) // 1000
        assert d["fields"] == {"n": i, "temp": 20 + i / 8}
    with mongo.client() as client:
        latest = {d["_id"]: d for d in client[database]["latest"].find()}
    assert {dev: latest[dev]["fields"]["n"]["value"] for dev in devices} == {"m-a": 119, "m-b": 119}
    wait_for(lambda: sink_status(pipeline, "mongo").get("state") == "ok", message="spool empty again")

    # the query worker, restarted, takes its latest values from MongoDB
    pipeline.stop("query:1")
    pipeline.start("query")
    wait_for(lambda: pipeline.latest("m-a") == {"n": 119, "temp": 20 + 119 / 8}, message="restored latest values")
    assert "latest values from mongo" in (pipeline.logs / "query_1.log").read_text()


def test_a_number_beyond_64_bits_is_a_dead_letter_not_a_stuck_sink(pipeline_factory, mongo: Mongo) -> None:
    database = unique_name("u64")
    pipeline: Pipeline = pipeline_factory(extra_toml=mongo_toml(mongo.url, database, free_port()),
                                          rollups="enabled = false")      # ROLES start no rollup worker
    pipeline.start_all(ROLES)
    # JSON allows integers up to 2**64 - 1; SQLite and BSON stop at 2**63 - 1
    pipeline.send(b'{"device":"ok-1","n":1}\n{"device":"big","n":18446744073709551615}\n{"device":"ok-2","n":2}\n')
    wait_for(lambda: pipeline.count_rows("readings") == 2, message="the good readings in SQLite")
    with mongo.client() as client:
        wait_for(lambda: client[database]["latest"].count_documents({}) == 2, message="the good ones in MongoDB")

    def dead_sources() -> list[str]:
        result = pipeline.cli("deadletters", "--json")
        return sorted(letter["source"] for letter in orjson.loads(result.stdout)) if result.returncode == 0 else []

    # The parser sets it aside before any sink sees it (workers/core/storable.py): one dead letter.
    assert wait_for(lambda: dead_sources() == ["parser"], message="one dead letter")
    pipeline.send(b'{"device":"ok-3","n":3}\n')                       # both sinks still take readings
    wait_for(lambda: pipeline.count_rows("readings") == 3, message="SQLite still writing")
    with mongo.client() as client:
        wait_for(lambda: client[database]["latest"].count_documents({}) == 3, message="MongoDB still writing")
