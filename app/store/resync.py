"""Resync a venue: send again the newest state of each of its bookings Mozrest has been sent,
past the no-op rule, for a venue whose POS was replaced or after Mozrest lost data.

A resent state is a new delivery (`reason` `resync`) of the booking's newest ingested outbox
row, so every other rule holds unchanged: one request per booking at a time, newest wins (a
state written meanwhile supersedes it at ingest), a paused venue's are parked, the rate limit
takes its tokens at the claim. Bookings never sent stay as they are (the `held` rules).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, LargeBinary, Text, cast, exists, func, insert, select

from app.contract import ContractError, parse_row
from app.db import translate_errors
from app.models import ACTIVE_STATUSES, booking, delivery, outbox, venue
from app.states import DeliveryReason, DeliveryStatus
from app.store.admin import NotFoundError
from app.store.audit import Audit, AuditEntry
from app.store.bookings import active_deliveries, lock_bookings, quiet_until
from app.store.toolkit import Toolkit
from app.store.venues import VenueRules, paused_now

#: How far before `since` a booking's `updated_at` may lie while its newest state was written
#: since then. Ingest stamps `updated_at` with the database's clock in the transaction that
#: reads the row, which can begin just before the RMS's transaction (whose start is the row's
#: `created_at`) commits; an hour is far more than any transaction lives (a lease, at most).
INGEST_CLOCK_MARGIN = timedelta(hours=1)


def _written_since(venue_id: str, since: datetime) -> list[ColumnElement[bool]]:
    """The venue's bookings sent before whose newest state may have been written since `since`:
    the booking's `updated_at` index narrows them (a venue's years of bookings are not read);
    the caller still compares the newest outbox row's `created_at` with `since` itself."""
    return [
        booking.c.venue_id == venue_id,
        booking.c.sent_outbox_id.is_not(None),
        booking.c.updated_at >= since - INGEST_CLOCK_MARGIN,
    ]


class Resync:
    """`Store.resync_venue`."""

    def __init__(
        self,
        tools: Toolkit,
        *,
        rules: VenueRules,
        audit: Audit,
        send_items: bool,
        max_payload_bytes: int,
    ) -> None:
        self.tools = tools
        self.rules = rules
        self.audit = audit
        self.send_items = send_items
        self.max_payload_bytes = max_payload_bytes

    @translate_errors
    async def count_resync(self, venue_id: str, *, since: datetime) -> int:
        """How many bookings `resync_venue` would queue now (for a confirmation), counted in
        the database: a big venue's bookings never leave it."""
        waiting = delivery.alias("waiting")
        query = (
            select(func.count())
            .select_from(booking.join(outbox, outbox.c.id == booking.c.last_outbox_id))
            .where(
                *_written_since(venue_id, since),
                outbox.c.created_at >= since,
                ~exists().where(
                    waiting.c.booking_id == booking.c.booking_id,
                    waiting.c.status.in_(ACTIVE_STATUSES),
                ),
            )
        )
        async with self.tools.read() as conn:
            return int((await conn.execute(query)).scalar_one())

    @translate_errors
    async def resync_venue(
        self, venue_id: str, *, since: datetime, audit: AuditEntry | None = None
    ) -> int:
        """Queue again the newest state, written since `since`, of every booking of the venue
        that was sent before; how many were queued. NotFoundError for a venue never seen."""
        async with self.audit.change(audit) as change:
            conn = change.conn
            now = await self.tools.now(conn)
            known = (
                await conn.execute(select(venue.c.venue_id).where(venue.c.venue_id == venue_id))
            ).first()
            if known is None:
                raise NotFoundError(f"the relay has never seen venue {venue_id!r}")
            sent = {
                row.booking_id: row.last_outbox_id
                for row in await conn.execute(
                    select(booking.c.booking_id, booking.c.last_outbox_id).where(
                        *_written_since(venue_id, since)
                    )
                )
            }
            queued = await self._queue(conn, venue_id, sent, since, now)
            change.detail = {"queued": queued, "since": since.isoformat()}
            return queued

    async def _queue(
        self,
        conn: Any,
        venue_id: str,
        sent: dict[str, int],
        since: datetime,
        now: datetime,
    ) -> int:
        if not sent:
            return 0
        bookings = await lock_bookings(self.tools, conn, sent)
        active = await active_deliveries(self.tools, conn, bookings, payloads=False)
        rows = await conn.execute(
            select(
                outbox.c.id,
                outbox.c.booking_id,
                outbox.c.venue_id,
                outbox.c.created_at,
                cast(
                    outbox.c.payload, LargeBinary if self.tools.dialect == "sqlite" else Text
                ).label("payload_text"),
            ).where(
                self.tools.in_(outbox.c.id, sorted(set(sent.values()))),
                outbox.c.created_at >= since,
            )
        )
        rules = await self.rules.current(conn)
        paused = venue_id in await paused_now(self.tools, conn, [venue_id])
        new: list[dict[str, Any]] = []
        for row in rows:
            if row.booking_id not in bookings or active.get(row.booking_id):
                continue  # gone, or a state of it already waits or is on the wire
            try:
                state = parse_row(
                    row.payload_text,
                    booking_id=row.booking_id,
                    venue_id=row.venue_id,
                    send_items=rules.sends_items(venue_id, self.send_items),
                    max_payload_bytes=self.max_payload_bytes,
                )
            except ContractError:
                continue  # the newest ingested row is valid; a setting changed since (size)
            new.append(
                {
                    "booking_id": row.booking_id,
                    "venue_id": row.venue_id,
                    "outbox_id": row.id,
                    "payload": state,
                    "status": DeliveryStatus.PENDING,
                    "attempt_count": 0,
                    "changed_fields": [],
                    "warnings": [],
                    "created_at": now,
                    "updated_at": now,
                    "next_attempt_at": None
                    if paused
                    else quiet_until(bookings[row.booking_id], now),
                    "outbox_created_at": row.created_at,
                    "reason": DeliveryReason.RESYNC,
                }
            )
        if new:
            await conn.execute(insert(delivery), new)
        return len(new)
