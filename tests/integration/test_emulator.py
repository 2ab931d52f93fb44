"""The local Mozrest emulator: webhook validation, stored orders, menus, faults and control API."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.emulator import ConnectionDropped, create_app

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Bearer t"}

# The two payloads of Mozrest's POS integration page, verbatim.
SEATED_EXAMPLE: dict[str, Any] = {
    "bookingId": "60e890aca5f07b6ee5b950b1",
    "venueId": "60e890aca5f07b6ee5b950b1",
    "partySize": 4,
    "status": "seated",
    "tables": ["28c3ce8b-8c10-4a64-8099-f0dffcc549a8"],
    "date": 1639578600,
    "prepayment": 50.00,
    "contact": {
        "firstname": "John",
        "lastname": "Doe",
        "email": "john.doe@mail.com",
        "telephone": "34646223399",
        "locale": "en",
    },
    "notes": "I am allergic to peanuts",
}
ITEMS_EXAMPLE: dict[str, Any] = {
    "bookingId": "60e890aca5f07b6ee5b950b1",
    "venueId": "60e890aca5f07b6ee5b950b1",
    "partySize": 2,
    "status": "seated",
    "tables": ["28c3ce8b-8c10-4a64-8099-f0dffcc549a8"],
    "date": 1639578600,
    "contact": {
        "firstname": "John",
        "lastname": "Doe",
        "email": "john.doe@mail.com",
        "telephone": "34646223399",
        "locale": "en",
    },
    "items": [
        {"sku": "PIZZA-001", "quantity": 2},
        {"sku": "WINE-012", "quantity": 1, "notes": "no ice"},
    ],
}


def payload(**changes: Any) -> dict[str, Any]:
    """A minimal valid payload of booking `b1` at venue `v1`, with `changes` applied."""
    return {
        "bookingId": "b1",
        "venueId": "v1",
        "partySize": 2,
        "status": "seated",
        "tables": ["t1"],
        "date": 1639578600,
        **changes,
    }


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(token="t", api_key="k"))
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
        yield client


async def send(client: httpx.AsyncClient, body: object) -> httpx.Response:
    return await client.post("/rms", json=body, headers=AUTH)


async def test_mozrest_examples_are_accepted_and_stored_exactly(
    client: httpx.AsyncClient,
) -> None:
    """Both payloads from Mozrest's documentation are accepted and stored as sent."""
    for example in (SEATED_EXAMPLE, ITEMS_EXAMPLE):
        response = await send(client, example)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "bookingId": example["bookingId"]}
        stored = (await client.get(f"/_emulator/bookings/{example['bookingId']}")).json()
        assert stored["state"] == example
    assert stored["accepted_count"] == 2
    assert stored["order_items"] == ITEMS_EXAMPLE["items"]
    everything = (await client.get("/_emulator/bookings")).json()["items"]
    assert list(everything) == [ITEMS_EXAMPLE["bookingId"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (payload(notes=None), "notes"),
        (payload(contact={"firstname": None}), "contact.firstname"),
        (payload(colour="red"), "colour"),
        (payload(items=[{"sku": "A", "quantity": 0}]), "items[0].quantity"),
        (payload(items=[{"sku": "A", "quantity": "2"}]), "items[0].quantity"),
        (payload(venueId=17), "venueId"),
        (payload(bookingId=["b1"]), "bookingId"),
        (payload(partySize=None), "partySize"),
        ([payload()], "payload"),
    ],
    ids=[
        "null-notes",
        "null-contact-field",
        "unknown-field",
        "zero-quantity",
        "string-quantity",
        "venue-not-string",
        "booking-not-string",
        "missing-required",
        "not-an-object",
    ],
)
async def test_contract_violations_are_400_naming_the_field(
    client: httpx.AsyncClient, body: object, field: str
) -> None:
    """A body breaking the webhook contract is 400 naming the offending field, and not stored."""
    response = await send(client, body)
    assert response.status_code == 400
    assert response.json()["field"] == field
    assert response.json()["detail"].startswith(f"{field}: ")
    assert (await client.get("/_emulator/bookings")).json() == {"items": {}}


async def test_non_json_wrong_content_type_and_oversized_bodies_are_400(
    client: httpx.AsyncClient,
) -> None:
    """A body that is not JSON, not sent as application/json, or over 64 KiB is refused with 400."""
    not_json = await client.post(
        "/rms", content=b"{nope", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert not_json.json()["field"] == "payload"
    as_text = await client.post(
        "/rms", content=b'{"a": 1}', headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert as_text.status_code == 400
    assert "application/json" in as_text.json()["detail"]
    oversized = await send(client, payload(notes="x" * 65536))
    assert oversized.status_code == 400
    assert "65536" in oversized.json()["detail"]
    with_charset = await client.post(
        "/rms",
        content=httpx.Request("POST", "/", json=payload()).content,
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
    )
    assert with_charset.status_code == 200


async def test_bearer_token_is_checked() -> None:
    """A configured token must match exactly; without one, every request passes, with or
    without a Bearer token (a relay may run without MOZREST_WEBHOOK_TOKEN on loopback)."""
    transport = httpx.ASGITransport(app=create_app(token="t"))
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
        assert (await client.post("/rms", json=payload())).status_code == 401
        for header in ("Bearer", "Basic dDp0", "Bearer x"):
            response = await client.post("/rms", json=payload(), headers={"Authorization": header})
            assert response.status_code == 401, header
            assert response.headers["WWW-Authenticate"] == "Bearer"
        response = await client.post("/rms", json=payload(), headers={"Authorization": "Bearer t"})
        assert response.status_code == 200
    transport = httpx.ASGITransport(app=create_app(token=None))
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
        for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": "Basic x"}):
            response = await client.post("/rms", json=payload(), headers=headers)
            assert response.status_code == 200, headers


async def test_unknown_sku_is_traced_and_still_accepted(client: httpx.AsyncClient) -> None:
    """With a venue menu configured, unknown SKUs are recorded in the trace and answered 200."""
    await client.put("/_emulator/venues/v1/menu", json={"skus": ["PIZZA-001"]})
    items = [{"sku": "PIZZA-001", "quantity": 1}, {"sku": "GHOST", "quantity": 1}]
    response = await send(client, payload(items=items))
    assert response.status_code == 200
    trace = (await client.get("/_emulator/trace")).json()["items"]
    assert len(trace) == 1
    assert trace[0]["type"] == "unknown_sku"
    assert (trace[0]["bookingId"], trace[0]["venueId"], trace[0]["skus"]) == ("b1", "v1", ["GHOST"])
    assert trace[0]["at"].endswith("+00:00")
    assert (await client.get("/_emulator/bookings/b1")).json()["order_items"] == items


async def test_reject_unknown_answers_422_and_stores_nothing(client: httpx.AsyncClient) -> None:
    """A menu with reject_unknown answers 422 naming the unknown SKUs and keeps no state."""
    await client.put("/_emulator/venues/v1/menu", json={"skus": ["X"], "reject_unknown": True})
    items = [{"sku": "A", "quantity": 1}, {"sku": "X", "quantity": 1}, {"sku": "B", "quantity": 2}]
    response = await send(client, payload(items=items))
    assert response.status_code == 422
    assert response.json() == {"detail": "Unknown SKU(s): A, B"}
    assert (await client.get("/_emulator/bookings/b1")).status_code == 404
    other_venue = await send(client, payload(bookingId="b2", venueId="v2", items=items))
    assert other_venue.status_code == 200


async def test_omitted_or_empty_items_keep_the_previous_order_items(
    client: httpx.AsyncClient,
) -> None:
    """As Mozrest documents, a state without items leaves the POS order's items untouched."""
    items = [{"sku": "PIZZA-001", "quantity": 2}]
    await send(client, payload(items=items))
    await send(client, payload(partySize=3))
    booking = (await client.get("/_emulator/bookings/b1")).json()
    assert booking["state"] == payload(partySize=3)
    assert booking["order_items"] == items
    assert booking["order_items_kept"] is True
    await send(client, payload(items=[]))
    assert (await client.get("/_emulator/bookings/b1")).json()["order_items"] == items
    new_items = [{"sku": "WINE-012", "quantity": 1}]
    await send(client, payload(items=new_items))
    booking = (await client.get("/_emulator/bookings/b1")).json()
    assert (booking["order_items"], booking["order_items_kept"]) == (new_items, False)
    assert booking["accepted_count"] == 4


async def test_fixed_status_carries_retry_after(client: httpx.AsyncClient) -> None:
    """A fixed status fault answers every request with it and the configured Retry-After."""
    await client.put("/_emulator/faults", json={"status": 503, "retry_after_seconds": 7})
    response = await send(client, payload())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    await client.put(
        "/_emulator/faults",
        json={"status": 429, "retry_after_seconds": 7, "retry_after_http_date": True},
    )
    response = await send(client, payload())
    assert response.status_code == 429
    assert response.headers["Retry-After"].endswith(" GMT")
    assert (await client.get("/_emulator/bookings")).json() == {"items": {}}
    await client.delete("/_emulator/faults")
    assert (await send(client, payload())).status_code == 200


async def test_failure_rate_one_fails_all_and_zero_fails_none(client: httpx.AsyncClient) -> None:
    """Failure rate 1.0 answers the failure status every time; 0.0 never does."""
    await client.put("/_emulator/faults", json={"failure_rate": 1.0, "failure_status": 502})
    assert [(await send(client, payload())).status_code for _ in range(5)] == [502] * 5
    await client.put("/_emulator/faults", json={"failure_rate": 0.0})
    assert [(await send(client, payload())).status_code for _ in range(5)] == [200] * 5
    stats = (await client.get("/_emulator/stats")).json()
    assert stats == {"received": 10, "accepted": 5, "dropped": 0, "by_status": {"200": 5, "502": 5}}


async def test_seeded_failure_rate_is_reproducible(client: httpx.AsyncClient) -> None:
    """The same seed gives the same sequence of injected failures."""
    runs = []
    for _ in range(2):
        await client.put("/_emulator/faults", json={"failure_rate": 0.5, "seed": 42})
        runs.append([(await send(client, payload())).status_code for _ in range(20)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}


async def test_counted_burst_fails_next_n_then_succeeds(client: httpx.AsyncClient) -> None:
    """`fail_next` N answers the next N requests with its status, then requests succeed again."""
    await client.put("/_emulator/faults", json={"fail_next": 3, "fail_next_status": 429})
    codes = [(await send(client, payload())).status_code for _ in range(5)]
    assert codes == [429, 429, 429, 200, 200]
    assert (await client.get("/_emulator/faults")).json()["fail_next_remaining"] == 0
    log = (await client.get("/_emulator/requests")).json()["items"]
    assert [entry["fault"] for entry in log] == ["fail_next"] * 3 + [None] * 2


async def test_latency_delays_the_answer(client: httpx.AsyncClient) -> None:
    """Injected latency holds the answer back by at least the configured milliseconds."""
    started = time.monotonic()
    await send(client, payload())
    baseline = time.monotonic() - started
    await client.put("/_emulator/faults", json={"latency_ms": 150})
    started = time.monotonic()
    assert (await send(client, payload())).status_code == 200
    assert time.monotonic() - started >= 0.15 > baseline
    entry = (await client.get("/_emulator/requests")).json()["items"][-1]
    assert entry["finished_ns"] - entry["arrival_ns"] >= 150_000_000


async def test_fault_target_selects_the_endpoint(client: httpx.AsyncClient) -> None:
    """Faults hit /rms by default, only pos-tables with target "pos-tables", both with "all"."""
    tables_auth = {"Authorization": "Bearer k"}
    expected = {"rms": (503, 200), "pos-tables": (200, 503), "all": (503, 503)}
    for target, codes in expected.items():
        await client.put("/_emulator/faults", json={"status": 503, "target": target})
        rms = await send(client, payload())
        tables = await client.get("/venues/v1/pos-tables", headers=tables_auth)
        assert (rms.status_code, tables.status_code) == codes, target


async def test_bad_fault_settings_are_422(client: httpx.AsyncClient) -> None:
    """Fault settings out of range or unknown are refused with 422 and change nothing."""
    for body in ({"failure_rate": 1.5}, {"status": 200}, {"latency_ms": -1}, {"surprise": 1}):
        assert (await client.put("/_emulator/faults", json=body)).status_code == 422, body
    assert (await client.get("/_emulator/faults")).json()["status"] is None


async def test_drop_raises_instead_of_answering_in_process(client: httpx.AsyncClient) -> None:
    """In process a drop surfaces as ConnectionDropped and is logged without a status."""
    await client.put("/_emulator/faults", json={"drop_rate": 1.0})
    with pytest.raises(ConnectionDropped):
        await send(client, payload())
    (entry,) = (await client.get("/_emulator/requests")).json()["items"]
    assert (entry["status_code"], entry["fault"], entry["bookingId"]) == (None, "drop", "b1")
    assert (await client.get("/_emulator/stats")).json()["dropped"] == 1
    assert (await client.get("/_emulator/bookings")).json() == {"items": {}}


async def test_reset_clears_everything(client: httpx.AsyncClient) -> None:
    """Reset forgets bookings, request log, trace, faults, menus, tables and stats."""
    await client.put("/_emulator/venues/v1/menu", json={"skus": [], "reject_unknown": False})
    await client.put("/_emulator/venues/v1/tables", json={"tables": [{"id": "X", "name": "X"}]})
    await send(client, payload(items=[{"sku": "A", "quantity": 1}]))
    await client.put("/_emulator/faults", json={"status": 500})
    assert (await client.post("/_emulator/reset")).status_code == 200
    assert (await client.get("/_emulator/bookings")).json() == {"items": {}}
    assert (await client.get("/_emulator/requests")).json() == {"items": []}
    assert (await client.get("/_emulator/trace")).json() == {"items": []}
    assert (await client.get("/_emulator/stats")).json()["received"] == 0
    tables = await client.get("/venues/v1/pos-tables", headers={"Authorization": "Bearer k"})
    assert tables.json()["count"] == 4
    assert (await send(client, payload(items=[{"sku": "A", "quantity": 1}]))).status_code == 200
    assert (await client.get("/_emulator/trace")).json() == {"items": []}


async def test_pos_tables_default_and_configured(client: httpx.AsyncClient) -> None:
    """An unconfigured venue answers the default tables; a configured one exactly its own."""
    auth = {"Authorization": "Bearer k"}
    default = (await client.get("/venues/abc-123/pos-tables", headers=auth)).json()
    assert default["venueId"] == "abc-123"
    assert default["count"] == len(default["tables"]) == 4
    assert default["tables"][0] == {"id": "T1", "name": "Table 1", "area": "Main room"}
    assert default["tables"][-1]["area"] is None
    tables = [
        {"id": "T12", "name": "Table 12", "area": "Terrace"},
        {"id": "T15", "name": "Table 15", "area": None},
    ]
    await client.put("/_emulator/venues/abc-123/tables", json={"tables": tables})
    response = await client.get("/venues/abc-123/pos-tables", headers=auth)
    assert response.json() == {"venueId": "abc-123", "tables": tables, "count": 2}


async def test_pos_tables_checks_the_api_key(client: httpx.AsyncClient) -> None:
    """The POS tables endpoint wants the Partner API key, not the webhook token."""
    for headers in ({}, AUTH, {"Authorization": "Bearer wrong"}):
        response = await client.get("/venues/v1/pos-tables", headers=headers)
        assert response.status_code == 401
        assert "detail" in response.json()


async def test_put_token_rotates_the_keys_it_expects(client: httpx.AsyncClient) -> None:
    """`PUT /_emulator/token` changes the webhook token and the Partner API key from the next
    request on; an omitted key stays, null accepts any, and a reset keeps them."""
    answer = await client.put("/_emulator/token", json={"token": "t2"})
    assert answer.json() == {"token_required": True, "api_key_required": True}
    assert (await send(client, payload())).status_code == 401
    rotated = {"Authorization": "Bearer t2"}
    assert (await client.post("/rms", json=payload(), headers=rotated)).status_code == 200
    # The API key was omitted: still `k`.
    key = {"Authorization": "Bearer k"}
    assert (await client.get("/venues/v1/pos-tables", headers=key)).status_code == 200
    await client.put("/_emulator/token", json={"api_key": "k2"})
    assert (await client.get("/venues/v1/pos-tables", headers=key)).status_code == 401
    key2 = {"Authorization": "Bearer k2"}
    assert (await client.get("/venues/v1/pos-tables", headers=key2)).status_code == 200
    await client.post("/_emulator/reset")
    assert (await client.post("/rms", json=payload(), headers=rotated)).status_code == 200
    answer = await client.put("/_emulator/token", json={"token": None})
    assert answer.json() == {"token_required": False, "api_key_required": True}
    assert (await client.post("/rms", json=payload())).status_code == 200
    for bad in ({"token": ""}, {"tokn": "x"}, {"token": 5}):
        assert (await client.put("/_emulator/token", json=bad)).status_code == 422, bad


async def test_request_log_records_every_request_in_order(client: httpx.AsyncClient) -> None:
    """Every /rms request is logged with rising seq and arrival_ns, never with the token."""
    await send(client, payload())
    await client.post("/rms", json=payload(bookingId="b2"))
    await send(client, payload(notes=None))
    await send(client, payload(bookingId="b2"))
    log = (await client.get("/_emulator/requests")).json()["items"]
    assert [entry["status_code"] for entry in log] == [200, 401, 400, 200]
    assert [entry["bookingId"] for entry in log] == ["b1", "b2", "b1", "b2"]
    assert [entry["seq"] for entry in log] == sorted({entry["seq"] for entry in log})
    arrivals = [entry["arrival_ns"] for entry in log]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == 4
    assert all(entry["finished_ns"] >= entry["arrival_ns"] for entry in log)
    assert log[0]["body"] == payload() and log[0]["received_at"].endswith("+00:00")
    assert "Bearer t" not in str(log)
    only_b2 = (await client.get("/_emulator/requests", params={"booking_id": "b2"})).json()
    assert [entry["seq"] for entry in only_b2["items"]] == [log[1]["seq"], log[3]["seq"]]
    since = (await client.get("/_emulator/requests", params={"since_seq": log[1]["seq"]})).json()
    assert [entry["seq"] for entry in since["items"]] == [log[2]["seq"], log[3]["seq"]]


async def test_apps_are_independent(client: httpx.AsyncClient) -> None:
    """Two emulator apps in one process share no state."""
    await send(client, payload())
    transport = httpx.ASGITransport(app=create_app(token="t"))
    async with httpx.AsyncClient(transport=transport, base_url="http://other") as other:
        assert (await other.get("/_emulator/bookings")).json() == {"items": {}}
    assert (await client.get("/")).status_code == 200


@pytest.fixture(scope="module")
def served_emulator() -> Iterator[str]:
    """A real emulator process on a free loopback port, with token `t`; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-c", f"from app.emulator import serve; serve(port={port}, token='t')"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline() if ready else ""
        assert f"listening on http://127.0.0.1:{port}" in line, line or "no listening line"
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    # A drop is deliberate: the server must not log it as an application error.
    assert "Exception in ASGI application" not in stderr, stderr


def test_served_emulator_over_loopback(served_emulator: str) -> None:
    """Over real HTTP: states are stored, bad tokens are 401 and a drop is a transport error."""
    with httpx.Client(base_url=served_emulator, timeout=5) as client:
        assert client.post("/rms", json=SEATED_EXAMPLE, headers=AUTH).status_code == 200
        stored = client.get(f"/_emulator/bookings/{SEATED_EXAMPLE['bookingId']}").json()
        assert stored["state"] == SEATED_EXAMPLE
        assert client.post("/rms", json=payload()).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/rms", json=payload(), headers=wrong).status_code == 401
        client.put("/_emulator/faults", json={"drop_rate": 1.0})
        with pytest.raises(httpx.TransportError):
            client.post("/rms", json=payload(), headers=AUTH)
        client.delete("/_emulator/faults")
        assert client.post("/rms", json=payload(), headers=AUTH).status_code == 200
        stats = client.get("/_emulator/stats").json()
        assert (stats["accepted"], stats["dropped"]) == (2, 1)
