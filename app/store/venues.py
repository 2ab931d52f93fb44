"""Venues: pause and resume, per-venue settings, and what ingest and claims must know of them.

A paused venue's rows are ingested as usual, but nothing is sent for it: its deliveries are
*parked* (`next_attempt_at` NULL while `pending` or `retrying`), which takes them out of the due
index, so other venues never wait behind a paused one's backlog. Resuming makes every parked
delivery of the venue due at once, with a fresh retry window (time spent paused never makes a
delivery dead). The venue's row is the mutex of parking and un-parking: a transaction that parks
reads it `FOR SHARE` and resuming updates it, so a delivery is never parked after the resume that
should have released it.

Ingest and claims learn which venues are paused or have their own settings from `VenueRules`,
read again at most every `RULES_MAX_AGE_SECONDS` (a pause takes effect on every replica within
2 seconds); a venue the rules call paused is checked under its lock before anything is parked.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import translate_errors
from app.models import ACTIVE_STATUSES, delivery, venue
from app.states import DeliveryStatus
from app.store.admin import NotFoundError, Record
from app.store.audit import Audit, AuditEntry
from app.store.toolkit import Toolkit, statement

#: How stale a process's view of the venues' settings may be.
RULES_MAX_AGE_SECONDS = 1.0
#: The window of `dead_last_hour` in a venue object.
DEAD_WINDOW = timedelta(hours=1)
#: Longest pause reason taken.
MAX_REASON_LENGTH = 500

VENUE_COLUMNS = (
    venue.c.venue_id,
    venue.c.paused,
    venue.c.paused_at,
    venue.c.paused_by,
    venue.c.pause_reason,
    venue.c.send_items,
)


@dataclass(frozen=True, slots=True)
class Rules:
    """The venues that differ from the defaults: paused ones, and per-venue `send_items`."""

    paused: frozenset[str] = frozenset()
    send_items: dict[str, bool] = field(default_factory=dict)

    def sends_items(self, venue_id: str, default: bool) -> bool:
        return self.send_items.get(venue_id, default)


@statement("venues.rules")
def _rules(tools: Toolkit) -> Any:
    return select(venue.c.venue_id, venue.c.paused, venue.c.send_items).where(
        or_(venue.c.paused.is_(True), venue.c.send_items.is_not(None))
    )


@statement("venues.known")
def _known(tools: Toolkit) -> Any:
    return select(venue.c.venue_id).where(tools.in_param(venue.c.venue_id, "ids"))


@statement("venues.insert")
def _insert(tools: Toolkit) -> Any:
    return insert(venue)


@statement("venues.lock_paused")
def _lock_paused(tools: Toolkit) -> Any:
    return (
        select(venue.c.venue_id)
        .where(tools.in_param(venue.c.venue_id, "ids"), venue.c.paused.is_(True))
        .order_by(venue.c.venue_id)
        .with_for_update(read=True)
    )


@statement("venues.park")
def _park(tools: Toolkit) -> Any:
    return (
        update(delivery)
        .where(tools.in_param(delivery.c.id, "ids"))
        .values(next_attempt_at=None, updated_at=bindparam("now"))
    )


class VenueRules:
    """One process's view of the venues' rules, read again when older than a second."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools
        self._rules = Rules()
        self._read_at = float("-inf")

    async def current(self, conn: AsyncConnection) -> Rules:
        if time.monotonic() - self._read_at > RULES_MAX_AGE_SECONDS:
            paused, send_items = set(), {}
            for row in await conn.execute(self.tools.statement("venues.rules")):
                if row.paused:
                    paused.add(row.venue_id)
                if row.send_items is not None:
                    send_items[row.venue_id] = bool(row.send_items)
            self._rules = Rules(frozenset(paused), send_items)
            self._read_at = time.monotonic()
        return self._rules

    def forget(self) -> None:
        """Read the rules again next time (this process just changed them)."""
        self._read_at = float("-inf")


async def paused_now(tools: Toolkit, conn: AsyncConnection, venue_ids: Iterable[str]) -> set[str]:
    """Of these venues, those paused now, their rows locked for share until the transaction ends
    (so no resume can slip between this check and the parking it decides)."""
    ids = sorted(set(venue_ids))
    if not ids:
        return set()
    rows = await conn.execute(tools.statement("venues.lock_paused"), {"ids": ids})
    return {row.venue_id for row in rows}


async def park(
    tools: Toolkit, conn: AsyncConnection, deliveries: Sequence[Any], now: datetime
) -> None:
    """Keep these deliveries of paused venues out of the due index until their venue resumes."""
    if deliveries:
        ids = [d.id for d in deliveries]
        await conn.execute(tools.statement("venues.park"), {"ids": ids, "now": now})


async def add_seen(
    tools: Toolkit, conn: AsyncConnection, venue_ids: Iterable[str], now: datetime
) -> None:
    """Give every venue ingest meets a row (the venue list). Ingest runs one at a time (its
    lock), and an operator's first write to a venue takes the same lock (`Venues._upsert`)."""
    ids = sorted(set(venue_ids))
    if not ids:
        return
    known = set((await conn.execute(tools.statement("venues.known"), {"ids": ids})).scalars())
    new = [v for v in ids if v not in known]
    if new:
        await conn.execute(
            tools.statement("venues.insert"),
            [{"venue_id": v, "created_at": now, "updated_at": now} for v in new],
        )


class Venues:
    """The operators' side of venues (`/api/venues`, `mozrest-relay venue`)."""

    def __init__(self, tools: Toolkit, rules: VenueRules, audit: Audit) -> None:
        self.tools = tools
        self.rules = rules
        self.audit = audit

    @translate_errors
    async def list_venues(self, *, after_id: str | None, limit: int) -> list[Record]:
        """Up to `limit` venues after `after_id`, in venue id order."""
        query = select(*VENUE_COLUMNS)
        if after_id is not None:
            query = query.where(venue.c.venue_id > after_id)
        async with self.tools.read() as conn:
            now = await self.tools.now(conn)
            rows = [
                dict(r._mapping)
                for r in await conn.execute(query.order_by(venue.c.venue_id).limit(limit))
            ]
            counts = await self._delivery_counts(conn, [r["venue_id"] for r in rows], now)
        return [{**row, **counts.get(row["venue_id"], _no_counts())} for row in rows]

    @translate_errors
    async def get_venue(self, venue_id: str) -> Record:
        async with self.tools.read() as conn:
            now = await self.tools.now(conn)
            return await self._venue(conn, venue_id, now)

    async def _venue(self, conn: AsyncConnection, venue_id: str, now: datetime) -> Record:
        row = (
            await conn.execute(select(*VENUE_COLUMNS).where(venue.c.venue_id == venue_id))
        ).first()
        if row is None:
            raise NotFoundError(f"the relay has never seen venue {venue_id!r}")
        counts = await self._delivery_counts(conn, [venue_id], now)
        return {**dict(row._mapping), **counts.get(venue_id, _no_counts())}

    async def _delivery_counts(
        self, conn: AsyncConnection, venue_ids: list[str], now: datetime
    ) -> dict[str, dict[str, Any]]:
        """Per venue: its waiting and dead deliveries by status, and those that went dead in
        the last hour (the venue to pause when all its answers are 4xx)."""
        if not venue_ids:
            return {}
        found: dict[str, dict[str, Any]] = {v: _no_counts() for v in venue_ids}
        statuses = (*ACTIVE_STATUSES, DeliveryStatus.DEAD)
        rows = await conn.execute(
            select(delivery.c.venue_id, delivery.c.status, func.count())
            .where(self.tools.in_(delivery.c.venue_id, venue_ids), delivery.c.status.in_(statuses))
            .group_by(delivery.c.venue_id, delivery.c.status)
        )
        for venue_id, status, count in rows:
            found[venue_id]["deliveries"][status] = int(count)
        recent = await conn.execute(
            select(delivery.c.venue_id, func.count())
            .where(
                self.tools.in_(delivery.c.venue_id, venue_ids),
                delivery.c.status == DeliveryStatus.DEAD,
                delivery.c.updated_at >= now - DEAD_WINDOW,
            )
            .group_by(delivery.c.venue_id)
        )
        for venue_id, count in recent:
            found[venue_id]["dead_last_hour"] = int(count)
        return found

    @translate_errors
    async def pause(
        self, venue_id: str, *, by: str, reason: str | None, audit: AuditEntry | None = None
    ) -> Record:
        """Pause a venue (a paused one stays as it was): nothing more is sent for it."""
        async with self.audit.change(audit) as change:
            conn = change.conn
            change.detail = {"reason": reason}
            now = await self.tools.now(conn)
            await self._upsert(conn, venue_id, now)
            await conn.execute(
                update(venue)
                .where(venue.c.venue_id == venue_id, venue.c.paused.is_(False))
                .values(
                    paused=True, paused_at=now, paused_by=by, pause_reason=reason, updated_at=now
                )
            )
            self.rules.forget()
            return await self._venue(conn, venue_id, now)

    @translate_errors
    async def resume(self, venue_id: str, *, audit: AuditEntry | None = None) -> Record:
        """Resume a venue: each of its bookings' newest waiting state is due at once, with a
        fresh retry window. NotFoundError for a venue never seen."""
        async with self.audit.change(audit) as change:
            conn = change.conn
            now = await self.tools.now(conn)
            found = (
                await conn.execute(
                    select(venue.c.venue_id).where(venue.c.venue_id == venue_id).with_for_update()
                )
            ).first()
            if found is None:
                raise NotFoundError(f"the relay has never seen venue {venue_id!r}")
            await conn.execute(
                update(venue)
                .where(venue.c.venue_id == venue_id)
                .values(
                    paused=False, paused_at=None, paused_by=None, pause_reason=None, updated_at=now
                )
            )
            released = await conn.execute(
                update(delivery)
                .where(
                    delivery.c.venue_id == venue_id,
                    delivery.c.status.in_(ACTIVE_STATUSES),
                    delivery.c.next_attempt_at.is_(None),
                )
                .values(next_attempt_at=now, requeued_at=now, updated_at=now)
            )
            change.detail = {"released": released.rowcount or 0}
            self.rules.forget()
            return await self._venue(conn, venue_id, now)

    @translate_errors
    async def update_settings(
        self, venue_id: str, *, send_items: bool | None, audit: AuditEntry | None = None
    ) -> Record:
        """Set the venue's `send_items` (None: follow RELAY_SEND_ITEMS) for states ingested
        from now on."""
        async with self.audit.change(audit) as change:
            conn = change.conn
            change.detail = {"send_items": send_items}
            now = await self.tools.now(conn)
            await self._upsert(conn, venue_id, now)
            await conn.execute(
                update(venue)
                .where(venue.c.venue_id == venue_id)
                .values(send_items=send_items, updated_at=now)
            )
            self.rules.forget()
            return await self._venue(conn, venue_id, now)

    @translate_errors
    async def count_paused(self) -> int:
        async with self.tools.read() as conn:
            count = await conn.execute(
                select(func.count()).select_from(venue).where(venue.c.paused.is_(True))
            )
            return int(count.scalar_one())

    async def _upsert(self, conn: AsyncConnection, venue_id: str, now: datetime) -> None:
        """The venue's row, made if the relay has not met it yet: under the ingest lock, which
        is also what makes ingest's venue rows (so the two never insert the same one)."""
        exists = (
            await conn.execute(select(venue.c.venue_id).where(venue.c.venue_id == venue_id))
        ).first()
        if exists is None:
            await self.tools.take_lock(conn, "ingest", wait=True)
            await add_seen(self.tools, conn, [venue_id], now)


def _no_counts() -> dict[str, Any]:
    statuses = (*ACTIVE_STATUSES, str(DeliveryStatus.DEAD))
    return {"deliveries": {status: 0 for status in statuses}, "dead_last_hour": 0}
