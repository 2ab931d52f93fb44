"""Ingest's writes: a decided batch's bookings, deliveries, leases and outbox outcomes, in the
ingesting transaction (`app.store.ingest` reads and decides)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import booking, delivery, outbox
from app.states import Outcome
from app.store import bookings
from app.store.rate import RateLimit
from app.store.records import Claim, LeaseRequest
from app.store.toolkit import Toolkit, statement
from app.store.venues import add_seen
from app.text import storable

#: An outcome and, for `invalid` (or a held state with a note), the row's `error`.
RowOutcome = tuple[Outcome, str | None]


@dataclass(slots=True)
class Writes:
    """What deciding a batch will write."""

    new_bookings: list[dict[str, Any]] = field(default_factory=list)
    touched_bookings: list[dict[str, Any]] = field(default_factory=list)
    new_deliveries: list[dict[str, Any]] = field(default_factory=list)
    superseded: list[Any] = field(default_factory=list)
    leasable: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)


@statement("ingest.mark_processed")
def _mark_processed_statement(tools: Toolkit) -> Any:
    return (
        update(outbox)
        .where(tools.in_param(outbox.c.id, "ids"))
        .values(processed_at=bindparam("now"), outcome=bindparam("outcome"))
    )


@statement("ingest.mark_processed_with_error")
def _mark_with_error_statement(tools: Toolkit) -> Any:
    return (
        update(outbox)
        .where(outbox.c.id == bindparam("o_id"))
        .values(
            processed_at=bindparam("now"),
            outcome=bindparam("o_outcome"),
            error=bindparam("o_error"),
        )
    )


@statement("ingest.insert_bookings")
def _insert_bookings(tools: Toolkit) -> Any:
    return insert(booking)


@statement("ingest.update_bookings")
def _update_bookings(tools: Toolkit) -> Any:
    return (
        update(booking)
        .where(booking.c.booking_id == bindparam("b_booking_id"))
        .values(
            last_outbox_id=bindparam("b_last_outbox_id"),
            sent_outbox_id=func.coalesce(
                bindparam("b_sent_outbox_id", type_=BigInteger), booking.c.sent_outbox_id
            ),
            reached_send_status=bindparam("b_reached_send_status"),
            updated_at=bindparam("now"),
        )
    )


@statement("ingest.insert_deliveries")
def _insert_deliveries_statement(tools: Toolkit) -> Any:
    return insert(delivery)


@statement("ingest.insert_deliveries_returning")
def _insert_returning(tools: Toolkit) -> Any:
    return insert(delivery).returning(delivery.c.id, delivery.c.outbox_id)


@statement("ingest.deliveries_of_bookings")
def _deliveries_of_bookings(tools: Toolkit) -> Any:
    return select(delivery.c.id, delivery.c.outbox_id).where(
        tools.in_param(delivery.c.booking_id, "ids")
    )


async def write_batch(
    tools: Toolkit,
    conn: AsyncConnection,
    writes: Writes,
    *,
    now: datetime,
    outcomes: dict[int, RowOutcome],
    known: dict[str, Any],
    lease: LeaseRequest | None,
    rate: RateLimit,
) -> list[Claim]:
    """Write a batch's decisions and its rows' `outcomes`; lease what the worker has slots for
    (and the rate limit grants)."""
    leased: dict[int, dict[str, Any]] = {}
    token = uuid.uuid4().hex
    expires = now + timedelta(seconds=lease.seconds) if lease is not None else now
    if lease is not None and writes.leasable:
        writes.leasable.sort(key=lambda pair: pair[0]["outbox_id"])  # oldest states first
        granted = await rate.take(conn, lease.grant(len(writes.leasable)), now)
        for delivery_row, values in writes.leasable[:granted]:
            delivery_row.update(
                lease_owner=lease.worker_id,
                lease_token=token,
                lease_expires_at=expires,
                next_attempt_at=expires,
            )
            leased[delivery_row["outbox_id"]] = delivery_row
            values["sent_outbox_id"] = delivery_row["outbox_id"]
    if writes.new_bookings:
        await add_seen(tools, conn, (b["venue_id"] for b in writes.new_bookings), now)
        await conn.execute(
            tools.statement("ingest.insert_bookings"),
            [dict(b, created_at=now, updated_at=now) for b in writes.new_bookings],
        )
    if writes.touched_bookings:
        await conn.execute(
            tools.statement("ingest.update_bookings"),
            [
                {
                    "b_booking_id": b["booking_id"],
                    "b_last_outbox_id": b["last_outbox_id"],
                    "b_sent_outbox_id": b["sent_outbox_id"],
                    "b_reached_send_status": b["reached_send_status"],
                    "now": now,
                }
                for b in writes.touched_bookings
            ],
        )
    await bookings.supersede(tools, conn, writes.superseded, now)
    claims: list[Claim] = []
    if writes.new_deliveries:
        ids = await _insert_deliveries(tools, conn, writes.new_deliveries, want=leased)
        claims = [
            Claim(
                delivery_id=ids[outbox_id],
                booking_id=d["booking_id"],
                venue_id=d["venue_id"],
                outbox_id=outbox_id,
                payload=d["payload"],
                attempt_count=0,
                created_at=now,
                outbox_created_at=d["outbox_created_at"],
                retry_window_started_at=now,
                lease_token=token,
                lease_expires_at=expires,
                previous_sent_outbox_id=(
                    known[d["booking_id"]].sent_outbox_id if d["booking_id"] in known else None
                ),
                traceparent=d["traceparent"],
            )
            for outbox_id, d in leased.items()
        ]
    await _mark_processed(tools, conn, outcomes, now)
    return claims


async def _insert_deliveries(
    tools: Toolkit, conn: AsyncConnection, rows: list[dict[str, Any]], *, want: Iterable[int]
) -> dict[int, int]:
    """Insert deliveries; return the ids of those whose outbox ids are in `want`."""
    wanted = set(want)
    if not wanted:
        await conn.execute(tools.statement("ingest.insert_deliveries"), rows)
        return {}
    if tools.engine.dialect.insert_executemany_returning:
        result = await conn.execute(tools.statement("ingest.insert_deliveries_returning"), rows)
        return {r.outbox_id: r.id for r in result if r.outbox_id in wanted}
    await conn.execute(tools.statement("ingest.insert_deliveries"), rows)  # no RETURNING
    found = await conn.execute(
        tools.statement("ingest.deliveries_of_bookings"),
        {"ids": sorted({r["booking_id"] for r in rows})},
    )
    return {r.outbox_id: r.id for r in found if r.outbox_id in wanted}


async def _mark_processed(
    tools: Toolkit, conn: AsyncConnection, outcomes: dict[int, RowOutcome], now: datetime
) -> None:
    by_outcome: dict[Outcome, list[int]] = defaultdict(list)
    errors: list[dict[str, Any]] = []
    for row_id, (outcome, error) in outcomes.items():
        if error is None:
            by_outcome[outcome].append(row_id)
        else:
            # The error can quote a key of the row: stored only as storable text.
            errors.append(
                {
                    "o_id": row_id,
                    "o_outcome": str(outcome),
                    "o_error": storable(error),
                    "now": now,
                }
            )
    for outcome, ids in by_outcome.items():
        await conn.execute(
            tools.statement("ingest.mark_processed"),
            {"ids": ids, "now": now, "outcome": str(outcome)},
        )
    if errors:
        await conn.execute(tools.statement("ingest.mark_processed_with_error"), errors)
