import pytest

pytest_plugins = ["tests.servers", "tests.pipeline"]

# A test that uses one of these needs what `make test-servers` installs (VictoriaMetrics, mongoeco,
# Mosquitto, MicroPython) or starts worker processes on real sockets: it is marked ``servers``. Every
# other test is marked ``unit`` and runs on a fresh checkout after `make install` alone.
SERVER_FIXTURES = {"pipeline", "pipeline_factory", "victoria_server", "victoria", "mongo_server", "mongo",
                   "mosquitto_server", "mosquitto", "micropython", "micropython_unix", "nats_cluster"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="write tests/golden/<decoder>/<case>/expected.json from what the decoders give "
                          "(then read each one and keep it)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: needs no test server and no running pipeline (pytest -m unit)")
    config.addinivalue_line("markers", "servers: needs the test servers (make test-servers) or starts worker "
                                       "processes (pytest -m 'not servers' leaves these out)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("servers") is None and SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
        if item.get_closest_marker("servers") is None:
            item.add_marker(pytest.mark.unit)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures see whether the test failed (to print worker logs on failure).
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
