"""The outbox contract and the relay's own tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db import MYSQL_TABLE_OPTIONS, BigId, JsonDocument, UTCDateTime, utcnow

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = "status IN ('pending', 'retrying')"


def upgrade() -> None:
    op.create_table(
        "mozrest_outbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("booking_id", sa.String(64), nullable=False),
        sa.Column("venue_id", sa.String(64), nullable=False),
        sa.Column("payload", JsonDocument, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("processed_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mozrest_outbox"),
        sqlite_autoincrement=True,
        **MYSQL_TABLE_OPTIONS,
    )
    if op.get_bind().dialect.name == "mysql":
        # No partial indexes: `processed_at IS NULL ORDER BY id` is a ref scan on this one.
        op.create_index("ix_mozrest_outbox_pending", "mozrest_outbox", ["processed_at", "id"])
    else:
        op.create_index(
            "ix_mozrest_outbox_unprocessed",
            "mozrest_outbox",
            ["id"],
            postgresql_where=sa.text("processed_at IS NULL"),
            sqlite_where=sa.text("processed_at IS NULL"),
        )
    op.create_index("ix_mozrest_outbox_booking_id", "mozrest_outbox", ["booking_id", "id"])
    op.create_index("ix_mozrest_outbox_outcome", "mozrest_outbox", ["outcome", "id"])

    op.create_table(
        "mozrest_booking",
        sa.Column("booking_id", sa.String(64), nullable=False),
        sa.Column("venue_id", sa.String(64), nullable=False),
        sa.Column("last_outbox_id", sa.BigInteger(), nullable=False),
        sa.Column("sent_outbox_id", sa.BigInteger(), nullable=True),
        sa.Column("accepted_payload", JsonDocument, nullable=True),
        sa.Column("accepted_outbox_id", sa.BigInteger(), nullable=True),
        sa.Column("accepted_at", UTCDateTime(), nullable=True),
        sa.Column("unconfirmed_outbox_id", sa.BigInteger(), nullable=True),
        sa.Column("quiet_until", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.PrimaryKeyConstraint("booking_id", name="pk_mozrest_booking"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_mozrest_booking_updated_at", "mozrest_booking", ["updated_at"])

    op.create_table(
        "mozrest_delivery",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("booking_id", sa.String(64), nullable=False),
        sa.Column("venue_id", sa.String(64), nullable=False),
        sa.Column("outbox_id", sa.BigInteger(), nullable=False),
        sa.Column("payload", JsonDocument, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("changed_fields", JsonDocument, nullable=False),
        sa.Column("warnings", JsonDocument, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_token", sa.String(32), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("outbox_created_at", UTCDateTime(), nullable=True),
        sa.Column("requeued_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mozrest_delivery"),
        sqlite_autoincrement=True,
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index(
        "ix_mozrest_delivery_due",
        "mozrest_delivery",
        ["next_attempt_at"],
        postgresql_where=sa.text(_ACTIVE),
        sqlite_where=sa.text(_ACTIVE),
    )
    op.create_index("ix_mozrest_delivery_booking_id", "mozrest_delivery", ["booking_id", "id"])
    op.create_index("ix_mozrest_delivery_status", "mozrest_delivery", ["status", "id"])
    op.create_index("ix_mozrest_delivery_venue_id", "mozrest_delivery", ["venue_id", "id"])

    op.create_table(
        "mozrest_attempt",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mozrest_attempt"),
        sqlite_autoincrement=True,
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_mozrest_attempt_delivery_id", "mozrest_attempt", ["delivery_id", "id"])

    op.create_table(
        "mozrest_worker",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
        sa.Column("circuit", sa.String(16), nullable=False, server_default=sa.text("'closed'")),
        sa.Column("credentials", sa.String(16), nullable=False, server_default=sa.text("'ok'")),
        sa.PrimaryKeyConstraint("id", name="pk_mozrest_worker"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_mozrest_worker_heartbeat_at", "mozrest_worker", ["heartbeat_at"])

    if op.get_bind().dialect.name == "postgresql":
        # Queue tables churn: with the default thresholds (10-20% of a table) a burst runs on
        # statistics from before it. Vacuum and analyse after a few thousand changes instead.
        for table in ("mozrest_outbox", "mozrest_delivery", "mozrest_booking", "mozrest_attempt"):
            op.execute(
                f"ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = 0.02, "
                "autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.01, "
                "autovacuum_analyze_threshold = 1000)"
            )

    lock = op.create_table(
        "mozrest_lock",
        sa.Column("name", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_mozrest_lock"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.bulk_insert(lock, [{"name": "ingest"}, {"name": "maintenance"}])


def downgrade() -> None:
    for table in (
        "mozrest_lock",
        "mozrest_worker",
        "mozrest_attempt",
        "mozrest_delivery",
        "mozrest_booking",
        "mozrest_outbox",
    ):
        op.drop_table(table)
