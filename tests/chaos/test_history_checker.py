"""The history checker itself, on small hand-made histories: each broken rule is flagged, and
nothing is flagged where the relay behaved."""

from __future__ import annotations

import json
from typing import Any

from tests.chaos.checker import OutboxRow, ReceivedRequest, check, delivery_lags

MS = 1_000_000


def state(booking: str = "b1", **changes: Any) -> dict[str, Any]:
    return {
        "bookingId": booking,
        "venueId": "v1",
        "partySize": 2,
        "status": "seated",
        "tables": ["t1"],
        "date": 1639578600,
        **changes,
    }


def row(row_id: int, payload: Any, outcome: str | None = "queued") -> OutboxRow:
    booking = payload["bookingId"] if isinstance(payload, dict) else "b1"
    return OutboxRow(row_id, booking, "v1", json.dumps(payload), outcome)


class Receiver:
    """Builds a receiver log: requests one after another unless told when."""

    def __init__(self) -> None:
        self.log: list[ReceivedRequest] = []
        self.clock = 0

    def got(
        self, body: dict[str, Any], status: int | None = 200, *, at: int | None = None, ms: int = 5
    ) -> Receiver:
        start = self.clock + MS if at is None else at * MS
        self.clock = start + ms * MS
        self.log.append(
            ReceivedRequest(
                body["bookingId"], start, start + ms * MS, status, body, seq=len(self.log) + 1
            )
        )
        return self


def rules(report: Any) -> list[str]:
    return sorted(v.rule for v in report.violations)


def test_a_clean_history_has_no_violation_and_no_duplicate() -> None:
    """Seated, then a table move, each accepted once: nothing to flag."""
    a, b = state(), state(tables=["t2"])
    report = check([row(1, a), row(2, b)], Receiver().got(a).got(b).log)
    assert report.ok, report.describe()
    assert (report.changes, report.bookings, report.requests, report.accepted) == (2, 1, 2, 2)
    assert report.duplicates == 0


def test_the_newest_state_never_accepted_is_lost() -> None:
    """The newest seated state was written but Mozrest only ever accepted the older one."""
    a, b = state(), state(partySize=3)
    report = check([row(1, a), row(2, b)], Receiver().got(a).got(b, 500).log)
    assert rules(report) == ["lost"]
    assert report.lost == 1


def test_a_booking_never_sent_at_all_is_lost() -> None:
    """A seated state with no request at all."""
    report = check([row(1, state())], [])
    assert rules(report) == ["lost"]


def test_a_later_change_of_a_sent_booking_must_follow_whatever_its_status() -> None:
    """Seated was accepted; the cancellation after it never arrived (SPEC 3.6)."""
    a, c = state(), state(status="cancelled")
    report = check([row(1, a), row(2, c)], Receiver().got(a).log)
    assert rules(report) == ["lost"]


def test_a_held_newest_state_may_be_missing_when_nothing_was_sent() -> None:
    """Seated then cancelled before anything left: coalesced into `held`, nothing sent."""
    report = check([row(1, state(), "superseded"), row(2, state(status="cancelled"), "held")], [])
    assert report.ok, report.describe()


def test_a_booking_never_seated_must_never_be_sent() -> None:
    """Booked then cancelled: any request at all breaks the send policy."""
    booked, cancelled = state(status="booked"), state(status="cancelled")
    report = check([row(1, booked, "held"), row(2, cancelled, "held")], Receiver().got(booked).log)
    assert rules(report) == ["unexpected"]


def test_an_older_state_after_a_newer_one_is_stale_even_if_the_final_state_is_right() -> None:
    """B (newer) went out, then A (older), then B again: the A request is stale."""
    a, b = state(), state(partySize=4)
    report = check([row(1, a), row(2, b)], Receiver().got(b, 500).got(a).got(b).log)
    assert rules(report) == ["stale"]
    assert report.stale == 1


def test_an_older_state_landing_last_is_both_stale_and_lost() -> None:
    a, b = state(), state(partySize=4)
    report = check([row(1, a), row(2, b)], Receiver().got(b).got(a).log)
    assert rules(report) == ["lost", "stale"]


def test_a_state_written_twice_is_read_in_the_relays_favour() -> None:
    """A, B, A written; A, B, A received: the last A is row 3's, not a stale row 1."""
    a, b = state(), state(tables=["t9"])
    history = [row(1, a), row(2, b), row(3, a)]
    report = check(history, Receiver().got(a).got(b).got(a).log)
    assert report.ok, report.describe()
    assert report.duplicates == 0


def test_overlapping_requests_of_one_booking_are_flagged() -> None:
    """The second request arrived while the first was still being answered."""
    a, b = state(), state(partySize=5)
    log = Receiver().got(a, at=0, ms=50).got(b, at=20, ms=40).log
    report = check([row(1, a), row(2, b)], log)
    assert rules(report) == ["overlap"]
    assert report.overlaps == 1


def test_back_to_back_requests_and_other_bookings_do_not_overlap() -> None:
    """Requests of one booking that touch, and requests of two bookings at once, are fine."""
    a, b, other = state(), state(partySize=5), state("b2")
    log = Receiver().got(a, at=0, ms=10).got(other, at=2, ms=30).got(b, at=10, ms=5).log
    report = check([row(1, a), row(2, other), row(3, b)], log)
    assert report.ok, report.describe()


def test_the_same_state_accepted_twice_is_a_duplicate_not_a_violation() -> None:
    """A timeout after Mozrest accepted: the retry lands the same state again."""
    a = state()
    report = check([row(1, a)], Receiver().got(a).got(a).log)
    assert report.ok, report.describe()
    assert report.duplicates == 1


def test_equality_is_on_the_normalised_state() -> None:
    """50 equals 50.0 and empty items equal no items: the final state matches (SPEC 3.5)."""
    written = state(prepayment=50, items=[])
    received = state(prepayment=50.0)
    report = check([row(1, written)], Receiver().got(received).log)
    assert report.ok, report.describe()


def test_the_final_state_is_the_one_that_finished_last() -> None:
    """Two overlapping requests: the older one finished last, so Mozrest holds it."""
    a, b = state(), state(partySize=6)
    log = Receiver().got(a, at=0, ms=100).got(b, at=10, ms=5).log
    report = check([row(1, a), row(2, b)], log)
    assert rules(report) == ["lost", "overlap"]


def test_a_row_without_an_outcome_is_lost() -> None:
    a = state()
    report = check([row(1, a), row(2, state(partySize=3), None)], Receiver().got(a).log)
    assert "unsettled" in rules(report)
    assert report.lost == 2  # the row itself, and the booking's newest state


def test_invalid_rows_are_skipped_when_finding_the_newest_state() -> None:
    """The newest row is malformed: the state before it is the one Mozrest must hold."""
    a = state()
    broken = state(partySize=0)
    report = check([row(1, a), row(2, broken, "invalid")], Receiver().got(a).log)
    assert report.ok, report.describe()


def test_a_wrong_outcome_is_flagged_both_ways() -> None:
    """A valid row marked invalid, and a malformed row given a delivery."""
    a = state()
    history = [row(1, a, "invalid"), row(2, state("b2", partySize=-1), "queued")]
    report = check(history, [])
    assert rules(report) == ["lost", "outcome", "outcome"]


def test_a_row_whose_bookingid_disagrees_with_its_column_is_invalid() -> None:
    mismatched = OutboxRow(1, "b1", "v1", json.dumps(state("b9")), "invalid")
    assert check([mismatched], []).ok


def test_a_request_carrying_a_state_never_written_is_a_phantom() -> None:
    a = state()
    report = check([row(1, a)], Receiver().got(a).got(state(notes="never written")).log)
    assert rules(report) == ["lost", "phantom"]


def test_size_counts_the_wire_form_not_the_stored_text() -> None:
    """Stored with ASCII escapes and spaces, the text is over the limit; the state is not."""
    under = state(notes="é" * 300)
    stored = json.dumps(under)  # ensure_ascii: each é takes 6 bytes here, 2 on the wire
    assert len(stored) > 1024
    report = check(
        [OutboxRow(1, "b1", "v1", stored, "queued")],
        Receiver().got(under).log,
        max_payload_bytes=1024,
    )
    assert report.ok, report.describe()


def test_a_lag_runs_from_the_commit_to_mozrest_holding_that_state_or_a_newer_one() -> None:
    """A (row 1) accepted 40 ms after its commit; B (row 2) never sent on its own but C (row 3),
    accepted 900 ms after B's commit, covers it; a state Mozrest already held lags 0."""
    a, b, c = state(), state(tables=["t2"]), state(tables=["t3"])
    rows = [row(1, a), row(2, b, "superseded"), row(3, c), row(4, c, "unchanged")]
    log = Receiver().got(a, at=50, ms=30).got(c, at=1000, ms=100).log
    commits = {1: 40 * MS, 2: 200 * MS, 3: 600 * MS, 4: 1200 * MS}
    lags = {lag.outbox_id: lag.seconds for lag in delivery_lags(rows, log, commits)}
    assert lags == {1: 0.04, 2: 0.9, 3: 0.5, 4: 0.0}


def test_a_state_never_held_has_no_lag_and_held_states_are_not_measured() -> None:
    """A booking whose newest state Mozrest never got shows None; a `held` state (no send status
    yet, SPEC 3.6) and rows without a commit time are left out."""
    booked, seated, moved = state(status="booked"), state(), state(tables=["t9"])
    rows = [row(1, booked, "held"), row(2, seated), row(3, moved)]
    log = Receiver().got(seated, at=100).log
    lags = {lag.outbox_id: lag.seconds for lag in delivery_lags(rows, log, {1: 0, 3: 200 * MS})}
    assert lags == {3: None}
