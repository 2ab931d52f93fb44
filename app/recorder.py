"""The worker's recorder: Mozrest's answers to the database in batches.

Requests in flight finish within moments of each other, so one transaction records whatever
arrived while the previous one was written, lingering a few milliseconds for more when more are
expected (like PgQueuer's `JobStatusLogBuffer`). Recording rides out database outages: an answer
is never dropped while the process lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from app import metrics, tracing
from app.logs import get_logger, log_event
from app.store import AttemptResult, Settled

log = get_logger("worker")

#: How long the recorder waits for more answers before writing a small batch.
RECORD_LINGER_SECONDS = 0.005


class Recorder:
    """Answers in, batches out. `run()` until `finish()`; what was put before is recorded."""

    def __init__(
        self,
        *,
        record: Callable[[list[AttemptResult]], Awaitable[list[Settled]]],
        on_recorded: Callable[[list[AttemptResult], list[Settled]], None],
        batch_size: int,
        expected: Callable[[], int],
        linger_seconds: float = RECORD_LINGER_SECONDS,
    ) -> None:
        self._record = record
        self._on_recorded = on_recorded
        self.batch_size = batch_size
        self._expected = expected
        """How many answers are worth waiting for (the requests in flight, a quarter of the
        concurrency at most)."""
        self.linger_seconds = linger_seconds
        self._queue: asyncio.Queue[AttemptResult | None] = asyncio.Queue()
        self._arrived = asyncio.Event()
        """Set by `put`; the linger waits on it."""
        self._finishing = False

    def put(self, result: AttemptResult) -> None:
        self._queue.put_nowait(result)
        self._arrived.set()

    def finish(self) -> None:
        """Record everything put so far, then end `run()`."""
        self._finishing = True
        self._queue.put_nowait(None)
        self._arrived.set()

    def pending(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            await self._linger()
            last = False
            while not self._queue.empty() and len(batch) < self.batch_size:
                item = self._queue.get_nowait()
                if item is None:
                    last = True
                    break
                batch.append(item)
            self._on_recorded(batch, await self._record(batch))
            if last:
                return

    async def _linger(self) -> None:
        wanted = self._expected()
        deadline = time.monotonic() + self.linger_seconds
        while self._queue.qsize() + 1 < wanted and not self._finishing:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


def report_settled(batch: list[AttemptResult], settled: list[Settled]) -> bool:
    """The logs and metrics of a recorded batch; True when a newer state of one of its bookings
    may go now (dispatch should look at once)."""
    woke = False
    for result, outcome in zip(batch, settled, strict=True):
        fields = {
            "delivery_id": outcome.delivery_id,
            "booking_id": outcome.booking_id,
            "status_code": result.status_code,
            **tracing.log_fields(result.claim.traceparent),
        }
        if outcome.status is None:
            log_event(log, logging.WARNING, "delivery.lease_lost", **fields)
        elif outcome.status == "delivered":
            woke = woke or outcome.newer_waiting
            if outcome.lag_seconds is not None:
                metrics.DELIVERY_LAG.observe(max(outcome.lag_seconds, 0.0))
            # One line per delivery would dominate the logs at any real rate: the admin API
            # and the metrics show each delivery; DEBUG shows the lines.
            log_event(log, logging.DEBUG, "delivery.accepted", **fields)
        elif outcome.status == "retrying":
            next_at = outcome.next_attempt_at
            log_event(
                log,
                logging.INFO,
                "delivery.retry_scheduled",
                next_attempt_at=next_at.isoformat() if next_at else None,
                error=result.error,
                **fields,
            )
        elif outcome.status == "dead":
            log_event(log, logging.WARNING, "delivery.dead", error=outcome.error, **fields)
        else:
            woke = True
            log_event(log, logging.INFO, f"delivery.{outcome.status}", **fields)
    return woke
