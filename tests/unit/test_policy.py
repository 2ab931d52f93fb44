"""The delivery policy: ingest decisions, answer classification, backoff and the breaker."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from app.policy import (
    MAX_RETRY_AFTER_SECONDS,
    BookingView,
    Breaker,
    Outcome,
    RetryPolicy,
    Settlement,
    Verdict,
    classify,
    decide,
    may_send_first,
    parse_http_date,
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


NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("Mon, 30 Nov 2026 12:01:30 GMT", 90),  # IMF-fixdate
        ("Monday, 30-Nov-26 12:01:30 GMT", 90),  # RFC 850
        ("Mon Nov 30 12:01:30 2026", 90),  # asctime
        ("Mon, 30 Nov 2026 12:01:30 -0000", 90),  # -0000: once a naive datetime, then a crash
        ("Mon, 30 Nov 2026 12:01:30 +0000", 90),
        ("Mon, 30 Nov 2026 12:01:30 UTC", 90),
        ("Mon, 30 Nov 2026 13:01:30 +0100", 90),
        ("  45 ", 45),
        ("999999999999", MAX_RETRY_AFTER_SECONDS),
        ("9" * 400, MAX_RETRY_AFTER_SECONDS),
        ("9" * 5000, MAX_RETRY_AFTER_SECONDS),  # past int()'s digit limit
        ("Fri, 31 Dec 99999 23:59:59 GMT", MAX_RETRY_AFTER_SECONDS),
        ("\u00b2", None),  # str.isdigit() says yes; float() says no
        ("\u0663", None),  # ARABIC-INDIC DIGIT THREE
        ("-5", None),
        ("1.5", None),
        ("1e9", None),
        ("Mon, 30 Nov 2026 12:01:30 +9999", None),
        ("Mon, 30 Foo 2026 12:01:30 GMT", None),
        ("", None),
    ],
)
def test_retry_after_reads_every_valid_form_and_ignores_the_rest(
    value: str, seconds: float | None
) -> None:
    """Retry-After is delta-seconds in ASCII digits or an HTTP-date in any of RFC 9110's three
    formats and any zone spelling; anything else is None; nothing raises or overflows."""
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_is_read_against_the_servers_clock_when_given() -> None:
    """An HTTP-date Retry-After counts from Mozrest's own `Date`, as Unix seconds or datetime."""
    server_now = parse_http_date("Mon, 30 Nov 2026 12:00:00 GMT")
    assert parse_retry_after("Mon, 30 Nov 2026 12:00:20 GMT", now=server_now) == 20


def _settle(policy: RetryPolicy, verdict: Verdict, **changes: object) -> Settlement:
    values: dict[str, object] = {
        "now": NOW,
        "attempt_count": 0,
        "retry_window_started_at": NOW - timedelta(hours=1),
        "lease_expires_at": NOW + timedelta(seconds=30),
        "outbox_created_at": NOW - timedelta(seconds=2),
        "answered": True,
        "written": True,
        "retry_after_seconds": None,
        "newer_waiting": False,
        **changes,
    }
    return policy.settle(verdict, **values)  # type: ignore[arg-type]


def test_a_retry_after_past_the_deadline_is_dead_at_once_naming_it() -> None:
    """A Retry-After that would put the next attempt past creation + RELAY_RETRY_MAX_AGE ends
    the delivery dead now, saying so, rather than retrying it in the year 5195."""
    policy = RetryPolicy(max_age_seconds=2 * 3600)
    settled = _settle(policy, Verdict.RETRY, retry_after_seconds=MAX_RETRY_AFTER_SECONDS)
    assert settled.status == "dead"
    assert settled.error is not None and "Retry-After" in settled.error
    within = _settle(policy, Verdict.RETRY, retry_after_seconds=600)
    assert within.status == "retrying"
    assert within.next_attempt_at == NOW + timedelta(seconds=600)


def test_without_retry_after_the_last_try_falls_on_the_deadline() -> None:
    """Backoff never schedules past the deadline: one last try at it, then dead."""
    policy = RetryPolicy(base_delay_seconds=1000, max_delay_seconds=1000, max_age_seconds=3700)
    settled = _settle(policy, Verdict.RETRY)
    assert settled.next_attempt_at == NOW + timedelta(seconds=100)
    assert _settle(policy, Verdict.RETRY, now=NOW + timedelta(seconds=100)).status == "dead"


def test_backoff_of_a_huge_attempt_count_does_not_overflow() -> None:
    """Thousands of attempts (a long credentials outage) still give a capped delay."""
    policy = RetryPolicy(base_delay_seconds=1, max_delay_seconds=30)
    assert 15 <= policy.delay_seconds(5000) <= 30


def test_an_unwritten_request_does_not_wait_for_its_lease() -> None:
    """No connection, no request: the retry is not pushed to the lease's end, as it is for a
    request that may still land."""
    policy = RetryPolicy(base_delay_seconds=1, max_delay_seconds=1)
    unanswered = _settle(policy, Verdict.RETRY, answered=False, written=True)
    unwritten = _settle(policy, Verdict.RETRY, answered=False, written=False)
    assert unanswered.next_attempt_at == NOW + timedelta(seconds=30)
    assert unwritten.next_attempt_at is not None
    assert unwritten.next_attempt_at <= NOW + timedelta(seconds=1)


def test_a_booking_that_reached_a_send_status_is_sent_in_its_newest_state() -> None:
    """Amended SPEC 3.6: seated earlier (never sent), finished now: finished is queued."""
    decision = decide(state(status="finished"), BookingView(reached_send_status=True), SEND)
    assert decision.outcome is Outcome.QUEUED


def test_a_first_state_sent_is_never_a_cancellation() -> None:
    """Seated earlier but never sent, cancelled now: held, whatever came before."""
    view = BookingView(reached_send_status=True)
    assert decide(state(status="cancelled"), view, SEND).outcome is Outcome.HELD
    assert not may_send_first("cancelled", reached_send_status=True)
    assert may_send_first("finished", reached_send_status=True)
    assert not may_send_first("finished", reached_send_status=False)


def test_a_held_state_with_an_unknown_status_says_so() -> None:
    """ "Seated" (capital S) is held with a note listing the known statuses; a known one is
    held silently."""
    note = decide(state(status="Seated"), BookingView(), SEND).note
    assert note is not None and note.startswith("status: 'Seated' is not a status")
    assert "seated" in note and "cancelled" in note
    assert decide(state(status="confirmed"), BookingView(), SEND).note is None
