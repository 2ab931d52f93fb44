"""What the worker needs of a store: the `Store` implements it; tests give a `FakeStore`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from app.store.records import AttemptResult, Claim, IngestReport, LeaseRequest, Settled, WorkerInfo


class StorePort(Protocol):
    """The worker's side of the store. Outages raise `StoreError`; each call is a transaction."""

    async def ingest(
        self, *, limit: int, lease: LeaseRequest | None = None
    ) -> IngestReport | None: ...

    async def claim_due(
        self,
        *,
        worker_id: str,
        limit: int,
        lease_seconds: float,
        take: Callable[[int], int] | None = None,
    ) -> list[Claim]: ...

    async def release(self, claims: Sequence[Claim]) -> None: ...

    async def record(
        self, results: Sequence[AttemptResult], *, worker_id: str
    ) -> list[Settled]: ...

    async def register_worker(self, info: WorkerInfo) -> None: ...

    async def heartbeat(
        self, worker_id: str, *, circuit: str, credentials: str, request_rate: float = ...
    ) -> None: ...

    async def mark_stopped(self, worker_id: str) -> None: ...

    async def prune(
        self,
        *,
        retention_seconds: float,
        batch_size: int = ...,
        audit_retention_seconds: float | None = ...,
        payload_retention_seconds: float | None = ...,
    ) -> Counter[str]: ...

    async def end_stalled_sessions(self, *, waiting_seconds: float) -> list[str]: ...

    async def ping(self) -> datetime: ...
