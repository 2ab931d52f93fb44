"""All of the relay's SQL: ingest, claim, record, release, heartbeats, retention, admin reads.

Concurrency rests on three rules (docs/adr/0002-claims-and-leases.md):

1. One ingester at a time: ingest holds the `ingest` row of `mozrest_lock` (`FOR UPDATE SKIP
   LOCKED`; SQLite's `BEGIN IMMEDIATE` is the same thing), so rows are decided in id order.
2. The booking row is the booking's mutex: every transaction that changes a booking's deliveries
   first locks its `mozrest_booking` row, always in `booking_id` order so two transactions
   cannot deadlock. The claim skips locked bookings rather than waiting.
3. A claim is a lease on one delivery (owner, token, expiry, all on the database clock). At most
   one delivery per booking holds a live lease, and an outcome only moves a delivery whose lease
   token still matches, so a process that lost its lease cannot undo its successor's work.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Integer,
    LargeBinary,
    String,
    Text,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    null,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.contract import ContractError, State, parse_row
from app.db import READ_ONLY, StoreError, clock_now, is_outage, translate_errors
from app.logs import get_logger, log_event
from app.models import (
    ACTIVE_PREDICATE,
    ACTIVE_STATUSES,
    attempt,
    booking,
    delivery,
    lock,
    outbox,
    worker,
)
from app.policy import BookingView, Outcome, RetryPolicy, Verdict, decide, may_send_first
from app.store_admin import AdminQueries
from app.text import storable

#: `status IN ('pending', 'retrying')` as literal SQL, the very predicate of the partial index
#: `ix_mozrest_delivery_due`: with bound parameters a prepared statement's generic plan could not
#: prove the index applies.
_ACTIVE = text(ACTIVE_PREDICATE)
#: What a recorded attempt changes on its delivery (`Store._apply_changes`).
_CHANGE_FIELDS = ("c_status", "c_next_attempt_at", "c_delivered_at", "c_status_code", "c_error")
#: Attempts keep at most this much of Mozrest's answer.
RESPONSE_BODY_LIMIT = 4096

log = get_logger("store")


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What one ingest batch decided."""

    rows: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    queued: int = 0
    """New deliveries left for `claim_due`."""
    claims: list[Claim] = field(default_factory=list)
    """New deliveries leased to the ingesting worker (`LeaseRequest`)."""

    def merge(self, other: IngestReport) -> IngestReport:
        return IngestReport(
            rows=self.rows + other.rows,
            outcomes=self.outcomes + other.outcomes,
            queued=self.queued + other.queued,
            claims=self.claims + other.claims,
        )


class _RowsFailed(Exception):
    """The database refused work on these rows, for a reason of theirs (not an outage)."""

    def __init__(self, row_ids: list[int]) -> None:
        super().__init__(f"{len(row_ids)} rows refused")
        self.row_ids = row_ids


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Lease deliveries to `worker_id` for `seconds` (see `Store.ingest`): at most `limit`, and,
    with `take`, only as many as `take(wanted)` grants when the transaction knows how many it
    could lease (the worker's free request slots at that instant)."""

    worker_id: str
    limit: int
    seconds: float
    take: Callable[[int], int] | None = None

    def grant(self, wanted: int) -> int:
        wanted = min(wanted, self.limit)
        return wanted if self.take is None else max(0, min(wanted, self.take(wanted)))


@dataclass(frozen=True, slots=True)
class Claim:
    """A leased delivery: this process may POST `payload` until `lease_expires_at`."""

    delivery_id: int
    booking_id: str
    venue_id: str
    outbox_id: int
    payload: State
    attempt_count: int
    created_at: datetime
    outbox_created_at: datetime | None
    retry_window_started_at: datetime
    """RELAY_RETRY_MAX_AGE counts from here: creation, or the operator's last requeue."""
    lease_token: str
    lease_expires_at: datetime
    previous_sent_outbox_id: int | None = None
    """The booking's "sent once" mark before this claim set it: a claim given back unsent
    restores it, as if never made."""


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One webhook request and Mozrest's answer, or the lack of one."""

    claim: Claim
    verdict: Verdict
    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    response_body: str | None = None
    retry_after_seconds: float | None = None
    written: bool = True
    """Whether the state reached the wire: unanswered, it may still land; unwritten (no
    connection), it was never sent."""


@dataclass(frozen=True, slots=True)
class Settled:
    """How a recorded attempt left its delivery, for logs and metrics."""

    delivery_id: int
    booking_id: str
    status: str | None
    """The delivery's new status, or None when this process no longer held the lease."""
    next_attempt_at: datetime | None = None
    lag_seconds: float | None = None
    newer_waiting: bool = False
    """A newer state of the booking is queued behind this one (and may go now)."""
    error: str | None = None
    """The delivery's `last_error` as recorded."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: str
    hostname: str
    pid: int
    role: str


class Store(AdminQueries):
    """The relay's only door to the database. Methods are transactions."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        send_statuses: frozenset[str] = frozenset({"seated"}),
        send_items: bool = True,
        max_payload_bytes: int = 65536,
        retry_policy: RetryPolicy | None = None,
        credentials_cooldown_seconds: float = 10.0,
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.send_statuses = send_statuses
        self.send_items = send_items
        self.max_payload_bytes = max_payload_bytes
        self.retry_policy = dataclasses.replace(
            retry_policy or RetryPolicy(), credentials_cooldown_seconds=credentials_cooldown_seconds
        )
        self._reader = engine.execution_options(**{READ_ONLY: True})
        self._statements: dict[Hashable, Any] = {}

    # -- plumbing -------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.connect() as conn:
            yield conn

    def _statement(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The hot path's statements, built once: building one (and its cache key) cost
        SQLAlchemy more than executing it from its compiled cache. Their variable parts are
        bound parameters."""
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = build()
        return statement

    async def _now(self, conn: AsyncConnection) -> datetime:
        statement = self._statement("now", lambda: select(clock_now()))
        value: datetime = (await conn.execute(statement)).scalar_one()
        return value

    async def _take_lock(self, conn: AsyncConnection, name: str) -> bool:
        """Hold the named process-wide mutex for this transaction, or False if another has it."""
        statement = self._statement(
            "lock",
            lambda: (
                select(lock.c.name)
                .where(lock.c.name == bindparam("name"))
                .with_for_update(skip_locked=True)
            ),
        )
        row = (await conn.execute(statement, {"name": name})).first()
        return row is not None

    def _in(self, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
        """`column IN (values)`; on PostgreSQL `column = ANY(:array)`, one parameter however
        many values, so one cached statement (and one server-side prepared statement) serves
        every batch size, and binding costs the driver one array rather than a placeholder each.
        """
        return self._in_param(column, None, list(values))

    def _in_param(
        self, column: Any, name: str | None, values: list[Any] | None = None
    ) -> ColumnElement[bool]:
        """`_in` for a prebuilt statement: the list is the bound parameter `name`."""
        if self.dialect != "postgresql":
            return column.in_(bindparam(name, values, expanding=True))
        item = BigInteger() if isinstance(column.type, BigInteger) else String()
        return column == any_(bindparam(name, values, type_=ARRAY(item)))

    async def _lock_bookings(
        self,
        conn: AsyncConnection,
        booking_ids: Iterable[str],
        *,
        skip_locked: bool = False,
        with_snapshot: bool = False,
    ) -> dict[str, Any]:
        """Lock booking rows in `booking_id` order (the deadlock-free order) and return them;
        the snapshot's payload only when asked (only ingest decides against it)."""
        ids = sorted(set(booking_ids))
        if not ids:
            return {}
        statement = self._statement(
            ("lock_bookings", skip_locked, with_snapshot),
            lambda: (
                select(
                    *(c for c in booking.c if with_snapshot or c is not booking.c.accepted_payload)
                )
                .where(self._in_param(booking.c.booking_id, "ids"))
                .order_by(booking.c.booking_id)
                .with_for_update(skip_locked=skip_locked)
            ),
        )
        rows = await conn.execute(statement, {"ids": ids})
        return {row.booking_id: row for row in rows}

    async def _active_deliveries(
        self, conn: AsyncConnection, booking_ids: Iterable[str], *, payloads: bool = True
    ) -> dict[str, list[Any]]:
        """Pending and retrying deliveries of these bookings, oldest state first.

        The status is filtered here, not in SQL: with `status IN (...)` in the query, PostgreSQL
        planned it onto the admin `(status, id)` index whenever statistics lagged a burst, and
        read every active delivery of the relay to find a few bookings' (hundreds of index
        entries per delivery). By booking id alone only the booking index applies; terminal
        rows of a booking's history come back without their payloads, and every row does
        without `payloads` (record needs none: decoding them cost as much as the query).
        """
        ids = sorted(set(booking_ids))
        grouped: dict[str, list[Any]] = defaultdict(list)
        if not ids:
            return grouped

        def build() -> Any:
            active = delivery.c.status.in_(ACTIVE_STATUSES)
            payload = case((active, delivery.c.payload), else_=null()) if payloads else null()
            return (
                select(
                    delivery.c.id,
                    delivery.c.booking_id,
                    delivery.c.venue_id,
                    delivery.c.outbox_id,
                    payload.label("payload"),
                    delivery.c.status,
                    delivery.c.attempt_count,
                    delivery.c.created_at,
                    delivery.c.outbox_created_at,
                    delivery.c.requeued_at,
                    delivery.c.next_attempt_at,
                    delivery.c.lease_token,
                    delivery.c.lease_expires_at,
                )
                .where(self._in_param(delivery.c.booking_id, "ids"))
                .order_by(delivery.c.outbox_id, delivery.c.id)
            )

        rows = await conn.execute(self._statement(("active", payloads), build), {"ids": ids})
        for row in rows:
            if row.status in ACTIVE_STATUSES:
                grouped[row.booking_id].append(row)
        return grouped

    # -- ingest ---------------------------------------------------------------------------

    async def ingest(self, *, limit: int, lease: LeaseRequest | None = None) -> IngestReport | None:
        """Give the oldest unprocessed outbox rows their outcome; None if another process is
        ingesting right now.

        With `lease`, a new delivery whose booking has nothing on the wire and nothing newer
        waiting is leased to that worker in the same transaction, as `claim_due` would lease it
        a moment later: the claim's own transaction (and its re-reads of the same bookings) is
        saved for the common case of a state that can go at once.

        A batch the database refuses for a reason of its rows (not an outage: `db.is_outage`)
        is taken again one row at a time, and the row that fails alone is set aside as
        `invalid`: one odd row never stalls the rows behind it.
        """
        try:
            return await self._ingest_batch(limit=limit, lease=lease)
        except _RowsFailed as failed:
            log_event(
                log,
                logging.WARNING,
                "ingest.batch_refused",
                rows=len(failed.row_ids),
                error=type(failed.__cause__).__name__,
            )
        merged = IngestReport()
        for _ in range(limit):
            try:
                report = await self._ingest_batch(limit=1, lease=None)
            except _RowsFailed as failed:
                report = await self._set_aside(failed.row_ids, failed.__cause__)
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
        async with self._write() as conn:
            now = await self._now(conn)
            result = await conn.execute(
                update(outbox)
                .where(self._in(outbox.c.id, row_ids), outbox.c.processed_at.is_(None))
                .values(processed_at=now, outcome=str(Outcome.INVALID), error=error)
            )
        count = result.rowcount or 0
        log_event(log, logging.WARNING, "outbox.set_aside", outbox_ids=row_ids, error=error)
        return IngestReport(rows=count, outcomes=Counter({str(Outcome.INVALID): count}))

    @translate_errors
    async def _ingest_batch(self, *, limit: int, lease: LeaseRequest | None) -> IngestReport | None:
        """`ingest` of one batch in one transaction; `_RowsFailed` when the database refused it
        for a reason that is not an outage."""
        async with self._write() as conn:
            if not await self._take_lock(conn, "ingest"):
                return None
            statement = self._statement(
                "unprocessed",
                lambda: (
                    select(
                        outbox.c.id,
                        outbox.c.booking_id,
                        outbox.c.venue_id,
                        # SQLite hands back whatever bytes an RMS wrote: read them as bytes,
                        # so text that is not UTF-8 makes its row invalid, not the batch fail.
                        cast(
                            outbox.c.payload,
                            LargeBinary if self.dialect == "sqlite" else Text,
                        ).label("payload_text"),
                        outbox.c.created_at,
                        clock_now().label("now"),  # the clock, without a round trip of its own
                    )
                    .where(outbox.c.processed_at.is_(None))
                    .order_by(outbox.c.id)
                    .limit(bindparam("limit", type_=Integer))
                ),
            )
            rows = (await conn.execute(statement, {"limit": limit})).all()
            if not rows:
                return IngestReport()
            try:
                return await self._decide_rows(conn, rows, limit=limit, lease=lease)
            except Exception as exc:
                if is_outage(exc):
                    raise
                raise _RowsFailed([row.id for row in rows]) from exc

    async def _decide_rows(
        self, conn: AsyncConnection, rows: Sequence[Any], *, limit: int, lease: LeaseRequest | None
    ) -> IngestReport:
        """Decide a batch of outbox rows, under the ingest lock (`_ingest_batch`)."""
        leasing = lease is not None and lease.limit > 0
        now = max(row.now for row in rows)
        outcomes: dict[int, tuple[Outcome, str | None]] = {}
        newest: dict[str, tuple[Any, State]] = {}
        # Bookings whose states in this batch reached a send status before their newest one
        # (seated, then finished before the seated state left, is sent as finished).
        reached: set[str] = set()
        for row in rows:
            try:
                state = parse_row(
                    row.payload_text,
                    booking_id=row.booking_id,
                    venue_id=row.venue_id,
                    send_items=self.send_items,
                    max_payload_bytes=self.max_payload_bytes,
                )
            except ContractError as exc:
                outcomes[row.id] = (Outcome.INVALID, str(exc))
                continue
            previous = newest.get(row.booking_id)
            if previous is not None:
                outcomes[previous[0].id] = (Outcome.SUPERSEDED, None)
                if previous[1]["status"] in self.send_statuses:
                    reached.add(row.booking_id)
            newest[row.booking_id] = (row, state)

        bookings = await self._lock_bookings(conn, newest, with_snapshot=True)
        # A booking with no row yet has no deliveries (both are created together, and a
        # booking row is pruned only when it has none active): skip the read for a batch of
        # new bookings.
        active = await self._active_deliveries(conn, bookings)
        # A full batch may have left newer rows of these bookings unread: those bookings
        # wait for the next batch to decide, as `claim_due` makes them wait.
        undecided: set[str] = set()
        if leasing and len(rows) >= limit:
            last = rows[-1].id
            undecided = await self._unread_after(conn, dict.fromkeys(newest, last))
        new_bookings: list[dict[str, Any]] = []
        touched_bookings: list[dict[str, Any]] = []
        new_deliveries: list[dict[str, Any]] = []
        superseded: list[Any] = []
        leasable: list[tuple[dict[str, Any], dict[str, Any]]] = []
        expires = now + timedelta(seconds=lease.seconds) if lease is not None else now
        token = uuid.uuid4().hex
        for booking_id in sorted(newest):
            row, state = newest[booking_id]
            known = bookings.get(booking_id)
            if known is not None and row.id <= known.last_outbox_id:
                outcomes[row.id] = (Outcome.SUPERSEDED, None)
                continue
            in_flight = [d for d in active[booking_id] if _leased(d, now)]
            queued = [d for d in active[booking_id] if not _leased(d, now)]
            # Only the newest queued state matters; older ones (left by a crash) go now.
            superseded.extend(queued[:-1])
            view = BookingView(
                accepted=known.accepted_payload if known is not None else None,
                in_flight=in_flight[-1].payload if in_flight else None,
                queued=queued[-1].payload if queued else None,
                sent_once=known is not None and known.sent_outbox_id is not None,
                reached_send_status=booking_id in reached
                or (known is not None and known.reached_send_status),
                accepted_uncertain=known is not None and _unconfirmed(known),
            )
            decision = decide(state, view, self.send_statuses)
            outcomes[row.id] = (decision.outcome, decision.note)
            if decision.supersede_queued and queued:
                superseded.append(queued[-1])
            values = {
                "booking_id": booking_id,
                "venue_id": row.venue_id,
                "last_outbox_id": row.id,
                "sent_outbox_id": None,
                "reached_send_status": view.reached_send_status
                or state["status"] in self.send_statuses,
            }
            if decision.outcome is Outcome.QUEUED:
                # Behind a request still on the wire, it waits for that one's outcome
                # (`record` wakes it) or, at worst, for its lease to end.
                due = max(
                    now,
                    in_flight[-1].lease_expires_at if in_flight else now,
                    _quiet_until(known, now),
                )
                delivery_row = {
                    "booking_id": booking_id,
                    "venue_id": row.venue_id,
                    "outbox_id": row.id,
                    "payload": state,
                    "status": "pending",
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
                }
                if lease is not None and due <= now and booking_id not in undecided:
                    # Due now, nothing on the wire: it may be leased here (`claim_due`'s
                    # rules), if the worker has a slot for it (below).
                    leasable.append((delivery_row, values))
                new_deliveries.append(delivery_row)
            (touched_bookings if known is not None else new_bookings).append(values)

        leased: dict[int, dict[str, Any]] = {}
        if lease is not None and leasable:
            leasable.sort(key=lambda pair: pair[0]["outbox_id"])  # oldest states first
            for delivery_row, values in leasable[: lease.grant(len(leasable))]:
                delivery_row.update(
                    lease_owner=lease.worker_id,
                    lease_token=token,
                    lease_expires_at=expires,
                    next_attempt_at=expires,
                )
                leased[delivery_row["outbox_id"]] = delivery_row
                values["sent_outbox_id"] = delivery_row["outbox_id"]
        if new_bookings:
            await conn.execute(
                insert(booking),
                [dict(b, created_at=now, updated_at=now) for b in new_bookings],
            )
        if touched_bookings:
            await conn.execute(
                update(booking)
                .where(booking.c.booking_id == bindparam("b_booking_id"))
                .values(
                    last_outbox_id=bindparam("b_last_outbox_id"),
                    sent_outbox_id=func.coalesce(
                        bindparam("b_sent_outbox_id", type_=BigInteger),
                        booking.c.sent_outbox_id,
                    ),
                    reached_send_status=bindparam("b_reached_send_status"),
                    updated_at=now,
                ),
                [
                    {
                        "b_booking_id": b["booking_id"],
                        "b_last_outbox_id": b["last_outbox_id"],
                        "b_sent_outbox_id": b["sent_outbox_id"],
                        "b_reached_send_status": b["reached_send_status"],
                    }
                    for b in touched_bookings
                ],
            )
        await self._supersede(conn, superseded, now)
        claims: list[Claim] = []
        if new_deliveries:
            sent_before = {b: row.sent_outbox_id for b, row in bookings.items()}
            ids = await self._insert_deliveries(conn, new_deliveries, want=leased)
            claims = [
                Claim(
                    delivery_id=ids[outbox_id],
                    booking_id=d["booking_id"],
                    venue_id=d["venue_id"],
                    outbox_id=outbox_id,
                    payload=d["payload"],
                    attempt_count=0,
                    created_at=now,
                    outbox_created_at=d["outbox_created_at"],
                    retry_window_started_at=now,
                    lease_token=token,
                    lease_expires_at=expires,
                    previous_sent_outbox_id=sent_before.get(d["booking_id"]),
                )
                for outbox_id, d in leased.items()
            ]
        await self._mark_processed(conn, outcomes, now)
        return IngestReport(
            rows=len(rows),
            outcomes=Counter(str(outcome) for outcome, _ in outcomes.values()),
            queued=len(new_deliveries) - len(claims),
            claims=claims,
        )

    async def _insert_deliveries(
        self, conn: AsyncConnection, rows: list[dict[str, Any]], *, want: Iterable[int]
    ) -> dict[int, int]:
        """Insert deliveries; return the ids of those whose outbox ids are in `want`."""
        wanted = set(want)
        if not wanted:
            await conn.execute(insert(delivery), rows)
            return {}
        if self.engine.dialect.insert_executemany_returning:
            result = await conn.execute(
                insert(delivery).returning(delivery.c.id, delivery.c.outbox_id), rows
            )
            return {r.outbox_id: r.id for r in result if r.outbox_id in wanted}
        await conn.execute(insert(delivery), rows)  # MySQL: no RETURNING
        found = await conn.execute(
            select(delivery.c.id, delivery.c.outbox_id).where(
                self._in(delivery.c.booking_id, sorted({r["booking_id"] for r in rows}))
            )
        )
        return {r.outbox_id: r.id for r in found if r.outbox_id in wanted}

    async def _unread_after(self, conn: AsyncConnection, after: Mapping[str, int]) -> set[str]:
        """Those bookings with an outbox row not yet ingested after the id given for each:
        a newer state committed but undecided. It may be a cancellation, or a return to what
        Mozrest already holds, so nothing of theirs is leased before ingest has decided it.

        The query selects by booking id alone and the ids and `processed_at` are compared here:
        with either in the SQL, PostgreSQL could plan the query onto the partial index of
        unprocessed rows, or onto a primary-key range, and read the whole backlog on every
        call (measured with `python -m bench.plans`). By booking id alone only the booking
        index applies, and it reads these bookings' rows within retention.
        """
        if not after:
            return set()
        statement = self._statement(
            "unread_after",
            lambda: select(outbox.c.booking_id, outbox.c.id, outbox.c.processed_at).where(
                self._in_param(outbox.c.booking_id, "ids")
            ),
        )
        rows = await conn.execute(statement, {"ids": sorted(after)})
        # `.get`: MySQL's PAD SPACE collations match ids that differ by trailing spaces.
        return {
            row.booking_id
            for row in rows
            if row.processed_at is None and row.id > after.get(row.booking_id, row.id)
        }

    async def _supersede(self, conn: AsyncConnection, deliveries: list[Any], now: datetime) -> None:
        """A newer state replaces these before they landed. A state that never left is, in the
        outbox too, `superseded` rather than `queued`."""
        if not deliveries:
            return
        await conn.execute(
            update(delivery)
            .where(self._in(delivery.c.id, [d.id for d in deliveries]))
            .values(status="superseded", updated_at=now, next_attempt_at=None)
        )
        never_sent = [d.outbox_id for d in deliveries if d.attempt_count == 0]
        if never_sent:
            await conn.execute(
                update(outbox).where(self._in(outbox.c.id, never_sent)).values(outcome="superseded")
            )

    async def _hold(self, conn: AsyncConnection, deliveries: list[Any], now: datetime) -> None:
        """Take back deliveries that may not be the first sent after all (`claim_due`): their
        rows are `held`, as ingest would have decided had no claim been pending."""
        if not deliveries:
            return
        await conn.execute(
            update(delivery)
            .where(self._in(delivery.c.id, [d.id for d in deliveries]))
            .values(
                status="superseded",
                updated_at=now,
                next_attempt_at=None,
                last_error=(
                    "held: the booking was never sent, and a booking's first state is never "
                    "a cancellation"
                ),
            )
        )
        await conn.execute(
            update(outbox)
            .where(self._in(outbox.c.id, [d.outbox_id for d in deliveries]))
            .values(outcome=str(Outcome.HELD))
        )

    async def _forget_sent(self, conn: AsyncConnection, claims: Sequence[Claim]) -> None:
        """Undo what these claims' leasing marked "sent once", for claims whose state never
        reached the wire. The caller holds the bookings' locks and has checked that
        each claim's lease is still its own."""
        if not claims:
            return
        await conn.execute(
            update(booking)
            .where(
                booking.c.booking_id == bindparam("f_booking_id"),
                booking.c.sent_outbox_id == bindparam("f_outbox_id"),
            )
            .values(sent_outbox_id=bindparam("f_previous")),
            [
                {
                    "f_booking_id": c.booking_id,
                    "f_outbox_id": c.outbox_id,
                    "f_previous": c.previous_sent_outbox_id,
                }
                for c in claims
            ],
        )

    async def _mark_processed(
        self, conn: AsyncConnection, outcomes: dict[int, tuple[Outcome, str | None]], now: datetime
    ) -> None:
        by_outcome: dict[Outcome, list[int]] = defaultdict(list)
        errors: list[dict[str, Any]] = []
        for row_id, (outcome, error) in outcomes.items():
            if error is None:
                by_outcome[outcome].append(row_id)
            else:
                # The error can quote a key of the row: stored only as storable text.
                errors.append(
                    {"o_id": row_id, "o_outcome": str(outcome), "o_error": storable(error)}
                )
        statement = self._statement(
            "processed",
            lambda: (
                update(outbox)
                .where(self._in_param(outbox.c.id, "ids"))
                .values(processed_at=bindparam("now"), outcome=bindparam("outcome"))
            ),
        )
        for outcome, ids in by_outcome.items():
            await conn.execute(statement, {"ids": ids, "now": now, "outcome": str(outcome)})
        if errors:
            await conn.execute(
                update(outbox)
                .where(outbox.c.id == bindparam("o_id"))
                .values(
                    processed_at=now, outcome=bindparam("o_outcome"), error=bindparam("o_error")
                ),
                errors,
            )

    # -- dispatch -------------------------------------------------------------------------

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
        async with self._write() as conn:
            now = await self._now(conn)
            candidates = (
                (
                    await conn.execute(
                        select(delivery.c.booking_id)
                        .where(
                            _ACTIVE,
                            delivery.c.next_attempt_at <= now,
                        )
                        .order_by(delivery.c.next_attempt_at)
                        .limit(limit * 2)
                    )
                )
                .scalars()
                .all()
            )
            if not candidates:
                return []
            bookings = await self._lock_bookings(conn, candidates, skip_locked=True)
            undecided = await self._unread_after(
                conn, {b: row.last_outbox_id for b, row in bookings.items()}
            )
            for booking_id in undecided:
                bookings.pop(booking_id, None)
            active = await self._active_deliveries(conn, bookings)
            expires = now + timedelta(seconds=lease_seconds)
            token = uuid.uuid4().hex
            chosen: list[Any] = []
            stale: list[Any] = []
            held: list[Any] = []
            # Oldest due first, as the candidates came.
            for booking_id in dict.fromkeys(candidates):
                if booking_id not in bookings or len(chosen) >= limit:
                    continue
                deliveries = active.get(booking_id, [])
                if not deliveries or any(_leased(d, now) for d in deliveries):
                    continue  # one request per booking at a time
                if _quiet_until(bookings[booking_id], now) > now:
                    continue  # an unanswered request may still be on its way
                newest = deliveries[-1]
                stale.extend(deliveries[:-1])
                sent = bookings[booking_id].sent_outbox_id
                if sent is not None and newest.outbox_id < sent:
                    stale.append(newest)  # never send a state older than one already sent
                    continue
                if newest.next_attempt_at is None or newest.next_attempt_at > now:
                    continue
                if sent is None and not may_send_first(
                    newest.payload["status"],
                    reached_send_status=bookings[booking_id].reached_send_status,
                ):
                    # Queued behind a claim that was given back unsent: as if that claim had
                    # never been made, this state would have been held.
                    held.append(newest)
                    continue
                chosen.append(newest)
            await self._supersede(conn, stale, now)
            await self._hold(conn, held, now)
            if chosen and take is not None:
                chosen = chosen[: max(0, take(len(chosen)))]
            if not chosen:
                return []
            ids = [d.id for d in chosen]
            # Due again exactly when the lease ends: a crashed owner's work is then taken over
            # by whoever claims next, with no sweeper.
            await conn.execute(
                update(delivery)
                .where(self._in(delivery.c.id, ids))
                .values(
                    lease_owner=worker_id,
                    lease_token=token,
                    lease_expires_at=expires,
                    next_attempt_at=expires,
                    updated_at=now,
                )
            )
            await conn.execute(
                update(booking)
                .where(booking.c.booking_id == bindparam("b_booking_id"))
                .values(sent_outbox_id=bindparam("b_outbox_id"), updated_at=now),
                [{"b_booking_id": d.booking_id, "b_outbox_id": d.outbox_id} for d in chosen],
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
                    previous_sent_outbox_id=bookings[row.booking_id].sent_outbox_id,
                )
                for row in chosen
            ]

    async def record(self, results: Sequence[AttemptResult], *, worker_id: str) -> list[Settled]:
        """Store attempts and move their deliveries on: delivered, retrying, dead, superseded.

         A batch the database refuses for a reason of its answers (not an outage) is recorded
         one answer at a time, and an answer refused alone is recorded without its text
        : one odd answer never keeps the others unrecorded.
        """
        try:
            return await self._record_batch(results, worker_id=worker_id)
        except _RowsFailed as failed:
            if len(results) == 1:
                return await self._record_bare(results[0], failed, worker_id=worker_id)
            log_event(
                log,
                logging.WARNING,
                "record.batch_refused",
                attempts=len(results),
                error=type(failed.__cause__).__name__,
            )
        settled: list[Settled] = []
        for result in results:
            try:
                settled += await self._record_batch([result], worker_id=worker_id)
            except _RowsFailed as failed:
                settled += await self._record_bare(result, failed, worker_id=worker_id)
        return settled

    async def _record_bare(
        self, result: AttemptResult, failed: _RowsFailed, *, worker_id: str
    ) -> list[Settled]:
        """Record an attempt the database refused, without Mozrest's text; if even that is
        refused, the fault is not the answer's and the error goes up."""
        cause = type(failed.__cause__).__name__
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
            return await self._record_batch([bare], worker_id=worker_id)
        except _RowsFailed as again:
            raise again.__cause__ or again from None

    @translate_errors
    async def _record_batch(
        self, results: Sequence[AttemptResult], *, worker_id: str
    ) -> list[Settled]:
        """`record` of one batch in one transaction; `_RowsFailed` when the database refused it
        for a reason that is not an outage."""
        if not results:
            return []
        try:
            return await self._record_transaction(results, worker_id=worker_id)
        except Exception as exc:
            if is_outage(exc):
                raise
            raise _RowsFailed([r.claim.delivery_id for r in results]) from exc

    async def _record_transaction(
        self, results: Sequence[AttemptResult], *, worker_id: str
    ) -> list[Settled]:
        async with self._write() as conn:
            now = await self._now(conn)
            bookings = await self._lock_bookings(conn, (r.claim.booking_id for r in results))
            active = await self._active_deliveries(conn, bookings, payloads=False)
            # A claimed delivery no longer active (cancelled, superseded) is not ours to move.
            current = {d.id: d for rows in active.values() for d in rows}
            await conn.execute(
                insert(attempt),
                [
                    {
                        "delivery_id": r.claim.delivery_id,
                        "worker_id": worker_id,
                        "started_at": r.started_at,
                        "duration_ms": r.duration_ms,
                        "status_code": r.status_code,
                        "error": storable(r.error, limit_bytes=RESPONSE_BODY_LIMIT),
                        "response_body": storable(r.response_body, limit_bytes=RESPONSE_BODY_LIMIT),
                    }
                    for r in results
                ],
            )
            changes: list[dict[str, Any]] = []
            # The newest accepted state per booking: its delivery row holds the payload.
            snapshots: dict[str, Claim] = {}
            settled: list[Settled] = []
            unwritten: list[Claim] = []
            finished_bookings: set[str] = set()
            unanswered: dict[str, tuple[int, datetime]] = {}
            for result in results:
                claim = result.claim
                row = current.get(claim.delivery_id)
                owned = row is not None and row.lease_token == claim.lease_token
                if result.status_code is None and result.written:
                    # No answer: the request may still land, up to the end of its lease.
                    outbox_id, until = unanswered.get(
                        claim.booking_id, (claim.outbox_id, claim.lease_expires_at)
                    )
                    unanswered[claim.booking_id] = (
                        max(outbox_id, claim.outbox_id),
                        max(until, claim.lease_expires_at),
                    )
                if result.verdict is Verdict.DELIVERED:
                    known = snapshots.get(claim.booking_id)
                    if known is None or known.outbox_id < claim.outbox_id:
                        snapshots[claim.booking_id] = claim
                if not owned:
                    settled.append(Settled(claim.delivery_id, claim.booking_id, None))
                    continue
                if result.status_code is not None or not result.written:
                    finished_bookings.add(claim.booking_id)
                newer_waiting = any(
                    d.outbox_id > claim.outbox_id for d in active.get(claim.booking_id, [])
                )
                if not result.written:
                    unwritten.append(claim)
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
                changes.append(
                    {
                        "c_id": claim.delivery_id,
                        "c_status": settlement.status,
                        "c_next_attempt_at": settlement.next_attempt_at,
                        "c_delivered_at": settlement.delivered_at,
                        "c_status_code": result.status_code,
                        "c_error": storable(
                            settlement.error or result.error, limit_bytes=RESPONSE_BODY_LIMIT
                        ),
                    }
                )
                settled.append(
                    Settled(
                        claim.delivery_id,
                        claim.booking_id,
                        settlement.status,
                        settlement.next_attempt_at,
                        settlement.lag_seconds,
                        newer_waiting,
                        error=settlement.error or result.error,
                    )
                )
            await self._apply_changes(conn, changes, now)
            # A request that never reached the wire (no connection) did not send the state.
            await self._forget_sent(conn, unwritten)
            if snapshots:
                # Copied from the delivery rows in the database: no payload is encoded here or
                # sent back over the wire.
                statement = self._statement("snapshot", self._snapshot_statement)
                await conn.execute(
                    statement,
                    {"ids": [c.delivery_id for c in snapshots.values()], "now": now},
                )
            if unanswered:
                await conn.execute(
                    update(booking)
                    .where(booking.c.booking_id == bindparam("u_booking_id"))
                    .values(
                        unconfirmed_outbox_id=bindparam("u_outbox_id"),
                        quiet_until=bindparam("u_quiet_until"),
                        updated_at=now,
                    ),
                    [
                        {
                            "u_booking_id": booking_id,
                            "u_outbox_id": max(
                                outbox_id, bookings[booking_id].unconfirmed_outbox_id or 0
                            ),
                            "u_quiet_until": max(until, _quiet_until(bookings[booking_id], now)),
                        }
                        for booking_id, (outbox_id, until) in unanswered.items()
                        if booking_id in bookings
                    ],
                )
            await self._wake_queued(
                conn,
                [active.get(b, []) for b in finished_bookings],
                done={r.claim.delivery_id for r in results},
                now=now,
            )
            return settled

    async def _wake_queued(
        self, conn: AsyncConnection, bookings: Iterable[list[Any]], *, done: set[int], now: datetime
    ) -> None:
        """A booking's request finished (or was given back): the newer state queued behind it,
        due when that request's lease would have ended, may go now."""
        waiting = [
            d.id
            for deliveries in bookings
            for d in deliveries
            if d.id not in done
            and d.status == "pending"
            and not _leased(d, now)
            and d.next_attempt_at is not None
            and d.next_attempt_at > now
        ]
        if waiting:
            await conn.execute(
                update(delivery).where(self._in(delivery.c.id, waiting)).values(next_attempt_at=now)
            )

    def _snapshot_statement(self) -> Any:
        """The accepted states become their bookings' snapshots, copied from the delivery rows
        inside the database: no payload is encoded here or sent back over the wire."""
        accepted = delivery.alias("accepted")
        return (
            update(booking)
            .where(
                booking.c.booking_id == accepted.c.booking_id,
                self._in_param(accepted.c.id, "ids"),
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

    async def _apply_changes(
        self, conn: AsyncConnection, changes: list[dict[str, Any]], now: datetime
    ) -> None:
        """Move recorded deliveries on. Deliveries that end alike (typically: delivered, HTTP
        200) are moved by one statement on their ids; the rest row by row."""
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for change in changes:
            key = tuple(change[k] for k in _CHANGE_FIELDS)
            groups[key].append(change["c_id"])
        one_by_one = [
            dict(zip(("c_id", *_CHANGE_FIELDS), (ids[0], *key), strict=True))
            for key, ids in groups.items()
            if len(ids) == 1
        ]
        settled = {
            "status": bindparam("c_status"),
            "next_attempt_at": bindparam("c_next_attempt_at"),
            "delivered_at": bindparam("c_delivered_at"),
            "last_status_code": bindparam("c_status_code"),
            "last_error": bindparam("c_error"),
            "attempt_count": delivery.c.attempt_count + 1,
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
            "updated_at": bindparam("now"),
        }
        grouped = self._statement(
            "settle_alike",
            lambda: update(delivery).where(self._in_param(delivery.c.id, "ids")).values(**settled),
        )
        for key, ids in groups.items():
            if len(ids) > 1:
                await conn.execute(
                    grouped, {"ids": ids, "now": now, **dict(zip(_CHANGE_FIELDS, key, strict=True))}
                )
        if one_by_one:
            each = self._statement(
                "settle_each",
                lambda: (
                    update(delivery).where(delivery.c.id == bindparam("c_id")).values(**settled)
                ),
            )
            await conn.execute(each, [dict(change, now=now) for change in one_by_one])

    @translate_errors
    async def release(self, claims: Sequence[Claim]) -> None:
        """Give claims back unsent (shutdown, open circuit, a lease run out before the write):
        no attempt is counted, and the booking is as if never claimed. A claim whose
        lease another process has taken over since is left alone."""
        if not claims:
            return
        async with self._write() as conn:
            now = await self._now(conn)
            bookings = await self._lock_bookings(conn, (c.booking_id for c in claims))
            active = await self._active_deliveries(conn, bookings, payloads=False)
            tokens = {d.id: d.lease_token for rows in active.values() for d in rows}
            claims = [c for c in claims if tokens.get(c.delivery_id) == c.lease_token]
            if not claims:
                return
            await self._forget_sent(conn, claims)
            await conn.execute(
                update(delivery)
                .where(
                    delivery.c.id == bindparam("r_id"),
                    delivery.c.lease_token == bindparam("r_token"),
                )
                .values(
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    next_attempt_at=now,
                    updated_at=now,
                ),
                [{"r_id": c.delivery_id, "r_token": c.lease_token} for c in claims],
            )
            await self._wake_queued(
                conn,
                [active.get(c.booking_id, []) for c in claims],
                done={c.delivery_id for c in claims},
                now=now,
            )

    # -- processes ------------------------------------------------------------------------

    @translate_errors
    async def register_worker(self, info: WorkerInfo) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
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
    async def heartbeat(self, worker_id: str, *, circuit: str, credentials: str) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(
                update(worker)
                .where(worker.c.id == worker_id)
                .values(heartbeat_at=now, circuit=circuit, credentials=credentials)
            )

    @translate_errors
    async def mark_stopped(self, worker_id: str) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(
                update(worker).where(worker.c.id == worker_id).values(stopped_at=now)
            )

    # -- retention ------------------------------------------------------------------------

    @translate_errors
    async def prune(self, *, retention_seconds: float, batch_size: int = 500) -> Counter[str]:
        """Delete one small batch of terminal rows and idle snapshots older than retention."""
        removed: Counter[str] = Counter()
        async with self._write() as conn:
            if not await self._take_lock(conn, "maintenance"):
                return removed
            now = await self._now(conn)
            cutoff = now - timedelta(seconds=retention_seconds)
            # Old rows have low ids: look at the oldest few by primary key and keep the ones due,
            # so the cost never grows with the table (a filter on processed_at would scan it).
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
            waiting = {
                d.outbox_id
                for rows in (
                    await self._active_deliveries(
                        conn, (row.booking_id for row in due), payloads=False
                    )
                ).values()
                for d in rows
            }
            outbox_ids = [row.id for row in due if row.id not in waiting]
            if outbox_ids:
                await conn.execute(delete(outbox).where(self._in(outbox.c.id, outbox_ids)))
                removed["outbox"] = len(outbox_ids)
            delivery_ids = [
                row.id
                for row in await conn.execute(
                    select(delivery.c.id, delivery.c.status, delivery.c.updated_at)
                    .order_by(delivery.c.id)
                    .limit(batch_size)
                )
                if row.status not in ACTIVE_STATUSES and row.updated_at < cutoff
            ]
            if delivery_ids:
                await conn.execute(
                    delete(attempt).where(self._in(attempt.c.delivery_id, delivery_ids))
                )
                await conn.execute(delete(delivery).where(self._in(delivery.c.id, delivery_ids)))
                removed["deliveries"] = len(delivery_ids)
            await conn.execute(
                delete(worker).where(worker.c.heartbeat_at < now - timedelta(days=1))
            )
        # Snapshots hold guest personal data. Pruning one races with ingest deciding against it,
        # so it happens under the ingest lock, in its own short transaction.
        async with self._write() as conn:
            if not await self._take_lock(conn, "ingest"):
                return removed
            now = await self._now(conn)
            cutoff = now - timedelta(seconds=retention_seconds)
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
            if idle:
                busy = set(
                    (
                        await conn.execute(
                            select(delivery.c.booking_id).where(
                                self._in(delivery.c.booking_id, idle),
                                _ACTIVE,
                            )
                        )
                    ).scalars()
                )
                unprocessed = set(
                    (
                        await conn.execute(
                            select(outbox.c.booking_id).where(
                                self._in(outbox.c.booking_id, idle), outbox.c.processed_at.is_(None)
                            )
                        )
                    ).scalars()
                )
                doomed = [b for b in idle if b not in busy and b not in unprocessed]
                if doomed:
                    await conn.execute(
                        delete(booking).where(self._in(booking.c.booking_id, doomed))
                    )
                    removed["bookings"] = len(doomed)
        return removed

    # -- health ---------------------------------------------------------------------------

    @translate_errors
    async def ping(self) -> datetime:
        async with self._read() as conn:
            return await self._now(conn)

    @translate_errors
    async def schema_revision(self) -> str | None:
        from app.migrate import current_revision

        async with self._read() as conn:
            return await conn.run_sync(current_revision)


def _unconfirmed(booking_row: Any) -> bool:
    """A state newer than the snapshot left without an answer and may have landed."""
    unconfirmed = booking_row.unconfirmed_outbox_id
    accepted = booking_row.accepted_outbox_id
    return unconfirmed is not None and (accepted is None or unconfirmed > accepted)


def _quiet_until(booking_row: Any, now: datetime) -> datetime:
    if booking_row is None or booking_row.quiet_until is None:
        return now
    return max(now, booking_row.quiet_until)


def _leased(row: Any, now: datetime) -> bool:
    return row.lease_expires_at is not None and row.lease_expires_at > now


__all__ = ["AttemptResult", "Claim", "IngestReport", "Settled", "Store", "StoreError", "WorkerInfo"]
