"""Frozen replicas (SPEC 9.3, 9.4): relay processes stopped with SIGSTOP past their lease, at
chosen moments, then thawed. Nothing stale reaches Mozrest after a newer state, nothing is lost,
and the replicas that still run keep delivering.

The freezes are placed by watching `pg_stat_activity` (tests/chaos/freezer.py); every frozen
process is thawed when its test ends, whatever the outcome.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from mozrest_outbox import outbox_insert
from tests.chaos import scenarios
from tests.chaos.checker import OutboxRow, ReceivedRequest, Report, check, timeline
from tests.chaos.freezer import Freezer
from tests.chaos.harness import (
    ChangeWriter,
    Receiver,
    Rms,
    relay_env,
    scaled,
    start_emulator,
    start_worker,
    wait_settled,
)
from tests.conftest import Launcher, Process

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


#: How long after X's leasing transaction commits it is stopped: its requests leave over the
#: next few tens of milliseconds (each is written by a task of its own once all have started).
SEND_DELAY_SECONDS = 0.005


def _state(booking: str, version: int) -> dict[str, Any]:
    number = int(booking.rpartition("-")[2])
    return {
        "bookingId": booking,
        "venueId": f"venue-{number % 5}",
        "partySize": 2 + version,
        "status": "seated",
        "tables": [f"T{version}"],
        "date": 1_790_000_000 + number * 60,
    }


def _write_together(rms: Rms, payloads: list[dict[str, Any]]) -> None:
    """One RMS transaction writing many bookings' states: they become visible at once."""
    with rms.engine.begin() as conn:
        for payload in payloads:
            conn.execute(outbox_insert(payload))


def _wait_holding(receiver: Receiver, wanted: list[dict[str, Any]], timeout: float) -> bool:
    """Wait until Mozrest holds every one of these states; False when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = receiver.bookings()
        if all(held.get(s["bookingId"], {}).get("state") == s for s in wanted):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_replica_frozen_between_claim_and_request_sends_nothing_after_its_lease(
    launcher: Launcher, database_url: str
) -> None:
    """SPEC 9.3: replica X leases a batch of bookings and is frozen while it starts their
    requests, past its lease; the RMS writes newer states and replica Y sends them; X is thawed.
    Mozrest must never receive one of X's older states after Y's newer one.

    Y stands aside (frozen outside any transaction) while X alone delivers a first state of each
    booking (its connections to Mozrest stay open, as on a busy replica) and then ingests and
    leases the next one; X is stopped a few milliseconds after that transaction commits, while
    its requests are starting. A round counts when X held claims not yet sent at the stop.
    """
    lease = 2.0
    bookings = [f"claimed-{n:04d}" for n in range(150)]
    _, receiver = start_emulator(launcher)
    receiver.set_faults(latency_ms=20, latency_jitter_ms=30, seed=7)
    env = relay_env(
        database_url,
        receiver.url,
        lease_seconds=f"{lease:g}s",
        http_timeout="1s",
        concurrency=256,
        batch_size=256,
    )
    x, y = start_worker(launcher, env), start_worker(launcher, env)
    rms = Rms(database_url)
    rounds: list[str] = []
    try:
        with Freezer(database_url, relay_pids=[_pid(x), _pid(y)], lease_seconds=lease) as freezer:
            for version in range(2, 12, 3):
                aside = freezer.catch(_pid(y), "idle", timeout=5)
                warm_up = [_state(b, version - 1) for b in bookings]
                _write_together(rms, warm_up)
                assert _wait_holding(receiver, warm_up, 10), "X did not deliver the warm-up"
                _write_together(rms, [_state(b, version) for b in bookings])
                frozen = freezer.catch(_pid(x), "send", timeout=5, send_delay=SEND_DELAY_SECONDS)
                freezer.thaw(aside)
                newer = [_state(b, version + 1) for b in bookings]
                _write_together(rms, newer)
                delivered = _wait_holding(receiver, newer, lease + 5)
                freezer.thaw(frozen)
                assert delivered, "Y did not deliver the newer states while X was frozen"
                time.sleep(lease)  # what X does once thawed
                wait_settled(rms, timeout=30)
                freezer.verify_requests(receiver.requests())
                rounds.append(frozen.describe())
                if frozen.unsent:
                    break
            outbox, received = rms.outbox_rows(), receiver.requests()
    finally:
        rms.close()
    report = check(outbox, received)
    late = [
        r
        for r in received
        if r.arrival_ns > (frozen.thawed_ns or 0) and r.body.get("tables") == [f"T{version}"]
    ]
    print("\n".join(rounds))
    assert frozen.unsent, "no round froze X while it held claims not yet sent:\n" + "\n".join(
        rounds
    )
    assert report.stale == 0, (
        f"X, frozen {frozen.held_seconds:.1f} s with {frozen.unsent} claims not yet sent "
        f"(lease {lease:g} s), sent {len(late)} of them after it was thawed, after Y's newer "
        f"states:\n{_explain(report, outbox, received)}"
    )
    assert report.ok, report.describe()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_replica_frozen_inside_its_ingest_transaction_stalls_nobody(
    launcher: Launcher, database_url: str
) -> None:
    """SPEC 9.4: replica X is frozen while its session holds the ingest lock (inside the ingest
    transaction); replica Y must still ingest and deliver new states, each within
    RELAY_LEASE_SECONDS + 5 s of its commit, while X stays frozen."""
    lease, count = 2.0, 20
    bound = lease + 5
    _, receiver = start_emulator(launcher)
    receiver.set_faults(latency_ms=10, latency_jitter_ms=20, seed=5)
    env = relay_env(database_url, receiver.url, lease_seconds=f"{lease:g}s", http_timeout="1s")
    x, y = start_worker(launcher, env), start_worker(launcher, env)
    rms = Rms(database_url)
    try:
        with Freezer(database_url, relay_pids=[_pid(x), _pid(y)], lease_seconds=lease) as freezer:
            # Rows keep arriving, so ingest transactions have work in them while X is watched.
            filler = ChangeWriter(
                rms, [[_state(f"filler-{n:04d}", 1)] for n in range(1000)], rate=200, threads=2
            ).start()
            try:
                frozen = freezer.catch(_pid(x), "ingest", timeout=15, tries=50)
            finally:
                filler.stop()
            assert frozen.landed, f"X could not be frozen inside ingest: {frozen.describe()}"
            committed: dict[str, int] = {}
            for n in range(count):
                state = _state(f"fresh-{n:04d}", 1)
                rms.write(state)
                committed[state["bookingId"]] = time.monotonic_ns()
                time.sleep(0.05)
            held = _wait_holding(receiver, [_state(b, 1) for b in committed], bound)
            received = receiver.requests()
            freezer.thaw(frozen)
            wait_settled(rms, timeout=30)
            report = check(rms.outbox_rows(), receiver.requests())
    finally:
        rms.close()
    lags = {
        booking_id: min(
            (
                (r.finished_ns - at) / 1e9
                for r in received
                if r.booking_id == booking_id and r.accepted and r.finished_ns >= at
            ),
            default=math.inf,
        )
        for booking_id, at in committed.items()
    }
    in_time = sum(1 for lag in lags.values() if lag <= bound)
    print(f"frozen inside ingest: {frozen.describe()}; slowest {max(lags.values()):.2f} s")
    assert held and in_time == count, (
        f"{in_time} of {count} new states delivered within {bound:g} s of their commit while "
        f"replica X was frozen inside its ingest transaction ({frozen.describe()}); "
        f"slowest: {max(lags.values()):.2f} s"
    )
    assert report.ok, report.describe()


@pytest.mark.timeout(scaled(170, 1500))
@pytest.mark.parametrize("backend", ["postgresql"])
def test_frozen_replicas_lose_nothing_send_nothing_stale_and_stall_nobody(
    launcher: Launcher, database_url: str
) -> None:
    """Replicas frozen past their lease at random moments and inside each phase, again and
    again: every booking ends at its newest state, nothing older lands after something newer,
    and the replicas still running deliver each new state within the lease + 5 s."""
    figures = scenarios.frozen_replicas(launcher, database_url)
    assert figures.report is not None
    assert figures.report.ok, figures.report.describe()
    assert (figures.lost, figures.stale, figures.overlaps) == (0, 0, 0)
    assert not figures.facts["never"], figures.notes
    assert figures.facts["slowest_seconds"] <= figures.facts["bound_seconds"], figures.notes


def _pid(process: Process) -> int:
    return process.popen.pid


def _explain(report: Report, outbox: list[OutboxRow], received: list[ReceivedRequest]) -> str:
    broken = list(dict.fromkeys(v.booking_id for v in report.violations if v.booking_id))
    return "\n".join([report.describe(), *(timeline(b, outbox, received) for b in broken[:3])])


#: A relay session that takes the ingest lock, then has asyncpg prepare a statement it has not
#: seen (Parse, Describe, Flush: no Sync), and stops its own process before binding it. The
#: session is then "active", waiting on the client, where PostgreSQL arms no idle timer.
_FROZEN_BETWEEN_PREPARE_AND_BIND = """
import asyncio, os, signal, sys
from sqlalchemy import text
from app.runtime import build_engine
from app.settings import load_settings

async def main():
    engine = build_engine(load_settings())
    async with engine.connect() as conn:
        await conn.begin()
        await conn.execute(text("SELECT name FROM mozrest_lock WHERE name = 'ingest' FOR UPDATE"))
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.prepare("SELECT count(*) FROM mozrest_outbox WHERE id > $1")
        print("prepared", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        await raw.fetch("SELECT 1")

asyncio.run(main())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_session_frozen_between_prepare_and_bind_frees_its_locks_within_a_lease(
    launcher: Launcher, database_url: str
) -> None:
    """SPEC 9.4 at its narrowest: a relay process stopped between asyncpg's prepare of a new
    statement and its bind, where no server timer acts, has its session ended by the replica
    that still runs, and the ingest lock is free again within RELAY_LEASE_SECONDS."""
    lease = 2.0
    _, receiver = start_emulator(launcher)
    relay = relay_env(database_url, receiver.url, lease_seconds=f"{lease:g}s", http_timeout="1s")
    peer = start_worker(launcher, relay)
    env = {**os.environ, **relay}
    child = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_BETWEEN_PREPARE_AND_BIND],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    rms = Rms(database_url)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line.strip() == "prepared", f"the child did not get to prepare: {line}"
        frozen_at = time.monotonic()
        deadline = frozen_at + lease + 5
        taken_after: float | None = None
        while taken_after is None and time.monotonic() < deadline:
            with rms.engine.connect() as conn:
                conn.exec_driver_sql("SET lock_timeout = '200ms'")
                try:
                    conn.exec_driver_sql(
                        "SELECT name FROM mozrest_lock WHERE name = 'ingest' FOR UPDATE"
                    )
                    taken_after = time.monotonic() - frozen_at
                except OperationalError:
                    time.sleep(0.1)
                conn.rollback()
    finally:
        rms.close()
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    print(f"frozen between prepare and bind: the ingest lock was free again after {taken_after} s")
    assert taken_after is not None, (
        f"the ingest lock was still held {lease + 5:g} s after its holder froze between "
        f"prepare and bind (lease {lease:g} s)"
    )
    assert taken_after <= lease + 0.5, f"the lock was freed {taken_after:.1f} s after the freeze"
    assert '"sessions.ended_stalled"' in peer.output(), peer.output()
