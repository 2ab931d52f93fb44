"""The admin HTTP API (SPEC sections 6 and 7) against a real database on each backend.

Most tests drive the app in process (`httpx.ASGITransport`, lifespan run); one starts a real
`mozrest-relay api` process and talks to it over HTTP. Data is seeded the way the relay makes it:
outbox rows written as the RMS would, `Store.ingest`, then `claim_due` and `record` to play
Mozrest's answers; a few states are set with SQL where only time could produce them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.models import STATUSES, worker
from app.routes import decode_cursor, encode_cursor
from app.store import WorkerInfo
from tests import factories
from tests.conftest import Launcher, PostgresDatabases, Process, free_port, wait_http
from tests.integration.conftest import ADMIN_TOKEN, AUTH, Api, running_api

API_KEY = "test-key"
SECTION_7_FAMILIES = {
    "mozrest_relay_outbox_rows",
    "mozrest_relay_webhook_requests",
    "mozrest_relay_webhook_duration_seconds",
    "mozrest_relay_delivery_lag_seconds",
    "mozrest_relay_deliveries",
    "mozrest_relay_oldest_pending_age_seconds",
    "mozrest_relay_circuit_open",
}
DELIVERY_FIELDS = {
    "id",
    "booking_id",
    "venue_id",
    "outbox_id",
    "status",
    "attempt_count",
    "changed_fields",
    "warnings",
    "created_at",
    "updated_at",
    "next_attempt_at",
    "delivered_at",
    "last_status_code",
    "last_error",
    "venue_paused",
    "reason",
}
UTC_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


def state(booking_id: str, *, venue_id: str = "v1", **changes: Any) -> dict[str, Any]:
    """A valid seated state at this module's venue `v1`."""
    return factories.state(booking_id, venue_id=venue_id, **changes)


def api_requests(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) for every documented `/api` route with sample parameters, plus unknown
    ones."""
    samples = {"{delivery_id}": "1", "{booking_id}": "b1", "{venue_id}": "v1"}
    requests: list[tuple[str, str]] = []
    for path, operations in app.openapi()["paths"].items():
        if not path.startswith("/api/"):
            continue
        for name, value in samples.items():
            path = path.replace(name, value)
        requests.extend((method.upper(), path) for method in operations)
    return [*requests, ("GET", "/api/no-such-route"), ("DELETE", "/api/deliveries/1")]


# -- access ---------------------------------------------------------------------------------


async def test_every_api_route_needs_the_admin_token(api: Api) -> None:
    """Every /api route, known or not, answers 401 without the token or with a wrong one."""
    requests = api_requests(api.app)
    assert len(requests) == 21
    wrong = [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": "Bearer"},
    ]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.app), base_url="http://relay"
    ) as anonymous:
        for method, path in requests:
            for headers in wrong:
                response = await anonymous.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json() == {"detail": "missing or wrong admin token"}
                assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_api_is_shut_without_an_admin_token(database_url: str) -> None:
    """With no RELAY_ADMIN_TOKEN every /api route answers 503 and says so, token or not."""
    async with running_api(database_url, relay_admin_token=None) as api:
        for method, path in api_requests(api.app):
            response = await api.client.request(method, path, json={})
            assert response.status_code == 503, (method, path)
            assert response.json() == {"detail": "RELAY_ADMIN_TOKEN is not set"}
        assert (await api.client.get("/healthz")).status_code == 200


async def test_health_readiness_and_metrics_are_open(api: Api) -> None:
    """`/healthz`, `/readyz` and `/metrics` answer without a token; readiness names four checks."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.app), base_url="http://relay"
    ) as anonymous:
        health = await anonymous.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        ready = await anonymous.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert set(body["checks"]) == {"database", "schema", "worker", "mozrest"}
        assert body["checks"]["database"] == "ok" and body["checks"]["schema"] == "ok"
        assert body["checks"]["worker"] != "ok"  # no relay process has checked in
        metrics = await anonymous.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")


async def test_metrics_parse_and_carry_the_section_7_names(api: Api) -> None:
    """`/metrics` parses as Prometheus text, has every section 7 name and reads gauges live."""
    await api.write(state("b1"), state("b2"), state("b3"))
    await api.set_delivery((await api.deliveries(booking_id="b3"))[0]["id"], status="dead")
    text = (await api.client.get("/metrics")).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert SECTION_7_FAMILIES <= set(families)
    assert families["mozrest_relay_webhook_duration_seconds"].type == "histogram"
    assert families["mozrest_relay_delivery_lag_seconds"].type == "histogram"
    assert families["mozrest_relay_outbox_rows"].type == "counter"
    assert families["mozrest_relay_webhook_requests"].type == "counter"
    by_status = {s.labels["status"]: s.value for s in families["mozrest_relay_deliveries"].samples}
    assert by_status == {**dict.fromkeys(STATUSES, 0.0), "pending": 2.0, "dead": 1.0}
    assert families["mozrest_relay_oldest_pending_age_seconds"].samples[0].value >= 0
    assert families["mozrest_relay_circuit_open"].samples[0].value == 0
    assert not [line for line in text.splitlines() if "_created" in line]


async def test_openapi_documents_every_route_and_shape(api: Api) -> None:
    """`/openapi.json` lists every SPEC route with its response model."""
    schema = (await api.client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path, method in [
        ("/api/deliveries", "get"),
        ("/api/deliveries/{delivery_id}", "get"),
        ("/api/deliveries/{delivery_id}/retry", "post"),
        ("/api/deliveries/{delivery_id}/cancel", "post"),
        ("/api/deliveries/retry", "post"),
        ("/api/bookings/{booking_id}", "get"),
        ("/api/outbox", "get"),
        ("/api/stats", "get"),
        ("/api/workers", "get"),
        ("/api/venues/{venue_id}/pos-tables", "get"),
        ("/api/venues/{venue_id}/table-matching", "get"),
    ]:
        answer = paths[path][method]["responses"]["200"]["content"]["application/json"]
        assert "$ref" in answer["schema"], (path, answer)
    models = schema["components"]["schemas"]
    assert DELIVERY_FIELDS <= set(models["Delivery"]["properties"])
    assert {"payload", "attempts"} <= set(models["DeliveryDetail"]["properties"])
    assert not [p for p in paths if "{path" in p]


# -- deliveries -----------------------------------------------------------------------------


async def test_delivery_list_filters_and_fields(api: Api) -> None:
    """Each filter narrows the list, newest first, with the documented fields and UTC times."""
    await api.write(
        state("a1", venue_id="va"), state("a2", venue_id="va"), state("b1", venue_id="vb")
    )
    await api.write(state("a1", venue_id="va", partySize=3))  # supersedes a1's queued state
    a2 = (await api.deliveries(booking_id="a2"))[0]
    await api.set_delivery(a2["id"], status="dead")

    everything = await api.deliveries()
    assert [d["id"] for d in everything] == sorted((d["id"] for d in everything), reverse=True)
    assert len(everything) == 4
    first = everything[0]
    assert set(first) == DELIVERY_FIELDS
    assert isinstance(first["id"], int) and isinstance(first["outbox_id"], int)
    assert UTC_ISO.match(first["created_at"]) and UTC_ISO.match(first["updated_at"])
    assert UTC_ISO.match(first["next_attempt_at"])
    assert "partySize" in first["changed_fields"]

    assert {d["booking_id"] for d in await api.deliveries(venue_id="va")} == {"a1", "a2"}
    assert [d["booking_id"] for d in await api.deliveries(venue_id="vb")] == ["b1"]
    assert [d["status"] for d in await api.deliveries(booking_id="a1")] == [
        "pending",
        "superseded",
    ]
    assert [d["booking_id"] for d in await api.deliveries(status="dead")] == ["a2"]
    assert [d["booking_id"] for d in await api.deliveries(status="pending", venue_id="va")] == [
        "a1"
    ]
    assert await api.deliveries(status="delivered") == []
    assert await api.deliveries(venue_id="nowhere") == []


async def test_pages_have_no_duplicates_or_gaps_while_rows_arrive(api: Api) -> None:
    """Paging with next_cursor visits every older row once while new rows are inserted."""
    await api.write(*(state(f"b{i:02}") for i in range(23)))
    expected = [d["id"] for d in await api.deliveries()]
    expected_outbox = [
        row["id"] for row in (await api.client.get("/api/outbox?limit=500")).json()["items"]
    ]
    seen: list[int] = []
    seen_outbox: list[int] = []
    cursor = outbox_cursor = None
    pages = 0
    while True:
        params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/api/deliveries", params=params)).json()
        outbox_params = {"limit": 5, **({"cursor": outbox_cursor} if outbox_cursor else {})}
        outbox_page = (await api.client.get("/api/outbox", params=outbox_params)).json()
        seen.extend(d["id"] for d in page["items"])
        seen_outbox.extend(row["id"] for row in outbox_page["items"])
        pages += 1
        # The RMS keeps writing between page fetches.
        await api.write(state(f"new{pages}"))
        cursor, outbox_cursor = page["next_cursor"], outbox_page["next_cursor"]
        if cursor is None and outbox_cursor is None:
            break
    assert seen == expected
    assert seen_outbox == expected_outbox
    assert pages == 5
    newest = await api.deliveries(limit=1)
    assert newest[0]["booking_id"] == f"new{pages}"


async def test_list_parameters_are_validated(api: Api) -> None:
    """Bad limits, cursors, statuses, outcomes and ids answer 422, never 500."""
    await api.write(state("b1"), state("b2"))
    page = (await api.client.get("/api/deliveries", params={"limit": 1})).json()
    assert page["next_cursor"] is not None
    outbox_page = (await api.client.get("/api/outbox", params={"limit": 1})).json()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/api/deliveries", {"limit": 501}),
        ("/api/deliveries", {"limit": 0}),
        ("/api/deliveries", {"limit": "ten"}),
        ("/api/deliveries", {"cursor": "not-a-cursor"}),
        ("/api/deliveries", {"cursor": "!!!"}),
        ("/api/deliveries", {"cursor": encode_cursor("delivery", 0)}),
        ("/api/deliveries", {"cursor": encode_cursor("delivery", 2**63)}),
        ("/api/deliveries", {"cursor": outbox_page["next_cursor"]}),
        ("/api/deliveries", {"status": "lost"}),
        ("/api/deliveries", {"venue_id": "a\x00b"}),
        ("/api/deliveries", {"booking_id": "x" * 65}),
        ("/api/outbox", {"outcome": "sent"}),
        ("/api/outbox", {"limit": 501}),
        ("/api/outbox", {"cursor": page["next_cursor"]}),
        ("/api/deliveries/abc", {}),
        ("/api/deliveries/0", {}),
        ("/api/deliveries/99999999999999999999999", {}),
        ("/api/bookings/a%00b", {}),
        ("/api/venues/a:b/pos-tables", {}),
        ("/api/venues/.hidden/table-matching", {}),
    ]
    for path, params in cases:
        response = await api.client.get(path, params=params)
        assert response.status_code == 422, (path, params, response.text)
        assert isinstance(response.json()["detail"], list)
    bad_cursor = await api.client.get("/api/deliveries", params={"cursor": "garbage"})
    assert bad_cursor.json()["detail"][0]["loc"] == ["query", "cursor"]
    assert "next_cursor" in bad_cursor.json()["detail"][0]["msg"]
    assert (await api.client.get("/api/deliveries", params={"limit": 500})).status_code == 200
    second = await api.client.get("/api/deliveries", params={"limit": 1, "cursor": ""})
    assert second.status_code == 200  # an empty cursor is the first page


def test_cursor_round_trip_and_opacity() -> None:
    """A cursor decodes only to the id it was made for, and only for its own list."""
    cursor = encode_cursor("delivery", 12345)
    assert "12345" not in cursor
    assert decode_cursor("delivery", cursor) == 12345
    for bad in ("", "====", "ZGVsaXZlcnk6", encode_cursor("outbox", 5), "ZGVsaXZlcnk6MDE"):
        with pytest.raises(ValueError):
            decode_cursor("delivery", bad)


async def test_delivery_detail_has_payload_and_attempts_newest_first(api: Api) -> None:
    """The detail view adds the exact payload and every attempt, newest first; 404 if unknown."""
    await api.write(state("b1", notes="window seat"))
    (delivery_id,) = await api.answer(503)
    await api.set_delivery(delivery_id, next_attempt_at=datetime(2000, 1, 1, tzinfo=UTC))
    await api.answer(400)
    response = await api.client.get(f"/api/deliveries/{delivery_id}")
    assert response.status_code == 200
    detail = response.json()
    assert DELIVERY_FIELDS | {"payload", "attempts"} == set(detail)
    assert detail["payload"] == state("b1", notes="window seat")
    assert detail["status"] == "dead" and detail["attempt_count"] == 2
    assert detail["last_status_code"] == 400 and detail["last_error"] == "HTTP 400"
    assert [a["status_code"] for a in detail["attempts"]] == [400, 503]
    attempt = detail["attempts"][0]
    assert set(attempt) == {"started_at", "duration_ms", "status_code", "error", "response_body"}
    assert attempt["duration_ms"] == 7 and attempt["response_body"] == '{"detail": "answer"}'
    assert UTC_ISO.match(attempt["started_at"])
    missing = await api.client.get("/api/deliveries/999999")
    assert missing.status_code == 404 and "999999" in missing.json()["detail"]


async def test_retry_requeues_a_dead_delivery(api: Api) -> None:
    """A dead delivery that is its booking's newest state goes back to pending, due now."""
    await api.write(state("b1"))
    (delivery_id,) = await api.answer(400)
    response = await api.client.post(f"/api/deliveries/{delivery_id}/retry")
    assert response.status_code == 200, response.text
    requeued = response.json()
    assert requeued["id"] == delivery_id and requeued["status"] == "pending"
    assert requeued["next_attempt_at"] is not None
    assert await api.answer(200) == [delivery_id]
    assert (await api.client.get(f"/api/deliveries/{delivery_id}")).json()["status"] == "delivered"


async def test_retry_refuses_when_a_newer_state_exists(api: Api) -> None:
    """Retrying a dead delivery answers 409 once a newer state is queued, sent or delivered."""
    await api.write(state("b1"))
    (old,) = await api.answer(400)
    await api.write(state("b1", partySize=5))
    queued = await api.client.post(f"/api/deliveries/{old}/retry")
    assert queued.status_code == 409
    assert "newer state of booking 'b1'" in queued.json()["detail"]
    (new,) = await api.answer(200)
    delivered = await api.client.post(f"/api/deliveries/{old}/retry")
    assert delivered.status_code == 409 and "delivered" in delivered.json()["detail"]
    statuses = {d["id"]: d["status"] for d in await api.deliveries(booking_id="b1")}
    assert statuses == {old: "dead", new: "delivered"}


async def test_retry_refuses_when_the_newest_state_was_unchanged_or_held(api: Api) -> None:
    """A newer state that was not queued (equal to the snapshot, or held) still blocks a replay."""
    await api.write(state("b1"))
    await api.answer(200)
    await api.write(state("b1", partySize=4))
    (dead,) = await api.answer(400)
    await api.write(state("b1"))  # back to what Mozrest holds: unchanged, nothing queued
    response = await api.client.post(f"/api/deliveries/{dead}/retry")
    assert response.status_code == 409 and "written since" in response.json()["detail"]

    await api.write(state("b2"))
    (cancelled,) = [d["id"] for d in await api.deliveries(booking_id="b2")]
    assert (await api.client.post(f"/api/deliveries/{cancelled}/cancel")).status_code == 200
    await api.write(state("b2", status="cancelled"))  # never sent, so held
    response = await api.client.post(f"/api/deliveries/{cancelled}/retry")
    assert response.status_code == 409


async def test_retry_refuses_deliveries_in_other_statuses(api: Api) -> None:
    """Only dead or cancelled deliveries can be retried; pending and delivered answer 409."""
    await api.write(state("b1"), state("b2"))
    pending, delivered = [d["id"] for d in await api.deliveries()]
    await api.set_delivery(delivered, status="delivered")
    for delivery_id, status in [(pending, "pending"), (delivered, "delivered")]:
        response = await api.client.post(f"/api/deliveries/{delivery_id}/retry")
        assert response.status_code == 409
        assert response.json()["detail"] == (
            f"delivery {delivery_id} is {status}: only dead or cancelled deliveries can be retried"
        )
    assert (await api.client.post("/api/deliveries/424242/retry")).status_code == 404


async def test_cancel_rules(api: Api) -> None:
    """Pending and retrying deliveries cancel; in-flight ones and other statuses answer 409."""
    await api.write(state("b1"), state("b2"), state("b3"))
    by_booking = {d["booking_id"]: d["id"] for d in await api.deliveries()}
    cancelled = await api.client.post(f"/api/deliveries/{by_booking['b1']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["next_attempt_at"] is None
    again = await api.client.post(f"/api/deliveries/{by_booking['b1']}/cancel")
    assert again.status_code == 409 and "is cancelled" in again.json()["detail"]

    await api.set_delivery(by_booking["b2"], status="retrying")
    assert (await api.client.post(f"/api/deliveries/{by_booking['b2']}/cancel")).status_code == 200

    claims = await api.store.claim_due(worker_id="test", limit=10, lease_seconds=30)
    assert [c.delivery_id for c in claims] == [by_booking["b3"]]
    in_flight = await api.client.post(f"/api/deliveries/{by_booking['b3']}/cancel")
    assert in_flight.status_code == 409
    assert in_flight.json()["detail"].endswith("in flight, try again shortly")
    await api.set_delivery(by_booking["b3"], status="delivered", lease_expires_at=None)
    delivered = await api.client.post(f"/api/deliveries/{by_booking['b3']}/cancel")
    assert delivered.status_code == 409
    assert (await api.client.post("/api/deliveries/424242/cancel")).status_code == 404
    # A cancelled delivery is never claimed.
    assert await api.store.claim_due(worker_id="test", limit=10, lease_seconds=30) == []


async def test_retry_of_a_cancelled_delivery(api: Api) -> None:
    """A cancelled delivery can be retried and is then sent."""
    await api.write(state("b1"))
    (delivery_id,) = [d["id"] for d in await api.deliveries()]
    await api.client.post(f"/api/deliveries/{delivery_id}/cancel")
    response = await api.client.post(f"/api/deliveries/{delivery_id}/retry")
    assert response.status_code == 200 and response.json()["status"] == "pending"
    assert await api.answer(200) == [delivery_id]


async def test_bulk_retry_counts_and_requeues_only_the_newest(api: Api) -> None:
    """Bulk retry requeues matching dead deliveries, only the newest per booking, and counts."""
    await api.write(state("b1", venue_id="va"), state("b2", venue_id="va"))
    await api.write(state("b3", venue_id="vb"))
    await api.answer(400)
    await api.write(state("b1", venue_id="va", partySize=6))
    (b1_newest,) = await api.answer(400)  # b1 now has two dead deliveries
    await api.write(state("b4", venue_id="va"))
    await api.answer(200)

    only_vb = await api.client.post(
        "/api/deliveries/retry", json={"status": "dead", "venue_id": "vb"}
    )
    assert only_vb.json() == {"requeued": 1}
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    none_yet = await api.client.post(
        "/api/deliveries/retry", json={"status": "dead", "since": future}
    )
    assert none_yet.json() == {"requeued": 0}
    past = await api.client.post(
        "/api/deliveries/retry", json={"status": "dead", "until": "2000-01-01T00:00:00Z"}
    )
    assert past.json() == {"requeued": 0}
    rest = await api.client.post("/api/deliveries/retry", json={"status": "dead"})
    assert rest.status_code == 200 and rest.json() == {"requeued": 2}
    pending = {d["booking_id"]: d["id"] for d in await api.deliveries(status="pending")}
    assert set(pending) == {"b1", "b2", "b3"} and pending["b1"] == b1_newest
    assert [d["booking_id"] for d in await api.deliveries(status="dead")] == ["b1"]
    assert (await api.client.post("/api/deliveries/retry", json={"status": "dead"})).json() == {
        "requeued": 0
    }
    cancelled = await api.client.post("/api/deliveries/retry", json={"status": "cancelled"})
    assert cancelled.json() == {"requeued": 0}


async def test_bulk_retry_validates_its_body(api: Api) -> None:
    """The bulk retry body names dead or cancelled and nothing unknown (a typo cannot widen it)."""
    for body in [
        {},
        {"status": "pending"},
        {"status": "dead", "venueId": "v1"},
        {"status": "dead", "since": "yesterday"},
        {"status": "dead", "since": "0001-01-01T00:00:00+05:00"},
        {"status": "dead", "venue_id": "a\x00b"},
        ["dead"],
    ]:
        response = await api.client.post("/api/deliveries/retry", json=body)
        assert response.status_code == 422, (body, response.text)
    for raw in [b"{", b'{"status": "dead", "venue_id": "\\ud800"}']:
        response = await api.client.post(
            "/api/deliveries/retry", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (raw, response.text)


async def test_bulk_requeue_works_in_batches(api: Api) -> None:
    """A bulk requeue larger than one batch requeues every eligible delivery, batch by batch."""
    await api.write(*(state(f"b{i}") for i in range(7)))
    await api.answer(400)
    requeued = await api.store.requeue_deliveries(status="dead", batch_size=2)
    assert requeued == 7
    assert len(await api.deliveries(status="pending")) == 7


async def test_cancelled_deliveries_requeue_in_bulk_newest_only(api: Api) -> None:
    """Bulk retry of cancelled deliveries requeues only the newest cancelled state of a booking."""
    await api.write(state("b1"))
    await api.write(state("b1", partySize=3))
    await api.write(state("b2"))
    for d in await api.deliveries(status="pending"):
        await api.client.post(f"/api/deliveries/{d['id']}/cancel")
    for d in await api.deliveries(status="superseded"):
        await api.set_delivery(d["id"], status="cancelled")  # as if cancelled before superseded
    response = await api.client.post("/api/deliveries/retry", json={"status": "cancelled"})
    assert response.json() == {"requeued": 2}
    pending = await api.deliveries(status="pending", booking_id="b1")
    assert [d["outbox_id"] for d in pending] == [
        max(d["outbox_id"] for d in await api.deliveries(booking_id="b1"))
    ]


# -- bookings, outbox, stats, workers -------------------------------------------------------


async def test_booking_view(api: Api) -> None:
    """A booking shows its last accepted state and deliveries; unknown bookings answer 404."""
    missing = await api.client.get("/api/bookings/nobody")
    assert missing.status_code == 404 and "nobody" in missing.json()["detail"]

    await api.write(state("b1", venue_id="va"))
    waiting = (await api.client.get("/api/bookings/b1")).json()
    assert waiting["booking_id"] == "b1" and waiting["venue_id"] == "va"
    assert waiting["last_sent"] is None and len(waiting["deliveries"]) == 1

    await api.answer(200)
    await api.write(state("b1", venue_id="va", tables=["T2"]))
    response = await api.client.get("/api/bookings/b1")
    assert response.status_code == 200
    booking = response.json()
    assert booking["last_sent"]["payload"] == state("b1", venue_id="va")
    assert UTC_ISO.match(booking["last_sent"]["sent_at"])
    assert [d["status"] for d in booking["deliveries"]] == ["pending", "delivered"]
    assert set(booking["deliveries"][0]) == DELIVERY_FIELDS
    assert booking["deliveries"][0]["changed_fields"] == ["tables"]


async def test_outbox_list_and_filters(api: Api) -> None:
    """Outbox rows list newest first with outcome and error, filtered by outcome or booking."""
    await api.write(state("q1"), state("h1", status="booked"))
    await api.write(state("q1"))  # same as queued: unchanged
    await api.write(state("s1"), state("s1", partySize=4))  # one batch: the older is superseded
    await api.write({"bookingId": "i1", "venueId": "v1", "status": "seated"})
    await api.write(state("u1"), ingest=False)

    rows = (await api.client.get("/api/outbox")).json()["items"]
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert set(rows[0]) == {
        "id",
        "booking_id",
        "venue_id",
        "created_at",
        "processed_at",
        "outcome",
        "error",
    }

    async def outcomes(**params: Any) -> list[tuple[str, str | None]]:
        response = await api.client.get("/api/outbox", params=params)
        assert response.status_code == 200, response.text
        return [(r["booking_id"], r["outcome"]) for r in response.json()["items"]]

    assert await outcomes(outcome="queued") == [("s1", "queued"), ("q1", "queued")]
    assert await outcomes(outcome="unchanged") == [("q1", "unchanged")]
    assert await outcomes(outcome="held") == [("h1", "held")]
    assert await outcomes(outcome="superseded") == [("s1", "superseded")]
    assert await outcomes(outcome="invalid") == [("i1", "invalid")]
    assert await outcomes(outcome="unprocessed") == [("u1", None)]
    assert await outcomes(booking_id="q1") == [("q1", "unchanged"), ("q1", "queued")]
    assert await outcomes(booking_id="q1", outcome="queued") == [("q1", "queued")]
    invalid = (await api.client.get("/api/outbox?outcome=invalid")).json()["items"][0]
    assert "partySize" in invalid["error"] and UTC_ISO.match(invalid["processed_at"])
    unprocessed = (await api.client.get("/api/outbox?outcome=unprocessed")).json()["items"][0]
    assert unprocessed["processed_at"] is None and UTC_ISO.match(unprocessed["created_at"])


async def test_stats_shape_and_fleet_state(api: Api) -> None:
    """Stats count deliveries by status and report the live processes' circuit and credentials."""
    await api.write(state("b1"), state("b2"))
    await api.answer(400)
    await api.write(state("b3"))
    await api.write(state("b4"), ingest=False)
    stats = (await api.client.get("/api/stats")).json()
    assert stats["deliveries"] == {**dict.fromkeys(STATUSES, 0), "pending": 1, "dead": 2}
    assert stats["outbox_unprocessed"] == 1
    assert stats["oldest_pending_age_seconds"] >= 0
    assert (stats["circuit"], stats["credentials"]) == ("closed", "ok")

    await api.store.register_worker(WorkerInfo(id="w1", hostname="h", pid=1, role="worker"))
    await api.store.heartbeat("w1", circuit="open", credentials="rejected")
    stats = (await api.client.get("/api/stats")).json()
    assert (stats["circuit"], stats["credentials"]) == ("open", "rejected")
    await api.store.mark_stopped("w1")
    stats = (await api.client.get("/api/stats")).json()
    assert (stats["circuit"], stats["credentials"]) == ("closed", "ok")


async def test_empty_stats(api: Api) -> None:
    """With nothing waiting the oldest pending age is null and every status counts zero."""
    stats = (await api.client.get("/api/stats")).json()
    assert stats == {
        "deliveries": dict.fromkeys(STATUSES, 0),
        "outbox_unprocessed": 0,
        "oldest_pending_age_seconds": None,
        "circuit": "closed",
        "credentials": "ok",
        "venues_paused": 0,
        "rate_limit": 0.0,
        "request_rate": 0.0,
    }


async def test_workers_lists_live_processes_only(api: Api) -> None:
    """The workers list shows processes that checked in recently and have not stopped."""
    for worker_id in ("live", "stopped", "stale"):
        await api.store.register_worker(
            WorkerInfo(id=worker_id, hostname="host-a", pid=42, role="worker")
        )
    await api.store.mark_stopped("stopped")
    async with api.store.engine.begin() as conn:
        await conn.execute(
            update(worker)
            .where(worker.c.id == "stale")
            .values(heartbeat_at=datetime.now(UTC) - timedelta(hours=1))
        )
    response = await api.client.get("/api/workers")
    assert response.status_code == 200
    (item,) = response.json()["items"]
    assert item["id"] == "live" and item["hostname"] == "host-a" and item["pid"] == 42
    assert UTC_ISO.match(item["started_at"]) and UTC_ISO.match(item["heartbeat_at"])


# -- POS tables -----------------------------------------------------------------------------


async def control(emulator: Process, method: str, path: str, json: Any = None) -> None:
    """Configure the emulator through its control API."""
    async with httpx.AsyncClient(base_url=str(emulator.url)) as client:
        response = await client.request(method, path, json=json)
        response.raise_for_status()


TABLES = [
    {"id": "T1", "name": "Table 1", "area": "Main room"},
    {"id": "T2", "name": "Table 2", "area": None},
    {"id": "T3", "name": "Terrace 3", "area": "Terrace"},
]


async def test_pos_tables_are_fetched_and_cached(database_url: str, launcher: Launcher) -> None:
    """POS tables come from Mozrest in its shape and are cached for RELAY_POS_TABLES_CACHE."""
    emulator = launcher.emulator(api_key=API_KEY)
    await control(emulator, "PUT", "/_emulator/venues/v1/tables", json={"tables": TABLES})
    async with running_api(
        database_url, mozrest_api_url=emulator.url, mozrest_api_key=API_KEY
    ) as api:
        first = await api.client.get("/api/venues/v1/pos-tables")
        assert first.status_code == 200, first.text
        assert first.json() == {"venueId": "v1", "tables": TABLES, "count": 3}
        # Mozrest's tables change (and then fail): within the cache time the answer stands.
        await control(emulator, "PUT", "/_emulator/venues/v1/tables", json={"tables": TABLES[:1]})
        await control(
            emulator, "PUT", "/_emulator/faults", json={"target": "pos-tables", "status": 500}
        )
        assert (await api.client.get("/api/venues/v1/pos-tables")).json() == first.json()
    await control(emulator, "DELETE", "/_emulator/faults")
    async with running_api(
        database_url,
        mozrest_api_url=emulator.url,
        mozrest_api_key=API_KEY,
        relay_pos_tables_cache_seconds=0.001,
    ) as api:
        fresh = (await api.client.get("/api/venues/v1/pos-tables")).json()
        assert fresh["count"] == 1 and fresh["tables"] == TABLES[:1]


async def test_pos_tables_answer_502_when_mozrest_fails(
    database_url: str, launcher: Launcher
) -> None:
    """A failing, unreachable or unconfigured Mozrest answers 502 with a clear detail."""
    emulator = launcher.emulator(api_key=API_KEY)
    await control(
        emulator, "PUT", "/_emulator/faults", json={"target": "pos-tables", "status": 500}
    )
    async with running_api(
        database_url, mozrest_api_url=emulator.url, mozrest_api_key=API_KEY
    ) as api:
        failing = await api.client.get("/api/venues/v1/pos-tables")
        assert failing.status_code == 502
        assert (
            failing.json()["detail"]
            == "Mozrest's POS tables for venue 'v1': Mozrest answered HTTP 500"
        )
        matching = await api.client.get("/api/venues/v1/table-matching")
        assert matching.status_code == 502
    await control(emulator, "DELETE", "/_emulator/faults")
    async with running_api(
        database_url, mozrest_api_url=emulator.url, mozrest_api_key="wrong"
    ) as api:
        refused = await api.client.get("/api/venues/v1/pos-tables")
        assert refused.status_code == 502 and "MOZREST_API_KEY" in refused.json()["detail"]
        assert "wrong" not in refused.text
    async with running_api(
        database_url, mozrest_api_url=f"http://127.0.0.1:{free_port()}", mozrest_api_key=API_KEY
    ) as api:
        unreachable = await api.client.get("/api/venues/v1/pos-tables")
        assert unreachable.status_code == 502
        assert "could not reach Mozrest" in unreachable.json()["detail"]
    async with running_api(database_url, mozrest_api_url=emulator.url) as api:
        no_key = await api.client.get("/api/venues/v1/pos-tables")
        assert no_key.status_code == 502
        assert no_key.json()["detail"].endswith("MOZREST_API_KEY is not set")


async def test_table_matching_report(database_url: str, launcher: Launcher) -> None:
    """RMS table ids of recent states match POS tables by id, then by normalised name."""
    emulator = launcher.emulator(api_key=API_KEY)
    await control(emulator, "PUT", "/_emulator/venues/v1/tables", json={"tables": TABLES})
    async with running_api(
        database_url, mozrest_api_url=emulator.url, mozrest_api_key=API_KEY
    ) as api:
        await api.write(
            state("b1", tables=["T1"]),
            state("b2", tables=["T1", "terrace-3"]),
            state("b3", tables=["X9"]),
            state("b4", venue_id="v2", tables=["T2"]),
        )
        response = await api.client.get("/api/venues/v1/table-matching")
        assert response.status_code == 200, response.text
        report = response.json()
    assert report["venue_id"] == "v1"
    assert report["pos_tables"] == TABLES
    assert report["matched"] == [
        {"rms_table_id": "T1", "pos_table": TABLES[0], "match": "id"},
        {"rms_table_id": "terrace-3", "pos_table": TABLES[2], "match": "normalised"},
    ]
    assert report["unmatched_rms_table_ids"] == ["X9"]
    assert report["unused_pos_tables"] == [TABLES[1]]


# -- a real server --------------------------------------------------------------------------


async def test_real_api_process_over_http(database_url: str, launcher: Launcher) -> None:
    """`mozrest-relay api` serves health, metrics and the token-guarded API over real HTTP."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = launcher.start(
        "api",
        env={
            "DATABASE_URL": database_url,
            "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "RELAY_PORT": str(port),
        },
        wait_url=f"{base}/healthz",
    )
    wait_http(f"{base}/healthz", process=process)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert set(ready.json()["checks"]) == {"database", "schema", "worker", "mozrest"}
        assert (await client.get("/api/stats")).status_code == 401
        stats = await client.get("/api/stats", headers=AUTH)
        assert stats.status_code == 200 and stats.json()["circuit"] == "closed"
        assert (await client.get("/api/deliveries", headers=AUTH)).json() == {
            "items": [],
            "next_cursor": None,
        }
        metrics = (await client.get("/metrics")).text
        names = {family.name for family in text_string_to_metric_families(metrics)}
        assert SECTION_7_FAMILIES <= names
        docs = await client.get("/docs")
        assert docs.status_code == 200
    assert ADMIN_TOKEN not in process.output()
    assert process.terminate() == 0


async def test_unreachable_database_answers_503_not_500() -> None:
    """With the database down, readiness and the API answer 503 and metrics still scrape."""
    url = f"postgresql://relay@127.0.0.1:{free_port()}/relay"
    async with running_api(url) as api:
        ready = await api.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        assert ready.json()["checks"]["database"].startswith("unreachable")
        for path in ("/api/stats", "/api/deliveries", "/api/workers", "/api/bookings/b1"):
            response = await api.client.get(path)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["detail"].startswith("database unavailable")
        retry = await api.client.post("/api/deliveries/retry", json={"status": "dead"})
        assert retry.status_code == 503
        assert (await api.client.get("/metrics")).status_code == 200


# -- a schema that is not right, and requests that are not --------------------------------------


async def test_unmigrated_database_answers_503_naming_migrate(
    postgres: PostgresDatabases | None, tmp_path: Any
) -> None:
    """Never migrated: `/readyz` is 503 with the reason in `checks.schema`, every `/api/*` route
    503 with the same `detail`, and `/metrics` still scrapes (it answered 500)."""
    urls = [f"sqlite+aiosqlite:///{tmp_path}/never-migrated.db"]
    created = postgres.create(migrated=False) if postgres is not None else None
    if postgres is not None and created is not None:
        urls.append(postgres.url(created))
    try:
        await _check_unmigrated(urls)
    finally:
        if postgres is not None and created is not None:
            postgres.drop(created)


async def _check_unmigrated(urls: list[str]) -> None:
    for url in urls:
        async with running_api(url) as api:
            ready = await api.client.get("/readyz")
            assert ready.status_code == 503
            checks = ready.json()["checks"]
            assert checks["database"] == "ok"
            assert checks["schema"].startswith("not migrated: run mozrest-relay migrate")
            assert "mozrest-relay doctor" in checks["schema"]
            assert checks["worker"] != "ok"
            for method, path in api_requests(api.app):
                response = await api.client.request(method, path, json={})
                assert response.status_code == 503, (method, path, response.text)
                assert response.json() == {"detail": checks["schema"]}
            assert (await api.client.get("/metrics")).status_code == 200


async def test_readiness_never_echoes_driver_errors(postgres: PostgresDatabases | None) -> None:
    """`/readyz` is open: a missing database is "unreachable", pointing at doctor, without the
    driver's words (which name the database); the worker is not "ok" either."""
    if postgres is None:
        pytest.skip("PostgreSQL is not available")
    async with running_api(postgres.url("mozrest_no_such_database")) as api:
        ready = await api.client.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["database"].startswith("unreachable")
        assert "mozrest-relay doctor" in checks["database"]
        assert "does not exist" not in ready.text and "mozrest_no_such_database" not in ready.text
        assert checks["worker"] != "ok"


async def test_wrong_methods_answer_405_not_422(api: Api) -> None:
    """`GET /api/deliveries/retry` is not a delivery id: 405 naming POST; likewise a GET of a
    POST-only delivery action."""
    for path in ("/api/deliveries/retry", "/api/deliveries/1/retry", "/api/deliveries/1/cancel"):
        response = await api.client.get(path)
        assert response.status_code == 405, (path, response.text)
        assert response.headers["Allow"] == "POST"
        assert response.json() == {"detail": "Method Not Allowed"}
    assert (await api.client.get("/api/no-such-route")).status_code == 404


async def test_unknown_query_parameters_answer_422_naming_them(api: Api) -> None:
    """`statuss=dead` must not list everything: 422 naming the parameter, on every route."""
    await api.write(state("b1"))
    for path, params in [
        ("/api/deliveries", {"statuss": "dead"}),
        ("/api/outbox", {"outcome": "queued", "venue_id": "v1"}),
        ("/api/stats", {"verbose": "1"}),
    ]:
        response = await api.client.get(path, params=params)
        assert response.status_code == 422, (path, response.text)
        errors = response.json()["detail"]
        unknown = next(name for name in params if name not in ("outcome",))
        assert errors[0]["loc"] == ["query", unknown]
        assert unknown in errors[0]["msg"]
    known = await api.client.get("/api/deliveries", params={"status": "pending", "limit": 5})
    assert known.status_code == 200


async def test_the_metrics_page_passes_promtools_lint(api: Api) -> None:
    """`promtool check metrics` (Prometheus's own linter) finds nothing to say about a live
    `/metrics` page: names, units, help texts and types as Prometheus expects them."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("REQUIRE_PROMTOOL") == "1":
            pytest.fail("REQUIRE_PROMTOOL=1 but promtool is not installed")
        pytest.skip("promtool is not installed (Debian's prometheus package)")
    await api.write(state("b1"))
    await api.answer(200)
    page = (await api.client.get("/metrics")).text
    lint = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=page,
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
