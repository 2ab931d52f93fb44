"""Delivery policy as data: what to do with a new state, how to read an answer, when to retry.

Everything here is pure: no I/O, no clock but the one passed in. The store and the worker apply it.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from app.contract import State, changed_fields, delivery_warnings, states_equal

#: Answers that mean "try again later" (SPEC 3.9); 5xx are retryable too.
RETRYABLE_STATUS_CODES = frozenset({408, 425, 429})
#: The answer that means our credentials are wrong, not the booking.
CREDENTIALS_REJECTED_STATUS = 401


class Outcome(enum.StrEnum):
    """The outcome of an outbox row (SPEC section 2)."""

    QUEUED = "queued"
    UNCHANGED = "unchanged"
    HELD = "held"
    SUPERSEDED = "superseded"
    INVALID = "invalid"


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
    accepted_uncertain: bool = False
    """A newer state left without an answer and may have landed: `accepted` may be stale."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What ingest does with a booking's newest state."""

    outcome: Outcome
    supersede_queued: bool = False
    changed_fields: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def decide(new: State, booking: BookingView, send_statuses: frozenset[str]) -> Decision:
    """Decide a booking's newest state against what Mozrest holds or will hold (SPEC 3.4-3.6)."""
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
    if not booking.sent_once and booking.in_flight is None and new["status"] not in send_statuses:
        return Decision(Outcome.HELD, supersede_queued=supersede)
    shown = base if base is not None else booking.accepted  # what the operator compares with
    return Decision(
        Outcome.QUEUED,
        supersede_queued=supersede,
        changed_fields=changed_fields(shown, new),
        warnings=delivery_warnings(shown, new),
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
class RetryPolicy:
    """Exponential backoff with full jitter, capped, honouring `Retry-After`."""

    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 300.0
    max_age_seconds: float = 12 * 3600.0

    def delay_seconds(
        self,
        attempt: int,
        *,
        retry_after_seconds: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait before attempt `attempt + 1`, after `attempt` failed ones (>= 1)."""
        ceiling = min(self.max_delay_seconds, self.base_delay_seconds * 2 ** max(attempt - 1, 0))
        # Full jitter spreads a fleet's retries; the floor of half keeps the schedule readable.
        delay = (rng or random).uniform(ceiling / 2, ceiling)
        if retry_after_seconds is not None:
            delay = max(delay, retry_after_seconds)
        return delay


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


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
