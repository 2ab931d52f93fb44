"""The delivery policy: ingest decisions, answer classification, backoff and the breaker."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from app.policy import (
    BookingView,
    Breaker,
    Outcome,
    RetryPolicy,
    Verdict,
    classify,
    decide,
    parse_retry_after,
)

SEATED = {
    "bookingId": "b1",
    "venueId": "v1",
    "partySize": 4,
    "status": "seated",
    "tables": ["T1"],
    "date": 1639578600,
}
SEND = frozenset({"seated"})


def state(**changes: object) -> dict[str, object]:
    return {**SEATED, **changes}


def test_first_seated_state_is_queued_with_every_field_changed() -> None:
    """A booking never sent starts with its seated state, all its fields listed as changed."""
    decision = decide(state(), BookingView(), SEND)
    assert decision.outcome is Outcome.QUEUED
    assert decision.changed_fields == [
        "bookingId",
        "venueId",
        "partySize",
        "status",
        "tables",
        "date",
    ]


def test_state_outside_send_statuses_is_held_before_anything_was_sent() -> None:
    """A confirmed (not seated) state of a booking never sent is held, not sent."""
    assert decide(state(status="confirmed"), BookingView(), SEND).outcome is Outcome.HELD


def test_cancel_before_seated_left_supersedes_the_queued_seated_state() -> None:
    """Seated queued but unsent, then cancelled: cancelled is held and seated superseded."""
    decision = decide(state(status="cancelled"), BookingView(queued=state()), SEND)
    assert decision.outcome is Outcome.HELD
    assert decision.supersede_queued


def test_any_change_is_sent_once_the_booking_was_sent() -> None:
    """After a request left, finished and cancelled states are sent whatever the send set."""
    view = BookingView(accepted=state(), sent_once=True)
    decision = decide(state(status="finished"), view, SEND)
    assert decision.outcome is Outcome.QUEUED
    assert decision.changed_fields == ["status"]


def test_same_state_as_snapshot_is_unchanged() -> None:
    """A state equal to what Mozrest accepted sends nothing."""
    view = BookingView(accepted=state(prepayment=50), sent_once=True)
    assert decide(state(prepayment=50.0), view, SEND).outcome is Outcome.UNCHANGED


def test_same_state_as_in_flight_request_is_unchanged() -> None:
    """A state equal to the request on the wire is unchanged, though the snapshot differs."""
    view = BookingView(accepted=state(), in_flight=state(partySize=5), sent_once=True)
    assert decide(state(partySize=5), view, SEND).outcome is Outcome.UNCHANGED


def test_back_to_accepted_state_supersedes_the_queued_change() -> None:
    """A accepted, B queued, then A again: nothing is sent and B is superseded."""
    view = BookingView(accepted=state(), queued=state(partySize=6), sent_once=True)
    decision = decide(state(), view, SEND)
    assert decision.outcome is Outcome.UNCHANGED
    assert decision.supersede_queued


def test_same_state_as_queued_keeps_the_queued_one() -> None:
    """B queued, then B again: unchanged, and the queued B still goes."""
    view = BookingView(accepted=state(), queued=state(partySize=6), sent_once=True)
    decision = decide(state(partySize=6), view, SEND)
    assert decision.outcome is Outcome.UNCHANGED
    assert not decision.supersede_queued


def test_emptied_items_are_sent_with_a_warning() -> None:
    """Items going from some to none are sent, with the warning that Mozrest keeps them."""
    view = BookingView(accepted=state(items=[{"sku": "A", "quantity": 1}]), sent_once=True)
    decision = decide(state(), view, SEND)
    assert decision.outcome is Outcome.QUEUED
    assert decision.changed_fields == ["items"]
    assert "items" in decision.warnings[0]


@pytest.mark.parametrize(
    ("status_code", "verdict"),
    [
        (None, Verdict.RETRY),
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (301, Verdict.DEAD),
        (400, Verdict.DEAD),
        (401, Verdict.CREDENTIALS_REJECTED),
        (403, Verdict.DEAD),
        (404, Verdict.DEAD),
        (408, Verdict.RETRY),
        (422, Verdict.DEAD),
        (425, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
        (599, Verdict.RETRY),
    ],
)
def test_answers_are_classified_as_spec_section_3_9_says(
    status_code: int | None, verdict: Verdict
) -> None:
    """2xx delivers; no answer, 408, 425, 429, 5xx retry; 401 pauses; the rest is dead."""
    assert classify(status_code) is verdict


def test_backoff_grows_exponentially_within_jitter_and_is_capped() -> None:
    """Delays double per attempt within [ceiling/2, ceiling] and never pass the maximum."""
    policy = RetryPolicy(base_delay_seconds=1, max_delay_seconds=30)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (40, 30)]:
        delays = [policy.delay_seconds(attempt, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_retry_after_is_a_floor_for_the_delay() -> None:
    """Retry-After waits at least as long as Mozrest asked."""
    policy = RetryPolicy(base_delay_seconds=0.1, max_delay_seconds=1)
    assert policy.delay_seconds(1, retry_after_seconds=120) == 120


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Both Retry-After forms give seconds; junk gives None."""
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert parse_retry_after("30") == 30
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90
    )
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now=now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_breaker_opens_after_threshold_and_probes_once_per_cooldown() -> None:
    """Failures in a row open it; it allows a probe only after the cool-down; success closes."""
    breaker = Breaker(threshold=3, cooldown_seconds=10)
    for t in (0.0, 1.0):
        breaker.record_failure(t)
    assert breaker.closed
    breaker.record_failure(2.0)
    assert not breaker.closed
    assert not breaker.allows_probe(5.0)
    assert breaker.allows_probe(12.0)
    breaker.start_probe()
    assert not breaker.allows_probe(12.0)
    breaker.record_failure(13.0)  # the probe failed: open again, a new cool-down
    assert not breaker.allows_probe(20.0)
    assert breaker.allows_probe(23.0)
    breaker.start_probe()
    breaker.record_success()
    assert breaker.closed


def test_breaker_success_resets_the_failure_count() -> None:
    """Failures must be in a row: a success in between starts the count again."""
    breaker = Breaker(threshold=2, cooldown_seconds=1)
    breaker.record_failure(0)
    breaker.record_success()
    breaker.record_failure(1)
    assert breaker.closed


def test_nothing_is_suppressed_against_a_snapshot_an_unanswered_request_may_have_replaced() -> None:
    """A accepted, B sent without an answer (it may have landed), then A again: A is sent."""
    view = BookingView(accepted=state(), sent_once=True, accepted_uncertain=True)
    decision = decide(state(), view, SEND)
    assert decision.outcome is Outcome.QUEUED
    assert decision.changed_fields == []  # it equals the snapshot the operator sees
