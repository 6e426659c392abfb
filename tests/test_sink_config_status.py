"""Database sink configuration (environment overrides, checks) and what `status` shows per sink."""
from __future__ import annotations

from pathlib import Path

import pytest

from workers.core import config as config_mod
from workers.core.config import ConfigError, redact_url
from workers.core.envelope import Event, Reading
from workers.core.outbox import Spool, encode_batch, sink_summary
from workers.sinks import Batch


def load(table: dict, env: dict | None = None) -> config_mod.Config:
    return config_mod.from_dict(table, env=env or {})


def test_database_addresses_and_secrets_come_from_the_environment() -> None:
    cfg = load({"sinks": {"influx": {"enabled": True, "url": "http://file:8086", "token": "in-file"},
                          "mongo": {"enabled": True}}},
               env={"SENSORPIPE_INFLUX_URL": "https://influx.example:8086", "SENSORPIPE_INFLUX_TOKEN": "s3cret",
                    "SENSORPIPE_INFLUX_ORG": "home", "SENSORPIPE_INFLUX_BUCKET": "garden/autogen",
                    "SENSORPIPE_MONGO_URL": "mongodb://u:p@db:27017/?authSource=admin",
                    "SENSORPIPE_MONGO_DATABASE": "garden"})
    influx, mongo = cfg.sinks.influx, cfg.sinks.mongo
    assert (influx.url, influx.token, influx.org, influx.bucket) == \
        ("https://influx.example:8086", "s3cret", "home", "garden/autogen")
    assert (mongo.url, mongo.database) == ("mongodb://u:p@db:27017/?authSource=admin", "garden")
    assert load({"sinks": {"influx": {"enabled": True, "token": "in-file"}}}).sinks.influx.token == "in-file"


@pytest.mark.parametrize("table, message", [
    ({"influx": {"enabled": True, "url": "influx:8086"}}, "sinks.influx.url"),
    ({"influx": {"enabled": True, "measurement": ""}}, "sinks.influx.measurement"),
    ({"influx": {"enabled": True, "integers": "int"}}, "sinks.influx.integers"),
    ({"influx": {"enabled": True, "tokn": "x"}}, "did you mean 'token'"),
    ({"mongo": {"enabled": True, "url": "http://db"}}, "sinks.mongo.url"),
    ({"mongo": {"enabled": True, "url": "mongodb://db:notaport"}}, "sinks.mongo.url"),
    ({"mongo": {"enabled": True, "database": "a.b"}}, "sinks.mongo.database"),
])
def test_bad_sink_settings_name_the_key(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load({"sinks": table})


def test_one_endpoint_under_two_names_is_refused() -> None:
    with pytest.raises(ConfigError, match="sinks.influx.endpoint: tcp://127.0.0.1:5571 is sinks.sqlite.endpoint"):
        load({"sinks": {"influx": {"enabled": True, "endpoint": "tcp://127.0.0.1:5571"}}})
    with pytest.raises(ConfigError, match="rollups.endpoint"):
        load({"rollups": {"endpoint": "tcp://127.0.0.1:5555"}})
    load({"sinks": {"influx": {"enabled": True}, "mongo": {"enabled": True}, "webhook": {"enabled": True,
          "hooks": [{"url": "http://127.0.0.1:9/h"}]}}})          # the defaults never collide


def test_passwords_stay_out_of_messages() -> None:
    assert redact_url("mongodb://user:pa55@db:27017/x") == "mongodb://user:***@db:27017/x"
    assert redact_url("mongodb://db:27017") == "mongodb://db:27017"
    with pytest.raises(ConfigError) as error:
        load({"sinks": {"mongo": {"enabled": True, "url": "mongo://user:pa55@db"}}})
    assert "pa55" not in str(error.value)


def test_the_spool_knows_how_much_waits_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.append(Batch([Reading("d", 1, {"n": 1}, {})] * 3, [Event("d", 1, "scan", {})]))
    spool.append(Batch([Reading("d", 2, {"n": 2}, {})] * 2, []))
    assert (spool.waiting_readings, spool.waiting_events) == (5, 1)
    assert [p.name for p in spool.files] == ["0000000000000001.3.1.batch", "0000000000000002.2.0.batch"]

    # a file named the old way (no counts) is read back to count it
    (tmp_path / "spool" / "0000000000000003.batch").write_bytes(
        encode_batch(Batch([Reading("d", 3, {"n": 3}, {})] * 4, [])))
    again = Spool(tmp_path / "spool", fsync=False)
    assert (again.waiting_readings, again.waiting_events, len(again)) == (9, 1, 3)
    path, batch = again.oldest()
    assert len(batch.readings) == 3
    again.remove(path)
    assert (again.waiting_readings, again.waiting_events) == (6, 0)
    again.append(Batch([Reading("d", 4, {"n": 4}, {})], []))
    assert again.files[-1].name == "0000000000000004.1.0.batch"


def test_sink_summary_says_written_pending_spooled_dead_lettered() -> None:
    assert sink_summary({"written_readings": 10, "written_events": 2, "pending_readings": 3, "dead_letters": 1}) == {
        "written": 10, "events": 2, "pending": 3, "spooled": 0, "dead_lettered": 1, "dropped": 0,
        "write_failures": 0, "state": "ok"}
    away = sink_summary({"spool_readings": 500, "spool_events": 5, "spooled_batches": 2, "write_failures": 4})
    assert away["spooled"] == 505 and away["state"].startswith("spooling")
    assert sink_summary({"spool_readings": 9, "spool_full_now": 1})["state"].startswith("blocked")
