"""Delivery invariants under faults (issue 7): each scenario writes a history against PostgreSQL
with several relay processes and the emulator injecting faults, then the checker proves that
nothing was lost, nothing stale was sent and no two requests of a booking overlapped.

`CHAOS_SCALE=smoke` (the default, what `make test` runs) writes 1,200 to 2,000 changes a scenario;
`CHAOS_SCALE=full` (`make chaos`) about 20,000 and keeps outages longer.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos import scenarios
from tests.chaos.checker import check
from tests.chaos.harness import (
    Figures,
    Rms,
    relay_env,
    scaled,
    start_emulator,
    start_worker,
    wait_settled,
)
from tests.conftest import Launcher

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(scaled(170, 1500))]

SEATED = {
    "bookingId": "lease-1",
    "venueId": "venue-1",
    "partySize": 2,
    "status": "seated",
    "tables": ["T1"],
    "date": 1790000000,
}


def assert_invariants(figures: Figures) -> None:
    assert figures.report is not None
    assert figures.report.ok, figures.report.describe()
    assert (figures.lost, figures.stale, figures.overlaps) == (0, 0, 0)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_receiver_faults_lose_nothing(launcher: Launcher, database_url: str) -> None:
    """500s, timeouts, dropped connections and 429 bursts: every booking ends at its newest
    state, in order, one request at a time."""
    assert_invariants(scenarios.receiver_faults(launcher, database_url))


@pytest.mark.parametrize("backend", ["postgresql"])
def test_killed_workers_lose_nothing(launcher: Launcher, database_url: str) -> None:
    """SIGKILL every few seconds: the killed process's claims are taken over after the lease."""
    assert_invariants(scenarios.worker_kills(launcher, database_url))


@pytest.mark.parametrize("backend", ["mysql"])
def test_receiver_faults_lose_nothing_on_mariadb(launcher: Launcher, database_url: str) -> None:
    """The receiver-faults scenario with the relay on MariaDB: same invariants."""
    assert_invariants(scenarios.receiver_faults(launcher, database_url))


@pytest.mark.parametrize("backend", ["mysql"])
def test_killed_workers_lose_nothing_on_mariadb(launcher: Launcher, database_url: str) -> None:
    """SIGKILL and restart with the relay on MariaDB: claims are taken over, nothing lost."""
    assert_invariants(scenarios.worker_kills(launcher, database_url))


def test_database_restart_is_ridden_out(launcher: Launcher) -> None:
    """A private PostgreSQL restarts mid-run: relays reconnect, /readyz goes 503 then 200."""
    assert_invariants(scenarios.database_restart(launcher))


@pytest.mark.parametrize("backend", ["postgresql"])
def test_mozrest_outage_opens_the_circuit_and_drains_after(
    launcher: Launcher, database_url: str
) -> None:
    """While Mozrest fails, each relay sends only probes; afterwards the backlog drains."""
    figures = scenarios.mozrest_outage(launcher, database_url)
    assert_invariants(figures)
    # What each relay had on the wire when the outage began, plus the probes.
    bound = 2 * 32 + figures.facts["probes_allowed"]
    assert figures.facts["requests_during_outage"] <= bound, figures.notes


@pytest.mark.parametrize("backend", ["postgresql"])
def test_sigterm_under_load_exits_cleanly_and_loses_nothing(
    launcher: Launcher, database_url: str
) -> None:
    """Each SIGTERMed relay exits 0 within RELAY_SHUTDOWN_GRACE; its work is finished or
    released, and every booking still ends at its newest state."""
    figures = scenarios.graceful_shutdown(launcher, database_url)
    assert_invariants(figures)
    grace = figures.facts["grace"]
    for termination in figures.facts["exits"]:
        assert termination.code == 0, figures.notes
        assert termination.stopped_seconds is not None, figures.notes
        assert termination.stopped_seconds <= grace + 0.5, figures.notes
        # Interpreter shutdown comes on top; on a busy 2-core machine it can take a second.
        assert termination.exit_seconds <= grace + 3.0, figures.notes


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_smallest_lease_the_settings_allow_still_sends(
    launcher: Launcher, database_url: str
) -> None:
    """RELAY_LEASE_SECONDS exactly RELAY_HTTP_TIMEOUT + 1 s is accepted at start-up (SPEC 3.3:
    "at least 1 s shorter"), so a relay configured that way must deliver, not spin."""
    _, receiver = start_emulator(launcher)
    env = relay_env(database_url, receiver.url, lease_seconds="2s", http_timeout="1s")
    start_worker(launcher, env)
    rms = Rms(database_url)
    try:
        rms.write(SEATED)
        wait_settled(rms, timeout=8, what="one seated booking to be delivered")
    finally:
        rms.close()
    assert receiver.bookings()[str(SEATED["bookingId"])]["state"] == SEATED


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_newer_state_is_not_overtaken_by_a_timed_out_request(
    launcher: Launcher, database_url: str
) -> None:
    """A request that timed out on our side may still be processed by Mozrest. The lease (which
    outlives RELAY_HTTP_TIMEOUT by the documented margin) must keep the booking's newer state
    back until then, or the older state lands last and Mozrest keeps it (SPEC 3.2, 3.3)."""
    _, receiver = start_emulator(launcher)
    env = relay_env(database_url, receiver.url, lease_seconds="4s", http_timeout="1s")
    start_worker(launcher, env)
    rms = Rms(database_url)
    older, newer = dict(SEATED, bookingId="slow-1"), dict(SEATED, bookingId="slow-1", partySize=3)
    try:
        receiver.set_faults(latency_ms=2000)  # Mozrest takes 2 s; we give up after 1 s
        rms.write(older)
        time.sleep(0.4)
        rms.write(newer)  # waits behind the request on the wire
        time.sleep(0.3)
        receiver.clear_faults()  # Mozrest is fast again before our timeout fires
        wait_settled(rms, timeout=20, what="both states to settle")
        time.sleep(2.5)  # let the slow request finish on Mozrest's side
        report = check(rms.outbox_rows(), receiver.requests())
    finally:
        rms.close()
    assert receiver.bookings()["slow-1"]["state"] == newer, report.describe()
    assert report.ok, report.describe()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_state_sent_without_an_answer_is_not_taken_as_unchanged(
    launcher: Launcher, database_url: str
) -> None:
    """A accepted, then B sent and timed out (Mozrest may still accept it), then the RMS goes
    back to A. What Mozrest will hold is not known, so A must be sent again: suppressing it as
    `unchanged` against the snapshot leaves Mozrest on B if B did land (SPEC 3.2, 3.5)."""
    _, receiver = start_emulator(launcher)
    env = relay_env(database_url, receiver.url, lease_seconds="4s", http_timeout="1s")
    start_worker(launcher, env)
    rms = Rms(database_url)
    a, b = dict(SEATED, bookingId="doubt-1"), dict(SEATED, bookingId="doubt-1", tables=["T9"])
    try:
        rms.write(a)
        wait_settled(rms, timeout=10, what="A to be delivered")
        receiver.set_faults(latency_ms=2000)  # B's request will land after our 1 s timeout
        rms.write(b)
        time.sleep(0.4)
        receiver.set_faults(status=500)  # and its retries fail, so B stays unconfirmed
        time.sleep(1.1)
        rms.write(a)  # back to A while B is in doubt
        time.sleep(1.5)  # B's slow request lands at Mozrest meanwhile
        receiver.clear_faults()
        wait_settled(rms, timeout=20, what="the booking to settle")
        time.sleep(1.0)
        rows = rms.outbox_rows()
        report = check(rows, receiver.requests())
    finally:
        rms.close()
    outcomes = [(row.id, row.outcome) for row in rows]
    assert receiver.bookings()["doubt-1"]["state"] == a, f"{outcomes}\n{report.describe()}"
    assert report.ok, report.describe()
