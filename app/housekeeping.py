"""The worker's housekeeping loops: the heartbeat (this process and its gates, in
`mozrest_worker`), retention (old rows pruned, personal data scrubbed), in small batches, and
the sweep that ends a frozen replica's stalled sessions (`Store.end_stalled_sessions`).

Neither touches a delivery: a database outage only skips a beat, and the loops end when the
worker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError

from app import metrics
from app.gates import Gates
from app.logs import get_logger, log_event
from app.store import PRUNE_BATCH_SIZE, SCRUB_BATCH_SIZE, StoreError, StorePort

log = get_logger("worker")
#: Between two retention batches while there is more to remove: never hog the tables.
PRUNE_PAUSE_SECONDS = 0.1
#: And at least this many times as long as the batch took: retention (stripping a batch's JSON
#: documents runs on the event loop) takes at most a quarter of the worker's time, so a
#: backlog of a million rows to scrub slows the deliveries beside it, not stalls them.
PRUNE_PAUSE_FACTOR = 3.0
#: The stalled-session sweep runs every quarter lease, at most this far apart; a session kept
#: waiting on its client for the rest of the lease is ended, so a frozen replica holds its locks
#: for at most a lease (docs/reliability.md).
SWEEP_MAX_INTERVAL_SECONDS = 5.0


class Housekeeping:
    """The heartbeat and retention loops of one worker."""

    def __init__(
        self,
        *,
        store: StorePort,
        worker_id: str,
        gates: Gates,
        request_rate: Callable[[], float],
        stopping: asyncio.Event,
        heartbeat_interval_seconds: float,
        maintenance_interval_seconds: float,
        retention_seconds: float,
        audit_retention_seconds: float | None,
        payload_retention_seconds: float | None,
        lease_seconds: float,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.gates = gates
        self.request_rate = request_rate
        self.stopping = stopping
        self.heartbeat_interval_seconds = heartbeat_interval_seconds
        self.maintenance_interval_seconds = maintenance_interval_seconds
        self.retention_seconds = retention_seconds
        self.audit_retention_seconds = audit_retention_seconds
        self.payload_retention_seconds = payload_retention_seconds
        self.sweep_interval_seconds = min(lease_seconds / 4, SWEEP_MAX_INTERVAL_SECONDS)
        self.stalled_after_seconds = lease_seconds - self.sweep_interval_seconds

    async def heartbeat_loop(self) -> None:
        """Report the process and its gates now, again on every change of the gates, and at
        least every heartbeat interval."""
        while not self.stopping.is_set():
            with contextlib.suppress(StoreError):
                await self.store.heartbeat(
                    self.worker_id,
                    circuit=self.gates.circuit_state,
                    credentials=self.gates.credentials_state,
                    request_rate=self.request_rate(),
                )
            self.gates.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gates.changed.wait(), self.heartbeat_interval_seconds)
            self.gates.changed.clear()

    async def maintenance_loop(self) -> None:
        """Retention, batch after batch while a batch comes back full, then every interval."""
        while not self.stopping.is_set():
            with contextlib.suppress(StoreError):
                while not self.stopping.is_set():
                    started = time.monotonic()
                    removed = await self.store.prune(
                        retention_seconds=self.retention_seconds,
                        audit_retention_seconds=self.audit_retention_seconds,
                        payload_retention_seconds=self.payload_retention_seconds,
                    )
                    count_scrubbed(removed)
                    if removed:
                        log_event(log, logging.INFO, "retention.pruned", **removed)
                    if not came_back_full(removed):
                        break
                    took = time.monotonic() - started
                    await asyncio.sleep(max(PRUNE_PAUSE_SECONDS, took * PRUNE_PAUSE_FACTOR))
            await self._pause(self.maintenance_interval_seconds)

    async def sweep_loop(self) -> None:
        """End the relay sessions the database has kept waiting on a frozen client, every
        `sweep_interval_seconds`. A sweep that fails (the database down, the role not allowed
        to) is logged and tried again at the next interval: it never stops the worker."""
        while not self.stopping.is_set():
            try:
                ended = await self.store.end_stalled_sessions(
                    waiting_seconds=self.stalled_after_seconds
                )
            except StoreError:
                ended = []
            except DBAPIError as exc:
                log_event(log, logging.WARNING, "sessions.sweep_failed", error=type(exc).__name__)
                ended = []
            for name in ended:
                log_event(
                    log,
                    logging.WARNING,
                    "sessions.ended_stalled",
                    session=name,
                    waited_seconds=self.stalled_after_seconds,
                )
            await self._pause(self.sweep_interval_seconds)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the worker stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)


def came_back_full(removed: Counter[str]) -> bool:
    """Whether a retention pass may have left more to do: its payload walk read a full batch
    (`walked`, both walks together), or a prune removed one."""
    if removed.get("walked", 0) >= SCRUB_BATCH_SIZE:
        return True
    return max((n for key, n in removed.items() if key != "walked"), default=0) >= PRUNE_BATCH_SIZE


def count_scrubbed(removed: Counter[str]) -> None:
    """Payload retention's rows (`Store.prune`'s `*_scrubbed` counts) to their metric."""
    for table in ("outbox", "deliveries", "snapshots"):
        if removed.get(f"{table}_scrubbed"):
            metrics.PERSONAL_DATA_SCRUBBED.labels(table=table).inc(removed[f"{table}_scrubbed"])
