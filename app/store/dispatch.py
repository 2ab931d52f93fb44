"""Dispatch: lease due deliveries to a worker, and take back claims it gives up unsent.

A claim is a lease on one delivery: owner, token and expiry, all on the database clock. At most
one delivery per booking holds a live lease; the claim reads each candidate booking under its
lock, decides with `policy.plan_lease`, then writes (docs/adr/0002-claims-and-leases.md).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import translate_errors
from app.models import booking, delivery
from app.policy import Waiting, plan_lease
from app.store import bookings
from app.store.rate import RateLimit
from app.store.records import Claim
from app.store.toolkit import ACTIVE, Toolkit, statement
from app.store.venues import VenueRules, park, paused_now


@statement("dispatch.due_bookings")
def _due_bookings(tools: Toolkit) -> Any:
    return (
        select(delivery.c.booking_id)
        .where(ACTIVE, delivery.c.next_attempt_at <= bindparam("now"))
        .order_by(delivery.c.next_attempt_at)
        .limit(bindparam("limit", type_=Integer))
    )


@statement("dispatch.due_bookings_newest")
def _due_bookings_newest(tools: Toolkit) -> Any:
    return (
        select(delivery.c.booking_id)
        .where(ACTIVE, delivery.c.next_attempt_at <= bindparam("now"))
        .order_by(delivery.c.next_attempt_at.desc())
        .limit(bindparam("limit", type_=Integer))
    )


@statement("dispatch.lease")
def _lease(tools: Toolkit) -> Any:
    # Due again exactly when the lease ends: a crashed owner's work is then taken over by
    # whoever claims next, with no sweeper.
    return (
        update(delivery)
        .where(tools.in_param(delivery.c.id, "ids"))
        .values(
            lease_owner=bindparam("owner"),
            lease_token=bindparam("token"),
            lease_expires_at=bindparam("expires"),
            next_attempt_at=bindparam("expires"),
            updated_at=bindparam("now"),
        )
    )


@statement("dispatch.mark_sent")
def _mark_sent(tools: Toolkit) -> Any:
    return (
        update(booking)
        .where(booking.c.booking_id == bindparam("b_booking_id"))
        .values(sent_outbox_id=bindparam("b_outbox_id"), updated_at=bindparam("now"))
    )


@statement("dispatch.release")
def _release(tools: Toolkit) -> Any:
    return (
        update(delivery)
        .where(delivery.c.id == bindparam("r_id"), delivery.c.lease_token == bindparam("r_token"))
        .values(
            lease_owner=None,
            lease_token=None,
            lease_expires_at=None,
            next_attempt_at=bindparam("now"),
            updated_at=bindparam("now"),
        )
    )


class Dispatch:
    """Claims and their release (`Store.claim_due`, `Store.release`)."""

    def __init__(self, tools: Toolkit, *, rules: VenueRules, rate: RateLimit) -> None:
        self.tools = tools
        self.rules = rules
        self.rate = rate

    @translate_errors
    async def claim_due(
        self,
        *,
        worker_id: str,
        limit: int,
        lease_seconds: float,
        take: Callable[[int], int] | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` due deliveries, at most one per booking across all processes;
        with `take`, only as many as `take(found)` grants once they are found."""
        if limit <= 0:
            return []
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            candidates = await self._candidates(conn, now, limit)
            if not candidates:
                return []
            known = await bookings.lock_bookings(self.tools, conn, candidates, skip_locked=True)
            for booking_id in await bookings.unread_after(
                self.tools, conn, {b: row.last_outbox_id for b, row in known.items()}
            ):
                del known[booking_id]  # a newer state must be decided first
            active = await bookings.active_deliveries(self.tools, conn, known)
            chosen, stale, held = self._plan(candidates, known, active, now, limit)
            await bookings.supersede(self.tools, conn, stale, now)
            await bookings.hold(self.tools, conn, held, now)
            chosen = await self._park_paused(conn, chosen, now)
            if chosen and take is not None:
                chosen = chosen[: max(0, take(len(chosen)))]
            chosen = chosen[: await self.rate.take(conn, len(chosen), now)]
            if not chosen:
                return []
            return await self._lease(conn, chosen, known, worker_id, lease_seconds, now)

    async def _candidates(self, conn: AsyncConnection, now: datetime, limit: int) -> list[str]:
        """Bookings with a delivery due, half from the oldest due and half from the newest,
        taken in turn: a backlog drains oldest first, while a state that just came due (a new
        booking, another venue's) never waits behind the whole backlog (docs/adr/0007)."""
        oldest = (
            (
                await conn.execute(
                    self.tools.statement("dispatch.due_bookings"), {"now": now, "limit": limit * 2}
                )
            )
            .scalars()
            .all()
        )
        if len(oldest) < limit * 2:
            return list(oldest)  # no backlog: these are all that is due
        newest = (
            (
                await conn.execute(
                    self.tools.statement("dispatch.due_bookings_newest"),
                    {"now": now, "limit": limit},
                )
            )
            .scalars()
            .all()
        )
        turns = itertools.chain.from_iterable(itertools.zip_longest(oldest, newest))
        return list(dict.fromkeys(b for b in turns if b is not None))

    async def _park_paused(
        self, conn: AsyncConnection, chosen: list[Any], now: datetime
    ) -> list[Any]:
        """Park what came due for a paused venue (a retry, a lease run out, a claim given
        back); the rest may go."""
        rules = await self.rules.current(conn)
        suspect = {d.venue_id for d in chosen if d.venue_id in rules.paused}
        if not suspect:
            return chosen
        paused = await paused_now(self.tools, conn, suspect)
        await park(self.tools, conn, [d for d in chosen if d.venue_id in paused], now)
        return [d for d in chosen if d.venue_id not in paused]

    @staticmethod
    def _plan(
        candidates: Sequence[str],
        known: dict[str, Any],
        active: dict[str, list[Any]],
        now: datetime,
        limit: int,
    ) -> tuple[list[Any], list[Any], list[Any]]:
        """(to lease, to supersede, to hold), oldest due first, as the candidates came."""
        chosen: list[Any] = []
        stale: list[Any] = []
        held: list[Any] = []
        for booking_id in dict.fromkeys(candidates):
            if booking_id not in known or len(chosen) >= limit:
                continue
            deliveries = active.get(booking_id, [])
            plan = plan_lease(
                [
                    Waiting(
                        d.outbox_id,
                        d.payload["status"],
                        bookings.leased(d, now),
                        d.next_attempt_at is not None and d.next_attempt_at <= now,
                    )
                    for d in deliveries
                ],
                quiet=bookings.quiet_until(known[booking_id], now) > now,
                sent_outbox_id=known[booking_id].sent_outbox_id,
                reached_send_status=known[booking_id].reached_send_status,
            )
            stale.extend(deliveries[i] for i in plan.supersede)
            if plan.hold is not None:
                held.append(deliveries[plan.hold])
            if plan.lease is not None:
                chosen.append(deliveries[plan.lease])
        return chosen, stale, held

    async def _lease(
        self,
        conn: AsyncConnection,
        chosen: list[Any],
        known: dict[str, Any],
        worker_id: str,
        lease_seconds: float,
        now: datetime,
    ) -> list[Claim]:
        expires = now + timedelta(seconds=lease_seconds)
        token = uuid.uuid4().hex
        await conn.execute(
            self.tools.statement("dispatch.lease"),
            {
                "ids": [d.id for d in chosen],
                "owner": worker_id,
                "token": token,
                "expires": expires,
                "now": now,
            },
        )
        await conn.execute(
            self.tools.statement("dispatch.mark_sent"),
            [
                {"b_booking_id": d.booking_id, "b_outbox_id": d.outbox_id, "now": now}
                for d in chosen
            ],
        )
        # The rows read under the booking locks are the claimed rows as they now stand.
        return [
            Claim(
                delivery_id=row.id,
                booking_id=row.booking_id,
                venue_id=row.venue_id,
                outbox_id=row.outbox_id,
                payload=row.payload,
                attempt_count=row.attempt_count,
                created_at=row.created_at,
                outbox_created_at=row.outbox_created_at,
                retry_window_started_at=row.requeued_at or row.created_at,
                lease_token=token,
                lease_expires_at=expires,
                previous_sent_outbox_id=known[row.booking_id].sent_outbox_id,
                traceparent=row.traceparent,
            )
            for row in chosen
        ]

    @translate_errors
    async def release(self, claims: Sequence[Claim]) -> None:
        """Give claims back unsent (shutdown, open circuit, a lease run out before the write):
        no attempt is counted, and the booking is as if never claimed. A claim whose lease
        another process has taken over since is left alone."""
        if not claims:
            return
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            known = await bookings.lock_bookings(self.tools, conn, (c.booking_id for c in claims))
            active = await bookings.active_deliveries(self.tools, conn, known, payloads=False)
            tokens = {d.id: d.lease_token for rows in active.values() for d in rows}
            ours = [c for c in claims if tokens.get(c.delivery_id) == c.lease_token]
            if not ours:
                return
            await bookings.forget_sent(self.tools, conn, ours)
            await conn.execute(
                self.tools.statement("dispatch.release"),
                [{"r_id": c.delivery_id, "r_token": c.lease_token, "now": now} for c in ours],
            )
            await bookings.wake_queued(
                self.tools,
                conn,
                [active.get(c.booking_id, []) for c in ours],
                done={c.delivery_id for c in ours},
                now=now,
            )
