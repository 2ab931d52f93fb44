"""The store's admin reads: what `/api/*`, `/readyz` and `/metrics` show.

Reached through the `Store` facade. Lists are keyset pages:
`ORDER BY id DESC LIMIT n + 1` below an id, on the `(filter, id)` indexes of `models.py`, so a
page costs the same on the first page and the thousandth, and rows inserted between two page
fetches neither repeat nor hide older ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import false, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import translate_errors
from app.models import ACTIVE_STATUSES, STATUSES, attempt, booking, delivery, outbox, venue, worker
from app.states import CircuitState, CredentialsState, DeliveryStatus
from app.store.toolkit import Toolkit

#: Statuses an operator may requeue, and the ones that may be cancelled.
REQUEUEABLE_STATUSES = (DeliveryStatus.DEAD, DeliveryStatus.CANCELLED)
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
    delivery.c.reason,
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


def deliveries_query(*extra: Any) -> Any:
    """Deliveries as lists show them, with whether their venue is paused now."""
    paused = func.coalesce(venue.c.paused, false()).label("venue_paused")
    return select(*DELIVERY_COLUMNS, paused, *extra).select_from(
        delivery.outerjoin(venue, venue.c.venue_id == delivery.c.venue_id)
    )


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
    request_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Gauges:
    deliveries: dict[str, int]
    outbox_unprocessed: int
    oldest_pending_age_seconds: float | None
    circuit: str
    credentials: str
    live_workers: int = 0
    venues_paused: int = 0
    request_rate: float = 0.0
    """Webhook requests per second over the last 10 s, all live processes (their heartbeats)."""


@dataclass(frozen=True, slots=True)
class BookingRecord:
    """A booking as operators see it: its snapshot and its newest deliveries."""

    booking_id: str
    venue_id: str
    accepted_payload: dict[str, Any] | None
    accepted_outbox_id: int | None
    accepted_at: datetime | None
    deliveries: list[Record]


async def fetch_delivery(conn: AsyncConnection, delivery_id: int) -> Record:
    """One delivery as lists show it."""
    row = (await conn.execute(deliveries_query().where(delivery.c.id == delivery_id))).one()
    return dict(row._mapping)


class AdminQueries:
    """The admin API's reads."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    # -- health and gauges ----------------------------------------------------------------

    async def _fleet(self, conn: AsyncConnection, stale_after_seconds: float) -> FleetHealth:
        now = await self.tools.now(conn)
        rows = (
            await conn.execute(
                select(worker.c.circuit, worker.c.credentials, worker.c.request_rate).where(
                    worker.c.stopped_at.is_(None),
                    worker.c.heartbeat_at >= now - timedelta(seconds=stale_after_seconds),
                )
            )
        ).all()
        return FleetHealth(
            live_workers=len(rows),
            circuit_open=any(r.circuit != CircuitState.CLOSED for r in rows),
            credentials_rejected=any(r.credentials != CredentialsState.OK for r in rows),
            request_rate=sum(r.request_rate for r in rows),
        )

    @translate_errors
    async def fleet_health(self, *, stale_after_seconds: float) -> FleetHealth:
        async with self.tools.read() as conn:
            return await self._fleet(conn, stale_after_seconds)

    @translate_errors
    async def gauges(
        self, *, stale_after_seconds: float, status_count_cap: int | None = None
    ) -> Gauges:
        """Relay-wide counts for `/api/stats` and the Prometheus gauges. With
        `status_count_cap`, each status is counted up to one more than the cap (a page that
        shows "more than N" need not read a million index entries)."""
        async with self.tools.read() as conn:
            now = await self.tools.now(conn)
            counts: Counter[str] = Counter({status: 0 for status in STATUSES})
            if status_count_cap is None:
                for status, count in await conn.execute(
                    select(delivery.c.status, func.count()).group_by(delivery.c.status)
                ):
                    counts[status] = count
            else:
                counts.update(await self._capped_counts(conn, status_count_cap))
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
            venues_paused = (
                await conn.execute(
                    select(func.count()).select_from(venue).where(venue.c.paused.is_(True))
                )
            ).scalar_one()
        oldest = min((t for t in (unprocessed[1], oldest_delivery) if t is not None), default=None)
        return Gauges(
            deliveries=dict(counts),
            outbox_unprocessed=int(unprocessed[0]),
            oldest_pending_age_seconds=(
                max(0.0, (now - oldest).total_seconds()) if oldest is not None else None
            ),
            circuit=str(CircuitState.OPEN if fleet.circuit_open else CircuitState.CLOSED),
            credentials=str(
                CredentialsState.REJECTED if fleet.credentials_rejected else CredentialsState.OK
            ),
            live_workers=fleet.live_workers,
            venues_paused=int(venues_paused),
            request_rate=fleet.request_rate,
        )

    @staticmethod
    async def _capped_counts(conn: AsyncConnection, cap: int) -> dict[str, int]:
        """Deliveries per status, each counted up to `cap + 1`."""
        counts = {}
        for status in STATUSES:
            capped = select(delivery.c.id).where(delivery.c.status == status).limit(cap + 1)
            found = await conn.execute(select(func.count()).select_from(capped.subquery()))
            counts[status] = int(found.scalar_one())
        return counts

    @translate_errors
    async def list_workers(self, *, seen_within_seconds: float) -> list[Record]:
        """Relay processes that have not stopped and checked in within the window."""
        async with self.tools.read() as conn:
            now = await self.tools.now(conn)
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
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int,
    ) -> list[Record]:
        """Up to `limit` deliveries below `before_id`, newest first, created in [since, until)
        when those are given."""
        wanted = [
            column == value
            for column, value in (
                (delivery.c.status, status),
                (delivery.c.venue_id, venue_id),
                (delivery.c.booking_id, booking_id),
            )
            if value is not None
        ]
        if before_id is not None:
            wanted.append(delivery.c.id < before_id)
        if since is None and until is None:
            query = deliveries_query().where(*wanted).order_by(delivery.c.id.desc()).limit(limit)
        else:
            # The ids first, from the `created_at` index alone, then their rows. Asked for
            # whole rows in one query, PostgreSQL walks the primary key from the newest,
            # expecting the window's rows spread evenly over it (it cannot know that ids and
            # creation times rise together): a window three days back read every delivery
            # written since (130 ms at 1,000,000 deliveries, against 2 ms this way).
            if since is not None:
                wanted.append(delivery.c.created_at >= since)
            if until is not None:
                wanted.append(delivery.c.created_at < until)
            chosen = (
                select(delivery.c.id)
                .where(*wanted)
                .order_by(delivery.c.id.desc())
                .limit(limit)
                .subquery("chosen")
            )
            query = (
                deliveries_query()
                .join(chosen, chosen.c.id == delivery.c.id)
                .order_by(delivery.c.id.desc())
            )
        async with self.tools.read() as conn:
            rows = await conn.execute(query)
            return [dict(row._mapping) for row in rows]

    @translate_errors
    async def get_delivery(self, delivery_id: int) -> tuple[Record, list[Record]]:
        """One delivery with its payload, and its newest attempts first."""
        async with self.tools.read() as conn:
            row = (
                await conn.execute(
                    deliveries_query(delivery.c.payload).where(delivery.c.id == delivery_id)
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

    # -- bookings and outbox --------------------------------------------------------------

    @translate_errors
    async def get_booking(self, booking_id: str) -> BookingRecord:
        """A booking's snapshot and newest deliveries; NotFoundError if the relay has neither."""
        async with self.tools.read() as conn:
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
                    deliveries_query()
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
        async with self.tools.read() as conn:
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
        async with self.tools.read() as conn:
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
