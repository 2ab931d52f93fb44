"""The worker's tuning, in seconds and counts, read once from the settings."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from app.settings import Settings


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The tuning the loops need, in seconds and counts."""

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
    audit_retention_seconds: float | None = None
    payload_retention_seconds: float | None = None
    maintenance_interval_seconds: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            concurrency=settings.relay_concurrency,
            batch_size=settings.relay_batch_size,
            poll_interval_seconds=settings.relay_poll_interval_seconds,
            lease_seconds=settings.relay_lease_seconds,
            http_timeout_seconds=settings.relay_http_timeout_seconds,
            shutdown_grace_seconds=settings.relay_shutdown_grace_seconds,
            heartbeat_interval_seconds=settings.relay_heartbeat_interval_seconds,
            circuit_threshold=settings.relay_circuit_threshold,
            circuit_cooldown_seconds=settings.relay_circuit_cooldown_seconds,
            retention_seconds=settings.relay_retention_seconds,
            audit_retention_seconds=settings.relay_audit_retention_seconds,
            payload_retention_seconds=settings.relay_payload_retention_seconds,
        )

    @property
    def min_claim(self) -> int:
        """Claims are made in batches: a claim costs the same few statements however many rows
        it takes, so with claims held, wait until half a batch is free rather than claiming one
        delivery per finished request."""
        return max(1, min(self.concurrency // 2, self.batch_size))


def new_worker_id() -> str:
    """A worker id unique across hosts and restarts: host, pid and a random suffix."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
