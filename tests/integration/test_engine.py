"""The delivery engine end to end: SPEC section 3, one test per invariant.

Each test runs a real database (SQLite and PostgreSQL), a real Mozrest emulator served by uvicorn
on loopback in a thread of its own, the real publisher and a `Worker` as an asyncio task with
fast settings. Rows go into `mozrest_outbox` the way the RMS writes them; assertions are on what a
user sees: what the emulator received and stored, and the relay's rows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.models import attempt, booking, delivery
from app.models import worker as worker_table
from app.runtime import build_store, build_worker
from app.store import StoreError
from app.worker import WorkerFailed
from tests.conftest import eventually
from tests.factories import state
from tests.integration.conftest import FAST, TOKEN, Relay

DOCUMENTED_ORDER = (
    "bookingId",
    "venueId",
    "partySize",
    "status",
    "tables",
    "date",
    "prepayment",
    "contact",
    "notes",
    "items",
)
CONTACT = {
    "firstname": "John",
    "lastname": "Doe",
    "email": "john.doe@mail.com",
    "telephone": "34646223399",
    "locale": "en",
}
ITEMS = [{"sku": "PIZZA-001", "quantity": 2}, {"sku": "WINE-012", "quantity": 1, "notes": "no ice"}]


def assert_one_at_a_time(requests: list[dict[str, Any]]) -> None:
    """No two requests of one booking overlap in time at the emulator."""
    by_booking: dict[str, list[dict[str, Any]]] = {}
    for request in requests:
        by_booking.setdefault(request["bookingId"], []).append(request)
    for booking_id, seen in by_booking.items():
        seen.sort(key=lambda r: r["arrival_ns"])
        for before, after in itertools.pairwise(seen):
            assert after["arrival_ns"] >= before["finished_ns"], f"{booking_id} overlapped"


# -- 3.7 payload, and the Bearer token ----------------------------------------------------------


async def test_seated_booking_lands_with_the_exact_documented_payload(relay: Relay) -> None:
    """A seated booking reaches Mozrest once, with the Bearer token, in exactly the documented
    shape: documented key order, integer date, 50.0 kept, null optional fields omitted."""
    raw = (
        '{"notes": "I am allergic to peanuts", "status": "seated", "prepayment": 50.00, '
        '"items": [{"sku": "PIZZA-001", "quantity": 2}, '
        '{"notes": "no ice", "quantity": 1, "sku": "WINE-012"}], '
        '"contact": {"locale": "en", "telephone": "34646223399", "email": "john.doe@mail.com", '
        '"lastname": "Doe", "firstname": "John"}, "date": 1639578600, '
        '"tables": ["28c3ce8b", "T2"], "partySize": 4, "venueId": "venue-1", '
        '"bookingId": "bk-exact"}'
    )
    walk_in = (
        '{"bookingId": "bk-walk-in", "venueId": "venue-1", "partySize": 1, "status": "seated", '
        '"tables": ["T9"], "date": 1639578600, "contact": null, "notes": null, "items": [], '
        '"prepayment": null}'
    )
    exact_id = await relay.insert_raw("bk-exact", "venue-1", raw)
    walk_in_id = await relay.insert_raw("bk-walk-in", "venue-1", walk_in)
    await relay.start()

    expected = {
        "bookingId": "bk-exact",
        "venueId": "venue-1",
        "partySize": 4,
        "status": "seated",
        "tables": ["28c3ce8b", "T2"],
        "date": 1639578600,
        "prepayment": 50.0,
        "contact": CONTACT,
        "notes": "I am allergic to peanuts",
        "items": ITEMS,
    }
    expected_walk_in = state("bk-walk-in", partySize=1, tables=["T9"])
    await relay.wait_landed(expected)
    await relay.wait_landed(expected_walk_in)

    for booking_id, wanted in (("bk-exact", expected), ("bk-walk-in", expected_walk_in)):
        (request,) = await relay.requests(booking_id)
        assert request["status_code"] == 200  # the emulator answers 401 without Bearer test-token
        body = request["body"]
        assert body == wanted
        assert list(body) == [key for key in DOCUMENTED_ORDER if key in body]
        if "contact" in body:
            assert list(body["contact"]) == list(CONTACT)
        for item in body.get("items", []):
            assert list(item) == [key for key in ("sku", "quantity", "notes") if key in item]
        assert type(body["date"]) is int
    assert (await relay.requests("bk-exact"))[0]["body"]["prepayment"] == 50.0

    assert await relay.outcomes(exact_id, walk_in_id) == ["queued", "queued"]
    sent = await relay.wait_status(exact_id, "delivered")
    assert (sent.attempt_count, sent.last_status_code, sent.last_error) == (1, 200, None)
    assert sent.changed_fields == list(DOCUMENTED_ORDER)
    assert sent.warnings == []
    (answer,) = await relay.attempts(sent.id)
    assert answer.status_code == 200
    assert json.loads(answer.response_body) == {"status": "ok", "bookingId": "bk-exact"}
    for row in await relay.attempts():
        assert TOKEN not in f"{row.response_body} {row.error} {row.worker_id}"


# -- 3.6 send policy ----------------------------------------------------------------------------


async def test_states_before_the_first_seated_one_are_held_and_never_sent(relay: Relay) -> None:
    """Non-seated states of a booking never sent are `held`; its seated state then goes alone."""
    await relay.start()
    booked = state("bk-held", status="booked")
    confirmed = state("bk-held", status="confirmed", partySize=3)
    assert await relay.wait_processed(*await relay.insert(booked)) == ["held"]
    assert await relay.wait_processed(*await relay.insert(confirmed)) == ["held"]
    control = state("bk-control")
    await relay.insert(control)
    await relay.wait_landed(control)
    assert await relay.requests("bk-held") == []
    assert await relay.deliveries("bk-held") == []

    seated = state("bk-held", partySize=3)
    await relay.insert(seated)
    await relay.wait_landed(seated)
    assert [r["body"] for r in await relay.requests("bk-held")] == [seated]


async def test_a_booking_cancelled_before_its_seated_state_left_is_never_sent(
    relay: Relay,
) -> None:
    """Cancelled while its seated state waits (in the same batch, or queued behind a busy
    dispatch): the seated state is superseded, the cancellation held, nothing is sent."""
    batch_ids = await relay.insert(state("bk-batch"), state("bk-batch", status="cancelled"))
    # One request slot, kept busy by a slow request of another booking.
    await relay.set_faults(latency_ms=800)
    await relay.start(relay_concurrency=1)
    await relay.wait_processed(*batch_ids)
    busy = state("bk-busy")
    (busy_id,) = await relay.insert(busy)
    await eventually(lambda: _leased(relay, busy_id), timeout=3)
    (queued_seated,) = await relay.insert(state("bk-queued"))
    assert await relay.wait_processed(queued_seated) == ["queued"]
    (queued_cancel,) = await relay.insert(state("bk-queued", status="cancelled"))
    assert await relay.wait_processed(queued_cancel) == ["held"]
    await relay.wait_landed(busy)

    assert await relay.outcomes(*batch_ids) == ["superseded", "held"]
    assert await relay.deliveries("bk-batch") == []
    assert (await relay.delivery_of(queued_seated)).status == "superseded"
    await asyncio.sleep(0.2)
    assert await relay.requests("bk-queued") == []
    assert await relay.requests("bk-batch") == []


async def test_once_a_state_was_sent_later_states_are_sent_whatever_their_status(
    relay: Relay,
) -> None:
    """After a state left (accepted, or even refused), `finished` and `cancelled` are sent."""
    await relay.start()
    seated_a, seated_b = state("bk-finish"), state("bk-cancel")
    await relay.insert(seated_a, seated_b)
    await relay.wait_landed(seated_a)
    await relay.wait_landed(seated_b)
    finished, cancelled = (
        state("bk-finish", status="finished"),
        state("bk-cancel", status="cancelled"),
    )
    ids = await relay.insert(finished, cancelled)
    await relay.wait_landed(finished)
    await relay.wait_landed(cancelled)
    assert await relay.outcomes(*ids) == ["queued", "queued"]

    # The seated state left but was refused (dead): the booking counts as sent all the same.
    await relay.set_faults(fail_next=1, fail_next_status=400)
    (refused,) = await relay.insert(state("bk-refused"))
    await relay.wait_status(refused, "dead")
    await relay.clear_faults()
    late_cancel = state("bk-refused", status="cancelled")
    (late_id,) = await relay.insert(late_cancel)
    await relay.wait_landed(late_cancel)
    assert await relay.outcomes(late_id) == ["queued"]
    assert [r["status_code"] for r in await relay.requests("bk-refused")] == [400, 200]


# -- 3.5 no-op suppression ----------------------------------------------------------------------


async def test_a_state_equal_to_the_accepted_one_is_unchanged_and_not_sent(relay: Relay) -> None:
    """Equality is on the normalised state: 50 == 50.0, [] items == none, null == omitted; but
    table order counts."""
    await relay.start()
    accepted = state("bk-same", prepayment=50.0, contact=CONTACT, tables=["T1", "T2"])
    (first,) = await relay.insert(accepted)
    await relay.wait_landed(accepted)

    again = [
        accepted,
        {**accepted, "prepayment": 50},
        {**accepted, "items": []},
        {**accepted, "notes": None, "contact": dict(reversed(CONTACT.items()))},
    ]
    for same in again:
        (row_id,) = await relay.insert(same)
        assert await relay.wait_processed(row_id) == ["unchanged"], same
    reordered = {**accepted, "tables": ["T2", "T1"]}
    (moved,) = await relay.insert(reordered)
    await relay.wait_landed(reordered)

    assert [r["body"] for r in await relay.requests("bk-same")] == [accepted, reordered]
    deliveries = await relay.deliveries("bk-same")
    assert [d.outbox_id for d in deliveries] == [first, moved]
    assert deliveries[-1].changed_fields == ["tables"]


#: A request kept on the wire long enough for the test to ingest two more states behind it, even
#: on a loaded machine (at 500 ms, a busy CI machine sometimes landed it first); the timeout and
#: lease are raised to match so the slow request is not itself a failure.
SLOW_WIRE_MS = 2500
SLOW_WIRE: dict[str, float] = {"relay_http_timeout_seconds": 6.0, "relay_lease_seconds": 10.0}


async def test_returning_to_the_accepted_state_sends_nothing_and_supersedes_the_queued_one(
    relay: Relay,
) -> None:
    """A accepted, B queued, A again: nothing more is sent and B is superseded; the same holds
    against a state still on the wire."""
    a, b = state("bk-aba", partySize=2), state("bk-aba", partySize=6)
    await relay.start(relay_concurrency=1, **SLOW_WIRE)
    await relay.insert(a)
    await relay.wait_landed(a)
    # B waits unsent because the only request slot is busy with a slow request.
    await relay.set_faults(latency_ms=SLOW_WIRE_MS)
    busy = state("bk-busy")
    (busy_id,) = await relay.insert(busy)
    await eventually(lambda: _leased(relay, busy_id), timeout=3)
    (b_id,) = await relay.insert(b)
    assert await relay.wait_processed(b_id) == ["queued"]
    (a_again,) = await relay.insert(a)
    assert await relay.wait_processed(a_again) == ["unchanged"]
    assert (await relay.delivery_of(b_id)).status == "superseded"
    await relay.wait_landed(busy)

    # Against the in-flight state: A on the wire, B queued behind it, then A again.
    c, d = state("bk-wire", partySize=2), state("bk-wire", partySize=3)
    (c_id,) = await relay.insert(c)
    await eventually(lambda: _leased(relay, c_id), timeout=3)
    (d_id,) = await relay.insert(d)
    assert await relay.wait_processed(d_id) == ["queued"]
    (c_again,) = await relay.insert(c)
    assert await relay.wait_processed(c_again) == ["unchanged"]
    await relay.wait_landed(c)
    await asyncio.sleep(0.2)

    assert (await relay.delivery_of(d_id)).status == "superseded"
    assert [r["body"] for r in await relay.requests("bk-aba")] == [a]
    assert [r["body"] for r in await relay.requests("bk-wire")] == [c]


async def test_states_committed_while_no_worker_ran_are_decided_before_queued_work_is_sent(
    relay: Relay,
) -> None:
    """After a restart, newer states already committed win over states queued before it: a
    cancellation keeps the queued seated state from leaving, and A again keeps B from leaving."""
    a, b = state("bk-aba", partySize=2), state("bk-aba", partySize=6)
    await relay.start()
    await relay.insert(a)
    await relay.wait_landed(a)
    await relay.stop()

    # What a worker stopped between ingest and send leaves behind: B and a seated state queued.
    store = relay.store()
    b_id, seated_id = await relay.insert(b, state("bk-cancel"))
    assert (await store.ingest(limit=100)) is not None
    # While no worker runs, the RMS goes on: other bookings' states, then A again and the
    # cancellation, all committed before the worker starts.
    await relay.insert(*(state(f"bk-other-{n:03d}", status="booked") for n in range(100)))
    a_again, cancelled = await relay.insert(a, state("bk-cancel", status="cancelled"))
    control = state("bk-control")
    await relay.insert(control)

    await relay.start(relay_batch_size=20)
    await relay.wait_landed(control)
    await asyncio.sleep(0.2)
    assert await relay.requests("bk-cancel") == [], "the seated state of a cancelled booking left"
    assert [r["body"] for r in await relay.requests("bk-aba")] == [a], "B left after A again"
    # B and the seated state were queued, then replaced before they left: superseded (SPEC 3.4).
    assert await relay.outcomes(b_id, seated_id, a_again, cancelled) == [
        "superseded",
        "superseded",
        "unchanged",
        "held",
    ]


async def _leased(relay: Relay, outbox_id: int) -> bool:
    """Whether the delivery of an outbox row is claimed (its request is on the wire)."""
    async with relay.reader.connect() as conn:
        row = (
            await conn.execute(
                select(delivery.c.lease_token).where(delivery.c.outbox_id == outbox_id)
            )
        ).first()
    return row is not None and row.lease_token is not None


# -- 3.4 coalescing -----------------------------------------------------------------------------


async def test_rapid_changes_written_before_the_worker_runs_coalesce_into_one_post(
    relay: Relay,
) -> None:
    """Twenty states of one booking waiting together: one POST of the newest, 19 superseded."""
    changes = [state("bk-rapid", partySize=n, notes=f"change {n}") for n in range(1, 21)]
    ids = await relay.insert(*changes)
    await relay.start()
    await relay.wait_landed(changes[-1])
    await asyncio.sleep(0.1)
    assert [r["body"] for r in await relay.requests("bk-rapid")] == [changes[-1]]
    assert await relay.outcomes(*ids) == ["superseded"] * 19 + ["queued"]
    (only,) = await relay.deliveries("bk-rapid")
    assert (only.outbox_id, only.status) == (ids[-1], "delivered")


# -- 3.9 retries --------------------------------------------------------------------------------


async def test_server_errors_are_retried_with_backoff_until_accepted(relay: Relay) -> None:
    """Three 500s then a 200: four attempts recorded, with growing gaps, and the state lands."""
    await relay.set_faults(fail_next=3, fail_next_status=500)
    await relay.start()
    wanted = state("bk-500")
    (row_id,) = await relay.insert(wanted)
    sent = await relay.wait_status(row_id, "delivered")
    assert await relay.landed("bk-500") == wanted

    requests = await relay.requests("bk-500")
    assert [r["status_code"] for r in requests] == [500, 500, 500, 200]
    base = FAST["relay_retry_base_delay_seconds"]
    for n, (before, after) in enumerate(itertools.pairwise(requests)):
        # Full jitter keeps at least half of base * 2**n.
        assert after["arrival_ns"] - before["finished_ns"] >= base * 2**n / 2 * 1e9
    assert (sent.attempt_count, sent.last_status_code) == (4, 200)
    attempts = await relay.attempts(sent.id)
    assert [a.status_code for a in attempts] == [500, 500, 500, 200]
    assert all("Injected fault" in a.response_body for a in attempts[:3])
    assert [a.error for a in attempts] == ["HTTP 500"] * 3 + [None]


async def test_retry_after_on_429_is_honoured(relay: Relay) -> None:
    """A 429 with `Retry-After: 1` is retried, and not before a second has passed."""
    await relay.set_faults(fail_next=1, fail_next_status=429, retry_after_seconds=1)
    await relay.start()
    wanted = state("bk-429")
    (row_id,) = await relay.insert(wanted)
    sent = await relay.wait_status(row_id, "delivered")
    first, second = await relay.requests("bk-429")
    assert (first["status_code"], second["status_code"]) == (429, 200)
    assert second["arrival_ns"] - first["finished_ns"] >= 1e9
    assert sent.attempt_count == 2


async def test_the_shortest_lease_start_up_accepts_still_sends(relay: Relay) -> None:
    """RELAY_LEASE_SECONDS exactly RELAY_HTTP_TIMEOUT + 1s passes the start-up check (SPEC 3.3),
    so a worker configured so must deliver, not claim and release forever."""
    settings = relay.settings(relay_lease_seconds=2.0, relay_http_timeout_seconds=1.0)
    assert settings.relay_lease_seconds - settings.relay_http_timeout_seconds == 1.0
    await relay.start(relay_lease_seconds=2.0, relay_http_timeout_seconds=1.0)
    wanted = state("bk-short-lease")
    (row_id,) = await relay.insert(wanted)
    await relay.wait_landed(wanted, timeout=3)
    await relay.wait_status(row_id, "delivered")


async def test_other_client_answers_are_dead_at_once_with_the_answer_kept(relay: Relay) -> None:
    """400, 403, 3xx and a real 422 are `dead` after one attempt, with status and body kept (the
    body cut to 4 KiB)."""
    await relay.start()
    for code in (400, 403, 307):
        await relay.set_faults(status=code)
        (row_id,) = await relay.insert(state(f"bk-{code}"))
        dead = await relay.wait_status(row_id, "dead")
        assert (dead.attempt_count, dead.last_status_code) == (1, code)
        (kept,) = await relay.attempts(dead.id)
        assert kept.status_code == code
        assert json.loads(kept.response_body) == {"detail": f"Injected fault (status): {code}"}
    await relay.clear_faults()

    # The emulator's own 422 for unknown SKUs, with an answer longer than 4 KiB.
    menu = {"skus": ["KNOWN"], "reject_unknown": True}
    (await relay.emulator.put("/_emulator/venues/venue-menu/menu", json=menu)).raise_for_status()
    items = [{"sku": f"UNKNOWN-{n:03d}-" + "x" * 90, "quantity": 1} for n in range(60)]
    (row_id,) = await relay.insert(state("bk-422", venue_id="venue-menu", items=items))
    dead = await relay.wait_status(row_id, "dead")
    assert (dead.attempt_count, dead.last_status_code) == (1, 422)
    (kept,) = await relay.attempts(dead.id)
    assert kept.response_body.startswith('{"detail":"Unknown SKU(s): UNKNOWN-000-')
    assert len(kept.response_body.encode()) == 4096

    await asyncio.sleep(0.3)
    for code in (400, 403, 307, 422):
        assert len(await relay.requests(f"bk-{code}")) == 1, code
    assert await relay.bookings() == {}


async def test_rejected_credentials_pause_dispatch_without_dead_letters(relay: Relay) -> None:
    """While Mozrest answers 401, one probe per cool-down goes, nothing is dead, the worker
    reports `rejected`; once accepted, everything is delivered."""
    wanted = [state(f"bk-401-{n}") for n in range(10)]
    await relay.insert(*wanted)
    await relay.set_faults(status=401)
    started = time.monotonic()
    worker = await relay.start()
    await eventually(lambda: worker.credentials_state == "rejected", timeout=2)
    await eventually(lambda: _worker_column(relay, "credentials", "rejected"), timeout=2)
    outage = 1.5
    await asyncio.sleep(outage - (time.monotonic() - started))
    assert worker.credentials_state == "rejected"
    during = await relay.requests()
    deliveries = await relay.deliveries()

    cooldown = FAST["relay_circuit_cooldown_seconds"]
    assert len(during) <= len(wanted) + outage / cooldown + 2, len(during)
    assert {d.status for d in deliveries} <= {"pending", "retrying"}
    # After the first burst, requests come no faster than one per cool-down.
    probes = [r for r in during if r["arrival_ns"] > during[0]["arrival_ns"] + 0.5e9]
    assert probes, "no probe during the pause"
    for before, after in itertools.pairwise(probes):
        assert after["arrival_ns"] - before["finished_ns"] >= (cooldown - 0.05) * 1e9

    await relay.clear_faults()
    for each in wanted:
        await relay.wait_landed(each)
    await eventually(
        lambda: _all_status(relay, "delivered", len(wanted)), timeout=3, message="delivered"
    )
    assert worker.credentials_state == "ok"
    # Paused deliveries were deferred, not attempted: one attempt row per request sent.
    assert await relay.count(attempt) == len(await relay.requests())


async def _worker_column(relay: Relay, column: str, value: str) -> bool:
    async with relay.reader.connect() as conn:
        rows = (await conn.execute(select(worker_table.c[column]))).scalars().all()
    return list(rows) == [value]


async def _all_status(relay: Relay, status: str, count: int) -> bool:
    rows = await relay.deliveries()
    return len(rows) == count and all(d.status == status for d in rows)


# -- 3.10 outages -------------------------------------------------------------------------------


async def test_circuit_breaker_bounds_requests_in_an_outage_then_the_backlog_drains(
    relay: Relay,
) -> None:
    """Two seconds of 503s: the circuit opens and few requests reach Mozrest; once it recovers,
    a backlog of 50 bookings drains and every state lands."""
    wanted = [state(f"bk-outage-{n:02d}", partySize=n + 1) for n in range(50)]
    await relay.insert(*wanted)
    await relay.set_faults(status=503)
    concurrency, threshold, cooldown, outage = 8, 3, 0.3, 2.0
    worker = await relay.start(relay_concurrency=concurrency, relay_circuit_threshold=threshold)
    started = time.monotonic()
    seen: set[str] = set()
    while time.monotonic() - started < outage:
        seen.add(worker.circuit_state)
        await asyncio.sleep(0.02)
    assert "open" in seen
    assert worker.circuit_state != "closed"
    assert await _worker_row_circuit_open(relay)
    received = len(await relay.requests())
    assert received <= concurrency + threshold + outage / cooldown + 2, received

    await relay.clear_faults()
    for each in wanted:
        await relay.wait_landed(each)
    await eventually(lambda: _all_status(relay, "delivered", len(wanted)), timeout=3)
    assert worker.circuit_state == "closed"
    requests = await relay.requests()
    assert sum(r["status_code"] == 200 for r in requests) == len(wanted)
    assert await relay.count(attempt) == len(requests)
    assert_one_at_a_time(requests)


async def _worker_row_circuit_open(relay: Relay) -> bool:
    async with relay.reader.connect() as conn:
        circuit = (await conn.execute(select(worker_table.c.circuit))).scalar_one()
    return circuit in ("open", "half_open")


async def test_retry_max_age_ends_a_failing_delivery_dead(relay: Relay) -> None:
    """With RELAY_RETRY_MAX_AGE=1s and Mozrest failing for good, the delivery ends `dead`, not
    before its age passed, and no request follows."""
    await relay.set_faults(status=503)
    await relay.start(relay_retry_max_age_seconds=1.0)
    (row_id,) = await relay.insert(state("bk-old"))
    dead = await relay.wait_status(row_id, "dead", timeout=4)
    assert dead.attempt_count >= 2
    assert dead.last_status_code == 503
    assert (dead.updated_at - dead.created_at).total_seconds() >= 1.0
    count = len(await relay.requests("bk-old"))
    await asyncio.sleep(0.5)
    assert len(await relay.requests("bk-old")) == count
    assert await relay.bookings() == {}


# -- 3.8 bad input ------------------------------------------------------------------------------


async def test_invalid_rows_are_named_and_never_block_the_rows_around_them(relay: Relay) -> None:
    """Malformed rows are `invalid` with the field named; valid rows around them are delivered,
    and a later valid row of a booking with an invalid one proceeds."""
    first, last = state("bk-valid-1"), state("bk-valid-2")
    too_big = json.dumps(state("bk-big", notes="x" * 70_000))
    bad: list[tuple[str, str, str, str]] = [
        ("bk-array", "venue-1", json.dumps([state("bk-array")]), "payload"),
        ("bk-string", "venue-1", json.dumps("seated"), "payload"),
        ("bk-missing", "venue-1", json.dumps(state("bk-missing", partySize=None)), "partySize"),
        ("bk-type", "venue-1", json.dumps(state("bk-type", partySize="4")), "partySize"),
        (
            "bk-item",
            "venue-1",
            json.dumps(state("bk-item", items=[{"sku": "A", "quantity": 0}])),
            "items[0].quantity",
        ),
        ("bk-column", "venue-1", json.dumps(state("bk-other")), "bookingId"),
        ("bk-venue", "venue-2", json.dumps(state("bk-venue")), "venueId"),
        ("bk-unknown", "venue-1", json.dumps(state("bk-unknown", colour="red")), "colour"),
        ("bk-big", "venue-1", too_big, "payload"),
    ]
    (first_id,) = await relay.insert(first)
    bad_ids = [await relay.insert_raw(b, v, p) for b, v, p, _ in bad]
    (last_id,) = await relay.insert(last)
    await relay.start()
    await relay.wait_landed(first)
    await relay.wait_landed(last)

    rows = {row.id: row for row in await relay.outbox_rows()}
    assert (rows[first_id].outcome, rows[last_id].outcome) == ("queued", "queued")
    for row_id, (_, _, _, field) in zip(bad_ids, bad, strict=True):
        row = rows[row_id]
        assert row.outcome == "invalid", field
        assert row.processed_at is not None
        assert row.error.startswith(f"{field}: "), (field, row.error)
    assert "limit" in rows[bad_ids[-1]].error
    assert {d.booking_id for d in await relay.deliveries()} == {"bk-valid-1", "bk-valid-2"}

    fixed = state("bk-item", items=[{"sku": "A", "quantity": 1}])
    (fixed_id,) = await relay.insert(fixed)
    await relay.wait_landed(fixed)
    assert await relay.outcomes(fixed_id) == ["queued"]


# -- 3.7 items ----------------------------------------------------------------------------------


async def test_emptying_items_is_sent_with_a_warning_and_mozrest_keeps_the_old_items(
    relay: Relay,
) -> None:
    """A change that empties the items is sent without `items` and the delivery warns that the
    POS may keep them, as the emulator's order shows."""
    await relay.start()
    with_items = state("bk-items", items=ITEMS)
    await relay.insert(with_items)
    await relay.wait_landed(with_items)
    emptied = state("bk-items")
    (row_id,) = await relay.insert({**emptied, "items": []})
    await relay.wait_landed(emptied)

    sent = await relay.wait_status(row_id, "delivered")
    assert sent.changed_fields == ["items"]
    (warning,) = sent.warnings
    assert "items" in warning
    held = (await relay.bookings())["bk-items"]
    assert held["order_items"] == ITEMS
    assert held["order_items_kept"] is True


async def test_send_items_false_strips_items_from_every_payload(relay: Relay) -> None:
    """With RELAY_SEND_ITEMS=false no payload carries `items`, and an items-only change is a
    no-op."""
    await relay.start(relay_send_items=False)
    first = state("bk-no-items", items=ITEMS)
    await relay.insert(first)
    stripped = state("bk-no-items")
    await relay.wait_landed(stripped)
    (items_only,) = await relay.insert(state("bk-no-items", items=ITEMS[:1]))
    assert await relay.wait_processed(items_only) == ["unchanged"]
    bigger = state("bk-no-items", partySize=5, items=ITEMS)
    await relay.insert(bigger)
    await relay.wait_landed(state("bk-no-items", partySize=5))

    requests = await relay.requests("bk-no-items")
    assert len(requests) == 2
    assert all("items" not in r["body"] for r in requests)
    assert all("items" not in d.payload for d in await relay.deliveries())
    assert (await relay.bookings())["bk-no-items"]["order_items"] == []


# -- 3.2 and 3.3 newest wins, one at a time -----------------------------------------------------


async def test_newest_state_wins_while_one_is_on_the_wire(relay: Relay) -> None:
    """A on the wire, then B and C arrive: exactly A then C land, B is superseded, and the two
    requests never overlap."""
    await relay.set_faults(latency_ms=SLOW_WIRE_MS)
    await relay.start(**SLOW_WIRE)
    a, b, c = (state("bk-wire", partySize=n) for n in (2, 3, 4))
    (a_id,) = await relay.insert(a)
    await eventually(lambda: _leased(relay, a_id), timeout=3)
    (b_id,) = await relay.insert(b)
    assert await relay.wait_processed(b_id) == ["queued"]
    (c_id,) = await relay.insert(c)
    assert await relay.wait_processed(c_id) == ["queued"]
    assert await relay.requests("bk-wire") == []  # A is still on the wire

    await relay.wait_landed(c)
    await asyncio.sleep(0.2)
    requests = await relay.requests("bk-wire")
    assert [r["body"] for r in requests] == [a, c]
    assert_one_at_a_time(requests)
    assert (await relay.delivery_of(a_id)).status == "delivered"
    assert (await relay.delivery_of(b_id)).status == "superseded"
    assert (await relay.delivery_of(c_id)).status == "delivered"
    assert (await relay.bookings())["bk-wire"]["accepted_count"] == 2


# -- 3.11 shutdown ------------------------------------------------------------------------------


#: Start and stop a worker again and again, stopping it at random instants; run in a child
#: process so that a worker that never finishes stopping fails the test instead of hanging it.
STOP_CYCLES = """
import asyncio, os, random, sys
from sqlalchemy import select
from app.db import create_engine
from app.models import outbox
from app.runtime import build_store, build_worker
from app.settings import Settings

async def main(url, cycles, grace):
    engine = create_engine(url)
    settings = Settings(
        _env_file=None, database_url=url, mozrest_webhook_url="http://127.0.0.1:9/rms",
        relay_poll_interval_seconds=0.005, relay_heartbeat_interval_seconds=0.01,
        relay_shutdown_grace_seconds=grace, relay_lease_seconds=3, relay_http_timeout_seconds=1,
    )
    pace = random.Random(7)
    for cycle in range(cycles):
        worker = build_worker(settings, build_store(settings, engine))
        task = asyncio.create_task(worker.run())
        for n in range(5):
            booking_id = f"bk-{cycle}-{n}"
            payload = {"bookingId": booking_id, "venueId": "venue-1", "partySize": 2,
                       "status": "booked", "tables": ["T1"], "date": 1639578600}
            async with engine.begin() as conn:
                await conn.execute(outbox.insert().values(
                    booking_id=booking_id, venue_id="venue-1", payload=payload))
            await asyncio.sleep(pace.uniform(0, 0.03))
        worker.stop()
        done, _ = await asyncio.wait({task}, timeout=grace + 3)
        if not done:
            print(f"cycle {cycle}: still stopping {grace + 3:g}s after stop()", flush=True)
            os._exit(3)
        task.result()
        await worker.publisher.aclose()
    # Nothing was lost: a last worker decides what the last stop left unread, each row once.
    worker = build_worker(settings, build_store(settings, engine))
    task = asyncio.create_task(worker.run())
    for _ in range(200):
        async with engine.connect() as conn:
            outcomes = (await conn.execute(select(outbox.c.outcome))).scalars().all()
        if len(outcomes) == cycles * 5 and set(outcomes) == {"held"}:
            break
        await asyncio.sleep(0.05)
    else:
        print(f"rows left undecided: {sorted(map(str, outcomes))}", flush=True)
        os._exit(4)
    worker.stop()
    await task
    await worker.publisher.aclose()
    await engine.dispose()
    print(f"{cycles} stops, all within the grace", flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


def test_a_stopped_worker_always_returns_within_its_grace(
    database_url: str, tmp_path: Path
) -> None:
    """Stopped at any instant, even in the middle of a database call, the worker finishes within
    RELAY_SHUTDOWN_GRACE, cycle after cycle (the promise behind SIGTERM, SPEC 3.11)."""
    # Busy loops (5 ms polls, 10 ms heartbeats) so that stops often land mid-transaction.
    result = subprocess.run(
        [sys.executable, "-c", STOP_CYCLES, database_url, "20", "1.0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr[-3000:]}"


async def test_a_loop_that_dies_of_a_bug_stops_the_worker_and_loses_nothing(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one loop (here: recording answers) must not leave a worker running without it:
    the worker logs `worker.loop_failed`, stops within its grace and raises, so the process exits
    non-zero and is restarted; the state it sent but could not record is sent again by the next
    worker once the lease ends (at-least-once)."""
    settings = relay.settings()
    store = build_store(settings, relay.engine)

    async def broken_record(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("simulated bug while recording")

    store.record = broken_record
    worker = build_worker(settings, store)
    payload = state("bk-bug")
    (outbox_id,) = await relay.insert(payload)
    try:
        with pytest.raises(WorkerFailed, match="simulated bug while recording"):
            await asyncio.wait_for(worker.run(), timeout=settings.relay_shutdown_grace_seconds + 5)
    finally:
        await worker.publisher.aclose()
    failures = [r for r in caplog.records if r.getMessage() == "worker.loop_failed"]
    assert failures and failures[0].loop == "record"  # type: ignore[attr-defined]

    await relay.start()

    async def sent_again_and_recorded() -> bool:
        return (await relay.delivery_of(outbox_id)).status == "delivered"

    await eventually(sent_again_and_recorded, timeout=settings.relay_lease_seconds + 5)
    assert [r["body"] for r in await relay.requests("bk-bug")] == [payload, payload]


async def test_a_worker_stopped_during_a_database_outage_stops_cleanly(relay: Relay) -> None:
    """SIGTERM while the database is unreachable is a normal stop (exit 0, SPEC 3.11), not a
    loop failure: the loops' retries end with the outage's last error."""
    settings = relay.settings()
    store = build_store(settings, relay.engine)

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("database unreachable: connection refused")

    store.ingest = unreachable
    store.claim_due = unreachable
    worker = build_worker(settings, store)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.5)  # the loops are retrying
    worker.stop()
    try:
        await asyncio.wait_for(task, timeout=settings.relay_shutdown_grace_seconds + 5)
    finally:
        await worker.publisher.aclose()
    assert worker.failure is None


# -- 3.12 retention -----------------------------------------------------------------------------


async def test_retention_prunes_terminal_rows_and_idle_snapshots_but_not_pending_work(
    relay: Relay,
) -> None:
    """Pruning with zero retention removes delivered and dead deliveries, their attempts and idle
    snapshots; pending deliveries, unprocessed rows and their bookings' snapshots stay."""
    await relay.start()
    delivered = state("bk-done")
    (done_id,) = await relay.insert(delivered)
    await relay.wait_status(done_id, "delivered")
    await relay.set_faults(fail_next=1, fail_next_status=400)
    (dead_id,) = await relay.insert(state("bk-dead"))
    await relay.wait_status(dead_id, "dead")
    await relay.clear_faults()
    await relay.stop()

    store = relay.store()
    pending = state("bk-pending")
    (pending_id,) = await relay.insert(pending)
    assert (await store.ingest(limit=100)) is not None
    newer = state("bk-done", partySize=5)
    (unprocessed_id,) = await relay.insert(newer)
    terminal_ids = [(await relay.delivery_of(i)).id for i in (done_id, dead_id)]

    removed = await store.prune(retention_seconds=0)
    assert removed["deliveries"] == 2
    assert removed["bookings"] == 1
    assert [(d.outbox_id, d.status) for d in await relay.deliveries()] == [(pending_id, "pending")]
    assert all(a.delivery_id not in terminal_ids for a in await relay.attempts())
    assert await relay.count(attempt) == 0
    remaining = {row.id: row for row in await relay.outbox_rows()}
    assert done_id not in remaining and dead_id not in remaining
    assert pending_id in remaining  # its delivery still waits, however old the row
    assert remaining[unprocessed_id].processed_at is None
    async with relay.reader.connect() as conn:
        snapshots = set((await conn.execute(select(booking.c.booking_id))).scalars())
    assert snapshots == {"bk-done", "bk-pending"}  # bk-dead was idle

    await relay.start()
    await relay.wait_landed(pending)
    await relay.wait_landed(newer)
    kept_snapshot = await relay.wait_status(unprocessed_id, "delivered")
    assert kept_snapshot.changed_fields == ["partySize"]  # compared with the kept snapshot
