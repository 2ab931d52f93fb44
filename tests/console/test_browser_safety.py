"""The console's safety in a real browser: what a viewer sees and may do, CSRF, Mozrest's answers
as untrusted text, and a phone's width on every page.

One `mozrest-relay run` process, one emulator and one headless chromium serve every test of this
module (starting them costs seconds); no test here changes state, so their order does not
matter. The world: a dead delivery whose answer from Mozrest carries a `<script>` (the emulator
refuses an unknown SKU and echoes its name), a second dead one for another cause, and a pending
one at a paused venue.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import factories
from tests.conftest import Launcher, free_port
from tests.console.conftest import OPERATOR, TOKENS, VIEWER
from tests.console.test_browser import Console, _enqueue, open_browser, wait_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

VENUE, PAUSED_VENUE = "v-safety", "v-paused"
SCRIPT = "<script>window.__pwned=1</script>"
#: Links that lead to a write (each through a confirmation page); buttons are found by tag.
WRITE_LINKS = ("Retry group", "Retry all matching", "Resync…", "Erase personal data")
#: Buttons every signed-in page has that change nothing the relay sends.
HARMLESS_BUTTONS = ("Sign out", "Filter")

#: The write controls on the page: buttons other than the harmless ones, POST forms other than
#: sign-out, and links to a write's confirmation page.
_WRITE_CONTROLS_JS = """
const writeLinks = arguments[0], harmless = arguments[1], found = [];
for (const b of document.querySelectorAll('button, input[type=submit]')) {
  const label = (b.textContent || b.value || '').trim();
  if (!harmless.includes(label)) found.push('button: ' + label);
}
for (const f of document.querySelectorAll('form')) {
  const method = (f.getAttribute('method') || 'get').toLowerCase();
  if (method === 'post' && f.getAttribute('action') !== '/console/sign-out') {
    found.push('form: ' + f.getAttribute('action'));
  }
}
for (const a of document.querySelectorAll('a')) {
  const label = a.textContent.trim();
  if (writeLinks.includes(label) || a.classList.contains('button')) found.push('link: ' + label);
}
return found;
"""
#: Build a POST form in the page and submit it, as a page of another origin could not but a
#: script injected into this one could: the browser adds the session cookie itself.
_FORGE_JS = """
const form = document.createElement('form');
form.method = 'post';
form.action = arguments[0];
for (const [name, value] of Object.entries(arguments[1])) {
  const input = document.createElement('input');
  input.type = 'hidden'; input.name = name; input.value = value;
  form.appendChild(input);
}
document.body.appendChild(form);
window.__leaving = true;
HTMLFormElement.prototype.submit.call(form);
"""


@dataclass
class World:
    base: str
    api: httpx.Client
    script_id: int
    ghost_id: int
    pending_id: int
    group_key: str
    console: Console

    def delivery(self, delivery_id: int) -> dict[str, Any]:
        answer = self.api.get(f"/api/deliveries/{delivery_id}")
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        return body

    def pages(self) -> dict[str, list[str]]:
        """Every console page, each with the buttons and links to writes an operator sees on
        it (each button in its POST form)."""
        groups = ["link: Retry group"] * 2  # the SKU with a script, and GHOST-9
        venues = ["button: Pause", "button: Resume", *["button: Save", "link: Resync…"] * 2]
        return {
            "/console": [],
            "/console/deliveries": groups,
            "/console/deliveries?status=dead": [*groups, "link: Retry all matching"],
            f"/console/deliveries/{self.script_id}": ["button: Retry"],
            f"/console/deliveries/{self.pending_id}": ["button: Cancel"],
            "/console/deliveries/retry?status=dead": ["button: Requeue 2"],
            f"/console/groups/{self.group_key}/retry": ["button: Requeue 1"],
            "/console/bookings/bk-script": ["link: Erase personal data"],
            "/console/erase?booking_id=bk-script": ["button: Erase personal data"],
            "/console/outbox": [],
            "/console/outbox?outcome=queued": [],
            "/console/venues": venues,
            f"/console/venues?venue_id={VENUE}": venues,
            f"/console/venues/resync?venue_id={VENUE}": ["button: Resync 2 bookings"],
            "/console/audit": [],
        }


def _group_key(base: str, token: str, cause: str) -> str:
    """The failure group's key, read from the Deliveries page as an operator."""
    with httpx.Client(base_url=base) as client:
        page = client.get("/console/sign-in").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        client.post("/console/sign-in", data={"token": token, "csrf": csrf.group(1)})
        html = client.get("/console/deliveries").text
    for row in re.findall(r"<tr>.*?</tr>", html, re.S):
        key = re.search(r'/console/groups/([0-9a-f]+)/retry"', row)
        if cause in row and key is not None:
            return key.group(1)
    raise AssertionError(f"no failure group for {cause!r}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("console-safety")
    database = folder / "relay.db"
    database.write_bytes(sqlite_template.read_bytes())
    database_url = f"sqlite+aiosqlite:///{database}"
    launcher = Launcher(folder)
    browser_session = open_browser()
    try:
        emulator = launcher.emulator()
        control = httpx.Client(base_url=f"{emulator.url}/_emulator", timeout=5)
        control.put(f"/venues/{VENUE}/menu", json={"skus": ["PIZZA-001"], "reject_unknown": True})
        control.put(f"/venues/{VENUE}/tables", json={"tables": [{"id": "T1", "name": "Window"}]})
        control.close()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        launcher.start(
            "run",
            env={
                "DATABASE_URL": database_url,
                "MOZREST_WEBHOOK_URL": f"{emulator.url}/rms",
                "MOZREST_WEBHOOK_TOKEN": "test-token",
                "MOZREST_API_URL": str(emulator.url),
                "MOZREST_API_KEY": "test-key",
                "RELAY_API_TOKENS": TOKENS,
                "RELAY_PORT": str(port),
                "RELAY_POLL_INTERVAL": "20ms",
                "RELAY_HEARTBEAT_INTERVAL": "200ms",
            },
            wait_url=f"{base}/healthz",
        )
        api = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=10
        )
        api.post(
            f"/api/venues/{PAUSED_VENUE}/pause", json={"reason": "POS swap"}
        ).raise_for_status()
        asyncio.run(
            _enqueue(
                database_url,
                factories.state(
                    "bk-script",
                    venue_id=VENUE,
                    items=[{"sku": SCRIPT, "quantity": 1}],
                    contact={"firstname": "Ada", "lastname": "Lovelace"},
                ),
                factories.state(
                    "bk-ghost", venue_id=VENUE, items=[{"sku": "GHOST-9", "quantity": 1}]
                ),
                factories.state("bk-waiting", venue_id=PAUSED_VENUE),
            )
        )

        def settled() -> dict[str, int] | None:
            items = api.get("/api/deliveries").json()["items"]
            found = {d["booking_id"]: d for d in items}
            wanted = {"bk-script": "dead", "bk-ghost": "dead", "bk-waiting": "pending"}
            if any(found.get(b, {}).get("status") != s for b, s in wanted.items()):
                return None
            return {b: int(found[b]["id"]) for b in wanted}

        ids = wait_for(settled, message="two dead deliveries and one pending at a paused venue")
        driver = next(browser_session)
        yield World(
            base=base,
            api=api,
            script_id=ids["bk-script"],
            ghost_id=ids["bk-ghost"],
            pending_id=ids["bk-waiting"],
            group_key=_group_key(base, OPERATOR, "GHOST-9"),
            console=Console(driver, base, folder),
        )
        api.close()
    finally:
        browser_session.close()
        launcher.stop_all()


def sign_in_as(console: Console, token: str) -> None:
    console.open("/console/sign-in")
    console.driver.delete_all_cookies()
    console.open("/console/sign-in")
    console.driver.find_element(By.ID, "token").send_keys(token)
    console.press("Sign in")
    assert console.heading() == "Overview", console.text()


def status_code(driver: WebDriver) -> int:
    """The HTTP status of the page the browser shows (Navigation Timing's responseStatus)."""
    return int(
        driver.execute_script(
            "return performance.getEntriesByType('navigation')[0].responseStatus;"
        )
    )


def write_controls(driver: WebDriver) -> list[str]:
    return list(
        driver.execute_script(_WRITE_CONTROLS_JS, list(WRITE_LINKS), list(HARMLESS_BUTTONS))
    )


def forge(console: Console, action: str, fields: dict[str, str]) -> None:
    """POST a form built in the page to `action`, and wait for the answer's page."""
    console.driver.execute_script(_FORGE_JS, action, fields)
    wait_for(
        lambda: console.driver.execute_script(
            "return window.__leaving !== true && document.readyState === 'complete';"
        ),
        timeout=10,
        message=f"the answer to POST {action}",
    )


def session_csrf(driver: WebDriver) -> str:
    """The session's own CSRF token, from the Sign out form every page carries."""
    return str(
        driver.execute_script(
            "return document.querySelector('form.signout input[name=csrf]').value;"
        )
    )


def test_a_viewer_sees_no_write_control_on_any_page(world: World) -> None:
    """Every page, first as an operator (the controls are there), then as a viewer (none)."""
    console = world.console
    sign_in_as(console, OPERATOR)
    seen, expected = {}, {}
    for path, controls in world.pages().items():
        console.open(path)
        assert status_code(console.driver) == 200, path
        found = [c for c in write_controls(console.driver) if not c.startswith("form: ")]
        seen[path], expected[path] = sorted(found), sorted(controls)
    assert seen == expected
    sign_in_as(console, VIEWER)
    for path in world.pages():
        console.open(path)
        assert status_code(console.driver) == 200, path
        assert "(viewer)" in console.text(), path
        assert write_controls(console.driver) == [], path
    console.shot("viewer-delivery")


def test_writes_forged_with_a_viewers_cookie_are_refused_403(world: World) -> None:
    """Each of the console's writes, posted from the viewer's page with its valid CSRF token:
    403, nothing changes, and the refusal is audited under the viewer's name."""
    console = world.console
    sign_in_as(console, VIEWER)
    writes = {
        f"/console/deliveries/{world.script_id}/retry": {},
        f"/console/deliveries/{world.pending_id}/cancel": {},
        "/console/deliveries/retry": {"status": "dead"},
        f"/console/groups/{world.group_key}/retry": {},
        "/console/bookings/erase": {"booking_id": "bk-script"},
        "/console/venues/pause": {"venue_id": VENUE, "reason": "forged"},
        "/console/venues/resume": {"venue_id": PAUSED_VENUE},
        "/console/venues/resync": {"venue_id": VENUE},
        "/console/venues/items": {"venue_id": VENUE, "send_items": "strip"},
    }
    for action, fields in writes.items():
        console.open(f"/console/deliveries/{world.script_id}")
        forge(console, action, {"csrf": session_csrf(console.driver), **fields})
        assert status_code(console.driver) == 403, action
        assert console.heading() == "Refused", action
        assert "needs the operator role" in console.text(), action
    console.shot("viewer-forged-refused")

    assert world.delivery(world.script_id)["status"] == "dead"
    assert world.delivery(world.pending_id)["status"] == "pending"
    venues = {v["venue_id"]: v for v in world.api.get("/api/venues").json()["items"]}
    assert venues[PAUSED_VENUE]["paused"] and not venues[VENUE]["paused"]
    assert venues[VENUE]["send_items"] is None
    assert world.delivery(world.script_id)["payload"]["contact"]["firstname"] == "Ada"

    audit = world.api.get("/api/audit", params={"actor": "vera", "limit": 50}).json()["items"]
    assert sorted(r["action"] for r in audit) == sorted(
        [
            "delivery.retry",
            "delivery.cancel",
            "deliveries.retry_bulk",
            "deliveries.retry_bulk",
            "booking.erase",
            "venue.pause",
            "venue.resume",
            "venue.resync",
            "venue.update",
        ]
    )
    assert {r["result"] for r in audit} == {"refused"}


def test_a_post_without_the_csrf_token_is_refused_403(world: World) -> None:
    """An operator's session, so only the missing (or wrong) token can be why: 403 and nothing
    done; signing out without it is refused too."""
    console = world.console
    sign_in_as(console, OPERATOR)
    attempts: list[tuple[str, dict[str, str]]] = [
        (f"/console/deliveries/{world.script_id}/retry", {}),
        (f"/console/deliveries/{world.script_id}/retry", {"csrf": "not-this-sessions-token"}),
        (f"/console/deliveries/{world.pending_id}/cancel", {}),
        ("/console/deliveries/retry", {"status": "dead"}),
        ("/console/venues/pause", {"venue_id": VENUE, "reason": "no token"}),
        ("/console/bookings/erase", {"booking_id": "bk-script"}),
        ("/console/sign-out", {}),
    ]
    for action, fields in attempts:
        console.open("/console")
        forge(console, action, fields)
        assert status_code(console.driver) == 403, action
        assert console.heading() == "Refused", action
    console.shot("no-csrf-refused")

    assert world.delivery(world.script_id)["status"] == "dead"
    assert world.delivery(world.pending_id)["status"] == "pending"
    assert not world.api.get(f"/api/venues/{VENUE}").json()["paused"]
    console.open("/console")
    assert console.heading() == "Overview", "a sign-out without its CSRF token ended the session"


def test_an_answer_with_a_script_is_shown_as_text_and_runs_nothing(world: World) -> None:
    """Mozrest's 422 echoes the SKU `<script>window.__pwned=1</script>`: the delivery page and
    the failure groups show it as text, and no script runs."""
    console = world.console
    sign_in_as(console, OPERATOR)
    answer = world.api.get(f"/api/deliveries/{world.script_id}").json()["attempts"][0]
    assert SCRIPT in answer["response_body"], "the emulator's answer holds the script"
    for path in (f"/console/deliveries/{world.script_id}", "/console/deliveries"):
        console.open(path)
        assert console.driver.execute_script("return typeof window.__pwned;") == "undefined"
        assert SCRIPT in console.text(), path
        scripts = console.driver.execute_script(
            "return Array.from(document.scripts, s => s.getAttribute('src'));"
        )
        assert scripts == ["/console/static/console.js"], (path, scripts)
    answers = console.driver.find_elements(By.CSS_SELECTOR, "code.cause")
    assert any(SCRIPT in a.text for a in answers)
    console.open(f"/console/deliveries/{world.script_id}")
    shown = console.driver.find_element(By.CSS_SELECTOR, "pre.answer").text
    assert json.loads(shown)["detail"] == f"Unknown SKU(s): {SCRIPT}"
    console.shot("script-answer-as-text")


def test_every_page_fits_a_phones_width(world: World) -> None:
    """375 px wide: no page scrolls sideways, signed in or not, refusals included."""
    console = world.console
    sign_in_as(console, OPERATOR)
    console.driver.set_window_size(375, 800)
    try:
        width = console.driver.execute_script("return window.innerWidth")
        assert width <= 375, f"the window is {width} px wide, not a phone's 375"
        pages = [*world.pages(), "/console/deliveries/999999", "/console/sign-in"]
        for path in pages:
            console.open(path)
            scroll = console.driver.execute_script("return document.documentElement.scrollWidth")
            assert scroll <= width, (path, scroll)
        console.open("/console")
        forge(console, "/console/venues/pause", {"venue_id": VENUE})
        assert console.heading() == "Refused"
        assert console.driver.execute_script("return document.documentElement.scrollWidth") <= width
        console.shot("phone-refused")
    finally:
        console.driver.set_window_size(1280, 1000)
