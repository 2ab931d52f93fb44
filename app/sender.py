"""One claim's request: POST its state within its lease, or give the claim back.

The lease was granted on the database clock; the worker measures it on `lease_clock()` (which
runs while the process is frozen) from before the claiming call. The request must end before the
lease does: start-up guarantees RELAY_LEASE_SECONDS >= RELAY_HTTP_TIMEOUT + LEASE_MARGIN_SECONDS;
a claim that has used up half that margin before its request starts is given back, and the
request's deadline is absolute, checked again by the publisher the moment the body is written
(docs/adr/0002-claims-and-leases.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from datetime import UTC, datetime

from app import metrics, tracing
from app.clock import lease_clock
from app.contract import serialize
from app.gates import Gates
from app.logs import get_logger, log_event
from app.policy import classify
from app.publisher import Publisher, WebhookAnswer
from app.recorder import Recorder
from app.settings import LEASE_MARGIN_SECONDS
from app.store import AttemptResult, Claim, StoreError, StorePort

log = get_logger("worker")


class RequestRate:
    """Requests this process wrote over the last `window_seconds` (its heartbeat reports it; the
    live processes' sum is the relay's rate)."""

    def __init__(self, window_seconds: int = 10) -> None:
        self.window_seconds = window_seconds
        self._counts: collections.deque[list[int]] = collections.deque()

    def count(self) -> None:
        second = int(time.monotonic())
        if self._counts and self._counts[-1][0] == second:
            self._counts[-1][1] += 1
        else:
            self._counts.append([second, 1])
        self._forget(second)

    def per_second(self) -> float:
        self._forget(int(time.monotonic()))
        return sum(count for _, count in self._counts) / self.window_seconds

    def _forget(self, second: int) -> None:
        while self._counts and self._counts[0][0] <= second - self.window_seconds:
            self._counts.popleft()


class Sender:
    """Sends claims' states; answers go to the recorder and through the gates."""

    def __init__(
        self,
        *,
        store: StorePort,
        publisher: Publisher,
        gates: Gates,
        recorder: Recorder,
        lease_seconds: float,
        http_timeout_seconds: float,
        stopping: asyncio.Event,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.gates = gates
        self.recorder = recorder
        self.lease_seconds = lease_seconds
        self.http_timeout_seconds = http_timeout_seconds
        self.stopping = stopping
        self.sending: set[int] = set()
        """Deliveries whose body is being written or is on the wire."""
        self.unsent: list[Claim] = []
        """Claims that never left because the worker was stopping (its drain releases them)."""
        self.rate = RequestRate()

    async def send(self, claim: Claim, claimed_at: float, *, probe: bool) -> None:
        answer = await self._post(claim, claimed_at, probe=probe)
        if answer is None:
            return
        verdict = classify(answer.status_code)
        metrics.WEBHOOK_REQUESTS.labels(
            code=str(answer.status_code) if answer.status_code is not None else "error"
        ).inc()
        metrics.WEBHOOK_DURATION.observe(answer.duration_ms / 1000)
        if self.gates.record(verdict):
            log_event(
                log,
                logging.INFO if self.gates.may_send() else logging.WARNING,
                "circuit.changed",
                circuit=self.gates.circuit_state,
                credentials=self.gates.credentials_state,
            )
        if probe:
            self.gates.end_probe(abandoned=False)
        self.recorder.put(
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
        # The module's docstring says why these bounds.
        now = lease_clock()
        lease_ends = claimed_at + self.lease_seconds - LEASE_MARGIN_SECONDS / 2
        if self.stopping.is_set():
            self.unsent.append(claim)  # released by `_drain`
        elif lease_ends - now <= self.http_timeout_seconds or (
            not probe and not self.gates.may_send()
        ):
            # Too little lease left, or the circuit opened since the claim: not now.
            with contextlib.suppress(StoreError):
                await self.store.release([claim])
        else:
            deadline = min(now + self.http_timeout_seconds, lease_ends)
            answer = await self._publish(claim, deadline, started=now, probe=probe)
            if answer.written:
                self.rate.count()
            if not answer.lease_expired:
                return answer
            # Frozen past its deadline before the body was written: nothing left, so the claim
            # goes back as if never made (a successor may hold the booking by now: `release`
            # only gives back what this lease still holds).
            log_event(log, logging.WARNING, "delivery.lease_expired_unsent", **_ids(claim))
            with contextlib.suppress(StoreError):
                await self.store.release([claim])
        if probe:
            self.gates.end_probe(abandoned=True)
        return None

    async def _publish(
        self, claim: Claim, deadline: float, *, started: float, probe: bool
    ) -> WebhookAnswer:
        self.sending.add(claim.delivery_id)
        try:
            with tracing.webhook_post(claim, probe=probe) as span:
                answer = await self.publisher.publish(
                    serialize(claim.payload), deadline=deadline, traceparent=span.traceparent
                )
                return span.answered(answer)
        except Exception as exc:  # a bug must not strand the claim: record a failed try
            log.exception("delivery.publish_failed", extra={"delivery_id": claim.delivery_id})
            return WebhookAnswer(
                status_code=None,
                duration_ms=int((lease_clock() - started) * 1000),
                started_at=datetime.now(UTC),
                error=f"internal error: {type(exc).__name__}",
            )
        finally:
            self.sending.discard(claim.delivery_id)


def _ids(claim: Claim) -> dict[str, object]:
    return {"delivery_id": claim.delivery_id, "booking_id": claim.booking_id}
