"""The store's admin side: the reads and replays behind `/api/*`, `/readyz` and `/metrics`.

Mixed into `app.store.Store`, so all SQL still sits behind one class. Lists are keyset pages:
`ORDER BY id DESC LIMIT n + 1` below an id, on the `(filter, id)` indexes of `models.py`, so a
page costs the same on the first page and the thousandth, and rows inserted between two page
fetches neither repeat nor hide older ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from app.db import translate_errors
from app.models import ACTIVE_STATUSES, STATUSES, attempt, booking, delivery, outbox, worker

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from sqlalchemy.ext.asyncio import AsyncConnection


#: Statuses an operator may requeue, and the ones that may be cancelled.
REQUEUEABLE_STATUSES = ("dead", "cancelled")
CANCELLABLE_STATUSES = ACTIVE_STATUSES
#: Deliveries per transaction of a bulk requeue: short transactions, short booking locks.
REQUEUE_BATCH_SIZE = 500
#: Newest deliveries shown in a booking view, and newest attempts in a delivery's detail.
BOOKING_DELIVERIES_LIMIT = 100
ATTEMPTS_LIMIT = 100
#: The table-matching report reads at most this many recent states of a venue.
TABLE_MATCHING_STATES = 1000

#: Columns of a delivery in lists; keep in step with `app.schemas.Delivery`.
DELIVERY_COLUMNS = (
    delivery.c.id,
    delivery.c.booking_id,
    delivery.c.venue_id,
    delivery.c.outbox_id,
    delivery.c.status,
    delivery.c.attempt_count,
    delivery.c.changed_fields,
    delivery.c.warnings,
    delivery.c.created_at,
    delivery.c.updated_at,
    delivery.c.next_attempt_at,
    delivery.c.delivered_at,
    delivery.c.last_status_code,
    delivery.c.last_error,
)
#: Columns of an outbox row in lists (not the payload); keep in step with `app.schemas`.
OUTBOX_COLUMNS = (
    outbox.c.id,
    outbox.c.booking_id,
    outbox.c.venue_id,
    outbox.c.created_at,
    outbox.c.processed_at,
    outbox.c.outcome,
    outbox.c.error,
)

Record = dict[str, Any]


class NotFoundError(Exception):
    """The delivery or booking asked for does not exist."""


class ConflictError(Exception):
    """The change asked for would break a delivery rule; the message says which, plainly."""


@dataclass(frozen=True, slots=True)
class FleetHealth:
    """What the live relay processes report through their heartbeats."""

    live_workers: int
    circuit_open: bool
    credentials_rejected: bool


@dataclass(frozen=True, slots=True)
class Gauges:
    deliveries: dict[str, int]
    outbox_unprocessed: int
    oldest_pending_age_seconds: float | None
    circuit: str
    credentials: str
    live_workers: int = 0


@dataclass(frozen=True, slots=True)
class BookingRecord:
    """A booking as operators see it: its snapshot and its newest deliveries."""

    booking_id: str
    venue_id: str
    accepted_payload: dict[str, Any] | None
    accepted_outbox_id: int | None
    accepted_at: datetime | None
    deliveries: list[Record]


class AdminQueries:
    """Admin reads and writes; expects `_read`, `_write`, `_now` and `_lock_bookings` from
    `Store`."""

    if TYPE_CHECKING:

        def _read(self) -> AbstractAsyncContextManager[AsyncConnection]: ...
        def _write(self) -> AbstractAsyncContextManager[AsyncConnection]: ...
        async def _now(self, conn: AsyncConnection) -> Any: ...
        async def _lock_bookings(
            self, conn: AsyncConnection, booking_ids: Iterable[str], *, skip_locked: bool = False
        ) -> dict[str, Any]: ...

    # -- health and gauges ----------------------------------------------------------------

    async def _fleet(self, conn: AsyncConnection, stale_after_seconds: float) -> FleetHealth:
        now = await self._now(conn)
        rows = (
            await conn.execute(
                select(worker.c.circuit, worker.c.credentials).where(
                    worker.c.stopped_at.is_(None),
                    worker.c.heartbeat_at >= now - timedelta(seconds=stale_after_seconds),
                )
            )
        ).all()
        return FleetHealth(
            live_workers=len(rows),
            circuit_open=any(r.circuit != "closed" for r in rows),
            credentials_rejected=any(r.credentials != "ok" for r in rows),
        )

    @translate_errors
    async def fleet_health(self, *, stale_after_seconds: float) -> FleetHealth:
        async with self._read() as conn:
            return await self._fleet(conn, stale_after_seconds)

    @translate_errors
    async def gauges(self, *, stale_after_seconds: float) -> Gauges:
        """Relay-wide counts for `/api/stats` and the Prometheus gauges."""
        async with self._read() as conn:
            now = await self._now(conn)
            counts: Counter[str] = Counter({status: 0 for status in STATUSES})
            for status, count in await conn.execute(
                select(delivery.c.status, func.count()).group_by(delivery.c.status)
            ):
                counts[status] = count
            unprocessed = (
                await conn.execute(
                    select(func.count(), func.min(outbox.c.created_at)).where(
                        outbox.c.processed_at.is_(None)
                    )
                )
            ).one()
            oldest_delivery = (
                await conn.execute(
                    select(func.min(delivery.c.outbox_created_at)).where(
                        delivery.c.status.in_(ACTIVE_STATUSES)
                    )
                )
            ).scalar()
            fleet = await self._fleet(conn, stale_after_seconds)
        oldest = min((t for t in (unprocessed[1], oldest_delivery) if t is not None), default=None)
        return Gauges(
            deliveries=dict(counts),
            outbox_unprocessed=int(unprocessed[0]),
            oldest_pending_age_seconds=(
                max(0.0, (now - oldest).total_seconds()) if oldest is not None else None
            ),
            circuit="open" if fleet.circuit_open else "closed",
            credentials="rejected" if fleet.credentials_rejected else "ok",
            live_workers=fleet.live_workers,
        )

    @translate_errors
    async def list_workers(self, *, seen_within_seconds: float) -> list[Record]:
        """Relay processes that have not stopped and checked in within the window."""
        async with self._read() as conn:
            now = await self._now(conn)
            rows = await conn.execute(
                select(
                    worker.c.id,
                    worker.c.hostname,
                    worker.c.pid,
                    worker.c.role,
                    worker.c.started_at,
                    worker.c.heartbeat_at,
                    worker.c.circuit,
                    worker.c.credentials,
                )
                .where(
                    worker.c.stopped_at.is_(None),
                    worker.c.heartbeat_at >= now - timedelta(seconds=seen_within_seconds),
                )
                .order_by(worker.c.started_at, worker.c.id)
                .limit(1000)
            )
            return [dict(row._mapping) for row in rows]

    # -- deliveries -----------------------------------------------------------------------

    @translate_errors
    async def list_deliveries(
        self,
        *,
        status: str | None = None,
        venue_id: str | None = None,
        booking_id: str | None = None,
        before_id: int | None = None,
        limit: int,
    ) -> list[Record]:
        """Up to `limit` deliveries below `before_id`, newest first."""
        query = select(*DELIVERY_COLUMNS)
        if status is not None:
            query = query.where(delivery.c.status == status)
        if venue_id is not None:
            query = query.where(delivery.c.venue_id == venue_id)
        if booking_id is not None:
            query = query.where(delivery.c.booking_id == booking_id)
        if before_id is not None:
            query = query.where(delivery.c.id < before_id)
        async with self._read() as conn:
            rows = await conn.execute(query.order_by(delivery.c.id.desc()).limit(limit))
            return [dict(row._mapping) for row in rows]

    @translate_errors
    async def get_delivery(self, delivery_id: int) -> tuple[Record, list[Record]]:
        """One delivery with its payload, and its newest attempts first."""
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(*DELIVERY_COLUMNS, delivery.c.payload).where(
                        delivery.c.id == delivery_id
                    )
                )
            ).first()
            if row is None:
                raise NotFoundError(f"no delivery {delivery_id}")
            attempts = await conn.execute(
                select(
                    attempt.c.started_at,
                    attempt.c.duration_ms,
                    attempt.c.status_code,
                    attempt.c.error,
                    attempt.c.response_body,
                )
                .where(attempt.c.delivery_id == delivery_id)
                .order_by(attempt.c.id.desc())
                .limit(ATTEMPTS_LIMIT)
            )
            return dict(row._mapping), [dict(a._mapping) for a in attempts]

    @translate_errors
    async def requeue_delivery(self, delivery_id: int) -> Record:
        """Send a dead or cancelled delivery again, unless a newer state of its booking was
        written since; answers the delivery as it now is."""
        async with self._write() as conn:
            booking_id = (
                await conn.execute(
                    select(delivery.c.booking_id).where(delivery.c.id == delivery_id)
                )
            ).scalar()
            if booking_id is None:
                raise NotFoundError(f"no delivery {delivery_id}")
            bookings = await self._lock_bookings(conn, [booking_id])
            row = (
                await conn.execute(
                    select(
                        delivery.c.id,
                        delivery.c.booking_id,
                        delivery.c.outbox_id,
                        delivery.c.status,
                    ).where(delivery.c.id == delivery_id)
                )
            ).one()
            if row.status not in REQUEUEABLE_STATUSES:
                raise ConflictError(
                    f"delivery {delivery_id} is {row.status}: "
                    "only dead or cancelled deliveries can be retried"
                )
            refusals = await self._requeue_refusals(conn, [row], bookings)
            if row.id in refusals:
                raise ConflictError(refusals[row.id])
            await self._requeue(conn, [row.id], status=row.status)
            return await self._delivery(conn, delivery_id)

    @translate_errors
    async def requeue_deliveries(
        self,
        *,
        status: str,
        venue_id: str | None = None,
        created_since: datetime | None = None,
        created_until: datetime | None = None,
        batch_size: int = REQUEUE_BATCH_SIZE,
    ) -> int:
        """Requeue every dead (or cancelled) delivery that matches and is its booking's newest
        state, in short transactions of `batch_size`; returns how many were requeued."""
        if status not in REQUEUEABLE_STATUSES:
            raise ValueError(f"cannot requeue {status} deliveries")
        query = select(delivery.c.id, delivery.c.booking_id).where(delivery.c.status == status)
        if venue_id is not None:
            query = query.where(delivery.c.venue_id == venue_id)
        if created_since is not None:
            query = query.where(delivery.c.created_at >= created_since)
        if created_until is not None:
            query = query.where(delivery.c.created_at < created_until)
        requeued = 0
        after_id = 0
        while True:
            async with self._write() as conn:
                candidates = (
                    await conn.execute(
                        query.where(delivery.c.id > after_id)
                        .order_by(delivery.c.id)
                        .limit(batch_size)
                    )
                ).all()
                if not candidates:
                    return requeued
                after_id = candidates[-1].id
                bookings = await self._lock_bookings(conn, (c.booking_id for c in candidates))
                # Read again under the booking locks: a worker or operator may have moved them.
                rows = (
                    await conn.execute(
                        select(
                            delivery.c.id,
                            delivery.c.booking_id,
                            delivery.c.outbox_id,
                            delivery.c.status,
                        ).where(
                            delivery.c.id.in_([c.id for c in candidates]),
                            delivery.c.status == status,
                        )
                    )
                ).all()
                refusals = await self._requeue_refusals(conn, rows, bookings)
                ids = [r.id for r in rows if r.id not in refusals]
                requeued += await self._requeue(conn, ids, status=status)
            if len(candidates) < batch_size:
                return requeued

    async def _requeue_refusals(
        self, conn: AsyncConnection, rows: Sequence[Any], bookings: dict[str, Any]
    ) -> dict[int, str]:
        """Why each of these deliveries may not be sent again (absent: it may).

        Newest wins: a state older than one already accepted, sent, queued or merely
        decided (`last_outbox_id` also counts an `unchanged` or `held` newer state) is never
        sent. The same rule leaves only the newest of several dead deliveries of one booking.
        Callers hold the booking locks.
        """
        newer_active: dict[str, int] = dict(
            (
                await conn.execute(
                    select(delivery.c.booking_id, func.max(delivery.c.outbox_id))
                    .where(
                        delivery.c.booking_id.in_(sorted({r.booking_id for r in rows})),
                        delivery.c.status.in_((*ACTIVE_STATUSES, "delivered")),
                    )
                    .group_by(delivery.c.booking_id)
                )
            ).all()
        )
        refusals: dict[int, str] = {}
        for row in rows:
            known = bookings.get(row.booking_id)
            newer = f"a newer state of booking {row.booking_id!r}"
            if known is None:
                # The claim only sends deliveries whose booking row it can lock.
                refusals[row.id] = (
                    f"booking {row.booking_id!r} has no snapshot any more (pruned after "
                    "RELAY_RETENTION): the RMS must write its state again"
                )
            elif (known.accepted_outbox_id or 0) > row.outbox_id:
                refusals[row.id] = (
                    f"{newer} (outbox row {known.accepted_outbox_id}) was already delivered"
                )
            elif (known.sent_outbox_id or 0) > row.outbox_id:
                refusals[row.id] = f"{newer} (outbox row {known.sent_outbox_id}) was already sent"
            elif (newer_active.get(row.booking_id) or 0) > row.outbox_id:
                refusals[row.id] = (
                    f"{newer} (outbox row {newer_active[row.booking_id]}) is already queued"
                )
            elif known.last_outbox_id > row.outbox_id:
                refusals[row.id] = (
                    f"{newer} (outbox row {known.last_outbox_id}) was written since; "
                    "sending this older one would overwrite it"
                )
        return refusals

    async def _requeue(self, conn: AsyncConnection, ids: list[int], *, status: str) -> int:
        if not ids:
            return 0
        now = await self._now(conn)
        result = await conn.execute(
            update(delivery)
            .where(delivery.c.id.in_(ids), delivery.c.status == status)
            .values(
                status="pending",
                next_attempt_at=now,
                # A replay gets a fresh RELAY_RETRY_MAX_AGE window (`Store._settle`).
                requeued_at=now,
                lease_owner=None,
                lease_token=None,
                lease_expires_at=None,
                updated_at=now,
            )
        )
        return int(result.rowcount)

    @translate_errors
    async def cancel_delivery(self, delivery_id: int) -> Record:
        """Stop a pending or retrying delivery that is not on the wire right now."""
        async with self._write() as conn:
            booking_id = (
                await conn.execute(
                    select(delivery.c.booking_id).where(delivery.c.id == delivery_id)
                )
            ).scalar()
            if booking_id is None:
                raise NotFoundError(f"no delivery {delivery_id}")
            await self._lock_bookings(conn, [booking_id])
            now = await self._now(conn)
            row = (
                await conn.execute(
                    select(delivery.c.status, delivery.c.lease_expires_at).where(
                        delivery.c.id == delivery_id
                    )
                )
            ).one()
            if row.status not in CANCELLABLE_STATUSES:
                raise ConflictError(
                    f"delivery {delivery_id} is {row.status}: "
                    "only pending or retrying deliveries can be cancelled"
                )
            if row.lease_expires_at is not None and row.lease_expires_at > now:
                raise ConflictError(f"delivery {delivery_id} is in flight, try again shortly")
            await conn.execute(
                update(delivery)
                .where(delivery.c.id == delivery_id)
                .values(
                    status="cancelled",
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            return await self._delivery(conn, delivery_id)

    @staticmethod
    async def _delivery(conn: AsyncConnection, delivery_id: int) -> Record:
        row = (
            await conn.execute(select(*DELIVERY_COLUMNS).where(delivery.c.id == delivery_id))
        ).one()
        return dict(row._mapping)

    # -- bookings and outbox --------------------------------------------------------------

    @translate_errors
    async def get_booking(self, booking_id: str) -> BookingRecord:
        """A booking's snapshot and newest deliveries; NotFoundError if the relay has neither."""
        async with self._read() as conn:
            known = (
                await conn.execute(
                    select(
                        booking.c.venue_id,
                        booking.c.accepted_payload,
                        booking.c.accepted_outbox_id,
                        booking.c.accepted_at,
                    ).where(booking.c.booking_id == booking_id)
                )
            ).first()
            deliveries = [
                dict(row._mapping)
                for row in await conn.execute(
                    select(*DELIVERY_COLUMNS)
                    .where(delivery.c.booking_id == booking_id)
                    .order_by(delivery.c.id.desc())
                    .limit(BOOKING_DELIVERIES_LIMIT)
                )
            ]
        if known is None and not deliveries:
            raise NotFoundError(f"no booking {booking_id!r}")
        return BookingRecord(
            booking_id=booking_id,
            venue_id=known.venue_id if known is not None else deliveries[0]["venue_id"],
            accepted_payload=known.accepted_payload if known is not None else None,
            accepted_outbox_id=known.accepted_outbox_id if known is not None else None,
            accepted_at=known.accepted_at if known is not None else None,
            deliveries=deliveries,
        )

    @translate_errors
    async def list_outbox(
        self,
        *,
        outcome: str | None = None,
        unprocessed: bool = False,
        booking_id: str | None = None,
        before_id: int | None = None,
        limit: int,
    ) -> list[Record]:
        """Up to `limit` outbox rows below `before_id`, newest first, without payloads."""
        query = select(*OUTBOX_COLUMNS)
        if outcome is not None:
            query = query.where(outbox.c.outcome == outcome)
        if unprocessed:
            query = query.where(outbox.c.processed_at.is_(None))
        if booking_id is not None:
            query = query.where(outbox.c.booking_id == booking_id)
        if before_id is not None:
            query = query.where(outbox.c.id < before_id)
        async with self._read() as conn:
            rows = await conn.execute(query.order_by(outbox.c.id.desc()).limit(limit))
            return [dict(row._mapping) for row in rows]

    @translate_errors
    async def recent_table_ids(
        self, venue_id: str, *, states: int = TABLE_MATCHING_STATES
    ) -> list[str]:
        """The RMS table ids in a venue's newest queued states, most often seen first.

        Read from deliveries, whose `(venue_id, id)` index bounds the scan (the outbox has no
        venue index): these are the states Mozrest's POS has to place on its tables.
        """
        async with self._read() as conn:
            payloads = (
                await conn.execute(
                    select(delivery.c.payload)
                    .where(delivery.c.venue_id == venue_id)
                    .order_by(delivery.c.id.desc())
                    .limit(states)
                )
            ).scalars()
            seen: Counter[str] = Counter()
            for payload in payloads:
                tables = payload.get("tables") if isinstance(payload, dict) else None
                if isinstance(tables, list):
                    seen.update(t for t in tables if isinstance(t, str))
        return [table_id for table_id, _ in seen.most_common()]
