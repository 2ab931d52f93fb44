"""`app.pacing`: a backlog is refilled in waves only while requests are slow against ingest."""

from __future__ import annotations

from app.pacing import Pacing


def test_nothing_known_yet_leases_every_free_slot() -> None:
    assert Pacing(64).wave() is None
    only_requests = Pacing(64)
    only_requests.requests_took([0.2] * 10)
    assert only_requests.wave() is None


def test_a_slow_mozrest_refills_a_quarter_of_the_slots_at_a_time() -> None:
    pacing = Pacing(64)
    pacing.ingest_took(0.040, 64)  # 0.6 ms a row: all 64 slots in 40 ms
    pacing.requests_took([0.2] * 64)  # five times that
    assert pacing.slow and pacing.wave() == 16


def test_a_drain_bound_by_the_workers_core_is_not_taken_for_a_slow_mozrest() -> None:
    """As measured in a drain at 3,000/s: each request's own exchange takes 2-3 ms, refilling
    64 slots about 24 ms; nothing is staggered."""
    pacing = Pacing(64)
    for _ in range(20):
        pacing.ingest_took(0.012, 32)
        pacing.requests_took([0.003] * 32)
    assert not pacing.slow and pacing.wave() is None
    pacing.requests_took([0.030] * 64)  # a burst of slower answers, still under 1.5 x 24 ms
    assert pacing.wave() is None


def test_many_slots_against_a_slow_mozrest_are_staggered_too() -> None:
    """256 in flight at 200 ms: a 256-row ingest of 75 ms is less than the answer, but the
    slots would still sit empty for it on every cycle."""
    pacing = Pacing(256)
    pacing.ingest_took(0.075, 256)
    pacing.requests_took([0.2] * 256)
    assert pacing.wave() == 64


def test_the_averages_follow_a_mozrest_that_speeds_up_again() -> None:
    pacing = Pacing(8)
    pacing.ingest_took(0.008, 8)
    pacing.requests_took([0.5] * 8)
    assert pacing.wave() == 2
    pacing.requests_took([0.004] * 40)
    assert pacing.wave() is None
    assert Pacing(2).wave() is None
    tiny = Pacing(2)
    tiny.ingest_took(0.001, 2)
    tiny.requests_took([1.0])
    assert tiny.wave() == 1  # never zero
