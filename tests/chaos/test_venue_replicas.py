"""Venue pause across real relay processes (SPEC 10): what every replica obeys, coordinated
through the database alone. The rate limit across replicas is in test_rate_limit.py."""

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
