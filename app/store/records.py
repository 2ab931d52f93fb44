"""What the store hands the worker and takes back: claims, answers, and how they settled."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from app.contract import State
from app.policy import Verdict


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Lease deliveries to `worker_id` for `seconds` (see `Store.ingest`): at most `limit`, and,
    with `take`, only as many as `take(wanted)` grants when the transaction knows how many it
    could lease (the worker's free request slots at that instant: `RequestSlots.take`)."""

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
    traceparent: str | None = None
    """The delivery's trace context (`app.tracing`): its request's span belongs to that trace."""


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


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: str
    hostname: str
    pid: int
    role: str
