"""The relay's loops: ingest outbox rows, claim due deliveries, POST them, record the answers.

No SQL and no HTTP here: the loops drive a `Store` and a `Publisher`, through named parts:
`RequestSlots` (how many claims may be held), `Gates` (circuit, credentials, probe), the `Sender`
(one claim's request, within its lease) and the `Recorder` (answers to the database in batches).
Four loops share one process, plus the recorder's:

| loop | does |
| --- | --- |
| ingest | outbox rows to outcomes and deliveries; leases what can go at once |
| dispatch | claims due deliveries (retries, states queued behind a request); starts requests |
| heartbeat | reports the process and its gates to `mozrest_worker` (`app.housekeeping`) |
| maintenance | retention (`app.housekeeping`) |

The events they wait on:

| event | set by | waited on by |
| --- | --- | --- |
| `_stopping` | `stop()`: SIGTERM, a loop that died | `run()` |
| `_ingest_wakeup` | `wake_ingest()` (a NOTIFY), `stop()` | ingest, after an empty look |
| `_dispatch_wakeup` | ingest (deliveries queued), a request ending with a backlog due, | dispatch |
| | the recorder (a newer state may go), `stop()` | |
| `slots.freed` | a request ending, a claim giving back slots, `stop()` | ingest's pacing |
| `gates.changed` | a breaker changing state, `stop()` | heartbeat |
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from app import metrics
from app.clock import lease_clock
from app.gates import Gates
from app.housekeeping import Housekeeping
from app.logs import get_logger, log_event
from app.pacing import Pacing
from app.publisher import Publisher
from app.recorder import Recorder, report_settled
from app.retrying import ride_out_outages
from app.sender import Sender
from app.slots import RequestSlots
from app.store import (
    AttemptResult,
    Claim,
    LeaseRequest,
    Settled,
    StoreError,
    StorePort,
    WorkerInfo,
)
from app.worker_config import WorkerConfig, new_worker_id

log = get_logger("worker")
#: With a backlog and every claim slot taken, ingest waits this long at most for slots to free
#: before it ingests without leasing (outcomes of rows that are not sent are never held longer).
INGEST_PACE_SECONDS = 1.0
#: At most this pause between consecutive ingests that find rows (see `_ingest_loop`).
INGEST_LINGER_SECONDS = 0.02
T = TypeVar("T")


class WorkerFailed(RuntimeError):
    """One of the worker's loops died of an unexpected error (logged as `worker.loop_failed`)."""


class Worker:
    """One relay process's worker. `run()` until `stop()`; it then drains within the grace."""

    def __init__(
        self,
        *,
        store: StorePort,
        publisher: Publisher,
        config: WorkerConfig,
        worker_id: str | None = None,
        ingest_wakeup: asyncio.Event | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.config = config
        self.id = worker_id or new_worker_id()
        self.slots = RequestSlots(config.concurrency)
        self.gates = Gates(
            threshold=config.circuit_threshold, cooldown_seconds=config.circuit_cooldown_seconds
        )
        self.recorder = Recorder(
            record=self._record,
            on_recorded=self._recorded,
            batch_size=config.batch_size,
            expected=lambda: min(len(self.slots.in_flight), max(1, config.concurrency // 4)),
        )
        self._stopping = asyncio.Event()
        self.sender = Sender(
            store=store,
            publisher=publisher,
            gates=self.gates,
            recorder=self.recorder,
            lease_seconds=config.lease_seconds,
            http_timeout_seconds=config.http_timeout_seconds,
            stopping=self._stopping,
        )
        self.housekeeping = Housekeeping(
            store=store,
            worker_id=self.id,
            gates=self.gates,
            request_rate=self.sender.rate.per_second,
            stopping=self._stopping,
            heartbeat_interval_seconds=config.heartbeat_interval_seconds,
            maintenance_interval_seconds=config.maintenance_interval_seconds,
            retention_seconds=config.retention_seconds,
            audit_retention_seconds=config.audit_retention_seconds,
            payload_retention_seconds=config.payload_retention_seconds,
            lease_seconds=config.lease_seconds,
        )
        self._ingest_wakeup = ingest_wakeup or asyncio.Event()
        self._dispatch_wakeup = asyncio.Event()
        # Whether deliveries are known to be due beyond what the last claim took: only then does
        # a finished request wake dispatch (otherwise it claims on its poll interval).
        self._due_backlog = True
        self.pacing = Pacing(config.concurrency)
        self.failure: BaseException | None = None
        """Set when a loop died of an unexpected error: the worker then stops and `run()` raises."""

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; `run()` then finishes or releases in-flight work and returns."""
        self._stopping.set()
        for event in (self._ingest_wakeup, self._dispatch_wakeup, self.slots.freed):
            event.set()
        self.gates.changed.set()

    def wake_ingest(self) -> None:
        """New outbox rows may be waiting (a NOTIFY arrived)."""
        self._ingest_wakeup.set()

    @property
    def circuit_state(self) -> str:
        return self.gates.circuit_state

    @property
    def credentials_state(self) -> str:
        return self.gates.credentials_state

    async def run(self) -> None:
        info = WorkerInfo(id=self.id, hostname=socket.gethostname(), pid=os.getpid(), role="worker")
        try:
            await self._ride_out(lambda: self.store.register_worker(info), "register")
        except StoreError:
            return  # stopped before the database ever answered: nothing was claimed
        log_event(log, logging.INFO, "worker.started", worker_id=self.id)
        recorder = asyncio.create_task(self.recorder.run(), name="record")
        loops = [
            asyncio.create_task(self._ingest_loop(), name="ingest"),
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self.housekeeping.heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.housekeeping.maintenance_loop(), name="maintenance"),
            asyncio.create_task(self.housekeeping.sweep_loop(), name="sweep"),
        ]
        for task in [recorder, *loops]:
            task.add_done_callback(self._loop_ended)
        try:
            await self._stopping.wait()
        finally:
            self.stop()
            deadline = time.monotonic() + self.config.shutdown_grace_seconds
            # Loops leave at their next check, never in the middle of a transaction (a cancelled
            # SQLite transaction can hold the write lock past the grace); cancel only stragglers.
            _, stragglers = await asyncio.wait(loops, timeout=self.config.shutdown_grace_seconds)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._drain(recorder, deadline=deadline)
            with contextlib.suppress(StoreError):
                await asyncio.wait_for(self.store.mark_stopped(self.id), timeout=5)
            log_event(log, logging.INFO, "worker.stopped", worker_id=self.id)
        if self.failure is not None:
            raise WorkerFailed(str(self.failure)) from self.failure

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop ends only when the worker stops; one that died of a bug stops the worker, so
        the process exits non-zero and its supervisor restarts it, rather than running on
        without ingesting or recording. What it held is released or expires with its lease."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        if isinstance(error, StoreError) and self._stopping.is_set():
            return  # stopped while the database was out: retries end with the last error
        log.error(
            "worker.loop_failed",
            exc_info=error,
            extra={"loop": task.get_name(), "worker_id": self.id},
        )
        if self.failure is None:
            self.failure = error
        self.stop()

    async def _drain(self, recorder: asyncio.Task[None], *, deadline: float) -> None:
        """Let requests on the wire finish within the grace; release what never left; record
        every answer that came back."""
        tasks = list(self.slots.in_flight)
        if tasks:
            log_event(log, logging.INFO, "worker.draining", in_flight=len(tasks))
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        waiting = [
            c for c in self.slots.in_flight.values() if c.delivery_id not in self.sender.sending
        ]
        unsent = list({c.delivery_id: c for c in self.sender.unsent + waiting}.values())
        for task in list(self.slots.in_flight):
            task.cancel()
        await asyncio.gather(*self.slots.in_flight, return_exceptions=True)
        # A request cut off mid-flight keeps its lease until it expires: it may still land, and a
        # newer state must not overtake it. Claims that never left are released at once.
        if unsent:
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(self.store.release(unsent), timeout=5)
        self.recorder.finish()  # the recorder stops after everything before this
        try:
            await asyncio.wait_for(recorder, timeout=max(deadline - time.monotonic(), 5.0))
        except TimeoutError:
            log_event(log, logging.ERROR, "worker.unrecorded", attempts=self.recorder.pending())
        except Exception as exc:  # the recorder died of a bug: `_loop_ended` logs it
            self.failure = self.failure or exc

    async def _ride_out(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """A store call, retried through database outages until it succeeds or the worker stops
        (the last `StoreError` is then raised)."""
        return await ride_out_outages(call, what, until=self._stopping)

    # -- ingest ---------------------------------------------------------------------------

    async def _ingest_loop(self) -> None:
        backlog = False
        linger = 0.0  # before the next ingest, when the last one found rows
        while not self._stopping.is_set():
            if linger > 0 and not backlog:
                # Rows keep arriving: let more commit rather than run one small transaction per
                # row. As long as the last ingest took (at most INGEST_LINGER_SECONDS): a few
                # milliseconds when the worker is idle, larger batches when it is busy.
                await asyncio.sleep(linger)
            started = time.monotonic()
            limit, lease = await self._ingest_terms(backlog)
            claimed_at = lease_clock()
            with self.slots.granting(self._may_claim) as take:
                if lease is not None:
                    lease = dataclasses.replace(lease, take=take)
                ingest_started = time.monotonic()
                report = await self._ride_out(
                    functools.partial(self.store.ingest, limit=limit, lease=lease), "ingest"
                )
            if report is not None and report.claims:
                self.pacing.ingest_took(time.monotonic() - ingest_started, len(report.claims))
            backlog = False
            took = time.monotonic() - started
            linger = min(took, INGEST_LINGER_SECONDS) if report is not None and report.rows else 0.0
            if report is None or not report.rows:
                await self._wait(self._ingest_wakeup, self.config.poll_interval_seconds)
                continue
            for outcome, count in report.outcomes.items():
                metrics.OUTBOX_ROWS.labels(outcome=outcome).inc(count)
            log_event(
                log,
                logging.DEBUG,
                "outbox.ingested",
                rows=report.rows,
                leased=len(report.claims),
                **report.outcomes,
            )
            if report.claims and self._stopping.is_set():
                with contextlib.suppress(StoreError):
                    await self.store.release(report.claims)
                break
            self._launch(report.claims, probe=False, claimed_at=claimed_at)
            if report.queued:
                self._due_backlog = True
                self._dispatch_wakeup.set()
            # Rows are arriving: look again at once (spaced by the linger above) rather than
            # after a poll interval. Only an empty look waits for the next poll.
            backlog = report.rows >= limit

    async def _ingest_terms(self, backlog: bool) -> tuple[int, LeaseRequest | None]:
        """How many outbox rows the next ingest reads, and how many of their deliveries it may
        lease to this worker.

        While Mozrest accepts, new deliveries are leased as they are ingested (one transaction
        instead of two). With a backlog and every slot taken, ingest waits for slots (up to
        `INGEST_PACE_SECONDS`) and reads about as many rows as it can lease: the backlog stays
        in the outbox, where newer states of a booking still coalesce, and another replica with
        free slots ingests meanwhile (the ingest lock is taken per transaction).
        """
        if not self.gates.may_send():
            return self.config.batch_size, None  # nothing may be sent now; decide outcomes
        slots = self.slots.free()
        wave = self.pacing.wave()
        min_claim = self.config.min_claim if wave is None else min(wave, self.config.min_claim)
        if backlog and slots < min_claim and self.slots.in_flight:
            self.slots.freed.clear()
            deadline = time.monotonic() + INGEST_PACE_SECONDS
            while slots < min_claim and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._wait(self.slots.freed, remaining)
                slots = self.slots.free()
        if slots <= 0 or not self.gates.may_send():
            return self.config.batch_size, None
        limit = self.config.batch_size
        if backlog:
            # Every free slot while answers are quick; a wave at a time while they are slow
            # (`app.pacing`).
            limit = min(limit, max(slots, min_claim) if wave is None else wave)
        return limit, LeaseRequest(
            worker_id=self.id, limit=slots, seconds=self.config.lease_seconds
        )

    def _may_claim(self) -> bool:
        """Whether a claim may take slots now: not stopping, and requests may go (the circuit
        may have opened, or credentials failed, since the claim began)."""
        return not self._stopping.is_set() and self.gates.may_send()

    # -- dispatch -------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._reread_credentials()
            slots, probe = self.gates.claimable(self.slots.free())
            if not probe and self.slots.in_flight and slots < self.config.min_claim:
                await self._wait(self._dispatch_wakeup, self._dispatch_wait_seconds())
                continue
            claimed_full = False
            if slots > 0:
                claimed_full = await self._claim(slots, probe=probe)
                if self._stopping.is_set():
                    break
            if claimed_full:
                await asyncio.sleep(0)  # let the requests start, then claim more
                continue
            await self._wait(self._dispatch_wakeup, self._dispatch_wait_seconds())

    def _reread_credentials(self) -> None:
        """While Mozrest rejects our token, read it again from its file (MOZREST_WEBHOOK_TOKEN_
        FILE) before each look for a probe: a rotated secret (a Kubernetes Secret mounted as a
        file) is probed at once, without a restart or waiting out the cool-down."""
        if self.gates.credentials.closed or not self.publisher.reload_credentials():
            return
        self.gates.credentials.allow_probe_now()
        log_event(log, logging.INFO, "credentials.reloaded", worker_id=self.id)

    @property
    def credentials_read_at(self) -> datetime | None:
        """When the webhook token was last read from its file (None for a plain value)."""
        return self.publisher.token_read_at()

    async def _claim(self, slots: int, *, probe: bool) -> bool:
        """Claim up to `slots` due deliveries (one, as a probe) and start their requests;
        True when the claim came back full (more may be due)."""
        limit = min(slots, self.config.batch_size)
        claimed_at = lease_clock()
        with self.slots.granting(self._may_claim) as take:
            claims = await self._ride_out(
                functools.partial(
                    self.store.claim_due,
                    worker_id=self.id,
                    limit=limit,
                    lease_seconds=self.config.lease_seconds,
                    take=None if probe else take,
                ),
                "claim",
            )
        if claims and self._stopping.is_set():
            with contextlib.suppress(StoreError):  # stopped while claiming: these never left
                await self.store.release(claims)
            return False
        if probe and claims:
            self.gates.start_probe()
            log_event(log, logging.INFO, "circuit.probe", delivery_id=claims[0].delivery_id)
        self._launch(claims, probe=probe, claimed_at=claimed_at)
        full = len(claims) == limit and not probe
        self._due_backlog = full
        return full

    def _launch(self, claims: list[Claim], *, probe: bool, claimed_at: float) -> None:
        """Start a request for each claim. `claimed_at` is when the claiming call started: the
        database granted the leases later than that (its clock read comes after the call's
        locks), so measuring from it errs on the safe side."""
        for claim in claims:
            task = asyncio.create_task(self.sender.send(claim, claimed_at, probe=probe))
            self.slots.hold(task, claim)
            task.add_done_callback(self._sent)

    def _dispatch_wait_seconds(self) -> float:
        if self.gates.may_send():
            return self.config.poll_interval_seconds
        return min(self.config.poll_interval_seconds * 4, self.config.circuit_cooldown_seconds)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self.slots.release(task)
        if self._due_backlog:
            self._dispatch_wakeup.set()

    # -- record ---------------------------------------------------------------------------

    async def _record(self, batch: list[AttemptResult]) -> list[Settled]:
        """Record a batch, riding out outages as long as it takes: an answer is never dropped
        while the process lives (not even when stopping)."""
        return await ride_out_outages(lambda: self.store.record(batch, worker_id=self.id), "record")

    def _recorded(self, batch: list[AttemptResult], settled: list[Settled]) -> None:
        """Logs and metrics of a recorded batch; wake dispatch when a newer state may go."""
        self.pacing.requests_took([result.duration_ms / 1000 for result in batch])
        if report_settled(batch, settled):
            self._due_backlog = True
            self._dispatch_wakeup.set()

    # -- housekeeping ---------------------------------------------------------------------

    @staticmethod
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        """Wait until `event` is set or `seconds` pass, then re-arm it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)
        event.clear()
