"""The worker's behaviours in milliseconds, against a `FakeStore` and a `FakePublisher`: request
slots, the circuit's single probe, the credentials pause, the lease before the write, and the
shutdown grace. The same behaviours run against real databases in tests/integration."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from app.housekeeping import came_back_full
from app.policy import Verdict
from app.publisher import WebhookAnswer
from app.store import PRUNE_BATCH_SIZE, SCRUB_BATCH_SIZE
from app.worker import Worker
from app.worker_config import WorkerConfig
from tests.conftest import eventually
from tests.fakes import FakePublisher, FakeStore

FAST = WorkerConfig(
    concurrency=4,
    batch_size=10,
    poll_interval_seconds=0.005,
    lease_seconds=3.0,
    http_timeout_seconds=1.0,
    shutdown_grace_seconds=1.0,
    heartbeat_interval_seconds=0.05,
    circuit_threshold=3,
    circuit_cooldown_seconds=0.1,
)


@asynccontextmanager
async def running(
    store: FakeStore, publisher: FakePublisher, config: WorkerConfig = FAST
) -> AsyncIterator[Worker]:
    worker = Worker(store=store, publisher=publisher, config=config)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 5)


async def until(check: Callable[[], Any], message: str, timeout: float = 3.0) -> None:
    async def probe() -> Any:
        return check() or None

    await eventually(probe, timeout=timeout, message=message)


async def test_no_more_requests_than_slots_are_ever_on_the_wire() -> None:
    """With 20 deliveries due and 4 slots, at most 4 requests are in flight, and all land."""
    store, publisher = FakeStore(), FakePublisher(delay_seconds=0.02)
    store.add(*(f"bk-{i}" for i in range(20)))
    async with running(store, publisher):
        await until(lambda: len(store.recorded) == 20, "20 answers recorded")
    assert publisher.most_in_flight == 4
    assert store.verdicts() == {Verdict.DELIVERED: 20}


async def test_an_open_circuit_lets_one_probe_through_per_cooldown() -> None:
    """After 3 retryable failures in a row the circuit opens; then one request per cool-down
    (the probe) until one succeeds, and the backlog drains at full speed."""
    down = True
    store = FakeStore()
    publisher = FakePublisher(lambda body: 503 if down else 200)
    store.add(*(f"bk-{i}" for i in range(8)))
    config = dataclasses.replace(FAST, concurrency=1)
    async with running(store, publisher, config) as worker:
        await until(lambda: worker.circuit_state == "open", "the circuit opened")
        opened = len(publisher.requests)
        await asyncio.sleep(0.55)
        probes = publisher.requests[opened:]
        assert 3 <= len(probes) <= 6  # one per 0.1 s cool-down
        gaps = [b.at - a.at for a, b in itertools.pairwise(probes)]
        assert all(gap >= 0.09 for gap in gaps)
        down = False
        await until(lambda: store.verdicts()[Verdict.DELIVERED] == 8, "the backlog drained")
        assert worker.circuit_state == "closed"
    assert opened == 3


async def test_rejected_credentials_pause_sending_and_nothing_goes_dead() -> None:
    """A 401 pauses dispatch: one probe per cool-down, nothing dead-lettered; an accepted probe
    resumes sending."""
    rejected = True
    store = FakeStore()
    publisher = FakePublisher(lambda body: 401 if rejected else 200)
    store.add(*(f"bk-{i}" for i in range(5)))
    config = dataclasses.replace(FAST, concurrency=1)
    async with running(store, publisher, config) as worker:
        await until(lambda: worker.credentials_state == "rejected", "credentials rejected")
        await until(lambda: ("closed", "rejected") in store.heartbeats, "the heartbeat says so")
        paused_at = len(publisher.requests)
        await asyncio.sleep(0.35)
        assert len(publisher.requests) - paused_at <= 4
        assert Verdict.DEAD not in store.verdicts()
        rejected = False
        await until(lambda: store.verdicts()[Verdict.DELIVERED] == 5, "sending resumed")
        assert worker.credentials_state == "ok"


async def test_a_claim_with_too_little_lease_left_is_given_back_unsent() -> None:
    """A claim whose lease cannot outlive a whole request is released, never posted."""
    store, publisher = FakeStore(), FakePublisher()
    (claim,) = store.add("bk-1")
    tight = dataclasses.replace(FAST, lease_seconds=1.2)
    async with running(store, publisher, tight):
        await until(lambda: claim in store.released, "the claim given back")
    assert publisher.requests == []
    assert store.recorded == []


async def test_a_request_whose_lease_ran_out_before_the_write_is_given_back() -> None:
    """When the publisher reports the deadline passed before the body was written (a frozen
    process), nothing is recorded as sent: the claim goes back."""
    store = FakeStore()
    expired = WebhookAnswer(
        status_code=None,
        duration_ms=0,
        started_at=datetime.now(UTC),
        error="not sent",
        written=False,
        lease_expired=True,
    )
    publisher = FakePublisher(lambda body: expired)
    (claim,) = store.add("bk-1")
    async with running(store, publisher):
        await until(lambda: claim in store.released, "the claim given back")
    assert store.recorded == []


async def test_stopping_lets_requests_on_the_wire_finish_within_the_grace() -> None:
    """On stop, requests already on the wire finish and are recorded; the worker then ends."""
    store, publisher = FakeStore(), FakePublisher(delay_seconds=0.2)
    store.add("bk-1", "bk-2")
    worker = Worker(store=store, publisher=publisher, config=FAST)
    task = asyncio.create_task(worker.run())
    await until(lambda: publisher.in_flight == 2, "both requests on the wire")
    started = time.monotonic()
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < FAST.shutdown_grace_seconds
    assert store.verdicts() == {Verdict.DELIVERED: 2}
    assert store.stopped == [worker.id]


async def test_stopping_cuts_off_requests_that_outlast_the_grace() -> None:
    """A request still on the wire when the grace ends is cut off, not released (it may still
    land; its lease guards it), and the worker ends within the grace."""
    store, publisher = FakeStore(), FakePublisher(delay_seconds=10)
    store.add("bk-1")
    config = dataclasses.replace(FAST, shutdown_grace_seconds=0.2)
    worker = Worker(store=store, publisher=publisher, config=config)
    task = asyncio.create_task(worker.run())
    await until(lambda: publisher.in_flight == 1, "the request on the wire")
    started = time.monotonic()
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 0.2 + 0.5
    assert store.released == []


async def test_a_rotated_token_is_probed_at_once_and_sending_resumes() -> None:
    """While Mozrest answers 401 the worker re-reads its token file before each look for a
    probe; a rotated token is probed at once, not after the cool-down, and sending resumes."""
    accepted_token = False
    store = FakeStore()
    publisher = FakePublisher(lambda body: 200 if accepted_token else 401)
    store.add(*(f"bk-{i}" for i in range(3)))
    slow_cooldown = dataclasses.replace(FAST, circuit_cooldown_seconds=30.0)
    async with running(store, publisher, slow_cooldown) as worker:
        await until(lambda: worker.credentials_state == "rejected", "credentials rejected")
        assert publisher.reloads > 0  # read again while rejected
        accepted_token, publisher.rotated_token = True, "new-token"
        await until(lambda: store.verdicts()[Verdict.DELIVERED] == 3, "sending resumed", 2.0)
        assert worker.credentials_state == "ok"
    assert Verdict.DEAD not in store.verdicts()


async def test_retention_with_more_to_do_takes_at_most_a_quarter_of_the_time() -> None:
    """Full retention batches follow each other with a pause of three times the batch's own
    time: a million rows to scrub slow the deliveries beside them, never stall them."""
    calls: list[float] = []

    class SlowPrune(FakeStore):
        async def prune(self, **_: Any) -> Counter[str]:
            calls.append(time.monotonic())
            await asyncio.sleep(0.05)
            return Counter({"deliveries_scrubbed": PRUNE_BATCH_SIZE})

    store, publisher = SlowPrune(), FakePublisher()
    worker = Worker(store=store, publisher=publisher, config=FAST)
    task = asyncio.create_task(worker.run())
    await until(lambda: len(calls) >= 3, "three retention batches")
    worker.stop()
    await task
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert all(gap >= 0.05 * 4 * 0.9 for gap in gaps[:2]), gaps


async def test_the_stalled_session_sweep_runs_each_quarter_lease_and_survives_refusals() -> None:
    """The sweep asks for sessions kept waiting three quarters of a lease, every quarter lease;
    a sweep the database refuses (a role not allowed to end sessions) is logged and tried again,
    and the worker goes on delivering."""

    class Refusing(FakeStore):
        async def end_stalled_sessions(self, *, waiting_seconds: float) -> list[str]:
            await super().end_stalled_sessions(waiting_seconds=waiting_seconds)
            if len(self.sweeps) == 1:
                raise DBAPIError("SELECT pg_terminate_backend(...)", {}, Exception("denied"))
            return ["mozrest-relay/4242"]

    store, publisher = Refusing(), FakePublisher()
    config = dataclasses.replace(FAST, lease_seconds=2.0)
    async with running(store, publisher, config):
        await until(lambda: len(store.sweeps) >= 3, "the sweep did not run again after a refusal")
        store.add("B1")
        await until(lambda: store.recorded, "the worker stopped delivering")
    assert all(waited == 1.5 for waited in store.sweeps), store.sweeps


def test_retention_goes_on_while_a_payload_walk_or_a_prune_came_back_full() -> None:
    """Payload passes are smaller than prune batches: a full walk (both walks' rows together)
    means more to scrub, as a full prune means more to delete; anything less waits an interval."""
    assert came_back_full(Counter(walked=SCRUB_BATCH_SIZE, outbox_scrubbed=3))
    assert not came_back_full(Counter(walked=SCRUB_BATCH_SIZE - 1, outbox_scrubbed=40))
    assert came_back_full(Counter(outbox=PRUNE_BATCH_SIZE))
    assert not came_back_full(Counter(outbox=PRUNE_BATCH_SIZE - 1, walked=0))
    assert not came_back_full(Counter())
