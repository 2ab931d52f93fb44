"""The relay's only door to the database: one `Store`, built from a module per concern.

| module | concern |
| --- | --- |
| `toolkit` | transactions, the clock, named locks, id lists, the named statements |
| `bookings` | a booking's rows, shared by all: its lock, its waiting deliveries, supersede, hold |
| `ingest` | outbox rows to outcomes and deliveries |
| `dispatch` | claims (leases) and their release |
| `outcomes` | attempts, and what they make of their deliveries and snapshots |
| `upkeep` | the processes' heartbeats, retention, health checks |
| `admin`, `replay` | the admin API's reads, and operators' requeues and cancels |
| `venues` | pause and resume, per-venue settings; what ingest and claims must know of them |
| `resync` | a venue's bookings' newest states, sent again past the no-op rule |
| `rate` | the relay-wide rate limit's shared token bucket |

Every store function reads, decides with a pure function of `app.policy` (`decide`,
`plan_lease`, `RetryPolicy.settle`), then writes. Database outages come out as `StoreError`
(`app.db.is_outage`); the store's callers never see a driver's exception for one.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import StoreError
from app.policy import RetryPolicy
from app.store.admin import AdminQueries, ConflictError, NotFoundError
from app.store.audit import Audit, AuditEntry
from app.store.console import ConsoleQueries
from app.store.dispatch import Dispatch
from app.store.ingest import Ingest
from app.store.outcomes import Outcomes
from app.store.port import StorePort
from app.store.privacy import SCRUB_BATCH_SIZE, Erased, Privacy
from app.store.rate import RateLimit
from app.store.records import (
    AttemptResult,
    Claim,
    IngestReport,
    LeaseRequest,
    Settled,
    WorkerInfo,
)
from app.store.replay import Replays
from app.store.resync import Resync
from app.store.sessions import ConsoleSessions
from app.store.toolkit import Toolkit, statement_names
from app.store.upkeep import PRUNE_BATCH_SIZE, Upkeep
from app.store.venues import VenueRules, Venues


class Store:
    """The relay's only door to the database. Each method is one or a few transactions."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        send_statuses: frozenset[str] = frozenset({"seated"}),
        send_items: bool = True,
        max_payload_bytes: int = 65536,
        retry_policy: RetryPolicy | None = None,
        credentials_cooldown_seconds: float = 10.0,
        rate_limit: float = 0.0,
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.tools = Toolkit(engine)
        self.retry_policy = dataclasses.replace(
            retry_policy or RetryPolicy(), credentials_cooldown_seconds=credentials_cooldown_seconds
        )
        rules = VenueRules(self.tools)
        rate = RateLimit(self.tools, per_second=rate_limit)
        ingest = Ingest(
            self.tools,
            send_statuses=send_statuses,
            send_items=send_items,
            max_payload_bytes=max_payload_bytes,
            rules=rules,
            rate=rate,
        )
        dispatch = Dispatch(self.tools, rules=rules, rate=rate)
        outcomes = Outcomes(self.tools, retry_policy=self.retry_policy)
        #: The audit trail: `record(conn, ...)` inside a change's transaction, `change(entry)`
        #: for a transaction that writes its row, `record_alone`, `list` (`store/audit.py`).
        self.audit = Audit(self.tools)
        privacy = Privacy(self.tools, self.audit)
        upkeep = Upkeep(self.tools, audit=self.audit, privacy=privacy)
        admin = AdminQueries(self.tools)
        replays = Replays(self.tools, self.audit)
        venues = Venues(self.tools, rules, self.audit)
        resync = Resync(
            self.tools,
            rules=rules,
            audit=self.audit,
            send_items=send_items,
            max_payload_bytes=max_payload_bytes,
        )
        # The worker's side.
        self.ingest = ingest.run
        self.claim_due = dispatch.claim_due
        self.release = dispatch.release
        self.record = outcomes.record
        self.register_worker = upkeep.register_worker
        self.heartbeat = upkeep.heartbeat
        self.mark_stopped = upkeep.mark_stopped
        self.prune = upkeep.prune
        self.end_stalled_sessions = upkeep.end_stalled_sessions
        self.ping = upkeep.ping
        self.schema_revision = upkeep.schema_revision
        # The admin API's side.
        self.fleet_health = admin.fleet_health
        self.gauges = admin.gauges
        self.list_workers = admin.list_workers
        self.list_deliveries = admin.list_deliveries
        self.get_delivery = admin.get_delivery
        self.get_booking = admin.get_booking
        self.list_outbox = admin.list_outbox
        self.recent_table_ids = admin.recent_table_ids
        self.requeue_delivery = replays.requeue_delivery
        self.requeue_deliveries = replays.requeue_deliveries
        self.cancel_delivery = replays.cancel_delivery
        self.list_venues = venues.list_venues
        self.get_venue = venues.get_venue
        self.pause_venue = venues.pause
        self.resume_venue = venues.resume
        self.update_venue = venues.update_settings
        self.count_paused_venues = venues.count_paused
        self.resync_venue = resync.resync_venue
        self.count_resync = resync.count_resync
        self.erase_booking = privacy.erase_booking
        # The operator console's own reads and sessions (`store/console.py`, `store/sessions.py`).
        self.console = ConsoleQueries(self.tools)
        self.sessions = ConsoleSessions(self.tools)


__all__ = [
    "PRUNE_BATCH_SIZE",
    "SCRUB_BATCH_SIZE",
    "AttemptResult",
    "AuditEntry",
    "Claim",
    "ConflictError",
    "Erased",
    "IngestReport",
    "LeaseRequest",
    "NotFoundError",
    "Settled",
    "Store",
    "StoreError",
    "StorePort",
    "WorkerInfo",
    "statement_names",
]
