"""Reads and writes on a booking's rows that every part of the store shares.

The booking row is the booking's mutex: every transaction that changes a booking's deliveries
first locks its `mozrest_booking` row, always in `booking_id` order, so two transactions cannot
deadlock (docs/adr/0002-claims-and-leases.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, null, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import ACTIVE_STATUSES, booking, delivery, outbox
from app.states import DeliveryStatus, Outcome
from app.store.records import Claim
from app.store.toolkit import Toolkit, statement

#: Why a delivery queued behind a claim given back was taken back (`hold`).
HELD_FIRST_CANCELLATION = (
    "held: the booking was never sent, and a booking's first state is never a cancellation"
)


def _lock_statement(tools: Toolkit, *, skip_locked: bool, with_snapshot: bool) -> Any:
    columns = [c for c in booking.c if with_snapshot or c is not booking.c.accepted_payload]
    return (
        select(*columns)
        .where(tools.in_param(booking.c.booking_id, "ids"))
        .order_by(booking.c.booking_id)
        .with_for_update(skip_locked=skip_locked)
    )


@statement("bookings.lock")
def _lock(tools: Toolkit) -> Any:
    return _lock_statement(tools, skip_locked=False, with_snapshot=False)


@statement("bookings.lock_with_snapshot")
def _lock_with_snapshot(tools: Toolkit) -> Any:
    return _lock_statement(tools, skip_locked=False, with_snapshot=True)


@statement("bookings.lock_free")
def _lock_free(tools: Toolkit) -> Any:
    return _lock_statement(tools, skip_locked=True, with_snapshot=False)


async def lock_bookings(
    tools: Toolkit,
    conn: AsyncConnection,
    booking_ids: Iterable[str],
    *,
    skip_locked: bool = False,
    with_snapshot: bool = False,
) -> dict[str, Any]:
    """Lock booking rows in `booking_id` order (the deadlock-free order) and return them; the
    snapshot's payload only when asked (only ingest decides against it); with `skip_locked`,
    the bookings another transaction holds are passed over."""
    ids = sorted(set(booking_ids))
    if not ids:
        return {}
    name = (
        "bookings.lock_free"
        if skip_locked
        else "bookings.lock_with_snapshot"
        if with_snapshot
        else "bookings.lock"
    )
    rows = await conn.execute(tools.statement(name), {"ids": ids})
    return {row.booking_id: row for row in rows}


def _active_statement(tools: Toolkit, *, payloads: bool) -> Any:
    active = delivery.c.status.in_(ACTIVE_STATUSES)
    payload = case((active, delivery.c.payload), else_=null()) if payloads else null()
    return (
        select(
            delivery.c.id,
            delivery.c.booking_id,
            delivery.c.venue_id,
            delivery.c.outbox_id,
            payload.label("payload"),
            delivery.c.status,
            delivery.c.attempt_count,
            delivery.c.created_at,
            delivery.c.outbox_created_at,
            delivery.c.requeued_at,
            delivery.c.next_attempt_at,
            delivery.c.lease_token,
            delivery.c.lease_expires_at,
            delivery.c.traceparent,
        )
        .where(tools.in_param(delivery.c.booking_id, "ids"))
        .order_by(delivery.c.outbox_id, delivery.c.id)
    )


@statement("deliveries.of_bookings")
def _active(tools: Toolkit) -> Any:
    return _active_statement(tools, payloads=False)


@statement("deliveries.of_bookings_with_payloads")
def _active_with_payloads(tools: Toolkit) -> Any:
    return _active_statement(tools, payloads=True)


async def active_deliveries(
    tools: Toolkit, conn: AsyncConnection, booking_ids: Iterable[str], *, payloads: bool = True
) -> dict[str, list[Any]]:
    """Pending and retrying deliveries of these bookings, oldest state first.

    The status is filtered here, not in SQL: with `status IN (...)` in the query, PostgreSQL
    planned it onto the admin `(status, id)` index whenever statistics lagged a burst, and read
    every active delivery of the relay to find a few bookings' (hundreds of index entries per
    delivery). By booking id alone only the booking index applies; terminal rows of a booking's
    history come back without their payloads, and every row does without `payloads` (record
    needs none: decoding them cost as much as the query).
    """
    ids = sorted(set(booking_ids))
    grouped: dict[str, list[Any]] = defaultdict(list)
    if not ids:
        return grouped
    name = "deliveries.of_bookings_with_payloads" if payloads else "deliveries.of_bookings"
    for row in await conn.execute(tools.statement(name), {"ids": ids}):
        if row.status in ACTIVE_STATUSES:
            grouped[row.booking_id].append(row)
    return grouped


@statement("outbox.rows_of_bookings")
def _rows_of_bookings(tools: Toolkit) -> Any:
    return select(outbox.c.booking_id, outbox.c.id, outbox.c.processed_at).where(
        tools.in_param(outbox.c.booking_id, "ids")
    )


async def unread_after(tools: Toolkit, conn: AsyncConnection, after: Mapping[str, int]) -> set[str]:
    """Those bookings with an outbox row not yet ingested after the id given for each: a newer
    state committed but undecided. It may be a cancellation, or a return to what Mozrest already
    holds, so nothing of theirs is leased before ingest has decided it.

    The query selects by booking id alone and the ids and `processed_at` are compared here: with
    either in the SQL, PostgreSQL could plan the query onto the partial index of unprocessed
    rows, or onto a primary-key range, and read the whole backlog on every call (measured with
    `python -m bench.plans`). By booking id alone only the booking index applies, and it reads
    these bookings' rows within retention.
    """
    if not after:
        return set()
    rows = await conn.execute(tools.statement("outbox.rows_of_bookings"), {"ids": sorted(after)})
    return {
        row.booking_id
        for row in rows
        if row.processed_at is None and row.id > after.get(row.booking_id, row.id)
    }


@statement("deliveries.supersede")
def _supersede(tools: Toolkit) -> Any:
    return (
        update(delivery)
        .where(tools.in_param(delivery.c.id, "ids"))
        .values(status=DeliveryStatus.SUPERSEDED, updated_at=bindparam("now"), next_attempt_at=None)
    )


@statement("outbox.set_outcome")
def _set_outcome(tools: Toolkit) -> Any:
    return (
        update(outbox)
        .where(tools.in_param(outbox.c.id, "ids"))
        .values(outcome=bindparam("outcome"))
    )


async def supersede(
    tools: Toolkit, conn: AsyncConnection, deliveries: Sequence[Any], now: datetime
) -> None:
    """A newer state replaces these before they landed. A state that never left is, in the
    outbox too, `superseded` rather than `queued`."""
    if not deliveries:
        return
    await conn.execute(
        tools.statement("deliveries.supersede"), {"ids": [d.id for d in deliveries], "now": now}
    )
    never_sent = [d.outbox_id for d in deliveries if d.attempt_count == 0]
    if never_sent:
        await conn.execute(
            tools.statement("outbox.set_outcome"),
            {"ids": never_sent, "outcome": str(Outcome.SUPERSEDED)},
        )


@statement("deliveries.hold")
def _hold(tools: Toolkit) -> Any:
    return (
        update(delivery)
        .where(tools.in_param(delivery.c.id, "ids"))
        .values(
            status=DeliveryStatus.SUPERSEDED,
            updated_at=bindparam("now"),
            next_attempt_at=None,
            last_error=HELD_FIRST_CANCELLATION,
        )
    )


async def hold(
    tools: Toolkit, conn: AsyncConnection, deliveries: Sequence[Any], now: datetime
) -> None:
    """Take back deliveries that may not be the first sent after all (`claim_due`): their rows
    are `held`, as ingest would have decided had no claim been pending."""
    if not deliveries:
        return
    await conn.execute(
        tools.statement("deliveries.hold"), {"ids": [d.id for d in deliveries], "now": now}
    )
    await conn.execute(
        tools.statement("outbox.set_outcome"),
        {"ids": [d.outbox_id for d in deliveries], "outcome": str(Outcome.HELD)},
    )


@statement("bookings.forget_sent")
def _forget_sent(tools: Toolkit) -> Any:
    return (
        update(booking)
        .where(
            booking.c.booking_id == bindparam("f_booking_id"),
            booking.c.sent_outbox_id == bindparam("f_outbox_id"),
        )
        .values(sent_outbox_id=bindparam("f_previous"))
    )


async def forget_sent(tools: Toolkit, conn: AsyncConnection, claims: Sequence[Claim]) -> None:
    """Undo what these claims' leasing marked "sent once", for claims whose state never reached
    the wire. The caller holds the bookings' locks and has checked that each claim's lease is
    still its own."""
    if not claims:
        return
    await conn.execute(
        tools.statement("bookings.forget_sent"),
        [
            {
                "f_booking_id": c.booking_id,
                "f_outbox_id": c.outbox_id,
                "f_previous": c.previous_sent_outbox_id,
            }
            for c in claims
        ],
    )


@statement("deliveries.due_now")
def _due_now(tools: Toolkit) -> Any:
    return (
        update(delivery)
        .where(tools.in_param(delivery.c.id, "ids"))
        .values(next_attempt_at=bindparam("now"))
    )


async def wake_queued(
    tools: Toolkit,
    conn: AsyncConnection,
    bookings: Iterable[list[Any]],
    *,
    done: set[int],
    now: datetime,
) -> None:
    """A booking's request finished (or was given back): the newer state queued behind it, due
    when that request's lease would have ended, may go now."""
    waiting = [
        d.id
        for deliveries in bookings
        for d in deliveries
        if d.id not in done
        and d.status == DeliveryStatus.PENDING
        and not leased(d, now)
        and d.next_attempt_at is not None
        and d.next_attempt_at > now
    ]
    if waiting:
        await conn.execute(tools.statement("deliveries.due_now"), {"ids": waiting, "now": now})


def leased(row: Any, now: datetime) -> bool:
    return row.lease_expires_at is not None and row.lease_expires_at > now


def quiet_until(booking_row: Any, now: datetime) -> datetime:
    """No request of the booking starts before this: an unanswered one may still be on its way."""
    if booking_row is None or booking_row.quiet_until is None:
        return now
    until: datetime = booking_row.quiet_until
    return max(now, until)


def unconfirmed(booking_row: Any) -> bool:
    """A state newer than the snapshot left without an answer and may have landed."""
    unconfirmed_id = booking_row.unconfirmed_outbox_id
    accepted = booking_row.accepted_outbox_id
    return unconfirmed_id is not None and (accepted is None or unconfirmed_id > accepted)
