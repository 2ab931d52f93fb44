"""The store's admin side: the reads and replays behind `/api/*`, `/readyz` and `/metrics`.

Mixed into `app.store.Store`, so all SQL still sits behind one class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from app.models import ACTIVE_STATUSES, STATUSES, delivery, outbox, worker

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from sqlalchemy.ext.asyncio import AsyncConnection


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


class AdminQueries:
    """Admin reads and writes; expects `_read`, `_write` and `_now` from `Store`."""

    if TYPE_CHECKING:

        def _read(self) -> AbstractAsyncContextManager[AsyncConnection]: ...
        def _write(self) -> AbstractAsyncContextManager[AsyncConnection]: ...
        @staticmethod
        async def _now(conn: AsyncConnection) -> Any: ...

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

    async def fleet_health(self, *, stale_after_seconds: float) -> FleetHealth:
        async with self._read() as conn:
            return await self._fleet(conn, stale_after_seconds)

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
        )
