"""Operators' replays: requeue dead or cancelled deliveries (one, or in bulk), cancel waiting ones.

Newest wins here too: a state older than one already accepted, sent or queued is never requeued,
and every change takes its booking's lock first (docs/adr/0002-claims-and-leases.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import translate_errors
from app.models import ACTIVE_STATUSES, booking, delivery
from app.states import AuditResult, DeliveryReason, DeliveryStatus
from app.store.admin import (
    CANCELLABLE_STATUSES,
    REQUEUE_BATCH_SIZE,
    REQUEUEABLE_STATUSES,
    ConflictError,
    NotFoundError,
    Record,
    fetch_delivery,
)
from app.store.audit import Audit, AuditEntry, record_entry, update_detail
from app.store.bookings import lock_bookings
from app.store.toolkit import Toolkit


def requeue_candidates(
    status: str,
    *,
    venue_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    booking_id: str | None = None,
    delivery_ids: Sequence[int] | None = None,
) -> Any:
    """The deliveries a bulk requeue considers (`id`, `booking_id`); the console counts them
    with the same query before asking for a confirmation (`store/console.py`)."""
    query = select(delivery.c.id, delivery.c.booking_id).where(delivery.c.status == status)
    if venue_id is not None:
        query = query.where(delivery.c.venue_id == venue_id)
    if since is not None:
        query = query.where(delivery.c.created_at >= since)
    if until is not None:
        query = query.where(delivery.c.created_at < until)
    if booking_id is not None:
        query = query.where(delivery.c.booking_id == booking_id)
    if delivery_ids is not None:
        query = query.where(delivery.c.id.in_(list(delivery_ids) or [0]))
    return query


def may_requeue(candidate: Any) -> ColumnElement[bool]:
    """`Replays._requeue_refusals`' rule in SQL, true where it refuses nothing: for a count of
    many candidates (`candidate`: a subquery with `booking_id` and `outbox_id`, joined to
    `booking`) without reading them into Python. Keep the two in step."""
    newer = delivery.alias("newer")
    return and_(
        booking.c.booking_id.is_not(None),
        func.coalesce(booking.c.accepted_outbox_id, 0) <= candidate.c.outbox_id,
        func.coalesce(booking.c.sent_outbox_id, 0) <= candidate.c.outbox_id,
        booking.c.last_outbox_id <= candidate.c.outbox_id,
        ~exists().where(
            newer.c.booking_id == candidate.c.booking_id,
            newer.c.status.in_((*ACTIVE_STATUSES, DeliveryStatus.DELIVERED)),
            newer.c.outbox_id > candidate.c.outbox_id,
        ),
    )


class Replays:
    """Requeue and cancel, each in its booking's lock, each audited with its change."""

    def __init__(self, tools: Toolkit, audit: Audit) -> None:
        self.tools = tools
        self.audit = audit

    @translate_errors
    async def requeue_delivery(
        self, delivery_id: int, *, audit: AuditEntry | None = None
    ) -> Record:
        """Send a dead or cancelled delivery again, unless a newer state of its booking was
        written since; answers the delivery as it now is."""
        async with self.audit.change(audit) as change:
            conn = change.conn
            booking_id = (
                await conn.execute(
                    select(delivery.c.booking_id).where(delivery.c.id == delivery_id)
                )
            ).scalar()
            if booking_id is None:
                raise NotFoundError(f"no delivery {delivery_id}")
            bookings = await lock_bookings(self.tools, conn, [booking_id])
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
            change.detail = {"booking_id": booking_id, "was": row.status}
            return await fetch_delivery(conn, delivery_id)

    @translate_errors
    async def requeue_deliveries(
        self,
        *,
        status: str,
        venue_id: str | None = None,
        created_since: datetime | None = None,
        created_until: datetime | None = None,
        booking_id: str | None = None,
        delivery_ids: Sequence[int] | None = None,
        batch_size: int = REQUEUE_BATCH_SIZE,
        audit: AuditEntry | None = None,
    ) -> int:
        """Requeue every dead (or cancelled) delivery that matches and is its booking's newest
        state, in short transactions of `batch_size`; returns how many were requeued. The audit
        row is written with the first batch and its count kept in step by each later one."""
        if status not in REQUEUEABLE_STATUSES:
            raise ValueError(f"cannot requeue {status} deliveries")
        query = requeue_candidates(
            status,
            venue_id=venue_id,
            since=created_since,
            until=created_until,
            booking_id=booking_id,
            delivery_ids=delivery_ids,
        )
        requeued = 0
        after_id = 0
        audit_id: int | None = None
        while True:
            async with self.tools.write() as conn:
                candidates = (
                    await conn.execute(
                        query.where(delivery.c.id > after_id)
                        .order_by(delivery.c.id)
                        .limit(batch_size)
                    )
                ).all()
                if not candidates:
                    if audit is not None and audit_id is None:
                        await record_entry(
                            conn, audit, result=AuditResult.OK, detail={"requeued": 0}
                        )
                    return requeued
                after_id = candidates[-1].id
                bookings = await lock_bookings(self.tools, conn, (c.booking_id for c in candidates))
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
                if audit is not None:
                    if audit_id is None:
                        audit_id = await record_entry(
                            conn, audit, result=AuditResult.OK, detail={"requeued": requeued}
                        )
                    else:
                        await update_detail(conn, audit_id, {"requeued": requeued})
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
                        delivery.c.status.in_((*ACTIVE_STATUSES, DeliveryStatus.DELIVERED)),
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
        now = await self.tools.now(conn)
        result = await conn.execute(
            update(delivery)
            .where(delivery.c.id.in_(ids), delivery.c.status == status)
            .values(
                status=DeliveryStatus.PENDING,
                next_attempt_at=now,
                # A replay gets a fresh RELAY_RETRY_MAX_AGE window (`RetryPolicy.settle`).
                requeued_at=now,
                reason=DeliveryReason.REPLAY,
                lease_owner=None,
                lease_token=None,
                lease_expires_at=None,
                updated_at=now,
            )
        )
        return int(result.rowcount)

    @translate_errors
    async def cancel_delivery(self, delivery_id: int, *, audit: AuditEntry | None = None) -> Record:
        """Stop a pending or retrying delivery that is not on the wire right now."""
        async with self.audit.change(audit) as change:
            conn = change.conn
            booking_id = (
                await conn.execute(
                    select(delivery.c.booking_id).where(delivery.c.id == delivery_id)
                )
            ).scalar()
            if booking_id is None:
                raise NotFoundError(f"no delivery {delivery_id}")
            await lock_bookings(self.tools, conn, [booking_id])
            now = await self.tools.now(conn)
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
                    status=DeliveryStatus.CANCELLED,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            change.detail = {"booking_id": booking_id, "was": row.status}
            return await fetch_delivery(conn, delivery_id)
