import pytest

pytest_plugins = ["tests.pipeline", "tests.servers"]


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures see whether the test failed (to print worker logs on failure).
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
