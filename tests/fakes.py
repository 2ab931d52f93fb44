"""In-memory stand-ins for the worker's two sides, for unit tests that run in milliseconds.

`FakeStore` implements `app.store.StorePort` over lists: deliveries waiting to be claimed, and
what the worker recorded and released. `FakePublisher` answers from a script and counts the
requests it has on the wire at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app.policy import Verdict
from app.publisher import WebhookAnswer
from app.store import AttemptResult, Claim, IngestReport, LeaseRequest, Settled, WorkerInfo
from tests.factories import state

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class FakeStore:
    """Deliveries to claim (one per booking), and everything the worker did with them."""

    def __init__(self) -> None:
        self.due: list[Claim] = []
        self.sweeps: list[float] = []
        self.recorded: list[AttemptResult] = []
        self.released: list[Claim] = []
        self.registered: list[WorkerInfo] = []
        self.heartbeats: list[tuple[str, str]] = []
        self.stopped: list[str] = []
        self._next_id = 1

    def add(self, *booking_ids: str) -> list[Claim]:
        """Queue one seated state per booking, due now."""
        claims = []
        for booking_id in booking_ids:
            claim = Claim(
                delivery_id=self._next_id,
                booking_id=booking_id,
                venue_id="venue-1",
                outbox_id=self._next_id,
                payload=state(booking_id),
                attempt_count=0,
                created_at=NOW,
                outbox_created_at=NOW,
                retry_window_started_at=NOW,
                lease_token=f"token-{self._next_id}",
                lease_expires_at=NOW + timedelta(seconds=30),
            )
            self._next_id += 1
            claims.append(claim)
        self.due.extend(claims)
        return claims

    def verdicts(self) -> Counter[Verdict]:
        return Counter(r.verdict for r in self.recorded)

    async def ingest(self, *, limit: int, lease: LeaseRequest | None = None) -> IngestReport:
        return IngestReport()

    async def claim_due(
        self,
        *,
        worker_id: str,
        limit: int,
        lease_seconds: float,
        take: Callable[[int], int] | None = None,
    ) -> list[Claim]:
        count = min(limit, len(self.due))
        if take is not None:
            count = max(0, min(count, take(count)))
        claims, self.due = self.due[:count], self.due[count:]
        return claims

    async def release(self, claims: Sequence[Claim]) -> None:
        self.released.extend(claims)
        self.due.extend(claims)

    async def record(self, results: Sequence[AttemptResult], *, worker_id: str) -> list[Settled]:
        """Delivered and dead end a delivery; anything else makes it due again at once."""
        self.recorded.extend(results)
        settled = []
        for result in results:
            claim = result.claim
            if result.verdict is Verdict.DELIVERED:
                status = "delivered"
            elif result.verdict is Verdict.DEAD:
                status = "dead"
            else:
                status = "retrying"
                self.due.append(replace(claim, attempt_count=claim.attempt_count + 1))
            settled.append(Settled(claim.delivery_id, claim.booking_id, status))
        return settled

    async def register_worker(self, info: WorkerInfo) -> None:
        self.registered.append(info)

    async def heartbeat(
        self, worker_id: str, *, circuit: str, credentials: str, request_rate: float = 0.0
    ) -> None:
        self.heartbeats.append((circuit, credentials))

    async def mark_stopped(self, worker_id: str) -> None:
        self.stopped.append(worker_id)

    async def prune(
        self,
        *,
        retention_seconds: float,
        batch_size: int = 500,
        audit_retention_seconds: float | None = None,
        payload_retention_seconds: float | None = None,
    ) -> Counter[str]:
        return Counter()

    async def end_stalled_sessions(self, *, waiting_seconds: float) -> list[str]:
        self.sweeps.append(waiting_seconds)
        return []

    async def ping(self) -> datetime:
        return NOW


@dataclass
class Request:
    """One request the fake publisher received."""

    at: float
    body: dict[str, Any]


class FakePublisher:
    """Answers each request with `answer(body)` (a status code, None for no answer, or a whole
    `WebhookAnswer`) after `delay_seconds`."""

    def __init__(
        self,
        answer: Callable[[dict[str, Any]], int | WebhookAnswer | None] = lambda body: 200,
        *,
        delay_seconds: float = 0.0,
    ) -> None:
        self.answer = answer
        self.delay_seconds = delay_seconds
        self.requests: list[Request] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.reloads = 0
        self.rotated_token: str | None = None
        """Set to make the next `reload_credentials` report a changed token."""

    async def publish(
        self, body: bytes, *, deadline: float | None = None, traceparent: str | None = None
    ) -> WebhookAnswer:
        self.requests.append(Request(time.monotonic(), json.loads(body)))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_seconds)
        finally:
            self.in_flight -= 1
        answered = self.answer(json.loads(body))
        if isinstance(answered, WebhookAnswer):
            return answered
        return WebhookAnswer(
            status_code=answered,
            duration_ms=int(self.delay_seconds * 1000),
            started_at=datetime.now(UTC),
            error=None if answered == 200 else f"HTTP {answered}",
        )

    def reload_credentials(self) -> bool:
        """True once after `rotated_token` is set, as a token file read anew."""
        self.reloads += 1
        rotated, self.rotated_token = self.rotated_token, None
        return rotated is not None

    def token_read_at(self) -> datetime | None:
        return None

    async def aclose(self) -> None:
        return None
