"""The relay-wide rate limit toward Mozrest: a token bucket in one row, shared by every replica.

`RELAY_RATE_LIMIT` tokens a second refill it, up to a quarter second's worth; each lease takes
one, in the leasing transaction, under the row's lock. So over any 10 seconds the relay leases at
most 10.25 x the limit, whatever the number of replicas or their comings and goings (the contract
allows 11: the rest absorbs requests that reach Mozrest later than they were leased, which on a
busy host at hundreds a second is a few tenths of a second), and while work waits each claim
takes what has refilled since the last. A state without a token stays in the database, where a
newer state can still supersede it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import rate
from app.store.toolkit import Toolkit, statement

BUCKET = "webhook"


@statement("rate.lock")
def _lock(tools: Toolkit) -> Any:
    return (
        select(rate.c.tokens, rate.c.refilled_at)
        .where(rate.c.name == bindparam("name"))
        .with_for_update()
    )


@statement("rate.set")
def _set(tools: Toolkit) -> Any:
    return (
        update(rate)
        .where(rate.c.name == bindparam("bucket"))
        .values(tokens=bindparam("r_tokens"), refilled_at=bindparam("now"))
    )


class RateLimit:
    """Grants leases against the shared bucket; with no limit (0), grants all, touching nothing."""

    def __init__(self, tools: Toolkit, *, per_second: float) -> None:
        self.tools = tools
        self.per_second = per_second

    async def take(self, conn: AsyncConnection, wanted: int, now: datetime) -> int:
        """How many of `wanted` leases may be made now; takes their tokens."""
        if self.per_second <= 0 or wanted <= 0:
            return wanted
        burst = max(1.0, self.per_second / 4)  # a quarter second's worth
        row = (await conn.execute(self.tools.statement("rate.lock"), {"name": BUCKET})).first()
        if row is None:  # the migration makes the bucket; without it there is nothing to share
            return wanted
        elapsed = max(0.0, (now - row.refilled_at).total_seconds())
        tokens = min(burst, row.tokens + elapsed * self.per_second)
        granted = min(wanted, int(tokens))
        # `now` was read when the claim began, before this lock: another replica's claim that
        # began later may have refilled the bucket first. Its clock never goes back, or the
        # moments between the two readings would refill it twice.
        await conn.execute(
            self.tools.statement("rate.set"),
            {"bucket": BUCKET, "r_tokens": tokens - granted, "now": max(now, row.refilled_at)},
        )
        return granted
