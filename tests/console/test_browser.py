"""The console in a real browser: Debian's headless chromium driven by Selenium, against a real
`mozrest-relay run` process and the Mozrest emulator on loopback. Each step's page is saved as a
screenshot in the test's tmp dir.

In CI (`CI=true`) a browser that cannot start fails the test; elsewhere it is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import create_engine
from mozrest_outbox import outbox_insert
from tests import factories
from tests.conftest import Launcher, free_port
from tests.console.conftest import OPERATOR, TOKENS

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: Two dead deliveries (Mozrest rejects an unknown SKU), one healthy venue beside them.
VENUE, OTHER_VENUE = "v-browser", "v-calm"
ITEMS = [{"sku": "PIZZA-001", "quantity": 1}, {"sku": "GHOST-9", "quantity": 1}]


def _start_browser() -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


def open_browser() -> Generator[WebDriver, None, None]:
    """One headless chromium, quit afterwards: fails in CI when none can start, else skips."""
    try:
        driver = _start_browser()
    except (WebDriverException, OSError) as exc:
        reason = f"no headless chromium could start ({CHROMIUM}, {CHROMEDRIVER}): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason + "; apt-get install chromium chromium-driver")
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One browser per module: starting chromium costs seconds."""
    yield from open_browser()


def wait_for(check: Callable[[], Any], *, timeout: float = 15.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s: {message}")


async def _enqueue(database_url: str, *payloads: dict[str, Any]) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            for payload in payloads:
                await conn.execute(outbox_insert(payload))
    finally:
        await engine.dispose()


class Console:
    """The browser on the console, with a screenshot per step."""

    def __init__(self, driver: WebDriver, base: str, shots: Path) -> None:
        self.driver, self.base, self.shots = driver, base, shots

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def _navigate(self, element: Any) -> None:
        """Click, then wait for the next page to replace this one.

        The old page is marked with a script variable, and the wait is for a document without it
        that has finished loading. Waiting for the old `<html>` element to go stale instead trips
        over Chromium's "Node with given id does not belong to the document" while it swaps them.
        """
        self.driver.execute_script("window.__leaving = true;")
        element.click()
        WebDriverWait(self.driver, 10, ignored_exceptions=(WebDriverException,)).until(
            lambda driver: driver.execute_script(
                "return window.__leaving !== true && document.readyState === 'complete';"
            )
        )

    def click_link(self, text: str) -> None:
        self._navigate(self.driver.find_element(By.LINK_TEXT, text))

    def press(self, label: str) -> None:
        buttons = self.driver.find_elements(By.XPATH, f"//button[normalize-space()='{label}']")
        assert buttons, f"no {label!r} button on {self.driver.current_url}"
        self._navigate(buttons[0])

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def heading(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "h1").text)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_an_operator_finds_fixes_and_retries_a_dead_delivery_in_a_browser(
    browser: WebDriver, launcher: Launcher, database_url: str, tmp_path: Path
) -> None:
    """Sign in (a wrong token first), read the overview, filter deliveries, open a dead one and
    read Mozrest's answer, fix the menu, press Retry and see it delivered, retry the rest of its
    failure group through the confirmation, pause and resume a venue and read its POS tables,
    check a phone's width, sign out and be asked to sign in again."""
    emulator = launcher.emulator()
    assert emulator.url is not None
    control = httpx.Client(base_url=f"{emulator.url}/_emulator", timeout=5)
    control.put(f"/venues/{VENUE}/menu", json={"skus": ["PIZZA-001"], "reject_unknown": True})
    control.put(f"/venues/{VENUE}/tables", json={"tables": [{"id": "T1", "name": "Window"}]})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    launcher.start(
        "run",
        env={
            "DATABASE_URL": database_url,
            "MOZREST_WEBHOOK_URL": f"{emulator.url}/rms",
            "MOZREST_WEBHOOK_TOKEN": "test-token",
            "MOZREST_API_URL": emulator.url,
            "MOZREST_API_KEY": "test-key",
            "RELAY_API_TOKENS": TOKENS,
            "RELAY_PORT": str(port),
            "RELAY_POLL_INTERVAL": "20ms",
            "RELAY_HEARTBEAT_INTERVAL": "200ms",
        },
        wait_url=f"{base}/healthz",
    )
    asyncio.run(
        _enqueue(
            database_url,
            factories.state("bk-dead-1", venue_id=VENUE, items=ITEMS),
            factories.state("bk-dead-2", venue_id=VENUE, items=ITEMS),
            factories.state("bk-fine", venue_id=OTHER_VENUE),
        )
    )
    shots = tmp_path / "screenshots"
    shots.mkdir()
    console = Console(browser, base, shots)

    # Sign in: a wrong token is refused, the operator's opens the overview.
    console.open("/console")
    assert console.heading() == "Sign in"
    console.driver.find_element(By.ID, "token").send_keys("wrong-token")
    console.press("Sign in")
    assert "That token is not valid." in console.text()
    console.driver.find_element(By.ID, "token").send_keys(OPERATOR)
    console.press("Sign in")
    assert console.heading() == "Overview"

    def overview_counts() -> bool:
        console.open("/console")
        body = console.text()
        return "DEAD\n2" in body.upper() and "LIVE WORKERS\n1" in body.upper()

    wait_for(overview_counts, message="the overview shows 2 dead and a live worker")
    console.shot("overview")
    assert OPERATOR not in console.driver.page_source

    # Deliveries, filtered to the dead ones; the failure group names the cause.
    console.click_link("Deliveries")
    console.driver.find_element(By.CSS_SELECTOR, "#status option[value='dead']").click()
    console.driver.find_element(By.ID, "venue_id").send_keys(VENUE)
    console.press("Filter")
    assert "status=dead" in console.driver.current_url
    assert "venue_id=" + VENUE in console.driver.current_url
    body = console.text()
    assert "422 Unknown SKU(s): GHOST-9" in body and "2 (2 dead, 0 retrying)" in body
    console.shot("deliveries")

    # The dead delivery: Mozrest's answer, then Retry once the menu knows the SKU.
    rows = console.driver.find_elements(
        By.CSS_SELECTOR, "table.cards a[href^='/console/deliveries/']"
    )
    console._navigate(rows[-1])
    assert "Unknown SKU(s): GHOST-9" in console.text()
    console.shot("delivery-dead")
    control.put(f"/venues/{VENUE}/menu", json={"skus": ["PIZZA-001", "GHOST-9"]})
    console.press("Retry")
    assert "Requeued" in console.text()
    page = console.driver.current_url.split("?")[0]

    def delivered() -> bool:
        console.driver.get(page)
        return "delivered" in console.heading()

    wait_for(delivered, message="the retried delivery is delivered")
    console.shot("delivery-delivered")

    # The rest of the group, through the confirmation page.
    console.click_link("Deliveries")
    console.click_link("Retry group")
    assert "This will requeue 1 delivery." in console.text()
    console.shot("retry-group-confirm")
    console.press("Requeue 1")
    assert "Requeued 1 deliveries" in console.text()
    wait_for(
        lambda: control.get("/bookings").json()["items"].keys() >= {"bk-dead-1", "bk-dead-2"},
        message="both bookings reached Mozrest",
    )

    # Venues: pause with a reason, resume, and the POS tables with the matching report.
    console.click_link("Venues")
    console.driver.find_element(By.ID, "reason-1").send_keys("POS swap tonight")
    console.press("Pause")
    assert "Paused" in console.text() and "POS swap tonight" in console.text()
    console.shot("venues-paused")
    console.press("Resume")
    assert "Resumed" in console.text()
    console.open(f"/console/venues?venue_id={VENUE}")
    tables = console.driver.find_element(By.ID, "tables").text
    assert "Matched (1)" in tables and "Window" in tables
    console.shot("venues-tables")

    # A phone's width: no horizontal scroll.
    console.driver.set_window_size(375, 800)
    for path in (
        "/console",
        "/console/deliveries",
        f"{page.removeprefix(base)}",
        "/console/venues",
    ):
        console.open(path)
        width = console.driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 375, (path, width)
    console.shot("phone-venues")
    console.driver.set_window_size(1280, 1000)

    # Sign out: the pages ask for sign-in again.
    console.open("/console")
    console.press("Sign out")
    assert console.heading() == "Sign in"
    console.open("/console/deliveries")
    assert console.heading() == "Sign in"
    control.close()
