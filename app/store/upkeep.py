"""Upkeep: the processes' registry and heartbeats, retention, and the health checks."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import translate_errors
from app.models import ACTIVE_STATUSES, attempt, booking, delivery, outbox, worker
from app.store import bookings
from app.store.audit import Audit
from app.store.privacy import SCRUB_BATCH_SIZE, Privacy
from app.store.records import WorkerInfo
from app.store.toolkit import ACTIVE, Toolkit, statement

#: Rows each prune looks at per table: small batches never hog the tables; the worker prunes
#: again at once while a batch comes back full.
PRUNE_BATCH_SIZE = 500
#: Workers that have not checked in for this long are forgotten.
FORGET_WORKERS_AFTER = timedelta(days=1)


_END_STALLED_SESSIONS = text(
    """
    SELECT application_name, pg_terminate_backend(pid) AS ended
    FROM pg_stat_activity
    WHERE datname = current_database()
      AND usename = current_user
      AND pid <> pg_backend_pid()
      AND application_name LIKE 'mozrest-relay/%'
      AND state = 'active'
      AND wait_event_type = 'Client'
      AND wait_event IN ('ClientRead', 'ClientWrite')
      AND state_change < clock_timestamp() - make_interval(secs => :seconds)
    """
)


@statement("upkeep.heartbeat")
def _heartbeat(tools: Toolkit) -> Any:
    return (
        update(worker)
        .where(worker.c.id == bindparam("worker_id"))
        .values(
            heartbeat_at=bindparam("now"),
            circuit=bindparam("circuit"),
            credentials=bindparam("credentials"),
            request_rate=bindparam("request_rate"),
        )
    )


class Upkeep:
    """What keeps the relay's own tables in order (`Store.heartbeat`, `Store.prune`, ...)."""

    def __init__(self, tools: Toolkit, *, audit: Audit, privacy: Privacy) -> None:
        self.tools = tools
        self.audit = audit
        self.privacy = privacy

    @translate_errors
    async def register_worker(self, info: WorkerInfo) -> None:
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            await conn.execute(
                insert(worker).values(
                    id=info.id,
                    hostname=info.hostname,
                    pid=info.pid,
                    role=info.role,
                    started_at=now,
                    heartbeat_at=now,
                )
            )

    @translate_errors
    async def heartbeat(
        self, worker_id: str, *, circuit: str, credentials: str, request_rate: float = 0.0
    ) -> None:
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            await conn.execute(
                self.tools.statement("upkeep.heartbeat"),
                {
                    "worker_id": worker_id,
                    "now": now,
                    "circuit": circuit,
                    "credentials": credentials,
                    "request_rate": request_rate,
                },
            )

    @translate_errors
    async def mark_stopped(self, worker_id: str) -> None:
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            await conn.execute(
                update(worker).where(worker.c.id == worker_id).values(stopped_at=now)
            )

    @translate_errors
    async def prune(
        self,
        *,
        retention_seconds: float,
        batch_size: int = PRUNE_BATCH_SIZE,
        audit_retention_seconds: float | None = None,
        payload_retention_seconds: float | None = None,
    ) -> Counter[str]:
        """Delete one small batch of terminal rows and idle snapshots older than retention, and
        of audit rows older than theirs; strip guests' personal fields from one batch of rows
        older than payload retention (`Privacy.scrub_payloads`)."""
        removed: Counter[str] = Counter()
        if payload_retention_seconds is not None:
            removed += await self.privacy.scrub_payloads(
                retention_seconds=payload_retention_seconds,
                batch_size=min(batch_size, SCRUB_BATCH_SIZE),
            )
        async with self.tools.write() as conn:
            if not await self.tools.take_lock(conn, "maintenance"):
                return removed
            now = await self.tools.now(conn)
            cutoff = now - timedelta(seconds=retention_seconds)
            removed["outbox"] = await self._prune_outbox(conn, cutoff, batch_size)
            removed["deliveries"] = await self._prune_deliveries(conn, cutoff, batch_size)
            await conn.execute(
                delete(worker).where(worker.c.heartbeat_at < now - FORGET_WORKERS_AFTER)
            )
            if audit_retention_seconds is not None:
                removed["audit"] = await self.audit.prune(
                    conn,
                    before=now - timedelta(seconds=audit_retention_seconds),
                    batch_size=batch_size,
                )
        # Snapshots hold guest personal data. Pruning one races with ingest deciding against it,
        # so it happens under the ingest lock, in its own short transaction.
        async with self.tools.write() as conn:
            if not await self.tools.take_lock(conn, "ingest"):
                return +removed
            now = await self.tools.now(conn)
            cutoff = now - timedelta(seconds=retention_seconds)
            removed["bookings"] = await self._prune_snapshots(conn, cutoff, batch_size)
        return +removed  # only what was removed

    async def _prune_outbox(self, conn: AsyncConnection, cutoff: datetime, batch_size: int) -> int:
        # Old rows have low ids: look at the oldest few by primary key and keep the ones due, so
        # the cost never grows with the table (a filter on processed_at would scan it).
        due = [
            row
            for row in await conn.execute(
                select(outbox.c.id, outbox.c.booking_id, outbox.c.processed_at)
                .order_by(outbox.c.id)
                .limit(batch_size)
            )
            if row.processed_at is not None and row.processed_at < cutoff
        ]
        # A row whose delivery is still pending or retrying stays, however old: with
        # RELAY_RETRY_MAX_AGE longer than RELAY_RETENTION it would otherwise go first.
        active = await bookings.active_deliveries(
            self.tools, conn, (row.booking_id for row in due), payloads=False
        )
        waiting = {d.outbox_id for rows in active.values() for d in rows}
        doomed = [row.id for row in due if row.id not in waiting]
        if doomed:
            await conn.execute(delete(outbox).where(self.tools.in_(outbox.c.id, doomed)))
        return len(doomed)

    async def _prune_deliveries(
        self, conn: AsyncConnection, cutoff: datetime, batch_size: int
    ) -> int:
        doomed = [
            row.id
            for row in await conn.execute(
                select(delivery.c.id, delivery.c.status, delivery.c.updated_at)
                .order_by(delivery.c.id)
                .limit(batch_size)
            )
            if row.status not in ACTIVE_STATUSES and row.updated_at < cutoff
        ]
        if doomed:
            await conn.execute(delete(attempt).where(self.tools.in_(attempt.c.delivery_id, doomed)))
            await conn.execute(delete(delivery).where(self.tools.in_(delivery.c.id, doomed)))
        return len(doomed)

    async def _prune_snapshots(
        self, conn: AsyncConnection, cutoff: datetime, batch_size: int
    ) -> int:
        idle = (
            (
                await conn.execute(
                    select(booking.c.booking_id)
                    .where(booking.c.updated_at < cutoff)
                    .order_by(booking.c.updated_at)
                    .limit(batch_size)
                )
            )
            .scalars()
            .all()
        )
        if not idle:
            return 0
        busy = set(
            (
                await conn.execute(
                    select(delivery.c.booking_id).where(
                        self.tools.in_(delivery.c.booking_id, idle), ACTIVE
                    )
                )
            ).scalars()
        )
        unprocessed = set(
            (
                await conn.execute(
                    select(outbox.c.booking_id).where(
                        self.tools.in_(outbox.c.booking_id, idle), outbox.c.processed_at.is_(None)
                    )
                )
            ).scalars()
        )
        doomed = [b for b in idle if b not in busy and b not in unprocessed]
        if doomed:
            await conn.execute(delete(booking).where(self.tools.in_(booking.c.booking_id, doomed)))
        return len(doomed)

    # -- stalled sessions -----------------------------------------------------------------

    @translate_errors
    async def end_stalled_sessions(self, *, waiting_seconds: float) -> list[str]:
        """End the relay sessions (any replica's) that PostgreSQL has kept waiting on their
        client, in the middle of a statement, for `waiting_seconds`: their process is frozen.
        The names of the sessions ended (`application_name`, which carries the process id).

        The server's own timers cannot end them. asyncpg prepares a statement it has not seen
        (Parse, Describe, then Flush, not Sync) before it binds and runs it; a process frozen
        between the two leaves its session "active" and reading from the client, where neither
        `idle_in_transaction_session_timeout` nor `statement_timeout` acts, with its locks held
        for as long as it stays frozen. A session writing a result to a frozen client that no
        longer reads waits the same way. Only sessions of this database's relay processes under
        the same role are looked at (a role may always end its own sessions). MariaDB bounds the
        same waits itself (`net_read_timeout`, `net_write_timeout`); SQLite has no sessions.
        """
        if self.tools.dialect != "postgresql":
            return []
        async with self.tools.write() as conn:
            ended = await conn.execute(_END_STALLED_SESSIONS, {"seconds": waiting_seconds})
            return [row.application_name for row in ended if row.ended]

    # -- health ---------------------------------------------------------------------------

    @translate_errors
    async def ping(self) -> datetime:
        async with self.tools.read() as conn:
            return await self.tools.now(conn)

    @translate_errors
    async def schema_revision(self) -> str | None:
        from app.migrate import current_revision

        async with self.tools.read() as conn:
            return await conn.run_sync(current_revision)
