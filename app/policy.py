"""Delivery policy as data: what to do with a new state, how to read an answer, when to retry.

Everything here is pure: no I/O, no clock but the one passed in. The store and the worker apply it.
"""

from __future__ import annotations

import calendar
import enum
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_tz

from app.contract import State, changed_fields, delivery_warnings, states_equal
from app.states import CircuitState, DeliveryStatus
from app.states import Outcome as Outcome  # where it was first defined: callers import it here
from app.text import shown

#: Answers that mean "try again later"; 5xx are retryable too.
RETRYABLE_STATUS_CODES = frozenset({408, 425, 429})
#: The answer that means our credentials are wrong, not the booking.
CREDENTIALS_REJECTED_STATUS = 401
#: Reservation statuses the relay knows by name. It passes any status on to Mozrest as it is; only
#: those in RELAY_SEND_STATUSES start sending a booking, and `NEVER_FIRST_STATUSES` are never sent
#: first. Compared exactly: `Seated` is not `seated`, so a held state with another status says so
#: in its row's `error`, and `enqueue` and `doctor` warn. Keep in step with the README's list.
KNOWN_STATUSES = frozenset({"booked", "confirmed", "seated", "finished", "cancelled", "no_show"})
#: A booking never sent is never first sent in one of these: Mozrest has no order
#: to cancel.
NEVER_FIRST_STATUSES = frozenset({"cancelled"})


@dataclass(frozen=True, slots=True)
class BookingView:
    """What the relay knows of one booking when a new state arrives."""

    accepted: State | None = None
    """The snapshot: the state Mozrest last accepted."""
    in_flight: State | None = None
    """The state of a request still on the wire, if any."""
    queued: State | None = None
    """A queued state not yet sent (pending or retrying, not in flight), if any."""
    sent_once: bool = False
    """Whether any state of this booking has left for Mozrest."""
    reached_send_status: bool = False
    """Whether an earlier state of this booking had a status in RELAY_SEND_STATUSES."""
    accepted_uncertain: bool = False
    """A newer state left without an answer and may have landed: `accepted` may be stale."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What ingest does with a booking's newest state."""

    outcome: Outcome
    supersede_queued: bool = False
    changed_fields: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    note: str | None = None
    """For the outbox row's `error`: why a held state may stay held (an unknown status)."""


def may_send_first(status: str, *, reached_send_status: bool) -> bool:
    """Whether a booking never sent may be sent now, in a state of `status`: once it
    has reached a send status (this state or an earlier one), unless it is cancelled."""
    return reached_send_status and status not in NEVER_FIRST_STATUSES


def decide(new: State, booking: BookingView, send_statuses: frozenset[str]) -> Decision:
    """Decide a booking's newest state against what Mozrest holds or will hold."""
    if booking.queued is not None and states_equal(new, booking.queued):
        return Decision(Outcome.UNCHANGED)
    # What Mozrest will hold once everything already sent has landed. After a request that got
    # no answer nobody knows, so nothing is suppressed against the snapshot.
    base: State | None
    if booking.in_flight is not None:
        base = booking.in_flight
    else:
        base = None if booking.accepted_uncertain else booking.accepted
    supersede = booking.queued is not None
    if base is not None and states_equal(new, base):
        return Decision(Outcome.UNCHANGED, supersede_queued=supersede)
    reached = booking.reached_send_status or new["status"] in send_statuses
    if (
        not booking.sent_once
        and booking.in_flight is None
        and not may_send_first(new["status"], reached_send_status=reached)
    ):
        return Decision(
            Outcome.HELD, supersede_queued=supersede, note=_unknown_status(new, send_statuses)
        )
    shown = base if base is not None else booking.accepted  # what the operator compares with
    return Decision(
        Outcome.QUEUED,
        supersede_queued=supersede,
        changed_fields=changed_fields(shown, new),
        warnings=delivery_warnings(shown, new),
    )


@dataclass(frozen=True, slots=True)
class Waiting:
    """One active delivery of a booking, as the lease rule sees it."""

    outbox_id: int
    status: str
    """The status of the state it carries."""
    leased: bool
    """A request for it is on the wire, or about to be."""
    due: bool
    """Its next attempt time has come."""


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """What a claim does with one booking's waiting deliveries (indexes into them)."""

    lease: int | None = None
    supersede: tuple[int, ...] = ()
    hold: int | None = None


def plan_lease(
    waiting: Sequence[Waiting],
    *,
    quiet: bool,
    sent_outbox_id: int | None,
    reached_send_status: bool,
) -> LeasePlan:
    """Which of a booking's waiting deliveries (oldest state first) may be leased now; the one
    rule behind both `claim_due` and ingest's leasing (docs/adr/0002-claims-and-leases.md).

    One request per booking at a time, and none while an unanswered one may still land
    (`quiet`); only the newest state goes, older ones are superseded, and so is a newest older
    than a state already sent; a booking never sent is first sent only as `may_send_first`
    allows (a state queued behind a claim given back unsent may have to be held).
    """
    if not waiting or quiet or any(w.leased for w in waiting):
        return LeasePlan()
    newest = len(waiting) - 1
    older = tuple(range(newest))
    if sent_outbox_id is not None and waiting[newest].outbox_id < sent_outbox_id:
        return LeasePlan(supersede=(*older, newest))
    if not waiting[newest].due:
        return LeasePlan(supersede=older)
    if sent_outbox_id is None and not may_send_first(
        waiting[newest].status, reached_send_status=reached_send_status
    ):
        return LeasePlan(supersede=older, hold=newest)
    return LeasePlan(lease=newest, supersede=older)


def _unknown_status(state: State, send_statuses: frozenset[str]) -> str | None:
    status = state["status"]
    if status in send_statuses or status in KNOWN_STATUSES:
        return None
    expected = ", ".join(sorted({*KNOWN_STATUSES, *send_statuses}))
    return (
        f"status: {shown(status)!r} is not a status the relay knows ({expected}); held until "
        f"a state with a status in RELAY_SEND_STATUSES arrives"
    )


class Verdict(enum.StrEnum):
    """How one webhook answer (or its absence) settles a delivery."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    CREDENTIALS_REJECTED = "credentials_rejected"


def classify(status_code: int | None) -> Verdict:
    """Read Mozrest's answer: `None` means no answer came back (connection error, timeout)."""
    if status_code is None:
        return Verdict.RETRY
    if 200 <= status_code < 300:
        return Verdict.DELIVERED
    if status_code == CREDENTIALS_REJECTED_STATUS:
        return Verdict.CREDENTIALS_REJECTED
    if status_code in RETRYABLE_STATUS_CODES or 500 <= status_code < 600:
        return Verdict.RETRY
    return Verdict.DEAD


@dataclass(frozen=True, slots=True)
class Settlement:
    """Where one recorded attempt leaves its delivery."""

    status: str
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    lag_seconds: float | None = None
    error: str | None = None
    """Why, when the policy itself says more than the answer (a Retry-After past the deadline)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with equal jitter, capped, honouring `Retry-After`, bounded by
    `max_age_seconds` from the delivery's creation (or its operator's last requeue)."""

    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 300.0
    max_age_seconds: float = 12 * 3600.0
    credentials_cooldown_seconds: float = 10.0
    """After a 401: when the delivery is due again (our credentials, not the booking)."""

    def delay_seconds(
        self,
        attempt: int,
        *,
        retry_after_seconds: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait before attempt `attempt + 1`, after `attempt` failed ones (>= 1)."""
        exponent = min(max(attempt - 1, 0), 62)  # 2**63 s is past any cap; no float overflow
        ceiling = min(self.max_delay_seconds, self.base_delay_seconds * 2**exponent)
        # Equal jitter (uniform in [ceiling/2, ceiling]) spreads a fleet's retries; the floor of
        # half keeps the schedule readable.
        delay = (rng or random).uniform(ceiling / 2, ceiling)
        if retry_after_seconds is not None:
            delay = max(delay, retry_after_seconds)
        return delay

    def settle(
        self,
        verdict: Verdict,
        *,
        now: datetime,
        attempt_count: int,
        retry_window_started_at: datetime,
        lease_expires_at: datetime,
        outbox_created_at: datetime | None,
        answered: bool,
        written: bool,
        retry_after_seconds: float | None,
        newer_waiting: bool,
    ) -> Settlement:
        """Where an attempt leaves a delivery this process still holds.

        `attempt_count` counts the attempts before this one. A newer state waiting makes a
        failed attempt `superseded`: only the newest state needs to land.
        """
        if verdict is Verdict.DELIVERED:
            lag = (now - outbox_created_at).total_seconds() if outbox_created_at else None
            return Settlement(DeliveryStatus.DELIVERED, delivered_at=now, lag_seconds=lag)
        if verdict is Verdict.DEAD:
            return Settlement(DeliveryStatus.DEAD)
        if newer_waiting:
            return Settlement(DeliveryStatus.SUPERSEDED)
        if verdict is Verdict.CREDENTIALS_REJECTED:
            # Our credentials, not the booking: wait for them, never dead-letter for it.
            due = now + timedelta(seconds=self.credentials_cooldown_seconds)
            return Settlement(DeliveryStatus.RETRYING, next_attempt_at=due)
        deadline = retry_window_started_at + timedelta(seconds=self.max_age_seconds)
        remaining = (deadline - now).total_seconds()
        if remaining <= 0:
            return Settlement(DeliveryStatus.DEAD)
        if retry_after_seconds is not None and retry_after_seconds >= remaining:
            return Settlement(
                DeliveryStatus.DEAD,
                error=(
                    f"Retry-After asks for {retry_after_seconds:.0f}s, past the delivery's "
                    f"deadline (RELAY_RETRY_MAX_AGE) {remaining:.0f}s away"
                ),
            )
        delay = self.delay_seconds(attempt_count + 1, retry_after_seconds=retry_after_seconds)
        # Without a Retry-After, one last try at the deadline; with one, it is within it.
        next_at = now + timedelta(seconds=min(delay, remaining))
        if not answered and written:
            # Unanswered: the request may still land until its lease ends; never overlap it.
            next_at = max(next_at, lease_expires_at)
        return Settlement(DeliveryStatus.RETRYING, next_attempt_at=next_at)


@dataclass(frozen=True, slots=True)
class OutageBackoff:
    """How a worker rides out a database outage: random exponential waits between tries of the
    same work (tenacity's `wait_random_exponential`), `multiplier` seconds growing to at most
    `max_seconds`."""

    multiplier: float = 0.1
    max_seconds: float = 5.0


OUTAGE_BACKOFF = OutageBackoff()


#: A `Retry-After` is read as at most this: any deadline is far shorter, and arithmetic on the
#: value stays finite however many digits Mozrest sends.
MAX_RETRY_AFTER_SECONDS = 10 * 365 * 86400.0
_YEAR_10000 = 253402300800.0
_DELTA_SECONDS = re.compile(r"[0-9]+")  # ASCII digits only: "²" passes str.isdigit()


def parse_retry_after(value: str | None, *, now: datetime | float | None = None) -> float | None:
    """Seconds from a `Retry-After` header, or None when it is neither delta-seconds (ASCII
    digits) nor an HTTP-date (RFC 9110's three formats, any zone spelling). `now` (a datetime,
    or Unix seconds) is the server's clock (its `Date` header) when known. Never raises; never
    more than `MAX_RETRY_AFTER_SECONDS`."""
    if not value:
        return None
    value = value.strip(" \t")
    if _DELTA_SECONDS.fullmatch(value):
        if len(value) > 12:  # beyond any deadline; int() would refuse 4,300 digits
            return MAX_RETRY_AFTER_SECONDS
        return min(float(int(value)), MAX_RETRY_AFTER_SECONDS)
    when = parse_http_date(value)
    if when is None:
        return None
    if now is None:
        now = datetime.now(UTC)
    reference = now.timestamp() if isinstance(now, datetime) else now
    return min(max(0.0, when - reference), MAX_RETRY_AFTER_SECONDS)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date as Unix seconds, or None. IMF-fixdate, RFC 850 and asctime are all read, with
    any zone spelling (`GMT`, `UTC`, `+0000`, `-0000`, none: UTC; an offset: applied); the
    arithmetic is on integers, so no year overflows."""
    try:
        parts = parsedate_tz(value) if value else None
    except (TypeError, ValueError, IndexError):  # parsedate_tz is lenient, but not total
        return None
    if parts is None:
        return None
    offset = parts[9] or 0
    if abs(offset) > 86400:
        return None
    if parts[0] > 9999:
        return _YEAR_10000  # later than any deadline, and out of the calendar's range
    try:
        return float(calendar.timegm(parts[:6]) - offset)
    except (ValueError, OverflowError):  # no such month, or a year before 1
        return None


#: A breaker's states are the circuit's (`app.states.CircuitState`).
BreakerState = CircuitState


class Breaker:
    """A circuit breaker on a monotonic clock: after `threshold` failures in a row it opens, and
    lets one probe through per `cooldown_seconds` until a probe succeeds."""

    def __init__(self, *, threshold: int, cooldown_seconds: float) -> None:
        self.threshold = threshold
        self.cooldown_seconds = cooldown_seconds
        self.failures = 0
        self.state = BreakerState.CLOSED
        self._opened_at = 0.0

    def allows_probe(self, now: float) -> bool:
        """While open: whether the cool-down has passed, so one probe may go."""
        return self.state is BreakerState.OPEN and now - self._opened_at >= self.cooldown_seconds

    def start_probe(self) -> None:
        self.state = BreakerState.HALF_OPEN

    def allow_probe_now(self) -> None:
        """While open: let the next probe go without waiting out the cool-down (what it was
        waiting for has changed, e.g. a rotated token)."""
        if self.state is BreakerState.OPEN:
            self._opened_at = float("-inf")

    def record_success(self) -> None:
        self.failures = 0
        self.state = BreakerState.CLOSED

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state = BreakerState.OPEN
            self._opened_at = now

    def abandon_probe(self, now: float) -> None:
        """A probe that could not be sent: stay open, try again after the cool-down."""
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.OPEN
            self._opened_at = now

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED
