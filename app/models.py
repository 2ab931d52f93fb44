"""The relay's tables: `mozrest_outbox` is the RMS-facing contract; the rest are ours."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    false,
    text,
)

from app.db import MYSQL_TABLE_OPTIONS, BigId, JsonDocument, UTCDateTime, metadata, utcnow
from app.states import (
    AuditResult,
    CircuitState,
    CredentialsState,
    DeliveryReason,
    DeliveryStatus,
    Outcome,
    stored_values,
)

#: Outcomes of an outbox row, as stored (`app.states.Outcome`).
OUTCOMES = stored_values(Outcome)
#: Delivery statuses, as stored (`app.states.DeliveryStatus`); `ACTIVE` ones may still be sent.
STATUSES = stored_values(DeliveryStatus)
ACTIVE_STATUSES = (str(DeliveryStatus.PENDING), str(DeliveryStatus.RETRYING))

#: The SQL of `ACTIVE_STATUSES`, as the partial indexes and the claim query spell it.
ACTIVE_PREDICATE = "status IN ('pending', 'retrying')"
#: Deliveries that failed: dead, or waiting to be tried again.
FAILING_PREDICATE = "status IN ('dead', 'retrying')"

outbox = Table(
    "mozrest_outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("booking_id", String(64), nullable=False),
    Column("venue_id", String(64), nullable=False),
    Column("payload", JsonDocument, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("processed_at", UTCDateTime(), nullable=True),
    Column("outcome", String(16), nullable=True),
    Column("error", Text, nullable=True),
    # Optional W3C trace context the RMS may write in the same INSERT (`app/tracing.py`): 55
    # characters today; room for a later version's longer form. A malformed one is ignored.
    Column("traceparent", String(255), nullable=True),
    # The claim reads unprocessed rows in id order; a partial index keeps that cost independent
    # of how many processed rows the table holds. MySQL has no partial indexes: see migrations.
    Index(
        "ix_mozrest_outbox_unprocessed",
        "id",
        postgresql_where=text("processed_at IS NULL"),
        sqlite_where=text("processed_at IS NULL"),
    ).ddl_if(dialect=("postgresql", "sqlite")),  # type: ignore[arg-type] # a tuple is allowed
    # MySQL has no partial indexes; `processed_at IS NULL ORDER BY id` is a ref scan on this one.
    Index("ix_mozrest_outbox_pending", "processed_at", "id").ddl_if(dialect="mysql"),
    Index("ix_mozrest_outbox_booking_id", "booking_id", "id"),
    Index("ix_mozrest_outbox_outcome", "outcome", "id"),
    # Ids are watermarks (`mozrest_booking.last_outbox_id`): never reuse one after a prune.
    sqlite_autoincrement=True,
    **MYSQL_TABLE_OPTIONS,
)

booking = Table(
    "mozrest_booking",
    metadata,
    Column("booking_id", String(64), primary_key=True),
    Column("venue_id", String(64), nullable=False),
    # Highest outbox id ingested for this booking: an older row arriving later is superseded.
    Column("last_outbox_id", BigInteger, nullable=False),
    # Highest outbox id whose state left for Mozrest; set means "sent once". A claim
    # sets it; a claim given back unsent restores what it was (`Store.release`).
    Column("sent_outbox_id", BigInteger, nullable=True),
    # Whether a state of this booking had a status in RELAY_SEND_STATUSES: from then on its
    # newest state is sent, unless it is the first and cancelled.
    Column("reached_send_status", Boolean, nullable=False, server_default=false()),
    # The snapshot: the state Mozrest last accepted.
    Column("accepted_payload", JsonDocument, nullable=True),
    Column("accepted_outbox_id", BigInteger, nullable=True),
    Column("accepted_at", UTCDateTime(), nullable=True),
    # A state that left without an answer (timeout, dropped connection) may still land: until a
    # state at least as new is accepted, the snapshot is not what Mozrest surely holds.
    Column("unconfirmed_outbox_id", BigInteger, nullable=True),
    # No request for this booking may start before this time (database clock): an unanswered
    # request may still be on its way until its lease ends.
    Column("quiet_until", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("updated_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Index("ix_mozrest_booking_updated_at", "updated_at"),
    # A venue's bookings, for its resync.
    Index("ix_mozrest_booking_venue_id", "venue_id"),
    **MYSQL_TABLE_OPTIONS,
)

delivery = Table(
    "mozrest_delivery",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("booking_id", String(64), nullable=False),
    Column("venue_id", String(64), nullable=False),
    Column("outbox_id", BigInteger, nullable=False),
    Column("payload", JsonDocument, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt_count", Integer, nullable=False, server_default=text("0")),
    Column("changed_fields", JsonDocument, nullable=False),
    Column("warnings", JsonDocument, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("updated_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("delivered_at", UTCDateTime(), nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    # The claim: which process holds it and until when (database clock). Keep in step with
    # `store.Store.claim_due`.
    Column("lease_owner", String(64), nullable=True),
    Column("lease_token", String(32), nullable=True),
    Column("lease_expires_at", UTCDateTime(), nullable=True),
    Column("outbox_created_at", UTCDateTime(), nullable=True),
    # When an operator last requeued it: RELAY_RETRY_MAX_AGE counts from here, or from creation.
    Column("requeued_at", UTCDateTime(), nullable=True),
    # Why it was made: `change` (ingest), `replay` (an operator's requeue) or `resync` (a
    # venue's resync: a state Mozrest accepted, sent again past the no-op rule).
    Column("reason", String(16), nullable=False, server_default=text(f"'{DeliveryReason.CHANGE}'")),
    # The trace its attempts belong to (the row's valid `traceparent`, or one started at
    # ingest while tracing is on): every retry is a span of this one trace.
    Column("traceparent", String(55), nullable=True),
    Index(
        "ix_mozrest_delivery_due",
        "next_attempt_at",
        postgresql_where=text(ACTIVE_PREDICATE),
        sqlite_where=text(ACTIVE_PREDICATE),
    ),
    # Read on every batch by ingest, claim and record (`Store._active_deliveries`).
    Index("ix_mozrest_delivery_booking_id", "booking_id", "id"),
    Index("ix_mozrest_delivery_status", "status", "id"),
    Index("ix_mozrest_delivery_venue_id", "venue_id", "id"),
    # The admin lists filtered by venue and status together (`?venue_id=&status=dead`).
    Index("ix_mozrest_delivery_venue_id_status", "venue_id", "status", "id"),
    # Payload retention walks deliveries in the order they last changed (`store.privacy`).
    Index("ix_mozrest_delivery_updated_at", "updated_at", "id"),
    # The lists' and bulk retry's time window (`?since=&until=`): a range, not a primary-key walk.
    Index("ix_mozrest_delivery_created_at", "created_at", "id"),
    # The console's failure groups: the newest dead and retrying deliveries in id order, with
    # what they are grouped by, read from the index alone on PostgreSQL (`store/console.py`).
    # MySQL has no partial indexes: there, `ix_mozrest_delivery_status` serves.
    Index(
        "ix_mozrest_delivery_failing",
        "id",
        postgresql_where=text(FAILING_PREDICATE),
        sqlite_where=text(FAILING_PREDICATE),
        postgresql_include=["venue_id", "status", "last_status_code", "last_error", "updated_at"],
    ).ddl_if(dialect=("postgresql", "sqlite")),  # type: ignore[arg-type] # a tuple is allowed
    sqlite_autoincrement=True,
    **MYSQL_TABLE_OPTIONS,
)

attempt = Table(
    "mozrest_attempt",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("delivery_id", BigInteger, nullable=False),
    Column("worker_id", String(64), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("response_body", Text, nullable=True),
    Index("ix_mozrest_attempt_delivery_id", "delivery_id", "id"),
    sqlite_autoincrement=True,
    **MYSQL_TABLE_OPTIONS,
)

worker = Table(
    "mozrest_worker",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("heartbeat_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("stopped_at", UTCDateTime(), nullable=True),
    Column("circuit", String(16), nullable=False, server_default=text(f"'{CircuitState.CLOSED}'")),
    Column(
        "credentials", String(16), nullable=False, server_default=text(f"'{CredentialsState.OK}'")
    ),
    # Webhook requests per second this process sent over its last ten seconds (its heartbeat);
    # the live processes' sum is the relay's rate.
    Column("request_rate", Float, nullable=False, server_default=text("0")),
    Index("ix_mozrest_worker_heartbeat_at", "heartbeat_at"),
    **MYSQL_TABLE_OPTIONS,
)

# A venue the relay has seen, with its operator's settings. Ingest adds each venue it meets; the
# row is also the venue's mutex for parking and un-parking its deliveries (`store/venues.py`).
venue = Table(
    "mozrest_venue",
    metadata,
    Column("venue_id", String(64), primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("paused_at", UTCDateTime(), nullable=True),
    Column("paused_by", String(64), nullable=True),
    Column("pause_reason", Text, nullable=True),
    # Whether pre-ordered items are sent to this venue; None follows RELAY_SEND_ITEMS.
    Column("send_items", Boolean, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("updated_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    **MYSQL_TABLE_OPTIONS,
)

# The relay-wide rate limit's token bucket (one row, `webhook`): claims take tokens from it.
rate = Table(
    "mozrest_rate",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("refilled_at", UTCDateTime(), nullable=False),
    **MYSQL_TABLE_OPTIONS,
)

# One row per process-wide mutex; a transaction holds it with SELECT ... FOR UPDATE.
lock = Table(
    "mozrest_lock",
    metadata,
    Column("name", String(32), primary_key=True),
    **MYSQL_TABLE_OPTIONS,
)

#: Audited actions; keep in step with `app.schemas.AuditAction`.
AUDIT_ACTIONS = (
    "delivery.retry",
    "delivery.cancel",
    "deliveries.retry_bulk",
    "venue.pause",
    "venue.resume",
    "venue.update",
    "venue.resync",
    "booking.erase",
)
AUDIT_RESULTS = stored_values(AuditResult)

# Who changed what through the admin API, refused attempts included. Kept
# RELAY_AUDIT_RETENTION, whatever RELAY_RETENTION says. Never a token, never guest data.
audit = Table(
    "mozrest_audit",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    # The delivery id, venue id or booking id; for a bulk retry its filter as JSON.
    Column("target", Text, nullable=False),
    Column("result", String(16), nullable=False),
    Column("detail", JsonDocument, nullable=False),
    Column("client", String(64), nullable=True),
    Index("ix_mozrest_audit_actor", "actor", "id"),
    Index("ix_mozrest_audit_action", "action", "id"),
    Index("ix_mozrest_audit_at", "at"),
    sqlite_autoincrement=True,
    **MYSQL_TABLE_OPTIONS,
)

# How far payload retention has walked each table (`store.privacy`): one row per walk, so each
# pass reads only what changed since the last one.
scrub_mark = Table(
    "mozrest_scrub_mark",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("after_at", UTCDateTime(), nullable=True),
    Column("after_id", BigInteger, nullable=False, server_default=text("0")),
    **MYSQL_TABLE_OPTIONS,
)

# Operator console sessions (`app/store/sessions.py`): a hash of each session id, never the id;
# a row is what makes a session valid, so signing out on one replica ends it on every one.
console_session = Table(
    "mozrest_console_session",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("token_name", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_mozrest_console_session_expires_at", "expires_at"),
    **MYSQL_TABLE_OPTIONS,
)
