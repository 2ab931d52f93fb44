"""Venue pause and the rate limit across real relay processes (SPEC 10, 11): what every replica
obeys, coordinated through the database alone."""

from __future__ import annotations

import itertools
import threading
import time

import httpx
import pytest

from tests.chaos.harness import (
    Rms,
    relay_env,
    start_emulator,
    start_run,
    start_worker,
)
from tests.conftest import Launcher
from tests.factories import state

ADMIN = "chaos-admin"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_pause_on_one_api_process_reaches_every_replica_within_two_seconds(
    launcher: Launcher, database_url: str
) -> None:
    """Three workers deliver two venues' states as the RMS writes them; a pause of one venue,
    asked of one process's API, stops every replica sending for it within 2 s, while the other
    venue delivers throughout."""
    _, receiver = start_emulator(launcher)
    receiver.set_faults(latency_ms=20)
    env = relay_env(database_url, receiver.url, admin_token=ADMIN)
    _, api = start_run(launcher, env)
    for _ in range(2):
        start_worker(launcher, env)
    rms = Rms(database_url)
    stop = threading.Event()
    numbers = itertools.count()

    def write() -> None:
        while not stop.is_set():
            number = next(numbers)
            rms.write(state(f"p-{number}", venue_id="v-paused"))
            rms.write(state(f"o-{number}", venue_id="v-open"))
            time.sleep(0.05)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        time.sleep(3)
        paused = httpx.post(
            f"{api}/api/venues/v-paused/pause",
            json={"reason": "replicas test"},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert paused.status_code == 200, paused.text
        paused_ns = time.monotonic_ns()
        time.sleep(5)
    finally:
        stop.set()
        writer.join(10)
        rms.close()
    requests = receiver.requests()
    late = [
        (r.arrival_ns - paused_ns) / 1e9
        for r in requests
        if (r.booking_id or "").startswith("p-") and r.arrival_ns > paused_ns + 2_000_000_000
    ]
    assert late == [], f"requests for the paused venue this long after the pause: {late}"
    after = [
        r for r in requests if (r.booking_id or "").startswith("o-") and r.arrival_ns > paused_ns
    ]
    assert len(after) > 20, "the other venue stopped too"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_rate_limit_holds_across_replicas_and_a_replica_killed_midway(
    launcher: Launcher, database_url: str
) -> None:
    """Two replicas at RELAY_RATE_LIMIT=40 with 1,500 states waiting, one SIGKILLed and
    restarted midway: over every 10-second window at most 11 x 40 requests, at least 80% of
    the limit while work waits."""
    limit = 40
    _, receiver = start_emulator(launcher)
    rms = Rms(database_url)
    try:
        for number in range(1500):
            rms.write(state(f"r-{number}", venue_id="v-rate"))
    finally:
        rms.close()
    env = relay_env(database_url, receiver.url, rate_limit=str(limit))
    first = start_worker(launcher, env)
    start_worker(launcher, env)
    time.sleep(8)
    first.kill()
    start_worker(launcher, env)
    time.sleep(14)
    arrivals = sorted(r.arrival_ns / 1e9 for r in receiver.requests())
    start, end = arrivals[0], arrivals[-1]
    assert end - start > 15, "the run was too short to judge"
    windows = [
        sum(1 for t in arrivals if begin <= t < begin + 10)
        for begin in (start + step * 0.5 for step in range(int((end - start - 10) / 0.5)))
    ]
    assert max(windows) <= 11 * limit, max(windows)
    # Work waits throughout (1,500 states at 40/s); a restart's few seconds cost a little.
    assert min(windows) >= 0.8 * limit * 10, min(windows)
