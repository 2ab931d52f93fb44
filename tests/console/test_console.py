"""The operator console over HTTP (SPEC 14), on each backend: sign-in and sessions, CSRF and
roles, every page for both roles, the buttons and their audit rows, failure groups."""

from __future__ import annotations

import json
import re

import httpx

from app.console.sessions import SESSION_COOKIE
from tests import factories
from tests.console.conftest import (
    ALL_TOKENS,
    OPERATOR,
    TOKENS,
    VIEWER,
    answer_with,
    audit_of,
    browser,
    csrf_of,
    post_form,
    sign_in,
    signed_in,
)
from tests.integration.conftest import Api, running_api

GUEST = {
    "firstname": "Ysolde",
    "lastname": "Brackwater",
    "email": "ysolde.unique@example.org",
    "telephone": "+44700900777",
    "locale": "en",
}
PERSONAL = ("Ysolde", "Brackwater", "ysolde.unique@example.org", "+44700900777", "walnut-77")
LIST_PAGES = (
    "/console",
    "/console/deliveries",
    "/console/deliveries?status=dead",
    "/console/outbox",
    "/console/outbox?outcome=queued",
    "/console/venues",
    "/console/audit",
)


def personal_state(booking_id: str, **changes: object) -> dict[str, object]:
    return factories.state(booking_id, venue_id="v1", contact=GUEST, notes="walnut-77", **changes)


def buttons(html: str) -> list[str]:
    return re.findall(r"<button[^>]*>([^<]*)</button>", html)


def write_controls(html: str) -> list[str]:
    """The page's state-changing forms, and links to the confirmation pages that lead to one."""
    forms = re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', html)
    links = re.findall(r">(Retry group|Retry all matching|Erase personal data)</a>", html)
    return forms + links


async def test_sign_in_opens_a_strict_http_only_session_and_a_wrong_token_opens_none(
    api: Api,
) -> None:
    """A valid token gives an HttpOnly, SameSite=Strict cookie lasting RELAY_CONSOLE_SESSION
    (not Secure over plain HTTP, Secure over HTTPS); a wrong one is a 401 page and no cookie;
    without a session a page sends the browser to sign in."""
    async with browser(api) as client:
        assert (await client.get("/console")).status_code == 303
        wrong = await sign_in(client, "not-a-token")
        assert wrong.status_code == 401 and "not valid" in wrong.text
        assert SESSION_COOKIE not in wrong.headers.get("set-cookie", "")
        done = await sign_in(client, OPERATOR)
        assert done.status_code == 303 and done.headers["location"] == "/console"
        cookie = next(
            c for c in done.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
        )
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/console", "max-age=43200"} <= flags
        assert "secure" not in flags
        overview = await client.get("/console")
        assert overview.status_code == 200 and "otto" in overview.text
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://relay") as secure:
        done = await sign_in(secure, VIEWER)
        cookie = next(
            c for c in done.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
        )
        assert "secure" in cookie.lower()


async def test_a_session_works_on_every_replica_and_signing_out_ends_it_on_all(
    database_url: str,
) -> None:
    """Two app instances on one database: a session opened on one works on the other; signing
    out on the second ends it on the first; the stored row holds no session id."""
    async with (
        running_api(database_url, relay_api_tokens=TOKENS) as first,
        running_api(database_url, relay_api_tokens=TOKENS) as second,
        signed_in(first, OPERATOR) as client,
    ):
        cookie = client.cookies[SESSION_COOKIE]
        async with browser(second) as other:
            other.headers["Cookie"] = f"{SESSION_COOKIE}={cookie}"
            assert (await other.get("/console/deliveries")).status_code == 200
            out = await post_form(other, "/console/sign-out", "/console")
            assert out.status_code == 303
        assert (await client.get("/console")).status_code == 303
        forged = await client.post("/console/venues/pause", data={"venue_id": "v1"})
        assert forged.status_code == 403


async def test_no_token_configured_shuts_the_console_like_the_api(database_url: str) -> None:
    """With neither RELAY_ADMIN_TOKEN nor RELAY_API_TOKENS, every console path answers 503."""
    async with running_api(database_url, relay_admin_token=None) as api, browser(api) as client:
        for path in ("/console", "/console/sign-in", "/console/deliveries"):
            answer = await client.get(path)
            assert answer.status_code == 503
            assert answer.json() == {"detail": "RELAY_ADMIN_TOKEN is not set"}


async def test_every_page_renders_for_both_roles_without_tokens_or_guest_data_in_lists(
    api: Api,
) -> None:
    """Viewer and operator see every page (200); no token appears in any page or URL; guest
    data appears on the delivery and booking pages only; a viewer sees no write button."""
    await api.write(personal_state("b1"), factories.state("b2", venue_id="v2"))
    dead = await answer_with(api, 422, '{"detail": "Unknown SKU(s): X"}')
    await api.store.pause_venue("v2", by="otto", reason="POS swap")
    for token in (VIEWER, OPERATOR):
        async with signed_in(api, token) as client:
            pages = [*LIST_PAGES, f"/console/deliveries/{dead[0]}", "/console/bookings/b1"]
            pages += ["/console/deliveries/retry?status=dead", "/console/erase?booking_id=b1"]
            for path in pages:
                answer = await client.get(path)
                assert answer.status_code == 200, (path, answer.text)
                assert not any(t in answer.text or t in str(answer.url) for t in ALL_TOKENS)
                assert answer.headers["cache-control"] == "no-store"
                assert "default-src 'none'" in answer.headers["content-security-policy"]
                if path in LIST_PAGES:
                    assert not any(value in answer.text for value in PERSONAL), path
                if token == VIEWER:
                    assert write_controls(answer.text) == ["/console/sign-out"], path
            detail = (await client.get(f"/console/deliveries/{dead[0]}")).text
            assert all(value in detail for value in PERSONAL)
            assert "Unknown SKU(s): X" in detail
            for link in ("Overview", "Deliveries", "Outbox", "Venues", "Audit"):
                assert f">{link}</a>" in detail
    async with signed_in(api, OPERATOR) as client:
        detail = (await client.get(f"/console/deliveries/{dead[0]}")).text
        assert "Retry" in buttons(detail)


async def test_writes_need_the_csrf_token_and_the_operator_role(api: Api) -> None:
    """A POST without the form's CSRF token is 403 and changes nothing; a viewer's forged POST
    with a valid one is 403 and audited as refused under the viewer's name, like the API."""
    await api.write(factories.state("b1", venue_id="v1"))
    [delivery_id] = await answer_with(api, 400, "bad")
    async with signed_in(api, OPERATOR) as operator:
        for fields in ({}, {"csrf": "0" * 64}):
            answer = await operator.post(f"/console/deliveries/{delivery_id}/retry", data=fields)
            assert answer.status_code == 403
    async with signed_in(api, VIEWER) as viewer:
        token = csrf_of((await viewer.get("/console")).text)
        forged = await viewer.post(f"/console/deliveries/{delivery_id}/retry", data={"csrf": token})
        assert forged.status_code == 403 and "operator" in forged.text
        paused = await viewer.post(
            "/console/venues/pause", data={"csrf": token, "venue_id": "v1", "reason": "x"}
        )
        assert paused.status_code == 403
    assert (await api.store.get_venue("v1"))["paused"] is False
    assert [d["status"] for d in await api.deliveries()] == ["dead"]
    rows = await api.store.audit.list(limit=10)
    assert audit_of(rows) == [
        ("vera", "venue.pause", "v1", "refused"),
        ("vera", "delivery.retry", str(delivery_id), "refused"),
    ]
    assert rows[0]["detail"]["status"] == 403


async def test_buttons_change_state_and_are_audited_under_the_token_name(api: Api) -> None:
    """Retry, Cancel, pause with a reason, resume, the items switch and erasure, pressed through
    the forms, do what the API does and write the same audit rows under the session's name."""
    await api.write(personal_state("b1"), factories.state("b2", venue_id="v1"))
    first, second = await answer_with(api, 400, "nope")
    async with signed_in(api, OPERATOR) as client:
        page = f"/console/deliveries/{first}"
        retried = await post_form(client, f"{page}/retry", page)
        assert retried.status_code == 303 and retried.headers["location"].endswith("done=retried")
        cancelled = await post_form(client, f"{page}/cancel", page)
        assert cancelled.status_code == 303
        again = await post_form(client, f"/console/deliveries/{second}/cancel", page)
        assert again.status_code == 409 and "dead" in again.text
        paused = await post_form(
            client, "/console/venues/pause", "/console/venues", venue_id="v1", reason="POS swap"
        )
        assert paused.status_code == 303
        venues = (await client.get("/console/venues")).text
        assert "POS swap" in venues and ">Resume</button>" in venues
        resumed = await post_form(
            client, "/console/venues/resume", "/console/venues", venue_id="v1"
        )
        assert resumed.status_code == 303
        items = await post_form(
            client, "/console/venues/items", "/console/venues", venue_id="v1", send_items="strip"
        )
        assert items.status_code == 303
        erased = await post_form(
            client, "/console/bookings/erase", "/console/erase?booking_id=b1", booking_id="b1"
        )
        assert erased.status_code == 200, erased.text
        booking = (await client.get("/console/bookings/b1")).text
        assert "Ysolde" not in booking
    venue = await api.store.get_venue("v1")
    assert venue["paused"] is False and venue["send_items"] is False
    statuses = {d["id"]: d["status"] for d in await api.deliveries()}
    assert statuses == {first: "cancelled", second: "dead"}
    rows = await api.store.audit.list(limit=20)
    assert audit_of(rows) == [
        ("otto", "booking.erase", "b1", "ok"),
        ("otto", "venue.update", "v1", "ok"),
        ("otto", "venue.resume", "v1", "ok"),
        ("otto", "venue.pause", "v1", "ok"),
        ("otto", "delivery.cancel", str(second), "refused"),
        ("otto", "delivery.cancel", str(first), "ok"),
        ("otto", "delivery.retry", str(first), "ok"),
    ]
    assert rows[3]["detail"] == {"reason": "POS swap"}


async def test_failure_groups_count_by_cause_and_retry_group_requeues_its_dead(api: Api) -> None:
    """Dead and retrying deliveries are grouped by status code and first line of the answer
    (or the error's class) with counts and venues; `Retry group` confirms the count, then
    requeues exactly that many, audited as a bulk retry."""
    await api.write(*(factories.state(f"sku-{i}", venue_id="vx") for i in range(3)))
    await answer_with(api, 422, '{"detail": "Unknown SKU(s): PIZZA"}')
    await api.write(factories.state("slow-1", venue_id="vy"))
    await answer_with(api, 0, None, error="timeout: no answer within 10s")
    await api.write(factories.state("bad-1", venue_id="vz"))
    await answer_with(api, 400, "Bad <script>alert(1)</script> payload\nsecond line")
    async with signed_in(api, OPERATOR) as client:
        page = (await client.get("/console/deliveries")).text
        assert "422 Unknown SKU(s): PIZZA" in page and "3 <small>(3 dead, 0 retrying)" in page
        assert "timeout" in page and "(0 dead, 1 retrying)" in page
        assert "<script>alert" not in page and "&lt;script&gt;" in page
        assert "second line" not in page
        key = re.search(r'/console/groups/([0-9a-f]+)/retry">Retry group', page)
        assert key is not None
        confirm = await client.get(f"/console/groups/{key.group(1)}/retry")
        assert '<strong id="count">3</strong>' in confirm.text
        done = await client.post(
            f"/console/groups/{key.group(1)}/retry", data={"csrf": csrf_of(confirm.text)}
        )
        assert done.status_code == 200 and "Requeued 3 deliveries" in done.text
    by_booking = {d["booking_id"]: d["status"] for d in await api.deliveries()}
    assert [by_booking[f"sku-{i}"] for i in range(3)] == ["pending"] * 3
    assert by_booking["bad-1"] == "dead"
    [row] = await api.store.audit.list(limit=5)
    assert (row["actor"], row["action"], row["detail"]) == (
        "otto",
        "deliveries.retry_bulk",
        {"requeued": 3},
    )
    assert json.loads(row["target"]) == {"status": "dead", "group": "422 Unknown SKU(s): PIZZA"}


async def test_retry_all_matching_confirms_the_count_it_then_requeues(api: Api) -> None:
    """The filter's confirmation page says how many it will requeue (a booking's older dead
    state is not counted), and the POST requeues exactly that many."""
    await api.write(*(factories.state(f"m-{i}", venue_id="vm") for i in range(4)))
    await api.write(factories.state("other", venue_id="vo"))
    await answer_with(api, 400, "no")
    await api.write(factories.state("m-0", venue_id="vm", partySize=9))
    await answer_with(api, 400, "no")
    async with signed_in(api, OPERATOR) as client:
        listing = (await client.get("/console/deliveries?status=dead&venue_id=vm")).text
        assert "Retry all matching" in listing and listing.count('href="/console/deliveries/') >= 5
        confirm = await client.get("/console/deliveries/retry?status=dead&venue_id=vm")
        assert '<strong id="count">4</strong>' in confirm.text
        done = await client.post(
            "/console/deliveries/retry",
            data={"csrf": csrf_of(confirm.text), "status": "dead", "venue_id": "vm"},
        )
        assert "Requeued 4 deliveries" in done.text
    pending = await api.deliveries(status="pending")
    assert len(pending) == 4 and {d["venue_id"] for d in pending} == {"vm"}
    [row] = await api.store.audit.list(limit=5)
    assert json.loads(row["target"]) == {"status": "dead", "venue_id": "vm"}
    assert row["detail"] == {"requeued": 4}


async def test_the_delivery_page_shows_the_diff_against_what_mozrest_held(api: Api) -> None:
    """Field by field, against the booking's previous accepted state, with attempts and
    Mozrest's answer shown as text."""
    await api.write(factories.state("d1", venue_id="v1", partySize=2))
    await answer_with(api, 200, "ok")
    await api.write(factories.state("d1", venue_id="v1", partySize=6))
    [second] = await answer_with(api, 400, "<b>party too large</b>")
    async with signed_in(api, VIEWER) as client:
        page = (await client.get(f"/console/deliveries/{second}")).text
    row = re.search(
        r'<tr class="changed"><th scope="row" data-label="Field">partySize.*?</tr>', page
    )
    assert row is not None and "<code>2</code>" in row.group(0) and "<code>6</code>" in row.group(0)
    assert '<tr class="same"><th scope="row" data-label="Field">status' in page
    assert "&lt;b&gt;party too large&lt;/b&gt;" in page and "12 ms" in page


async def test_resync_confirms_how_many_bookings_it_will_resend_then_queues_them(
    api: Api,
) -> None:
    """The venue page's `Resync…` opens a confirmation saying how many bookings it will
    resend; confirming queues exactly those, audited as venue.resync."""
    await api.write(*(factories.state(f"rs-{i}", venue_id="vr") for i in range(3)))
    await api.answer(200)
    async with signed_in(api, OPERATOR) as client:
        venues = (await client.get("/console/venues")).text
        assert "Resync…" in venues
        confirm = await client.get("/console/venues/resync?venue_id=vr")
        assert "<strong>3</strong> bookings" in confirm.text
        done = await client.post(
            "/console/venues/resync",
            data={"csrf": csrf_of(confirm.text), "venue_id": "vr", "since": "24h"},
        )
        assert "The newest state of 3 bookings of venue vr is queued again." in done.text
    assert sorted(d["reason"] for d in await api.deliveries(venue_id="vr")) == [
        *["change"] * 3,
        *["resync"] * 3,
    ]
    [row] = await api.store.audit.list(limit=1)
    assert (row["action"], row["target"], row["result"]) == ("venue.resync", "vr", "ok")
