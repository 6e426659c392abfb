"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver, installed
by deploy/test-servers.sh) driven by selenium, against a real pipeline with its HTTP worker.

It loads the page, sees a reading a board sends appear within 2 s, sees a chart drawn, sends a command
from the form and sees the board's acknowledgement. Screenshots (desktop and phone width) go to the
test's temporary directory, or to docs/ with SENSORPIPE_SCREENSHOTS=docs (how docs/web.md's are made).
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.pipeline import REPO, Pipeline, wait_for
from tests.test_web import WEB_ROLES, Board, wait_http

DOCS = REPO / "docs"
EXTRA = """
[devices.cellar]
offline_after_s = 1
"""


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:       # fail, never skip: the suite's own script installs them
        pytest.fail("chromium and chromedriver are not installed: run `deploy/test-servers.sh install`")
    return chromium, driver


@pytest.fixture
def browser():
    chromium, driver = browser_binaries()
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900", "--hide-scrollbars"):
        options.add_argument(flag)
    # the Service path keeps selenium from looking for (downloading) a driver of its own
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def text(chrome: webdriver.Chrome, css: str) -> str:
    found = chrome.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_dashboard_shows_live_readings_a_chart_and_sends_a_command(pipeline_factory, browser, tmp_path: Path) -> None:
    p: Pipeline = pipeline_factory(extra_toml=EXTRA, rollups='windows = ["1m", "1h"]\ngrace_s = 0.5')
    p.start_all(WEB_ROLES)
    wait_http(p)
    board = Board(p.text_port, "greenhouse-1")
    try:
        # an hour of history, a reading a minute, so the chart has rollups to draw
        now_ms = int(time.time() * 1000)
        for minutes_ago in range(60, 0, -1):
            board.send({"ts": now_ms - minutes_ago * 60_000, "temp": round(21 + 2 * math.sin(minutes_ago / 9), 2),
                        "humi": round(50 - 4 * math.sin(minutes_ago / 13), 1)})
        board.send({"temp": 21.5, "humi": 50})
        p.send(b'{"device":"cellar","temp":12.5}\n')
        wait_for(lambda: p.latest("greenhouse-1").get("temp") == 21.5, message="the first readings")
        wait_for(lambda: p.count_rows("rollups", "WHERE device = 'greenhouse-1' AND window = '1m'") >= 55,
                 message="the hour's rollups")

        browser.get(f"http://127.0.0.1:{p.http_port}/#greenhouse-1")
        wait_for(lambda: text(browser, '#latest tr[data-field="temp"] td.value') == "21.5", message="latest on the page")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '.chart[data-field="temp"] svg path.line'),
                 message="the temp chart drawn")
        path = browser.find_element(By.CSS_SELECTOR, '.chart[data-field="temp"] svg path.line').get_attribute("d")
        assert path.count("L") >= 50, path[:200]            # a point per 1m window of the hour
        assert "1m" in text(browser, '.chart[data-field="temp"] h3')
        wait_for(lambda: "offline" in (browser.find_element(By.CSS_SELECTOR, '#devices li[data-device="cellar"]')
                                       .get_attribute("class")), message="cellar offline")

        # a reading appears within 2 s of the board sending it, and the chart grows
        sent = time.monotonic()
        board.send({"temp": 23.25, "humi": 51})
        wait_for(lambda: text(browser, '#latest tr[data-field="temp"] td.value') == "23.25", timeout=2,
                 interval=0.02, message="the new reading on the page within 2 s")
        shown_after = time.monotonic() - sent
        assert shown_after < 2
        grown = browser.find_element(By.CSS_SELECTOR, '.chart[data-field="temp"] svg path.line').get_attribute("d")
        assert grown.count("L") == path.count("L") + 1

        # a command from the form, acknowledged by the board
        field = browser.find_element(By.ID, "command-json")
        field.clear()
        field.send_keys('{"cmd":"relay","pin":5,"on":true}')
        browser.find_element(By.ID, "command-send").click()
        wait_for(lambda: "delivered" in text(browser, "#command-result"), message="the send answered")
        wait_for(lambda: text(browser, "#commands tbody tr td.status") == "acked", timeout=10,
                 message="the acknowledgement shown")
        assert board.got[-1]["cmd"] == "relay" and board.got[-1]["pin"] == 5
        assert text(browser, "#health") == "all sinks ok"

        target = DOCS if os.environ.get("SENSORPIPE_SCREENSHOTS") == "docs" else tmp_path
        browser.save_screenshot(str(target / "web-desktop.png"))
        browser.set_window_size(390, 1500)                 # a phone's width, the page's length
        wait_for(lambda: browser.execute_script("return window.innerWidth") <= 400, message="phone width")
        wait_for(lambda: browser.execute_script("return document.querySelector('.chart svg').viewBox.baseVal.width")
                 <= 400, message="the charts drawn again at the phone's width")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 400   # nothing wider
        browser.save_screenshot(str(target / "web-phone.png"))
        print(f"reading shown {shown_after * 1000:.0f} ms after it was sent; screenshots in {target}")
    finally:
        board.close()
