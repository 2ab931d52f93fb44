"""Venues (SPEC 10) and the relay-wide rate limit (SPEC 11), end to end on each backend: a real
worker, the real store and the emulator on loopback (the `relay` world of test_engine)."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.settings import ConfigError, Settings
from tests.conftest import eventually
from tests.factories import state
from tests.integration.conftest import Relay


async def _posted(relay: Relay, booking_id: str) -> list[dict[str, Any]]:
    return [r["body"] for r in await relay.requests(booking_id)]


async def test_a_paused_venue_ingests_but_sends_nothing_and_resumes_with_the_newest_states(
    relay: Relay,
) -> None:
    """Paused: 20 states for each of 50 bookings are ingested (coalesced), none is sent, while
    another venue delivers throughout; resumed: exactly one POST per booking, its newest."""
    store = relay.store()
    await store.pause_venue("v-paused", by="alice", reason="POS being replaced")
    await relay.start()
    newest: dict[str, dict[str, Any]] = {}
    for round_ in range(20):
        for number in range(50):
            booking_id = f"p-{number}"
            newest[booking_id] = state(booking_id, venue_id="v-paused", partySize=round_ + 1)
        await relay.insert(*(newest[f"p-{n}"] for n in range(50)))
        if round_ % 5 == 0:
            other = state(f"o-{round_}", venue_id="v-other")
            await relay.insert(other)
            await relay.wait_landed(other)
    await eventually(
        lambda: _all_processed(relay), timeout=15, message="every row of the paused venue ingested"
    )
    await asyncio.sleep(0.5)
    assert not any([await _posted(relay, b) for b in newest])
    venue = await store.get_venue("v-paused")
    assert venue["paused"] and venue["paused_by"] == "alice"
    assert venue["deliveries"]["pending"] == 50
    await store.resume_venue("v-paused")
    for payload in newest.values():
        await relay.wait_landed(payload, timeout=10)
    for booking_id, payload in newest.items():
        assert await _posted(relay, booking_id) == [payload]


async def _all_processed(relay: Relay) -> bool:
    rows = await relay.outbox_rows()
    return all(row.outcome is not None for row in rows)


async def test_a_pause_during_requests_lets_them_finish_and_starts_none_after(
    relay: Relay,
) -> None:
    """Requests of the venue on the wire when it is paused finish; none starts 2 s after."""
    await relay.set_faults(latency_ms=600)
    await relay.start(relay_concurrency=4)
    first = [state(f"w-{n}", venue_id="v-1") for n in range(4)]
    await relay.insert(*first)
    await eventually(lambda: _count_requests(relay, 4), timeout=5, message="4 on the wire")
    store = relay.store()
    await store.pause_venue("v-1", by="bob", reason=None)
    paused_at = datetime.now(UTC).timestamp()
    later = [state(f"w-{n}", venue_id="v-1", partySize=9) for n in range(4)]
    await relay.insert(*later)
    for payload in first:
        await relay.wait_landed(payload, timeout=5)
    await asyncio.sleep(3)
    started = [datetime.fromisoformat(r["received_at"]).timestamp() for r in await relay.requests()]
    late = [round(t - paused_at, 2) for t in started if t > paused_at + 2]
    assert late == [], f"requests started this many seconds after the pause: {late}"


async def _count_requests(relay: Relay, count: int) -> bool:
    return len(await relay.requests()) >= count


@pytest.mark.parametrize("send_items", [True, False])
async def test_send_items_per_venue_overrides_the_relay_wide_setting(
    relay: Relay, send_items: bool
) -> None:
    """A venue's `send_items` decides whether its pre-ordered items go, whatever
    RELAY_SEND_ITEMS says; null follows RELAY_SEND_ITEMS."""
    items = [{"sku": "PIZZA-001", "quantity": 2}]
    store = relay.store()
    await store.update_venue("v-items", send_items=send_items)
    await relay.start(relay_send_items=not send_items)
    mine = state("i-1", venue_id="v-items", items=items)
    others = state("i-2", venue_id="v-default", items=items)
    await relay.insert(mine, others)
    expected = mine if send_items else {k: v for k, v in mine.items() if k != "items"}
    await relay.wait_landed(expected)
    follow = others if not send_items else {k: v for k, v in others.items() if k != "items"}
    await relay.wait_landed(follow)


async def test_time_spent_paused_never_makes_a_delivery_dead(relay: Relay) -> None:
    """A delivery paused longer than RELAY_RETRY_MAX_AGE is sent on resume, not dead."""
    store = relay.store()
    await store.pause_venue("v-slow", by="carol", reason="night")
    await relay.start(relay_retry_max_age_seconds=1.0)
    payload = state("slow-1", venue_id="v-slow")
    (outbox_id,) = await relay.insert(payload)
    await relay.wait_processed(outbox_id)
    await asyncio.sleep(1.5)
    await relay.store(relay_retry_max_age_seconds=1.0).resume_venue("v-slow")
    await relay.wait_landed(payload)
    await relay.wait_status(outbox_id, "delivered")


async def test_an_unknown_venue_cannot_be_resumed(relay: Relay) -> None:
    from app.store import NotFoundError

    with pytest.raises(NotFoundError):
        await relay.store().resume_venue("never-seen")


async def test_a_rate_limit_holds_the_relay_to_it_and_uses_it_while_work_waits(
    relay: Relay,
) -> None:
    """At 20 requests a second with 400 states waiting: over every 10-second window at most
    11 x 20, and at least 80% of the limit while work waits."""
    limit = 20.0
    await relay.insert(*(state(f"r-{n}", venue_id="v-rate") for n in range(400)))
    await relay.start(relay_rate_limit=limit)
    await asyncio.sleep(12)
    await relay.stop()
    arrivals = sorted(
        datetime.fromisoformat(r["received_at"]).timestamp() for r in await relay.requests()
    )
    assert arrivals, "nothing was sent"
    start = arrivals[0]
    windows = [
        sum(1 for t in arrivals if begin <= t < begin + 10)
        for begin in itertools.takewhile(
            lambda b: b + 10 <= arrivals[-1], (start + step * 0.5 for step in itertools.count())
        )
    ]
    assert windows, "the run was shorter than a window"
    assert max(windows) <= 11 * limit
    assert min(windows) >= 0.8 * limit * 10


async def test_the_rate_buckets_clock_never_goes_back_so_no_moment_refills_it_twice(
    relay: Relay,
) -> None:
    """Each claim reads the clock before it reaches the bucket's lock, so two replicas' claims
    can reach it in the other order. The later one must not set the bucket's clock back to its
    own earlier reading: the moments between would refill the bucket a second time."""
    from app.store.rate import RateLimit

    store = relay.store()
    bucket = RateLimit(store.tools, per_second=100.0)
    async with store.tools.write() as conn:
        base = await store.tools.now(conn) + timedelta(seconds=5)  # a full bucket by then
    taken = []
    for offset in (0.0, -0.3, 0.2):  # the second claim read its clock 0.3 s before the first
        async with store.tools.write() as conn:
            taken.append(await bucket.take(conn, 1000, base + timedelta(seconds=offset)))
    # A full bucket (a quarter second's worth), then nothing, then what 0.2 s refills: not the
    # 0.5 s since the second claim's reading.
    assert taken == [25, 0, 20]


def test_a_negative_or_non_numeric_rate_limit_is_refused_naming_it() -> None:
    for value in ("-1", "fast", "nan"):
        with pytest.raises((ConfigError, ValueError)) as caught:
            Settings(_env_file=None, relay_rate_limit=value)
        assert "RELAY_RATE_LIMIT" in str(caught.value) or "relay_rate_limit" in str(caught.value)


# -- resync (SPEC 16) ---------------------------------------------------------------------------


async def test_resync_sends_each_sent_bookings_newest_state_again_past_the_no_op_rule(
    relay: Relay,
) -> None:
    """After a venue's POS was replaced: every booking sent before gets its newest state sent
    once more (`reason` `resync`), a booking never sent stays held, other venues are untouched."""
    await relay.start()
    sent, other = state("rs-1", venue_id="v-rs"), state("rs-2", venue_id="v-other")
    held = state("rs-3", venue_id="v-rs", status="confirmed")
    await relay.insert(sent, other, held)
    await relay.wait_landed(sent)
    await relay.wait_landed(other)
    store = relay.store()
    queued = await store.resync_venue("v-rs", since=datetime.now(UTC) - timedelta(hours=1))
    assert queued == 1
    await eventually(lambda: _posted_twice(relay, "rs-1"), timeout=5, message="rs-1 sent again")
    assert await _posted(relay, "rs-1") == [sent, sent]
    assert await _posted(relay, "rs-2") == [other]
    assert await _posted(relay, "rs-3") == []
    reasons = [d.reason for d in await relay.deliveries("rs-1")]
    assert reasons == ["change", "resync"]


async def _posted_twice(relay: Relay, booking_id: str) -> bool:
    return len(await _posted(relay, booking_id)) == 2


async def test_resync_keeps_newest_wins_and_a_paused_venue_paused(relay: Relay) -> None:
    """A state written after the resync supersedes the resent one; on a paused venue the
    resent states wait for the resume; bookings older than `since` are left alone."""
    await relay.start()
    first, old = state("rw-1", venue_id="v-rw"), state("rw-old", venue_id="v-rw")
    await relay.insert(old)
    await relay.wait_landed(old)
    await asyncio.sleep(1.2)
    cut = datetime.now(UTC)
    await relay.insert(first)
    await relay.wait_landed(first)
    await relay.stop()
    store = relay.store()
    await store.pause_venue("v-rw", by="dora", reason="resync while paused")
    assert await store.resync_venue("v-rw", since=cut) == 1  # rw-old is older than `since`
    newer = state("rw-1", venue_id="v-rw", partySize=7)
    await relay.insert(newer)
    await relay.start()
    await asyncio.sleep(1.0)
    assert await _posted(relay, "rw-1") == [first]  # paused: nothing more yet
    await relay.store().resume_venue("v-rw")
    await relay.wait_landed(newer)
    await asyncio.sleep(0.5)
    assert await _posted(relay, "rw-1") == [first, newer]  # the resent state was superseded
    assert await _posted(relay, "rw-old") == [old]


@pytest.mark.parametrize("rate_limit", [0.0, 30.0], ids=["no-limit", "30-per-s"])
async def test_a_small_venue_never_waits_behind_a_big_venues_backlog(
    relay: Relay, rate_limit: float
) -> None:
    """600 states of venue A due at once (a resumed venue) drain slowly (Mozrest takes 100 ms,
    4 requests at a time); a state written for venue B meanwhile is delivered within a second,
    with or without a rate limit (claims take from the newest due as well as the oldest)."""
    store = relay.store()
    await store.pause_venue("v-big", by="ed", reason="backlog")
    backlog = [state(f"big-{n}", venue_id="v-big") for n in range(600)]
    await relay.insert(*backlog)
    await relay.set_faults(latency_ms=100)
    await relay.start(relay_concurrency=4, relay_rate_limit=rate_limit)
    await eventually(lambda: _all_processed(relay), timeout=20, message="the backlog ingested")
    await relay.store().resume_venue("v-big")
    await asyncio.sleep(1.0)  # the backlog is draining
    waits = []
    for number in range(5):
        small = state(f"small-{number}", venue_id="v-small")
        written = time.monotonic()
        await relay.insert(small)
        await relay.wait_landed(small, timeout=10)
        waits.append(time.monotonic() - written)
    held = await relay.bookings()
    left = sum(1 for b in backlog if b["bookingId"] not in held)
    assert left > 100, "the backlog drained too fast to show anything"
    assert max(waits) < 1.0, f"the small venue waited {max(waits):.2f}s behind the backlog"
