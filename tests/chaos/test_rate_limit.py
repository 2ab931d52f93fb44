"""The relay-wide rate limit across real worker processes (SPEC 11), against the emulator.

With 1, 2 or 4 `mozrest-relay worker` replicas at RELAY_RATE_LIMIT 50 or 500, a backlog far
larger than the run can send, and one replica SIGKILLed and restarted midway:

- over every window of W seconds the emulator receives at most (W + 1) x limit requests (the
  contract's 10-second window: 11 x limit);
- while work waits, every window receives at least 0.8 x W x limit.

`make chaos` (CHAOS_SCALE=full) runs every pairing with the contract's 10-second windows;
`make test` runs one short pairing per replica count at 50/s with 3-second windows (a 3-second
window may hold 4 x limit).

Beside the emulator's count, each run prints the busiest window by the relay's own recorded
request starts: the difference is what the way from a lease to Mozrest adds.

A lone replica's kill leaves nothing to send until it is back: windows that overlap that gap are
exempt from the lower bound (never from the upper one). With more replicas the survivors carry
the whole limit through the kill.
"""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from app.models import attempt
from tests.chaos.harness import (
    SCALE,
    Rms,
    relay_env,
    scaled,
    start_emulator,
    wait_for_log,
)
from tests.conftest import Launcher, Process
from tests.factories import state

#: (replicas, requests per second). `make test` runs one short pairing per replica count, at
#: 50/s: 500/s needs about a core of the machine for the workers, the emulator and PostgreSQL,
#: which a 2-core machine shared with other work does not always have (docs/benchmarks.md,
#: "Rate limit and fairness"); `make chaos` runs it.
SMOKE_CASES = [(1, 50), (2, 50), (4, 50)]
FULL_CASES = [(r, limit) for r in (1, 2, 4) for limit in (50, 500)]
CASES = FULL_CASES if SCALE == "full" else SMOKE_CASES
#: The window the bounds are checked over, and the run's length before and after the kill.
WINDOW = float(scaled(3, 10))
BEFORE_KILL = float(scaled(5, 12))
AFTER_RESTART = float(scaled(6, 14))
#: Steps of the sliding window for the lower bound (the upper one starts a window at every
#: arrival, which finds the busiest window exactly).
STEP = 0.1


@dataclass(frozen=True, slots=True)
class Windows:
    """Requests per window of `width` seconds over a run's arrivals."""

    arrivals: list[float]
    width: float

    def busiest(self) -> tuple[int, float]:
        """The most requests any window holds, and where it starts (seconds from the first)."""
        best, at = 0, 0.0
        for i, begin in enumerate(self.arrivals):
            count = bisect.bisect_left(self.arrivals, begin + self.width) - i
            if count > best:
                best, at = count, begin
        return best, at - self.arrivals[0]

    def quietest(
        self, start: float, end: float, *, exempt: tuple[float, float] | None = None
    ) -> tuple[int, float] | None:
        """The fewest requests a window inside [start, end] holds (stepping by STEP), and where
        it starts; windows overlapping `exempt` are left out. None when no window fits."""
        found: tuple[int, float] | None = None
        begin = start
        while begin + self.width <= end:
            stop = begin + self.width
            if exempt is None or stop <= exempt[0] or begin >= exempt[1]:
                count = bisect.bisect_left(self.arrivals, stop) - bisect.bisect_left(
                    self.arrivals, begin
                )
                if found is None or count < found[0]:
                    found = (count, begin - self.arrivals[0])
            begin += STEP
        return found


def _attempt_starts(database_url: str) -> list[float]:
    """When each recorded request started, by the relay's clock (a killed replica's last
    requests are never recorded): the relay's side of the windows, beside the emulator's."""
    rms = Rms(database_url)
    try:
        with rms.engine.connect() as conn:
            rows = conn.execute(select(attempt.c.started_at)).scalars().all()
    finally:
        rms.close()
    return sorted(value.timestamp() for value in rows)


def _start_workers(launcher: Launcher, env: dict[str, str], count: int) -> list[Process]:
    """Start `count` workers at once (so their start-ups overlap), then wait for each."""
    processes = [launcher.start("worker", env=env) for _ in range(count)]
    for process in processes:
        wait_for_log(process, '"worker.started"', timeout=60)
    return processes


@pytest.mark.timeout(int(scaled(120, 240)))
@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize(
    ("replicas", "limit"), CASES, ids=[f"{r}-replicas-{limit}-per-s" for r, limit in CASES]
)
def test_the_rate_limit_holds_across_replicas_and_a_replica_killed_midway(
    launcher: Launcher, database_url: str, replicas: int, limit: int
) -> None:
    """Replicas drain a backlog larger than the run at RELAY_RATE_LIMIT=limit; one is
    SIGKILLed midway and restarted: every window holds at most (W + 1) x limit requests and,
    while work waits, at least 0.8 x W x limit."""
    run_seconds = BEFORE_KILL + AFTER_RESTART + 5
    backlog = int(limit * run_seconds * 1.5) + 200
    _, receiver = start_emulator(launcher)
    rms = Rms(database_url)
    try:
        rms.write_many([state(f"r-{n:06d}", venue_id=f"v-{n % 20}") for n in range(backlog)])
    finally:
        rms.close()
    env = relay_env(
        database_url,
        receiver.url,
        rate_limit=str(limit),
        # The bounds are about the limit, not the defaults' throughput on a shared 2-core
        # machine: enough requests in flight that one replica alone can carry 500/s while a
        # claim-to-record cycle takes a few hundred milliseconds, and a lease long enough that
        # a slow record never loses it (a lost lease resends, spending tokens on duplicates).
        concurrency=os.environ.get("RATE_TEST_CONCURRENCY", "256"),
        batch_size=os.environ.get("RATE_TEST_BATCH_SIZE", "200"),
        lease_seconds="10s",
    )
    workers = _start_workers(launcher, env, replicas)
    time.sleep(BEFORE_KILL)
    killed_ns = time.monotonic_ns()
    workers[0].kill()
    _start_workers(launcher, env, 1)
    restarted_ns = time.monotonic_ns()
    time.sleep(AFTER_RESTART)
    observed_ns = time.monotonic_ns()
    requests = receiver.requests()
    sent = _attempt_starts(database_url)
    arrivals = sorted(r.arrival_ns / 1e9 for r in requests if r.arrival_ns <= observed_ns)
    assert len(arrivals) < backlog, "the backlog ran out: no work waited at the end"
    start, end = arrivals[0], arrivals[-1]
    assert end - start >= 2 * WINDOW, f"the run was too short to judge: {end - start:.1f} s"
    windows = Windows(arrivals, WINDOW)
    busiest, busiest_at = windows.busiest()
    # A lone replica's kill stops sending until its successor has started and claimed.
    exempt = (killed_ns / 1e9, restarted_ns / 1e9 + 1.0) if replicas == 1 else None
    quietest = windows.quietest(start, end, exempt=exempt)
    rate = len(arrivals) / (end - start)
    sent_busiest, _ = Windows(sent, WINDOW).busiest()
    print(
        f"\n{replicas} replicas at {limit}/s, {WINDOW:g}-s windows: {len(arrivals):,} requests "
        f"in {end - start:.1f} s ({rate:.1f}/s); busiest window {busiest} "
        f"({busiest / WINDOW / limit:.3f} x limit) at {busiest_at:.1f} s; quietest "
        f"{quietest and quietest[0]} ({quietest and round(quietest[0] / WINDOW / limit, 3)} x "
        f"limit) at {quietest and round(quietest[1], 1)} s; killed at "
        f"{killed_ns / 1e9 - start:.1f} s, restarted at {restarted_ns / 1e9 - start:.1f} s; "
        f"by the relay's recorded attempts, busiest window {sent_busiest} "
        f"({sent_busiest / WINDOW / limit:.3f} x limit)"
    )
    assert busiest <= (WINDOW + 1) * limit, (
        f"{busiest} requests in the {WINDOW:g}-s window at {busiest_at:.1f} s: over "
        f"{(WINDOW + 1) * limit:g}"
    )
    assert quietest is not None, "no window outside the kill's gap to judge the lower bound by"
    assert quietest[0] >= 0.8 * WINDOW * limit, (
        f"{quietest[0]} requests in the {WINDOW:g}-s window at {quietest[1]:.1f} s while work "
        f"waited: under {0.8 * WINDOW * limit:g}"
    )
