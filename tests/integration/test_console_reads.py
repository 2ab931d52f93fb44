"""The console's reads that have their own queries: deliveries in a time window, and the counts
its confirmation pages show, which must be what the action then does.

`Retry all matching` (and `Retry group`) and `Resync` each count in the database before asking
for a confirmation; the action itself decides row by row under the booking locks. These tests
build bookings that each rule refuses and check, on every backend, that each count equals what
the action then requeues or queues.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.models import booking, delivery, outbox
from app.store import console as console_store
from tests.factories import state
from tests.integration.conftest import Api


async def _dead_world(api: Api) -> None:
    """b1: two dead states, the newest may go again. b2: dead, then a newer state delivered.
    b3: dead, then a newer state queued. b4 (venue va) and b5 (venue vb): dead, may go again."""
    await api.write(*(state(b, venue_id="va") for b in ("b1", "b2", "b3", "b4")))
    await api.write(state("b5", venue_id="vb"))
    await api.answer(400)
    await api.write(state("b1", venue_id="va", partySize=5))
    await api.answer(400)
    await api.write(state("b2", venue_id="va", partySize=5))
    await api.answer(200)
    await api.write(state("b3", venue_id="va", partySize=5))  # queued, not answered


async def _count(api: Api, **filters: Any) -> int:
    return await api.store.console.count_requeueable(status="dead", **filters)


@pytest.mark.parametrize("batch", [2, 2_000], ids=["batches-of-2", "one-batch"])
async def test_a_bulk_retrys_count_is_what_it_then_requeues(
    api: Api, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_store, "COUNT_BATCH_SIZE", batch)
    await _dead_world(api)
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await _count(api, since=future) == 0
    assert await _count(api, until=datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert await _count(api, booking_id="b2") == 0  # a newer state was delivered
    assert await _count(api, booking_id="b3") == 0  # a newer state is queued

    assert await _count(api, venue_id="vb") == 1
    assert await api.store.requeue_deliveries(status="dead", venue_id="vb") == 1

    dead = [d["id"] for d in await api.deliveries(status="dead", venue_id="va")]
    assert len(dead) == 5  # b1 twice, b2, b3, b4
    assert await _count(api, delivery_ids=dead) == 2  # b1's newest and b4
    assert await _count(api) == 2
    assert await api.store.requeue_deliveries(status="dead") == 2
    assert await _count(api) == 0
    pending = {d["booking_id"] for d in await api.deliveries(status="pending")}
    assert pending == {"b1", "b3", "b4", "b5"}


async def _age(api: Api, booking_id: str, *, written: datetime, updated: datetime) -> None:
    """As if the booking's newest state was written at `written` and ingested at `updated`."""
    async with api.store.engine.begin() as conn:
        last = (
            await conn.execute(
                select(booking.c.last_outbox_id).where(booking.c.booking_id == booking_id)
            )
        ).scalar_one()
        await conn.execute(update(outbox).where(outbox.c.id == last).values(created_at=written))
        await conn.execute(
            update(booking).where(booking.c.booking_id == booking_id).values(updated_at=updated)
        )


async def test_a_resyncs_count_is_what_it_then_queues(api: Api) -> None:
    """Sent bookings written since `since` count; one never sent, one with a state waiting,
    one written before `since` and another venue's do not. A booking ingested a little before
    `since` whose newest row says it was written after (the two clocks are read in different
    transactions) still counts."""
    names = ("sent", "waiting", "old", "edge")
    await api.write(*(state(f"r-{n}", venue_id="v-rs") for n in names))
    await api.write(state("r-other", venue_id="v-other"))
    await api.answer(200)
    await api.write(state("r-held", venue_id="v-rs", status="confirmed"))  # never sent
    await api.write(state("r-waiting", venue_id="v-rs", partySize=9))  # queued, not answered
    since = datetime.now(UTC) - timedelta(hours=2)
    await _age(api, "r-old", written=since - timedelta(days=2), updated=since - timedelta(days=2))
    await _age(
        api, "r-edge", written=since + timedelta(seconds=1), updated=since - timedelta(minutes=5)
    )

    count = await api.store.count_resync("v-rs", since=since)
    assert count == 2  # r-sent and r-edge
    assert await api.store.resync_venue("v-rs", since=since) == count
    assert await api.store.count_resync("v-rs", since=since) == 0  # each is waiting now
    resent = {d["booking_id"] for d in await api.deliveries(status="pending")}
    assert resent == {"r-sent", "r-edge", "r-waiting"}


async def test_deliveries_in_a_time_window_come_newest_first_page_by_page(api: Api) -> None:
    """`?since=&until=` lists the deliveries created in [since, until), newest first, with any
    other filter, and pages through them by id like the unfiltered list."""
    await api.write(*(state(f"w{i}", venue_id="va" if i % 2 else "vb") for i in range(12)))
    rows = sorted(await api.deliveries(), key=lambda d: d["id"])
    assert len(rows) == 12
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    async with api.store.engine.begin() as conn:
        for hour, row in enumerate(rows):  # one an hour, in id order, three days back
            await conn.execute(
                update(delivery)
                .where(delivery.c.id == row["id"])
                .values(created_at=base + timedelta(hours=hour))
            )
    since, until = base + timedelta(hours=3), base + timedelta(hours=9)
    window = [r["id"] for r in reversed(rows[3:9])]

    listed = await api.store.list_deliveries(since=since, until=until, limit=50)
    assert [r["id"] for r in listed] == window
    first = await api.store.list_deliveries(since=since, until=until, limit=4)
    rest = await api.store.list_deliveries(
        since=since, until=until, before_id=first[-1]["id"], limit=4
    )
    assert [r["id"] for r in first + rest] == window
    in_va = await api.store.list_deliveries(since=since, venue_id="va", limit=50)
    assert [r["id"] for r in in_va] == [
        r["id"] for r in reversed(rows[3:]) if r["venue_id"] == "va"
    ]
    assert await api.store.list_deliveries(until=base, limit=50) == []
    assert {r["booking_id"] for r in listed} == {r["booking_id"] for r in rows[3:9]}
    assert all(r["venue_paused"] is False for r in listed)
