"""A person in a real browser (Debian's headless Chromium through Selenium): signs in with the
form in eu-west, creates an event whose title holds markup (shown as text, no script ran),
sees it listed at once with the "served by / took" lines, edits and deletes it, signs out,
opens the live dashboard (every region, charts drawn), and sees the read-only banner while the
primary is cut off. Screenshots go to the test's tmp folder (and $LATITUDE_ARTIFACTS_DIR)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from latitude.lab.harness import wait_until

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PRIMARY, EU = "us-west", "eu-west"
MARKUP = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(
            "needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver):"
            " apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path):
    folder = tmp_path / "screenshots"
    folder.mkdir()
    extra = os.environ.get("LATITUDE_ARTIFACTS_DIR")

    def take(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        driver.save_screenshot(str(path))
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    return take


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def submit(driver, form_id: str, **fields) -> None:
    from selenium.webdriver.common.by import By

    form = driver.find_element(By.ID, form_id)
    for name, value in fields.items():
        box = form.find_element(By.NAME, name)
        box.clear()
        box.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


wait_for = functools.partial(wait_until, step=0.1)  # each poll reads the whole page


def test_a_person_uses_the_calendar_in_eu_west(calendar, browser, shots):
    from selenium.webdriver.common.by import By

    url = f"http://127.0.0.1:{calendar.state().regions[EU].app_port}"
    rtt = calendar.topology().rtt_ms(EU, PRIMARY)
    browser.get(url + "/")
    assert browser.find_element(By.ID, "sign-in")
    shots(browser, "1-sign-in")

    submit(browser, "sign-in", name="Ada from Dublin")
    wait_for(lambda: "Welcome" in browser.page_source, what="the welcome")
    assert "Ada from Dublin" in text_of(browser, "flash")
    written = text_of(browser, "last-write")
    m = re.fullmatch(
        r"your write went to us-west: (\d+) ms, one ocean round trip( \(\d+ ms of it at the primary\))?",
        written,
    )
    assert m, written
    assert int(m.group(1)) >= 0.9 * rtt  # the sign-in crossed the ocean once
    served = text_of(browser, "served-by")
    assert re.fullmatch(
        r"read in eu-west from its replica, \d+ ms \(replica \d+ ms behind.*\)", served
    ), served

    title = f"Planning {MARKUP} {time.time_ns()}"
    submit(browser, "new-event", title=title)
    wait_for(lambda: "Created" in browser.page_source, what="the new event")
    listed = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#events a.title")]
    assert title in listed  # shown at once, and as the very text typed
    assert browser.find_elements(By.CSS_SELECTOR, "#events img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#events script") == []
    assert browser.execute_script("return window.__xss === undefined")
    assert re.fullmatch(
        r"your write went to us-west: \d+ ms, one ocean round trip( \(\d+ ms of it at the primary\))?",
        text_of(browser, "last-write"),
    )
    shots(browser, "2-event-created")

    browser.find_element(By.LINK_TEXT, title).click()
    wait_for(lambda: browser.find_elements(By.ID, "edit-event"), what="the event page")
    assert text_of(browser, "event-title") == title
    assert "read in eu-west from its replica" in text_of(browser, "served-by")
    renamed = f"Renamed {time.time_ns()}"
    submit(browser, "edit-event", title=renamed)
    wait_for(lambda: "Saved" in browser.page_source, what="the edit")
    listed = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#events a.title")]
    assert renamed in listed and title not in listed

    browser.find_element(By.LINK_TEXT, renamed).click()
    wait_for(lambda: browser.find_elements(By.ID, "delete-event"), what="the event page")
    browser.find_element(By.CSS_SELECTOR, "#delete-event button").click()
    wait_for(lambda: "Deleted the event" in browser.page_source, what="the deletion")
    assert renamed not in [
        a.text for a in browser.find_elements(By.CSS_SELECTOR, "#events a.title")
    ]
    shots(browser, "3-after-delete")

    browser.find_element(By.ID, "sign-out").click()
    wait_for(lambda: browser.find_elements(By.ID, "sign-in"), what="the sign-in form")


def test_the_dashboard_shows_every_region_with_charts(calendar, browser, shots):
    from selenium.webdriver.common.by import By

    url = f"http://127.0.0.1:{calendar.state().regions[EU].app_port}"
    browser.get(url + "/_latitude/dashboard")
    wait_for(
        lambda: (
            int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0) >= 3
        ),
        30,
        "three updates",
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#regions tbody tr")
    by_region = {r.get_attribute("data-region"): r.text for r in rows}
    assert set(by_region) == {"us-west", "eu-west", "ap-southeast"}
    assert all(" up " in f" {text} " for text in by_region.values()), by_region
    assert "primary" in by_region["us-west"]
    lines = browser.find_elements(By.CSS_SELECTOR, "#chart-writes polyline")
    assert len(lines) == 2  # one line per replica region
    points = lines[0].get_attribute("points").split()
    assert len(points) >= 3
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart-kinds rect")
    assert bars, "no latency bars drawn"
    shots(browser, "4-dashboard")


def test_the_read_only_banner_while_the_primary_is_cut_off(healed, calendar, browser, shots):
    from selenium.webdriver.common.by import By

    world = healed
    url = f"http://127.0.0.1:{world.state().regions[EU].app_port}"
    browser.get(url + "/")
    assert not browser.find_elements(By.ID, "read-only")
    world.link("cut", PRIMARY, EU)

    def banner():
        browser.get(url + "/")
        return browser.find_elements(By.ID, "read-only")

    shown = wait_for(banner, 15, "the read-only banner")
    assert "us-west" in shown[0].text and "cannot be saved" in shown[0].text
    shots(browser, "5-read-only")
    world.link("heal", PRIMARY, EU)
    wait_for(lambda: not banner(), 15, "the banner to go")


def test_a_slower_writes_notice_while_only_the_primary_gateway_is_down(calendar, browser, shots):
    """The primary's app is down but its database answers: writes still work here, over the
    ocean (the gateway's fallback), so the page says so instead of claiming read-only."""
    from selenium.webdriver.common.by import By

    from tests.conftest import wait_healthy

    url = f"http://127.0.0.1:{calendar.state().regions[EU].app_port}"
    calendar.kill(PRIMARY, "app")
    try:

        def notice():
            browser.get(url + "/")
            return browser.find_elements(By.ID, "slow-writes")

        shown = wait_for(notice, 15, "the slower-writes notice")
        assert "over the ocean" in shown[0].text
        assert not browser.find_elements(By.ID, "read-only")
        shots(browser, "6-slow-writes")
    finally:
        calendar.revive(PRIMARY, "app")
        wait_healthy(calendar, PRIMARY)
