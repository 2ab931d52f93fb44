"""Ingest: outbox rows to outcomes and deliveries, one batch per transaction.

One ingester at a time: a batch holds the `ingest` row of `mozrest_lock` (`FOR UPDATE SKIP
LOCKED`; SQLite's `BEGIN IMMEDIATE` is the same thing), so rows are decided in id order. Each
batch reads the rows and their bookings, decides every booking's newest state with
`policy.decide` (and, when it may lease, `policy.plan_lease`), then writes
(`app.store.ingest_writes`).

A batch the database refuses for a reason of its rows (not an outage: `db.is_outage`) is taken
again one row at a time, and the row that fails alone is set aside as `invalid`: one odd row
never stalls the rows behind it (docs/reliability.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Integer,
    LargeBinary,
    Text,
    bindparam,
    cast,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from app import tracing
from app.contract import ContractError, State, parse_row
from app.db import clock_now, is_outage, is_row_fault, translate_errors
from app.logs import get_logger, log_event
from app.models import outbox
from app.policy import BookingView, Decision, Waiting, decide, plan_lease
from app.states import DeliveryStatus, Outcome
from app.store import bookings
from app.store.ingest_writes import RowOutcome, Writes, write_batch
from app.store.rate import RateLimit
from app.store.records import IngestReport, LeaseRequest
from app.store.toolkit import RowsRefused, Toolkit, statement
from app.store.venues import Rules, VenueRules, paused_now

log = get_logger("store")


@dataclass(slots=True)
class _Batch:
    """One batch's rows as parsed: outcomes so far, and each booking's newest valid state."""

    rows: Sequence[Any]
    now: datetime
    outcomes: dict[int, RowOutcome] = field(default_factory=dict)
    newest: dict[str, tuple[Any, State]] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)
    """Bookings whose older states in this batch had a send status (seated, then finished
    before the seated state left, is sent as finished)."""
    paused: set[str] = field(default_factory=set)
    """Venues paused now: their new deliveries are parked."""


@statement("ingest.unprocessed")
def _unprocessed(tools: Toolkit) -> Any:
    return (
        select(
            outbox.c.id,
            outbox.c.booking_id,
            outbox.c.venue_id,
            # SQLite hands back whatever bytes an RMS wrote: read them as bytes, so text that is
            # not UTF-8 makes its row invalid, not the batch fail.
            cast(outbox.c.payload, LargeBinary if tools.dialect == "sqlite" else Text).label(
                "payload_text"
            ),
            outbox.c.created_at,
            # As for the payload: bytes on SQLite, so a value that is not text is ignored.
            (
                cast(outbox.c.traceparent, LargeBinary)
                if tools.dialect == "sqlite"
                else outbox.c.traceparent
            ).label("traceparent"),
            clock_now().label("now"),  # the clock, without a round trip of its own
        )
        .where(outbox.c.processed_at.is_(None))
        .order_by(outbox.c.id)
        .limit(bindparam("limit", type_=Integer))
    )


@statement("ingest.set_aside")
def _set_aside_statement(tools: Toolkit) -> Any:
    return (
        update(outbox)
        .where(tools.in_param(outbox.c.id, "ids"), outbox.c.processed_at.is_(None))
        .values(
            processed_at=bindparam("now"), outcome=str(Outcome.INVALID), error=bindparam("error")
        )
    )


class Ingest:
    """Outbox rows to outcomes and deliveries (`Store.ingest`)."""

    def __init__(
        self,
        tools: Toolkit,
        *,
        send_statuses: frozenset[str],
        send_items: bool,
        max_payload_bytes: int,
        rules: VenueRules,
        rate: RateLimit,
    ) -> None:
        self.tools = tools
        self.send_statuses = send_statuses
        self.send_items = send_items
        self.max_payload_bytes = max_payload_bytes
        self.rules = rules
        self.rate = rate

    async def run(self, *, limit: int, lease: LeaseRequest | None = None) -> IngestReport | None:
        """Give the oldest unprocessed outbox rows their outcome; None if another process is
        ingesting right now. With `lease`, new deliveries that may go at once are leased to
        that worker in the same transaction (as `claim_due` would a moment later)."""
        try:
            return await self._batch(limit=limit, lease=lease)
        except RowsRefused as refused:
            log_event(
                log,
                logging.WARNING,
                "ingest.batch_refused",
                rows=len(refused.ids),
                error=type(refused.__cause__).__name__,
            )
        merged = IngestReport()
        for _ in range(limit):
            try:
                report = await self._batch(limit=1, lease=None)
            except RowsRefused as refused:
                report = await self._set_aside(refused.ids, refused.__cause__)
            if report is None or not report.rows:
                break
            merged = merged.merge(report)
        return merged

    @translate_errors
    async def _set_aside(self, row_ids: list[int], cause: BaseException | None) -> IngestReport:
        """Mark rows the database refused to process `invalid`, naming the refusal (never its
        text, which can quote the row's values)."""
        error = (
            f"payload: the database refused this row ({type(cause).__name__}); it was set "
            "aside so that the rows after it proceed"
        )
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            result = await conn.execute(
                self.tools.statement("ingest.set_aside"),
                {"ids": row_ids, "now": now, "error": error},
            )
        count = result.rowcount or 0
        log_event(log, logging.WARNING, "outbox.set_aside", outbox_ids=row_ids, error=error)
        return IngestReport(rows=count, outcomes=Counter({str(Outcome.INVALID): count}))

    @translate_errors
    async def _batch(self, *, limit: int, lease: LeaseRequest | None) -> IngestReport | None:
        """One batch in one transaction; `RowsRefused` when the database refused it for a
        reason that is not an outage."""
        async with self.tools.write() as conn:
            if not await self.tools.take_lock(conn, "ingest"):
                return None
            rows = (
                await conn.execute(self.tools.statement("ingest.unprocessed"), {"limit": limit})
            ).all()
            if not rows:
                return IngestReport()
            try:
                with tracing.ingest_span(rows):
                    return await self._decide(conn, rows, limit=limit, lease=lease)
            except Exception as exc:
                if is_outage(exc) or not is_row_fault(exc):
                    raise
                raise RowsRefused([row.id for row in rows]) from exc

    def _parse(self, rows: Sequence[Any], rules: Rules) -> _Batch:
        """Validate each row (items stripped where the venue, or RELAY_SEND_ITEMS, says so); an
        older state of a booking in the batch is superseded by its newer one at once."""
        batch = _Batch(rows=rows, now=max(row.now for row in rows))
        for row in rows:
            try:
                state = parse_row(
                    row.payload_text,
                    booking_id=row.booking_id,
                    venue_id=row.venue_id,
                    send_items=rules.sends_items(row.venue_id, self.send_items),
                    max_payload_bytes=self.max_payload_bytes,
                )
            except ContractError as exc:
                batch.outcomes[row.id] = (Outcome.INVALID, str(exc))
                continue
            previous = batch.newest.get(row.booking_id)
            if previous is not None:
                batch.outcomes[previous[0].id] = (Outcome.SUPERSEDED, None)
                if previous[1]["status"] in self.send_statuses:
                    batch.reached.add(row.booking_id)
            batch.newest[row.booking_id] = (row, state)
        return batch

    async def _decide(
        self, conn: AsyncConnection, rows: Sequence[Any], *, limit: int, lease: LeaseRequest | None
    ) -> IngestReport:
        """Read what the batch's bookings hold, decide each newest state, write."""
        rules = await self.rules.current(conn)
        batch = self._parse(rows, rules)
        known = await bookings.lock_bookings(self.tools, conn, batch.newest, with_snapshot=True)
        # A booking with no row yet has no deliveries (both are created together, and a booking
        # row is pruned only when it has none active): the read covers known bookings only.
        active = await bookings.active_deliveries(self.tools, conn, known)
        # A full batch may have left newer rows of these bookings unread: those bookings wait
        # for the next batch to decide, as `claim_due` makes them wait.
        undecided: set[str] = set()
        if lease is not None and lease.limit > 0 and len(rows) >= limit:
            undecided = await bookings.unread_after(
                self.tools, conn, dict.fromkeys(batch.newest, rows[-1].id)
            )
        # Deliveries of a paused venue are made parked (checked under the venue's lock).
        batch.paused = await paused_now(
            self.tools,
            conn,
            (row.venue_id for row, _ in batch.newest.values() if row.venue_id in rules.paused),
        )
        writes = Writes()
        for booking_id in sorted(batch.newest):
            self._decide_booking(
                batch, booking_id, known.get(booking_id), active[booking_id], writes,
                may_lease=lease is not None and booking_id not in undecided,
            )  # fmt: skip
        claims = await write_batch(
            self.tools,
            conn,
            writes,
            now=batch.now,
            outcomes=batch.outcomes,
            known=known,
            lease=lease,
            rate=self.rate,
        )
        return IngestReport(
            rows=len(rows),
            outcomes=Counter(str(outcome) for outcome, _ in batch.outcomes.values()),
            queued=len(writes.new_deliveries) - len(claims),
            claims=claims,
        )

    def _decide_booking(
        self,
        batch: _Batch,
        booking_id: str,
        known: Any,
        active: list[Any],
        writes: Writes,
        *,
        may_lease: bool,
    ) -> None:
        """Decide one booking's newest state of the batch into `writes`."""
        row, state = batch.newest[booking_id]
        now = batch.now
        if known is not None and row.id <= known.last_outbox_id:
            batch.outcomes[row.id] = (Outcome.SUPERSEDED, None)  # an older row arriving late
            return
        in_flight = [d for d in active if bookings.leased(d, now)]
        queued = [d for d in active if not bookings.leased(d, now)]
        # Only the newest queued state matters; older ones (left by a crash) go now.
        writes.superseded.extend(queued[:-1])
        view = BookingView(
            accepted=known.accepted_payload if known is not None else None,
            in_flight=in_flight[-1].payload if in_flight else None,
            queued=queued[-1].payload if queued else None,
            sent_once=known is not None and known.sent_outbox_id is not None,
            reached_send_status=booking_id in batch.reached
            or (known is not None and known.reached_send_status),
            accepted_uncertain=known is not None and bookings.unconfirmed(known),
        )
        decision = decide(state, view, self.send_statuses)
        batch.outcomes[row.id] = (decision.outcome, decision.note)
        if decision.supersede_queued and queued:
            writes.superseded.append(queued[-1])
        values = {
            "booking_id": booking_id,
            "venue_id": row.venue_id,
            "last_outbox_id": row.id,
            "sent_outbox_id": None,
            "reached_send_status": view.reached_send_status
            or state["status"] in self.send_statuses,
        }
        (writes.touched_bookings if known is not None else writes.new_bookings).append(values)
        if decision.outcome is not Outcome.QUEUED:
            return
        delivery_row = self._new_delivery(row, state, decision, in_flight, known, now)
        writes.new_deliveries.append(delivery_row)
        if row.venue_id in batch.paused:
            delivery_row["next_attempt_at"] = None  # parked until the venue resumes
            return
        plan = plan_lease(
            [
                *(Waiting(d.outbox_id, d.payload["status"], True, False) for d in in_flight),
                Waiting(row.id, state["status"], False, delivery_row["next_attempt_at"] <= now),
            ],
            quiet=bookings.quiet_until(known, now) > now,
            sent_outbox_id=known.sent_outbox_id if known is not None else None,
            reached_send_status=values["reached_send_status"],
        )
        if may_lease and plan.lease is not None:
            # It may be leased here, if the worker has a slot for it (`_write`).
            writes.leasable.append((delivery_row, values))

    @staticmethod
    def _new_delivery(
        row: Any,
        state: State,
        decision: Decision,
        in_flight: list[Any],
        known: Any,
        now: datetime,
    ) -> dict[str, Any]:
        # Behind a request still on the wire, it waits for that one's outcome (`record` wakes
        # it) or, at worst, for its lease to end; after an unanswered one, for its quiet time.
        due = max(
            now,
            in_flight[-1].lease_expires_at if in_flight else now,
            bookings.quiet_until(known, now),
        )
        return {
            "booking_id": row.booking_id,
            "venue_id": row.venue_id,
            "outbox_id": row.id,
            "payload": state,
            "status": DeliveryStatus.PENDING,
            "attempt_count": 0,
            "changed_fields": decision.changed_fields,
            "warnings": decision.warnings,
            "created_at": now,
            "updated_at": now,
            "next_attempt_at": due,
            "outbox_created_at": row.created_at,
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
            "traceparent": tracing.delivery_traceparent(
                row.traceparent, booking_id=row.booking_id, venue_id=row.venue_id, outbox_id=row.id
            ),
        }
