"""The relay's loop: ingest outbox rows, claim due deliveries, POST them, record the answers.

No SQL and no HTTP here: the loop drives a `Store` and a `Publisher`. Four tasks share one process:
ingest (outbox rows to outcomes and deliveries), dispatch (claims and requests, bounded by
`concurrency`), record (answers to the database in batches) and housekeeping (heartbeat,
retention). The circuit breaker and the credentials pause gate dispatch.
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
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from app import metrics
from app.clock import lease_clock
from app.contract import serialize
from app.logs import get_logger, log_event
from app.policy import Breaker, Verdict, classify
from app.publisher import Publisher, WebhookAnswer
from app.settings import LEASE_MARGIN_SECONDS, Settings
from app.store import AttemptResult, Claim, LeaseRequest, Store, StoreError, WorkerInfo

log = get_logger("worker")
#: How long the recorder waits for more answers before writing a small batch.
RECORD_LINGER_SECONDS = 0.005
#: With a backlog and every claim slot taken, ingest waits this long at most for slots to free
#: before it ingests without leasing (outcomes of rows that are not sent are never held longer).
INGEST_PACE_SECONDS = 1.0
#: At most this pause between consecutive ingests that find rows (see `_ingest_loop`).
INGEST_LINGER_SECONDS = 0.02
T = TypeVar("T")


class WorkerFailed(RuntimeError):
    """One of the worker's loops died of an unexpected error (logged as `worker.loop_failed`)."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The tuning the loop needs, in seconds and counts."""

    concurrency: int = 64
    batch_size: int = 200
    poll_interval_seconds: float = 0.05
    lease_seconds: float = 30.0
    http_timeout_seconds: float = 10.0
    shutdown_grace_seconds: float = 15.0
    heartbeat_interval_seconds: float = 5.0
    circuit_threshold: int = 5
    circuit_cooldown_seconds: float = 10.0
    retention_seconds: float = 7 * 86400.0
    maintenance_interval_seconds: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            concurrency=settings.relay_concurrency,
            batch_size=settings.relay_batch_size,
            poll_interval_seconds=settings.relay_poll_interval,
            lease_seconds=settings.relay_lease_seconds,
            http_timeout_seconds=settings.relay_http_timeout,
            shutdown_grace_seconds=settings.relay_shutdown_grace,
            heartbeat_interval_seconds=settings.relay_heartbeat_interval,
            circuit_threshold=settings.relay_circuit_threshold,
            circuit_cooldown_seconds=settings.relay_circuit_cooldown,
            retention_seconds=settings.relay_retention,
        )


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker:
    """One relay process's worker. `run()` until `stop()`; it then drains within the grace."""

    def __init__(
        self,
        *,
        store: Store,
        publisher: Publisher,
        config: WorkerConfig,
        worker_id: str | None = None,
        ingest_wakeup: asyncio.Event | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.config = config
        self.id = worker_id or new_worker_id()
        self.circuit = Breaker(
            threshold=config.circuit_threshold, cooldown_seconds=config.circuit_cooldown_seconds
        )
        self.credentials = Breaker(threshold=1, cooldown_seconds=config.circuit_cooldown_seconds)
        self._stopping = asyncio.Event()
        self._ingest_wakeup = ingest_wakeup or asyncio.Event()
        self._dispatch_wakeup = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._slots_freed = asyncio.Event()
        self._results: asyncio.Queue[AttemptResult | None] = asyncio.Queue()
        self._result_arrived = asyncio.Event()
        # Claims in flight, at most `concurrency`: a claim is held only while its request is on
        # the wire, so a state still waiting for a connection stays in the database, where a
        # newer state can supersede it.
        self._in_flight: dict[asyncio.Task[None], Claim] = {}
        self._reserved = 0
        # Whether deliveries are known to be due beyond what the last claim took: only then does
        # a finished request wake dispatch (otherwise it claims on its poll interval).
        self._due_backlog = True
        self._sending: set[int] = set()
        self._unsent: list[Claim] = []
        self._probe_in_flight = False
        self.failure: BaseException | None = None
        """Set when a loop died of an unexpected error: the worker then stops and `run()` raises."""
        # Claims are made in batches: a claim costs the same few statements however many rows
        # it takes, so with claims held wait until half a batch is free rather than claiming
        # one delivery per finished request.
        self._min_claim = max(1, min(config.concurrency // 2, config.batch_size))

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; `run()` then finishes or releases in-flight work and returns."""
        self._stopping.set()
        self._ingest_wakeup.set()
        self._dispatch_wakeup.set()
        self._slots_freed.set()
        self._state_changed.set()

    def wake_ingest(self) -> None:
        """New outbox rows may be waiting (a NOTIFY arrived)."""
        self._ingest_wakeup.set()

    @property
    def circuit_state(self) -> str:
        return str(self.circuit.state)

    @property
    def credentials_state(self) -> str:
        return "ok" if self.credentials.closed else "rejected"

    async def run(self) -> None:
        info = WorkerInfo(id=self.id, hostname=socket.gethostname(), pid=os.getpid(), role="worker")
        try:
            await self._with_retries(lambda: self.store.register_worker(info), "register")
        except StoreError:
            return  # stopped before the database ever answered: nothing was claimed
        log_event(log, logging.INFO, "worker.started", worker_id=self.id)
        recorder = asyncio.create_task(self._record_loop(), name="record")
        loops = [
            asyncio.create_task(self._ingest_loop(), name="ingest"),
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
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
        tasks = list(self._in_flight)
        if tasks:
            log_event(log, logging.INFO, "worker.draining", in_flight=len(tasks))
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        waiting = [c for c in self._in_flight.values() if c.delivery_id not in self._sending]
        unsent = list({c.delivery_id: c for c in self._unsent + waiting}.values())
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        # A request cut off mid-flight keeps its lease until it expires: it may still land, and a
        # newer state must not overtake it. Claims that never left are released at once.
        if unsent:
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(self.store.release(unsent), timeout=5)
        self._results.put_nowait(None)  # the recorder stops after everything before this
        try:
            await asyncio.wait_for(recorder, timeout=max(deadline - time.monotonic(), 5.0))
        except TimeoutError:
            log_event(log, logging.ERROR, "worker.unrecorded", attempts=self._results.qsize())
        except Exception as exc:  # the recorder died of a bug: `_loop_ended` logs it
            self.failure = self.failure or exc

    async def _with_retries(
        self, call: Callable[[], Awaitable[T]], what: str, *, until_stopped: bool = True
    ) -> T:
        """Run a store call, riding out database outages until it succeeds or, when
        `until_stopped`, the worker stops (the last `StoreError` is then raised)."""

        def log_retry(state: object) -> None:
            outcome = getattr(state, "outcome", None)
            error = outcome.exception() if outcome is not None else None
            log_event(log, logging.WARNING, "store.unavailable", during=what, error=str(error))

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StoreError),
            wait=wait_random_exponential(multiplier=0.1, max=5.0),
            before_sleep=log_retry,
            stop=lambda _: until_stopped and self._stopping.is_set(),
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

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
            with self._slots() as take:
                if lease is not None:
                    lease = dataclasses.replace(lease, take=take)
                report = await self._with_retries(
                    functools.partial(self.store.ingest, limit=limit, lease=lease), "ingest"
                )
            backlog = False
            took = time.monotonic() - started
            linger = min(took, INGEST_LINGER_SECONDS) if report is not None and report.rows else 0.0
            if report is not None and report.rows:
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
                backlog = report.rows >= limit
                # Rows are arriving: look again at once (spaced by the linger above) rather
                # than after a poll interval. Only an empty look waits for the next poll.
                continue
            await self._wait(self._ingest_wakeup, self.config.poll_interval_seconds)

    async def _ingest_terms(self, backlog: bool) -> tuple[int, LeaseRequest | None]:
        """How many outbox rows the next ingest reads, and how many of their deliveries it may
        lease to this worker.

        While Mozrest accepts, new deliveries are leased as they are ingested (one transaction
        instead of two). With a backlog and every slot taken, ingest waits for slots (up to
        `INGEST_PACE_SECONDS`) and reads about as many rows as it can lease: the backlog stays
        in the outbox, where newer states of a booking still coalesce, and another replica with
        free slots ingests meanwhile (the ingest lock is taken per transaction).
        """
        if not self._gates_closed():
            return self.config.batch_size, None  # nothing may be sent now; decide outcomes
        slots = self._claim_slots()
        if backlog and slots < self._min_claim and self._in_flight:
            self._slots_freed.clear()
            deadline = time.monotonic() + INGEST_PACE_SECONDS
            while slots < self._min_claim and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._wait(self._slots_freed, remaining)
                slots = self._claim_slots()
        if slots <= 0 or not self._gates_closed():
            return self.config.batch_size, None
        limit = self.config.batch_size
        if backlog:
            limit = min(limit, max(slots, self._min_claim))
        return limit, LeaseRequest(
            worker_id=self.id, limit=slots, seconds=self.config.lease_seconds
        )

    # -- dispatch -------------------------------------------------------------------------

    def _gates_closed(self) -> bool:
        return self.circuit.closed and self.credentials.closed

    @contextlib.contextmanager
    def _slots(self) -> Iterator[Callable[[int], int]]:
        """Hand a claim (ingest's or dispatch's) a `take(wanted)` that grants free request slots
        at the moment the claim knows how many it can lease, and holds them until the claim
        returns (its claims are then in flight). Reserving up front would hold every free slot
        for the whole transaction, and ingest and dispatch, both claiming, would starve each
        other (measured: states left for dispatch's next poll, 50 ms later).
        """
        taken = 0

        def take(wanted: int) -> int:
            nonlocal taken
            if self._stopping.is_set() or not self._gates_closed():
                return 0  # stopping, or the circuit opened (or credentials failed) meanwhile
            granted = max(0, min(wanted, self._claim_slots()))
            self._reserved += granted
            taken += granted
            return granted

        try:
            yield take
        finally:
            self._reserved -= taken
            if taken:
                self._slots_freed.set()

    def _claim_slots(self) -> int:
        return max(0, self.config.concurrency - len(self._in_flight) - self._reserved)

    def _free_slots(self) -> tuple[int, bool]:
        """How many claims dispatch may make now, and whether they are a probe."""
        if self._gates_closed():
            return self._claim_slots(), False
        if self._probe_in_flight:
            return 0, False
        now = time.monotonic()
        gates = [b for b in (self.circuit, self.credentials) if not b.closed]
        if all(b.allows_probe(now) for b in gates):
            return 1, True
        return 0, False

    async def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            claimed_full = False
            slots, probe = self._free_slots()
            if not probe and self._in_flight and slots < self._min_claim:
                await self._wait(self._dispatch_wakeup, self._dispatch_wait_seconds())
                continue
            if slots > 0:
                limit = min(slots, self.config.batch_size)
                claimed_at = lease_clock()
                with self._slots() as take:
                    claims = await self._with_retries(
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
                    # Stopped while claiming: these never left.
                    with contextlib.suppress(StoreError):
                        await self.store.release(claims)
                    break
                if probe and claims:
                    self._probe_in_flight = True
                    for gate in (self.circuit, self.credentials):
                        if not gate.closed:
                            gate.start_probe()
                    log_event(log, logging.INFO, "circuit.probe", delivery_id=claims[0].delivery_id)
                self._launch(claims, probe=probe, claimed_at=claimed_at)
                claimed_full = len(claims) == limit and not probe
                self._due_backlog = claimed_full
            if claimed_full:
                await asyncio.sleep(0)  # let the requests start, then claim more
                continue
            await self._wait(self._dispatch_wakeup, self._dispatch_wait_seconds())

    def _launch(self, claims: list[Claim], *, probe: bool, claimed_at: float) -> None:
        """Start a request for each claim. `claimed_at` is when the claiming call started: the
        database granted the leases later than that (its clock read comes after the call's
        locks), so measuring from it errs on the safe side."""
        for claim in claims:
            task = asyncio.create_task(self._send(claim, claimed_at, probe=probe))
            self._in_flight[task] = claim
            task.add_done_callback(self._sent)

    def _dispatch_wait_seconds(self) -> float:
        if self.circuit.closed and self.credentials.closed:
            return self.config.poll_interval_seconds
        return min(self.config.poll_interval_seconds * 4, self.config.circuit_cooldown_seconds)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        if self._due_backlog:
            self._dispatch_wakeup.set()
        self._slots_freed.set()

    async def _send(self, claim: Claim, claimed_at: float, *, probe: bool) -> None:
        answer = await self._post(claim, claimed_at, probe=probe)
        if answer is None:
            return
        verdict = classify(answer.status_code)
        metrics.WEBHOOK_REQUESTS.labels(
            code=str(answer.status_code) if answer.status_code is not None else "error"
        ).inc()
        metrics.WEBHOOK_DURATION.observe(answer.duration_ms / 1000)
        self._update_gates(verdict)
        if probe:
            self._end_probe(abandoned=False)
        self._result_arrived.set()
        await self._results.put(
            AttemptResult(
                claim=claim,
                verdict=verdict,
                started_at=answer.started_at,
                duration_ms=answer.duration_ms,
                status_code=answer.status_code,
                error=answer.error,
                response_body=answer.body,
                retry_after_seconds=answer.retry_after_seconds,
                written=answer.written,
            )
        )

    async def _post(self, claim: Claim, claimed_at: float, *, probe: bool) -> WebhookAnswer | None:
        """POST the claim's state, or give the claim back (None) if it should not leave now."""
        # The lease was granted on the database clock; this process measures it on
        # `lease_clock()` (which runs while the process is frozen) from before the grant. The
        # request must end before the lease does: start-up guarantees RELAY_LEASE_SECONDS >=
        # RELAY_HTTP_TIMEOUT + LEASE_MARGIN_SECONDS; a claim that has used up half that margin
        # before its request starts is given back, and the request's own deadline is absolute,
        # checked again by the publisher the moment the body is written.
        now = lease_clock()
        lease_ends = claimed_at + self.config.lease_seconds - LEASE_MARGIN_SECONDS / 2
        if self._stopping.is_set():
            self._unsent.append(claim)  # released by `_drain`
        elif lease_ends - now <= self.config.http_timeout_seconds or (
            not probe and not self._gates_closed()
        ):
            # Too little lease left, or the circuit opened since the claim: not now.
            with contextlib.suppress(StoreError):
                await self.store.release([claim])
        else:
            deadline = min(now + self.config.http_timeout_seconds, lease_ends)
            self._sending.add(claim.delivery_id)
            try:
                answer = await self.publisher.publish(serialize(claim.payload), deadline=deadline)
            except Exception as exc:  # a bug must not strand the claim: record a failed try
                log.exception("delivery.publish_failed", extra={"delivery_id": claim.delivery_id})
                answer = WebhookAnswer(
                    status_code=None,
                    duration_ms=int((lease_clock() - now) * 1000),
                    started_at=datetime.now(UTC),
                    error=f"internal error: {type(exc).__name__}",
                )
            finally:
                self._sending.discard(claim.delivery_id)
            if not answer.lease_expired:
                return answer
            # Frozen past its deadline before the body was written: nothing left, so the claim
            # goes back as if never made (a successor may hold the booking by now: `release`
            # only gives back what this lease still holds).
            log_event(log, logging.WARNING, "delivery.lease_expired_unsent", **_ids(claim))
            with contextlib.suppress(StoreError):
                await self.store.release([claim])
        if probe:
            self._end_probe(abandoned=True)
        return None

    def _end_probe(self, *, abandoned: bool) -> None:
        self._probe_in_flight = False
        if abandoned:
            now = time.monotonic()
            self.circuit.abandon_probe(now)
            self.credentials.abandon_probe(now)

    def _update_gates(self, verdict: Verdict) -> None:
        before = (self.circuit.state, self.credentials.state)
        now = time.monotonic()
        if verdict is Verdict.DELIVERED:
            self.circuit.record_success()
            self.credentials.record_success()
        elif verdict is Verdict.RETRY:
            self.circuit.record_failure(now)
        elif verdict is Verdict.CREDENTIALS_REJECTED:
            self.circuit.record_success()  # Mozrest answered: not an outage
            self.credentials.record_failure(now)
        else:
            self.circuit.record_success()
            self.credentials.abandon_probe(now)  # says nothing of our credentials
        after = (self.circuit.state, self.credentials.state)
        if after != before:
            log_event(
                log,
                logging.WARNING if after != ("closed", "closed") else logging.INFO,
                "circuit.changed",
                circuit=self.circuit_state,
                credentials=self.credentials_state,
            )
            self._state_changed.set()

    # -- record ---------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        """Record answers in batches: whatever arrived while the previous batch was written."""
        while True:
            first = await self._results.get()
            if first is None:
                return
            batch = [first]
            last = False
            # Requests in flight finish within moments of each other: a short linger turns
            # many one-row transactions into one.
            wanted = min(len(self._in_flight), max(1, self.config.concurrency // 4))
            deadline = time.monotonic() + RECORD_LINGER_SECONDS
            while self._results.qsize() + 1 < wanted and not self._stopping.is_set():
                self._result_arrived.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._result_arrived.wait(), remaining)
            while not self._results.empty() and len(batch) < self.config.batch_size:
                item = self._results.get_nowait()
                if item is None:
                    last = True
                    break
                batch.append(item)
            await self._record(batch)
            if last:
                return

    async def _record(self, batch: list[AttemptResult]) -> None:
        settled = await self._with_retries(
            lambda: self.store.record(batch, worker_id=self.id), "record", until_stopped=False
        )
        woke = False
        for result, outcome in zip(batch, settled, strict=True):
            fields = {
                "delivery_id": outcome.delivery_id,
                "booking_id": outcome.booking_id,
                "status_code": result.status_code,
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
                log_event(
                    log,
                    logging.INFO,
                    "delivery.retry_scheduled",
                    next_attempt_at=outcome.next_attempt_at.isoformat()
                    if outcome.next_attempt_at
                    else None,
                    error=result.error,
                    **fields,
                )
            elif outcome.status == "dead":
                log_event(log, logging.WARNING, "delivery.dead", error=outcome.error, **fields)
            else:
                woke = True
                log_event(log, logging.INFO, f"delivery.{outcome.status}", **fields)
        if woke:
            self._due_backlog = True
            self._dispatch_wakeup.set()

    # -- housekeeping ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(StoreError):
                await self.store.heartbeat(
                    self.id, circuit=self.circuit_state, credentials=self.credentials_state
                )
            self._state_changed.clear()
            await self._wait(self._state_changed, self.config.heartbeat_interval_seconds)

    async def _maintenance_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(StoreError):
                while not self._stopping.is_set():
                    removed = await self.store.prune(
                        retention_seconds=self.config.retention_seconds
                    )
                    if removed:
                        log_event(log, logging.INFO, "retention.pruned", **removed)
                    if max(removed.values(), default=0) < 500:
                        break
                    await asyncio.sleep(0.1)  # small batches: never hog the tables
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), timeout=self.config.maintenance_interval_seconds
                )

    @staticmethod
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        """Wait until `event` is set or `seconds` pass, then re-arm it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)
        event.clear()


def _ids(claim: Claim) -> dict[str, object]:
    return {"delivery_id": claim.delivery_id, "booking_id": claim.booking_id}
