"""The audit trail: who changed what through the admin API, refused attempts included.

A change and its `ok` row commit in one transaction: write the row with `record(conn, ...)`
inside the change's own transaction, or run the change in `Audit.change(entry)`, which writes it
for you and, when the change is refused (`ConflictError`, `NotFoundError`), rolls the change back
and records the refusal in a transaction of its own. Rows never hold a token or guest data: the
`detail` is counts and reasons.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import clock_now, translate_errors
from app.models import audit
from app.states import AuditResult
from app.store.admin import ConflictError, NotFoundError, Record
from app.store.toolkit import Toolkit

#: Audit rows each prune deletes at most (`Upkeep.prune`).
AUDIT_PRUNE_BATCH_SIZE = 500
#: Columns of an audit row in `/api/audit`; keep in step with `app.schemas.AuditRow`.
AUDIT_COLUMNS = (
    audit.c.id,
    audit.c.at,
    audit.c.actor,
    audit.c.action,
    audit.c.target,
    audit.c.result,
    audit.c.detail,
    audit.c.client,
)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """Who asks for which action on what: the audit row to write, without its result."""

    actor: str
    action: str
    target: str
    client: str | None = None


@dataclass(slots=True)
class Change:
    """A change in progress inside `Audit.change`: its transaction, and the `detail` its `ok`
    row will carry (set it before the block ends, e.g. `{"requeued": 12}`)."""

    conn: AsyncConnection
    detail: dict[str, Any] = field(default_factory=dict)


async def record(
    conn: AsyncConnection,
    *,
    actor: str,
    action: str,
    target: str,
    result: str,
    detail: dict[str, Any] | None = None,
    client: str | None = None,
) -> int:
    """Write one audit row in `conn`'s transaction, at the database's clock; answers its id."""
    inserted = await conn.execute(
        insert(audit)
        .values(
            at=clock_now(),
            actor=actor,
            action=action,
            target=target[:1000],
            result=result,
            detail=detail or {},
            client=client,
        )
        .returning(audit.c.id)
    )
    return int(inserted.scalar_one())


async def record_entry(
    conn: AsyncConnection,
    entry: AuditEntry,
    *,
    result: str,
    detail: dict[str, Any] | None = None,
) -> int:
    """`record` for an `AuditEntry`."""
    return await record(
        conn,
        actor=entry.actor,
        action=entry.action,
        target=entry.target,
        result=result,
        detail=detail,
        client=entry.client,
    )


async def update_detail(conn: AsyncConnection, audit_id: int, detail: dict[str, Any]) -> None:
    """Change an audit row's detail in `conn`'s transaction: a change made in several
    transactions (a bulk retry) keeps its row in step with what each one committed."""
    await conn.execute(update(audit).where(audit.c.id == audit_id).values(detail=detail))


class Audit:
    """The audit trail's writes, reads and retention (`Store.audit`)."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    async def record(
        self,
        conn: AsyncConnection,
        *,
        actor: str,
        action: str,
        target: str,
        result: str,
        detail: dict[str, Any] | None = None,
        client: str | None = None,
    ) -> int:
        """Write one audit row inside the caller's transaction (the module's `record`)."""
        return await record(
            conn,
            actor=actor,
            action=action,
            target=target,
            result=result,
            detail=detail,
            client=client,
        )

    @translate_errors
    async def record_alone(
        self, entry: AuditEntry, *, result: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Write one audit row in a transaction of its own: a refusal, or a call that changed
        nothing in the database."""
        async with self.tools.write() as conn:
            await record_entry(conn, entry, result=result, detail=detail)

    @asynccontextmanager
    async def change(self, entry: AuditEntry | None) -> AsyncIterator[Change]:
        """A write transaction whose `ok` audit row commits with the change. A refusal raised
        inside (`ConflictError`, `NotFoundError`) rolls the change back and is recorded as
        `refused`, with its reason, in a transaction of its own; any other failure leaves no
        row at all. Without an entry (the CLI's own calls are audited too, so rarely), just a
        transaction."""
        try:
            async with self.tools.write() as conn:
                change = Change(conn)
                yield change
                if entry is not None:
                    await record_entry(conn, entry, result=AuditResult.OK, detail=change.detail)
        except (ConflictError, NotFoundError) as exc:
            if entry is not None:
                await self.record_alone(
                    entry,
                    result=AuditResult.REFUSED,
                    detail={
                        "status": 409 if isinstance(exc, ConflictError) else 404,
                        "reason": str(exc),
                    },
                )
            raise

    @translate_errors
    async def list(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        before_id: int | None = None,
        limit: int,
    ) -> list[Record]:
        """Up to `limit` audit rows below `before_id`, newest first."""
        query = select(*AUDIT_COLUMNS)
        if actor is not None:
            query = query.where(audit.c.actor == actor)
        if action is not None:
            query = query.where(audit.c.action == action)
        if before_id is not None:
            query = query.where(audit.c.id < before_id)
        async with self.tools.read() as conn:
            rows = await conn.execute(query.order_by(audit.c.id.desc()).limit(limit))
            return [dict(row._mapping) for row in rows]

    async def prune(
        self, conn: AsyncConnection, *, before: datetime, batch_size: int = AUDIT_PRUNE_BATCH_SIZE
    ) -> int:
        """Delete up to `batch_size` of the oldest rows written before `before` (on the `at`
        index), in the caller's transaction."""
        doomed = (
            (
                await conn.execute(
                    select(audit.c.id)
                    .where(audit.c.at < before)
                    .order_by(audit.c.at)
                    .limit(batch_size)
                )
            )
            .scalars()
            .all()
        )
        if doomed:
            await conn.execute(delete(audit).where(self.tools.in_(audit.c.id, doomed)))
        return len(doomed)
