"""The operator console's reads: failure groups, deliveries accepted per minute, deliveries
filtered by creation time, and how many a bulk requeue would requeue (`app/console`).

Each read is bounded: the groups scan the newest `GROUP_SCAN_LIMIT` dead and retrying
deliveries (the page says so), the chart reads the last hour through the `updated_at` index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select

from app.db import translate_errors
from app.models import attempt, booking, delivery, venue
from app.states import DeliveryStatus
from app.store.replay import may_requeue, requeue_candidates
from app.store.toolkit import Toolkit

#: Dead and retrying deliveries the failure groups read at most, newest first.
GROUP_SCAN_LIMIT = 10_000
#: Characters of Mozrest's answer read for a group's cause, and shown of its first line.
ANSWER_HEAD_CHARS = 300
CAUSE_CHARS = 120
#: Venues named per group (the count says how many there are).
GROUP_VENUES_SHOWN = 10
#: Deliveries a requeue's count reads at a time: it takes no locks, so larger batches than the
#: requeue's own (`REQUEUE_BATCH_SIZE`) cost nothing but memory.
COUNT_BATCH_SIZE = 2_000
#: The statuses failure groups are made of.
FAILING_STATUSES = ("dead", "retrying")


@dataclass(slots=True)
class FailureGroup:
    """Dead and retrying deliveries that failed for one cause."""

    key: str
    status_code: int | None
    cause: str
    count: int = 0
    dead: int = 0
    retrying: int = 0
    venues: set[str] = field(default_factory=set)
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    newest_id: int = 0
    dead_ids: list[int] = field(default_factory=list)

    @property
    def venues_shown(self) -> list[str]:
        return sorted(self.venues)[:GROUP_VENUES_SHOWN]


@dataclass(frozen=True, slots=True)
class FailureGroups:
    groups: list[FailureGroup]
    scanned: int
    capped: bool
    scan_limit: int = GROUP_SCAN_LIMIT


def first_line(body: str | None) -> str:
    """What Mozrest said, in one line: a JSON answer's `message`, `detail` or `error` when it
    has one, else the first non-blank line of the body."""
    if not body:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for name in ("message", "detail", "error"):
            if isinstance(parsed.get(name), str) and parsed[name].strip():
                body = parsed[name]
                break
    line = next((part.strip() for part in body.splitlines() if part.strip()), "")
    return line[:CAUSE_CHARS]


def cause_of(status_code: int | None, last_error: str | None, answer: str | None) -> str:
    """A failure's cause: the status code and the answer's first line, or the error's class
    (`timeout`, `ClientConnectorError`, ...)."""
    if status_code is not None:
        return f"{status_code} {first_line(answer)}".strip()
    if not last_error:
        return "no answer recorded"
    return last_error.split(":", 1)[0].strip()[:CAUSE_CHARS] or "error"


def group_key(cause: str) -> str:
    """A short stable name for a cause, for links and forms."""
    return hashlib.sha256(cause.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _minute(value: Any) -> datetime:
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).replace(second=0, microsecond=0)
    return datetime.strptime(str(value)[:16], "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


class ConsoleQueries:
    """The console's reads (`Store.console`)."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    def _minute_of(self, column: Any) -> Any:
        if self.tools.dialect == "postgresql":
            return func.date_trunc("minute", column)
        if self.tools.dialect == "mysql":
            return func.date_format(column, "%Y-%m-%d %H:%i")
        return func.strftime("%Y-%m-%d %H:%M", column)

    @translate_errors
    async def paused_venues(self, *, limit: int) -> list[dict[str, Any]]:
        """Paused venues, longest paused first."""
        async with self.tools.read() as conn:
            rows = await conn.execute(
                select(venue.c.venue_id, venue.c.paused_at, venue.c.paused_by, venue.c.pause_reason)
                .where(venue.c.paused.is_(True))
                .order_by(venue.c.paused_at, venue.c.venue_id)
                .limit(limit)
            )
            return [dict(r._mapping) for r in rows]

    @translate_errors
    async def accepted_per_minute(self, *, minutes: int = 60) -> tuple[datetime, list[int]]:
        """Deliveries accepted in each of the last `minutes` minutes (oldest first), and the
        first minute's start, on the database's clock."""
        async with self.tools.read() as conn:
            now = await self.tools.now(conn)
            start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
            bucket = self._minute_of(delivery.c.delivered_at).label("minute")
            rows = await conn.execute(
                select(bucket, func.count())
                .where(
                    delivery.c.status == DeliveryStatus.DELIVERED,
                    # `updated_at` is indexed and never older than `delivered_at`.
                    delivery.c.updated_at >= start,
                    delivery.c.delivered_at >= start,
                )
                .group_by(bucket)
            )
            counts = [0] * minutes
            for minute, count in rows:
                index = int((_minute(minute) - start).total_seconds() // 60)
                if 0 <= index < minutes:
                    counts[index] += int(count)
        return start, counts

    def _failing(self, scan_limit: int) -> Any:
        """The newest `scan_limit` dead and retrying deliveries, each with the head of its last
        answer (`ix_mozrest_delivery_failing` reads them in id order without the table)."""
        head = (
            select(func.substr(attempt.c.response_body, 1, ANSWER_HEAD_CHARS))
            .where(attempt.c.delivery_id == delivery.c.id)
            .order_by(attempt.c.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        return (
            select(
                delivery.c.id,
                delivery.c.venue_id,
                delivery.c.status,
                delivery.c.last_status_code,
                delivery.c.last_error,
                delivery.c.updated_at,
                head.label("head"),
            )
            .where(delivery.c.status.in_(FAILING_STATUSES))
            .order_by(delivery.c.id.desc())
            .limit(scan_limit)
            .subquery("failing")
        )

    @translate_errors
    async def failure_groups(self, *, scan_limit: int = GROUP_SCAN_LIMIT) -> FailureGroups:
        """The newest `scan_limit` dead and retrying deliveries grouped by cause, largest
        group first (without their ids: `failure_group` has them).

        The database groups them by what makes a cause (status code, error, the answer's head)
        and by venue and status, so only those few rows reach Python."""
        failing = self._failing(scan_limit)
        error = case((failing.c.last_status_code.is_(None), failing.c.last_error), else_=None)
        keys = (failing.c.last_status_code, error, failing.c.head, failing.c.venue_id)
        async with self.tools.read() as conn:
            rows = (
                await conn.execute(
                    select(
                        *keys,
                        failing.c.status,
                        func.count().label("n"),
                        func.min(failing.c.updated_at).label("first_seen"),
                        func.max(failing.c.updated_at).label("last_seen"),
                        func.max(failing.c.id).label("newest_id"),
                    ).group_by(*keys, failing.c.status)
                )
            ).all()
        groups: dict[str, FailureGroup] = {}
        scanned = 0
        for row in rows:
            cause = cause_of(row.last_status_code, row[1], row.head)
            _add(
                _group(groups, cause, row.last_status_code),
                venue_id=row.venue_id,
                status=row.status,
                count=int(row.n),
                newest_id=int(row.newest_id),
                first_seen=row.first_seen,
                last_seen=row.last_seen,
            )
            scanned += int(row.n)
        ordered = sorted(groups.values(), key=lambda g: (-g.count, -g.newest_id))
        return FailureGroups(
            groups=ordered, scanned=scanned, capped=scanned >= scan_limit, scan_limit=scan_limit
        )

    @translate_errors
    async def failure_group(
        self, key: str, *, scan_limit: int = GROUP_SCAN_LIMIT
    ) -> FailureGroup | None:
        """One failure group of `failure_groups`, with the ids of its dead deliveries."""
        failing = self._failing(scan_limit)
        async with self.tools.read() as conn:
            rows = (await conn.execute(select(failing))).all()
        groups: dict[str, FailureGroup] = {}
        for row in rows:
            cause = cause_of(row.last_status_code, row.last_error, row.head)
            if group_key(cause) == key:
                group = _group(groups, cause, row.last_status_code)
                _add(
                    group,
                    venue_id=row.venue_id,
                    status=row.status,
                    count=1,
                    newest_id=row.id,
                    first_seen=row.updated_at,
                    last_seen=row.updated_at,
                )
                if row.status == "dead":
                    group.dead_ids.append(row.id)
        return groups.get(key)

    @translate_errors
    async def count_requeueable(
        self,
        *,
        status: str,
        venue_id: str | None = None,
        booking_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        delivery_ids: Sequence[int] | None = None,
    ) -> int:
        """How many deliveries `Store.requeue_deliveries` with the same filter would requeue
        now: the same candidates, less the same refusals (newest wins), read without locks."""
        query = requeue_candidates(
            status,
            venue_id=venue_id,
            since=since,
            until=until,
            booking_id=booking_id,
            delivery_ids=delivery_ids,
        )
        candidates = query.with_only_columns(
            delivery.c.id, delivery.c.booking_id, delivery.c.outbox_id
        )
        total, after_id = 0, 0
        async with self.tools.read() as conn:
            while True:
                # One batch at a time, counted in the database: how many it holds, the last id,
                # and how many of them the requeue would not refuse.
                batch = (
                    candidates.where(delivery.c.id > after_id)
                    .order_by(delivery.c.id)
                    .limit(COUNT_BATCH_SIZE)
                    .subquery("candidate")
                )
                counted = (
                    await conn.execute(
                        select(
                            func.count(),
                            func.max(batch.c.id),
                            func.coalesce(func.sum(case((may_requeue(batch), 1), else_=0)), 0),
                        ).select_from(
                            batch.outerjoin(booking, booking.c.booking_id == batch.c.booking_id)
                        )
                    )
                ).one()
                scanned, last_id, allowed = int(counted[0]), counted[1], int(counted[2])
                total += allowed
                if scanned < COUNT_BATCH_SIZE:
                    return total
                after_id = int(last_id)


def _group(groups: dict[str, FailureGroup], cause: str, status_code: int | None) -> FailureGroup:
    key = group_key(cause)
    group = groups.get(key)
    if group is None:
        group = groups[key] = FailureGroup(key=key, status_code=status_code, cause=cause)
    return group


def _add(
    group: FailureGroup,
    *,
    venue_id: str,
    status: str,
    count: int,
    newest_id: int,
    first_seen: datetime,
    last_seen: datetime,
) -> None:
    """`count` deliveries of one venue and status into `group`."""
    group.count += count
    group.venues.add(venue_id)
    group.newest_id = max(group.newest_id, newest_id)
    if status == "dead":
        group.dead += count
    else:
        group.retrying += count
    if group.first_seen is None or first_seen < group.first_seen:
        group.first_seen = first_seen
    if group.last_seen is None or last_seen > group.last_seen:
        group.last_seen = last_seen
