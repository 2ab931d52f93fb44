"""Outcomes: store each attempt, and move its delivery on as `policy.RetryPolicy.settle` says.

An outcome only moves a delivery whose lease token still matches, so a process that lost its
lease cannot undo its successor's work. Accepted states become their bookings' snapshots. A batch
the database refuses for a reason of its answers (not an outage) is recorded one answer at a
time, and an answer refused alone is recorded without its text (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import is_outage, is_row_fault, translate_errors
from app.logs import get_logger, log_event
from app.models import attempt, booking, delivery
from app.policy import RetryPolicy, Verdict
from app.store import bookings
from app.store.records import AttemptResult, Claim, Settled
from app.store.toolkit import RowsRefused, Toolkit, statement
from app.text import storable

log = get_logger("store")

#: Attempts keep at most this much of Mozrest's answer (the admin API shows 4 KiB).
RESPONSE_BODY_LIMIT = 4096
#: What a recorded attempt changes on its delivery (`_apply_changes`).
_CHANGE_FIELDS = ("c_status", "c_next_attempt_at", "c_delivered_at", "c_status_code", "c_error")


@dataclass(slots=True)
class _Recorded:
    """What one batch of answers will write, beside the attempts themselves."""

    changes: list[dict[str, Any]] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)
    snapshots: dict[str, Claim] = field(default_factory=dict)
    """The newest accepted state per booking: its delivery row holds the payload."""
    unwritten: list[Claim] = field(default_factory=list)
    finished_bookings: set[str] = field(default_factory=set)
    unanswered: dict[str, tuple[int, datetime]] = field(default_factory=dict)
    """Per booking: the newest state sent without an answer, and until when it may land."""


def _settle_statement(tools: Toolkit, *, alike: bool) -> Any:
    where = tools.in_param(delivery.c.id, "ids") if alike else delivery.c.id == bindparam("c_id")
    return (
        update(delivery)
        .where(where)
        .values(
            status=bindparam("c_status"),
            next_attempt_at=bindparam("c_next_attempt_at"),
            delivered_at=bindparam("c_delivered_at"),
            last_status_code=bindparam("c_status_code"),
            last_error=bindparam("c_error"),
            attempt_count=delivery.c.attempt_count + 1,
            lease_owner=None,
            lease_token=None,
            lease_expires_at=None,
            updated_at=bindparam("now"),
        )
    )


@statement("outcomes.settle_alike")
def _settle_alike(tools: Toolkit) -> Any:
    return _settle_statement(tools, alike=True)


@statement("outcomes.settle_each")
def _settle_each(tools: Toolkit) -> Any:
    return _settle_statement(tools, alike=False)


@statement("outcomes.insert_attempts")
def _insert_attempts(tools: Toolkit) -> Any:
    return insert(attempt)


@statement("outcomes.snapshot")
def _snapshot(tools: Toolkit) -> Any:
    """The accepted states become their bookings' snapshots, copied from the delivery rows
    inside the database: no payload is encoded here or sent back over the wire."""
    accepted = delivery.alias("accepted")
    return (
        update(booking)
        .where(
            booking.c.booking_id == accepted.c.booking_id,
            tools.in_param(accepted.c.id, "ids"),
            (booking.c.accepted_outbox_id.is_(None))
            | (booking.c.accepted_outbox_id <= accepted.c.outbox_id),
        )
        .values(
            accepted_payload=accepted.c.payload,
            accepted_outbox_id=accepted.c.outbox_id,
            accepted_at=bindparam("now"),
            # An unanswered state no newer than this one no longer matters.
            unconfirmed_outbox_id=case(
                (booking.c.unconfirmed_outbox_id <= accepted.c.outbox_id, None),
                else_=booking.c.unconfirmed_outbox_id,
            ),
            updated_at=bindparam("now"),
        )
    )


@statement("outcomes.unanswered")
def _unanswered(tools: Toolkit) -> Any:
    return (
        update(booking)
        .where(booking.c.booking_id == bindparam("u_booking_id"))
        .values(
            unconfirmed_outbox_id=bindparam("u_outbox_id"),
            quiet_until=bindparam("u_quiet_until"),
            updated_at=bindparam("now"),
        )
    )


class Outcomes:
    """Attempts and what they make of their deliveries (`Store.record`)."""

    def __init__(self, tools: Toolkit, *, retry_policy: RetryPolicy) -> None:
        self.tools = tools
        self.retry_policy = retry_policy

    async def record(self, results: Sequence[AttemptResult], *, worker_id: str) -> list[Settled]:
        """Store attempts and move their deliveries on: delivered, retrying, dead, superseded."""
        try:
            return await self._batch(results, worker_id=worker_id)
        except RowsRefused as refused:
            if len(results) == 1:
                return await self._record_bare(results[0], refused, worker_id=worker_id)
            log_event(
                log,
                logging.WARNING,
                "record.batch_refused",
                attempts=len(results),
                error=type(refused.__cause__).__name__,
            )
        settled: list[Settled] = []
        for result in results:
            try:
                settled += await self._batch([result], worker_id=worker_id)
            except RowsRefused as refused:
                settled += await self._record_bare(result, refused, worker_id=worker_id)
        return settled

    async def _record_bare(
        self, result: AttemptResult, refused: RowsRefused, *, worker_id: str
    ) -> list[Settled]:
        """Record an attempt the database refused, without Mozrest's text; if even that is
        refused, the fault is not the answer's and the error goes up."""
        cause = type(refused.__cause__).__name__
        log_event(
            log,
            logging.WARNING,
            "record.answer_set_aside",
            delivery_id=result.claim.delivery_id,
            error=cause,
        )
        bare = dataclasses.replace(
            result,
            response_body=None,
            error=f"{result.error or 'answer'} (its text could not be stored: {cause})",
        )
        try:
            return await self._batch([bare], worker_id=worker_id)
        except RowsRefused as again:
            raise again.__cause__ or again from None

    @translate_errors
    async def _batch(self, results: Sequence[AttemptResult], *, worker_id: str) -> list[Settled]:
        """One batch in one transaction; `RowsRefused` when the database refused it for a
        reason that is not an outage."""
        if not results:
            return []
        try:
            return await self._transaction(results, worker_id=worker_id)
        except Exception as exc:
            if is_outage(exc) or not is_row_fault(exc):
                raise
            raise RowsRefused([r.claim.delivery_id for r in results]) from exc

    async def _transaction(
        self, results: Sequence[AttemptResult], *, worker_id: str
    ) -> list[Settled]:
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            known = await bookings.lock_bookings(
                self.tools, conn, (r.claim.booking_id for r in results)
            )
            active = await bookings.active_deliveries(self.tools, conn, known, payloads=False)
            await conn.execute(
                self.tools.statement("outcomes.insert_attempts"),
                [_attempt_row(r, worker_id) for r in results],
            )
            recorded = self._decide(results, active, now)
            await self._apply_changes(conn, recorded.changes, now)
            if recorded.snapshots:
                await conn.execute(
                    self.tools.statement("outcomes.snapshot"),
                    {"ids": [c.delivery_id for c in recorded.snapshots.values()], "now": now},
                )
            await self._mark_unanswered(conn, recorded.unanswered, known, now)
            # A request that never reached the wire (no connection) did not send the state.
            await bookings.forget_sent(self.tools, conn, recorded.unwritten)
            await bookings.wake_queued(
                self.tools,
                conn,
                [active.get(b, []) for b in recorded.finished_bookings],
                done={r.claim.delivery_id for r in results},
                now=now,
            )
            return recorded.settled

    def _decide(
        self, results: Sequence[AttemptResult], active: dict[str, list[Any]], now: datetime
    ) -> _Recorded:
        """How each answer moves its delivery, where this process still holds the lease."""
        recorded = _Recorded()
        # A claimed delivery no longer active (cancelled, superseded) is not ours to move.
        current = {d.id: d for rows in active.values() for d in rows}
        for result in results:
            claim = result.claim
            if result.status_code is None and result.written:
                # No answer: the request may still land, up to the end of its lease.
                outbox_id, until = recorded.unanswered.get(
                    claim.booking_id, (claim.outbox_id, claim.lease_expires_at)
                )
                recorded.unanswered[claim.booking_id] = (
                    max(outbox_id, claim.outbox_id),
                    max(until, claim.lease_expires_at),
                )
            if result.verdict is Verdict.DELIVERED:
                newest = recorded.snapshots.get(claim.booking_id)
                if newest is None or newest.outbox_id < claim.outbox_id:
                    recorded.snapshots[claim.booking_id] = claim
            row = current.get(claim.delivery_id)
            if row is None or row.lease_token != claim.lease_token:
                recorded.settled.append(Settled(claim.delivery_id, claim.booking_id, None))
                continue
            if result.status_code is not None or not result.written:
                recorded.finished_bookings.add(claim.booking_id)
            if not result.written:
                recorded.unwritten.append(claim)
            self._settle(result, active.get(claim.booking_id, []), now, recorded)
        return recorded

    def _settle(
        self, result: AttemptResult, active: list[Any], now: datetime, recorded: _Recorded
    ) -> None:
        claim = result.claim
        newer_waiting = any(d.outbox_id > claim.outbox_id for d in active)
        settlement = self.retry_policy.settle(
            result.verdict,
            now=now,
            attempt_count=claim.attempt_count,
            retry_window_started_at=claim.retry_window_started_at,
            lease_expires_at=claim.lease_expires_at,
            outbox_created_at=claim.outbox_created_at,
            answered=result.status_code is not None,
            written=result.written,
            retry_after_seconds=result.retry_after_seconds,
            newer_waiting=newer_waiting,
        )
        error = settlement.error or result.error
        recorded.changes.append(
            {
                "c_id": claim.delivery_id,
                "c_status": settlement.status,
                "c_next_attempt_at": settlement.next_attempt_at,
                "c_delivered_at": settlement.delivered_at,
                "c_status_code": result.status_code,
                "c_error": storable(error, limit_bytes=RESPONSE_BODY_LIMIT),
            }
        )
        recorded.settled.append(
            Settled(
                claim.delivery_id,
                claim.booking_id,
                settlement.status,
                settlement.next_attempt_at,
                settlement.lag_seconds,
                newer_waiting,
                error=error,
            )
        )

    async def _apply_changes(
        self, conn: AsyncConnection, changes: list[dict[str, Any]], now: datetime
    ) -> None:
        """Move recorded deliveries on. Deliveries that end alike (typically: delivered, HTTP
        200) are moved by one statement on their ids; the rest row by row."""
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for change in changes:
            groups[tuple(change[k] for k in _CHANGE_FIELDS)].append(change["c_id"])
        one_by_one = []
        for key, ids in groups.items():
            values = dict(zip(_CHANGE_FIELDS, key, strict=True))
            if len(ids) > 1:
                await conn.execute(
                    self.tools.statement("outcomes.settle_alike"),
                    {"ids": ids, "now": now, **values},
                )
            else:
                one_by_one.append({"c_id": ids[0], "now": now, **values})
        if one_by_one:
            await conn.execute(self.tools.statement("outcomes.settle_each"), one_by_one)

    async def _mark_unanswered(
        self,
        conn: AsyncConnection,
        unanswered: dict[str, tuple[int, datetime]],
        known: dict[str, Any],
        now: datetime,
    ) -> None:
        """Keep a booking quiet while an unanswered request may still land, and mark its
        snapshot in doubt until a state at least as new is accepted."""
        rows = [
            {
                "u_booking_id": booking_id,
                "u_outbox_id": max(outbox_id, known[booking_id].unconfirmed_outbox_id or 0),
                "u_quiet_until": max(until, bookings.quiet_until(known[booking_id], now)),
                "now": now,
            }
            for booking_id, (outbox_id, until) in unanswered.items()
            if booking_id in known
        ]
        if rows:
            await conn.execute(self.tools.statement("outcomes.unanswered"), rows)


def _attempt_row(result: AttemptResult, worker_id: str) -> dict[str, Any]:
    return {
        "delivery_id": result.claim.delivery_id,
        "worker_id": worker_id,
        "started_at": result.started_at,
        "duration_ms": result.duration_ms,
        "status_code": result.status_code,
        "error": storable(result.error, limit_bytes=RESPONSE_BODY_LIMIT),
        "response_body": storable(result.response_body, limit_bytes=RESPONSE_BODY_LIMIT),
    }
