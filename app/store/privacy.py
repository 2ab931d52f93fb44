"""Guests' personal data in the relay's tables: erasure on request, and payload
retention.

Both strip the personal fields (`app.personal`) from every row of a booking that holds them:
its outbox payloads, its deliveries' payloads, its snapshot, and any text stored from its
attempts and errors that quotes one of their values. The edit is done here (read, strip,
write), under the bookings' locks (`bookings.lock_bookings`): `jsonb` on PostgreSQL and JSON text
elsewhere share no SQL to remove a key inside an array's objects. Retention reads each table once
per batch of bookings and writes its stripped rows with one statement per table.

Ingest decides a later state against the stripped snapshot, so every personal field the later
state has counts as changed and is sent in full. docs/personal-data.md lists every column.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Column,
    LargeBinary,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import translate_errors
from app.models import ACTIVE_STATUSES, attempt, booking, delivery, outbox, scrub_mark
from app.personal import personal_values, redact_text, strip_personal
from app.store.admin import ConflictError, NotFoundError
from app.store.audit import Audit, AuditEntry
from app.store.bookings import lock_bookings
from app.store.toolkit import Toolkit

#: Rows each retention pass walks per table. Stripping a row's JSON runs on the worker's event
#: loop, between the sender's and the recorder's turns: a pass of 500 held it for 130-160 ms on
#: a slow 2-core machine, and delivery p99 rose from about 70 to 152 ms at 50 states a second
#: (`make bench-scrub`). Smaller passes, paced the same way, cost the same CPU in shorter slices.
SCRUB_BATCH_SIZE = 100


@dataclass(frozen=True, slots=True)
class Erased:
    """How many rows of a booking lost personal fields."""

    booking_id: str
    outbox_rows: int = 0
    deliveries: int = 0
    snapshots: int = 0
    attempts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "outbox_rows": self.outbox_rows,
            "deliveries": self.deliveries,
            "snapshots": self.snapshots,
        }


class _Stripped(NamedTuple):
    """Rows that lost personal fields, per table."""

    outbox_rows: int
    deliveries: int
    snapshots: int
    attempts: int


@dataclass(frozen=True, slots=True)
class _Held:
    """Bookings locked for erasure, and their rows that can hold personal fields."""

    known: dict[str, Any]
    deliveries: Sequence[Any]
    rows: Sequence[Any]


def _payload_of(raw: Any) -> Any:
    """An outbox payload read as text or bytes (it may be anything the RMS wrote)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            return None
    return raw


def _outbox_text(tools: Toolkit) -> Any:
    # As ingest reads it: SQLite may hold any bytes, which the JSON type could not decode.
    return cast(outbox.c.payload, LargeBinary if tools.dialect == "sqlite" else Text)


def _stripped_outbox_row(
    row: Any, payload: Any, booking_id: str, values: set[str]
) -> dict[str, Any] | None:
    """The outbox row's payload and error without personal data, or None if it holds none."""
    stripped, changed = strip_personal(payload)
    if not isinstance(payload, dict):
        # Not an object (an invalid row): which part is personal cannot be told, so only
        # the ids are kept.
        stripped = {"bookingId": booking_id, "venueId": row.venue_id}
    error, error_changed = redact_text(row.error, values)
    if not (changed or error_changed):
        return None
    return {"row_id": row.id, "new_payload": stripped, "new_error": error}


def _strip(table: Table, key: Column[Any], **columns: str) -> Any:
    """An UPDATE of one row by `row_id`, setting each column to the bound parameter named."""
    values = {name: bindparam(param, type_=table.c[name].type) for name, param in columns.items()}
    return update(table).where(key == bindparam("row_id")).values(**values)


# Retention writes a batch's stripped rows with one statement each table (executemany).
_OUTBOX_STRIP = _strip(outbox, outbox.c.id, payload="new_payload", error="new_error")
_DELIVERY_STRIP = _strip(delivery, delivery.c.id, payload="new_payload", last_error="new_error")
_SNAPSHOT_STRIP = _strip(booking, booking.c.booking_id, accepted_payload="new_payload")
_ATTEMPT_STRIP = _strip(attempt, attempt.c.id, error="new_error", response_body="new_body")


async def _write(conn: AsyncConnection, statement: Any, changes: list[dict[str, Any]]) -> None:
    if changes:
        await conn.execute(statement, changes)


class Privacy:
    """Erasure (`Store.erase_booking`) and payload retention (`Store.scrub_payloads`)."""

    def __init__(self, tools: Toolkit, audit: Audit) -> None:
        self.tools = tools
        self.audit = audit

    @translate_errors
    async def erase_booking(self, booking_id: str, *, audit: AuditEntry | None = None) -> Erased:
        """Remove the booking's personal fields from every table; NotFoundError if the relay
        has no row of it, ConflictError while a state of it waits to be sent or ingested."""
        async with self.audit.change(audit) as change:
            erased = await self._erase(change.conn, booking_id)
            change.detail = erased.as_dict() | {"attempts": erased.attempts}
            return erased

    async def _erase(self, conn: AsyncConnection, booking_id: str) -> Erased:
        """Strip one booking's rows under its lock, on request: NotFoundError when the relay
        has no row of it, ConflictError while a state of it waits to be sent or read."""
        held = await self._lock_and_read(conn, [booking_id])
        if not held.known and not held.deliveries and not held.rows:
            raise NotFoundError(f"no booking {booking_id!r}")
        active = [d.id for d in held.deliveries if d.status in ACTIVE_STATUSES]
        if active:
            raise ConflictError(
                f"booking {booking_id!r} has a delivery waiting to be sent ({active[0]}): "
                "cancel it or let it finish, then erase"
            )
        if any(row.processed_at is None for row in held.rows):
            raise ConflictError(
                f"booking {booking_id!r} has a state the relay has not read yet: try again "
                "in a moment"
            )
        stripped = await self._strip_held(conn, held)
        return Erased(booking_id=booking_id, **stripped._asdict())

    # -- payload retention ----------------------------------------------------------------

    @translate_errors
    async def scrub_payloads(
        self, *, retention_seconds: float, batch_size: int = SCRUB_BATCH_SIZE
    ) -> Counter[str]:
        """One pass of payload retention: strip the personal fields of outbox rows
        processed more than `retention_seconds` ago, and of every booking whose newest delivery
        ended that long ago. Each walk resumes where the last pass stopped (`mozrest_scrub_mark`),
        on an index, a batch at a time; `walked` says how many rows it read (a full batch: call
        again)."""
        done: Counter[str] = Counter()
        async with self.tools.write() as conn:
            if not await self.tools.take_lock(conn, "maintenance"):
                return done
            cutoff = await self.tools.now(conn) - timedelta(seconds=retention_seconds)
            done += await self._walk_outbox(conn, cutoff, batch_size)
        async with self.tools.write() as conn:
            if not await self.tools.take_lock(conn, "maintenance"):
                return done
            cutoff = await self.tools.now(conn) - timedelta(seconds=retention_seconds)
            done += await self._walk_deliveries(conn, cutoff, batch_size)
        return done

    async def _mark(self, conn: AsyncConnection, name: str) -> tuple[datetime | None, int]:
        row = (
            await conn.execute(
                select(scrub_mark.c.after_at, scrub_mark.c.after_id).where(
                    scrub_mark.c.name == name
                )
            )
        ).first()
        if row is None:
            await conn.execute(insert(scrub_mark).values(name=name, after_id=0))
            return None, 0
        return row.after_at, int(row.after_id)

    async def _set_mark(
        self, conn: AsyncConnection, name: str, *, after_at: datetime | None, after_id: int
    ) -> None:
        await conn.execute(
            update(scrub_mark)
            .where(scrub_mark.c.name == name)
            .values(after_at=after_at, after_id=after_id)
        )

    async def _walk_outbox(
        self, conn: AsyncConnection, cutoff: datetime, batch_size: int
    ) -> Counter[str]:
        """Outbox rows in id order from the mark; the walk stops at the first row not due yet
        (rows are processed in about id order, so it waits for hours at most)."""
        _, after_id = await self._mark(conn, "outbox")
        rows = (
            await conn.execute(
                select(
                    outbox.c.id,
                    outbox.c.booking_id,
                    outbox.c.venue_id,
                    outbox.c.processed_at,
                    outbox.c.error,
                    _outbox_text(self.tools).label("payload_text"),
                )
                .where(outbox.c.id > after_id)
                .order_by(outbox.c.id)
                .limit(batch_size)
            )
        ).all()
        done: Counter[str] = Counter()
        changes = []
        for row in rows:
            if row.processed_at is None or row.processed_at >= cutoff:
                break
            payload = _payload_of(row.payload_text)
            change = _stripped_outbox_row(row, payload, row.booking_id, personal_values(payload))
            if change is not None:
                changes.append(change)
            done["walked"] += 1
            after_id = row.id
        await _write(conn, _OUTBOX_STRIP, changes)
        done["outbox_scrubbed"] += len(changes)
        await self._set_mark(conn, "outbox", after_at=None, after_id=after_id)
        return done

    async def _walk_deliveries(
        self, conn: AsyncConnection, cutoff: datetime, batch_size: int
    ) -> Counter[str]:
        """Deliveries in the order they last changed (`updated_at`, id) from the mark, up to
        the cutoff. A booking is stripped when its newest delivery ended before the cutoff; one
        passed over (a state still active, or ended since) is met again, because its newest
        delivery's `updated_at` moves past the mark when it ends."""
        after_at, after_id = await self._mark(conn, "delivery")
        query = select(delivery.c.id, delivery.c.booking_id, delivery.c.updated_at).where(
            delivery.c.updated_at < cutoff
        )
        if after_at is not None:
            # `updated_at >= mark` bounds the index scan; the OR alone is only a filter, and the
            # scan would start from the oldest row on every batch.
            query = query.where(
                delivery.c.updated_at >= after_at,
                or_(
                    delivery.c.updated_at > after_at,
                    and_(delivery.c.updated_at == after_at, delivery.c.id > after_id),
                ),
            )
        rows = (
            await conn.execute(
                query.order_by(delivery.c.updated_at, delivery.c.id).limit(batch_size)
            )
        ).all()
        done: Counter[str] = Counter()
        if not rows:
            return done
        booking_ids = sorted({row.booking_id for row in rows})
        due = await self._ended_before(conn, booking_ids, cutoff)
        if due:
            done += await self._erase_due(conn, sorted(due))
        done["walked"] += len(rows)
        last = rows[-1]
        await self._set_mark(conn, "delivery", after_at=last.updated_at, after_id=last.id)
        return done

    async def _ended_before(
        self, conn: AsyncConnection, booking_ids: list[str], cutoff: datetime
    ) -> set[str]:
        """Those bookings whose newest delivery ended before `cutoff`."""
        newest: dict[str, Any] = {}
        for row in await conn.execute(
            select(
                delivery.c.id, delivery.c.booking_id, delivery.c.status, delivery.c.updated_at
            ).where(self.tools.in_(delivery.c.booking_id, booking_ids))
        ):
            if row.booking_id not in newest or row.id > newest[row.booking_id].id:
                newest[row.booking_id] = row
        return {
            booking_id
            for booking_id, row in newest.items()
            if row.status not in ACTIVE_STATUSES and row.updated_at < cutoff
        }

    async def _erase_due(self, conn: AsyncConnection, booking_ids: list[str]) -> Counter[str]:
        """Retention's erase of a batch of bookings. Under the bookings' locks, one with a state
        still active is passed over, and outbox rows not ingested yet are left for later."""
        stripped = await self._strip_held(conn, await self._lock_and_read(conn, booking_ids))
        return Counter(
            outbox_scrubbed=stripped.outbox_rows,
            deliveries_scrubbed=stripped.deliveries,
            snapshots_scrubbed=stripped.snapshots,
        )

    async def _lock_and_read(self, conn: AsyncConnection, booking_ids: list[str]) -> _Held:
        """Lock the bookings and read every row of them that can hold personal fields."""
        known = await lock_bookings(self.tools, conn, booking_ids, with_snapshot=True)
        deliveries = (
            await conn.execute(
                select(
                    delivery.c.id,
                    delivery.c.booking_id,
                    delivery.c.status,
                    delivery.c.payload,
                    delivery.c.last_error,
                ).where(self.tools.in_(delivery.c.booking_id, booking_ids))
            )
        ).all()
        rows = (
            await conn.execute(
                select(
                    outbox.c.id,
                    outbox.c.booking_id,
                    outbox.c.venue_id,
                    outbox.c.processed_at,
                    outbox.c.error,
                    _outbox_text(self.tools).label("payload_text"),
                ).where(self.tools.in_(outbox.c.booking_id, booking_ids))
            )
        ).all()
        return _Held(known, deliveries, rows)

    async def _strip_held(self, conn: AsyncConnection, held: _Held) -> _Stripped:
        """Strip the personal fields of what `_lock_and_read` read, with one statement per
        table: bookings with a state still active are passed over, and outbox rows not ingested
        yet are left for later. The counts are the rows changed, across the bookings."""
        known, deliveries, rows = held.known, held.deliveries, held.rows
        busy = {d.booking_id for d in deliveries if d.status in ACTIVE_STATUSES}
        payloads = {row.id: _payload_of(row.payload_text) for row in rows}
        values: dict[str, set[str]] = {
            booking_id: personal_values(row.accepted_payload) for booking_id, row in known.items()
        }
        for row in rows:
            values.setdefault(row.booking_id, set()).update(personal_values(payloads[row.id]))
        for item in deliveries:
            values.setdefault(item.booking_id, set()).update(personal_values(item.payload))

        outbox_changes = [
            change
            for row in rows
            if row.booking_id not in busy and row.processed_at is not None
            for change in [
                _stripped_outbox_row(
                    row, payloads[row.id], row.booking_id, values.get(row.booking_id, set())
                )
            ]
            if change is not None
        ]
        delivery_changes = []
        owner: dict[int, str] = {}
        for item in deliveries:
            if item.booking_id in busy:
                continue
            owner[item.id] = item.booking_id
            stripped, changed = strip_personal(item.payload)
            last_error, error_changed = redact_text(
                item.last_error, values.get(item.booking_id, set())
            )
            if changed or error_changed:
                delivery_changes.append(
                    {"row_id": item.id, "new_payload": stripped, "new_error": last_error}
                )
        snapshot_changes = []
        for booking_id, row in known.items():
            if booking_id in busy or row.accepted_payload is None:
                continue
            stripped, changed = strip_personal(row.accepted_payload)
            if changed:
                snapshot_changes.append({"row_id": booking_id, "new_payload": stripped})
        attempt_changes = []
        if owner:
            for answer in await conn.execute(
                select(
                    attempt.c.id, attempt.c.delivery_id, attempt.c.error, attempt.c.response_body
                ).where(self.tools.in_(attempt.c.delivery_id, list(owner)))
            ):
                quoted = values.get(owner[answer.delivery_id], set())
                error, error_changed = redact_text(answer.error, quoted)
                body, body_changed = redact_text(answer.response_body, quoted)
                if error_changed or body_changed:
                    attempt_changes.append(
                        {"row_id": answer.id, "new_error": error, "new_body": body}
                    )
        await _write(conn, _OUTBOX_STRIP, outbox_changes)
        await _write(conn, _DELIVERY_STRIP, delivery_changes)
        await _write(conn, _SNAPSHOT_STRIP, snapshot_changes)
        await _write(conn, _ATTEMPT_STRIP, attempt_changes)
        return _Stripped(
            outbox_rows=len(outbox_changes),
            deliveries=len(delivery_changes),
            snapshots=len(snapshot_changes),
            attempts=len(attempt_changes),
        )
