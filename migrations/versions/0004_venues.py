"""Venues (pause, per-venue settings), the relay-wide rate limit's bucket, workers' request rate.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from app.db import MYSQL_TABLE_OPTIONS, UTCDateTime, utcnow

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "mozrest_venue",
        sa.Column("venue_id", sa.String(64), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("paused_at", UTCDateTime(), nullable=True),
        sa.Column("paused_by", sa.String(64), nullable=True),
        sa.Column("pause_reason", sa.Text(), nullable=True),
        sa.Column("send_items", sa.Boolean(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.PrimaryKeyConstraint("venue_id", name="pk_mozrest_venue"),
        **MYSQL_TABLE_OPTIONS,
    )
    rate = op.create_table(
        "mozrest_rate",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("refilled_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_mozrest_rate"),
        **MYSQL_TABLE_OPTIONS,
    )
    assert rate is not None
    op.bulk_insert(rate, [{"name": "webhook", "tokens": 0.0, "refilled_at": datetime.now(UTC)}])
    with op.batch_alter_table("mozrest_worker") as batch:
        batch.add_column(
            sa.Column("request_rate", sa.Float(), nullable=False, server_default=sa.text("0"))
        )
    if bind.dialect.name == "mysql":
        collation = "utf8mb4_nopad_bin" if bind.dialect.is_mariadb else "utf8mb4_0900_bin"  # type: ignore[attr-defined]
        op.execute(
            "ALTER TABLE mozrest_venue MODIFY venue_id VARCHAR(64) CHARACTER SET utf8mb4 "
            f"COLLATE {collation} NOT NULL"
        )
    # Every venue already known has a row: the venue list is this table.
    op.execute(
        "INSERT INTO mozrest_venue (venue_id, created_at, updated_at) "
        "SELECT venue_id, MIN(created_at), MIN(created_at) FROM mozrest_booking "
        "GROUP BY venue_id"
    )


def downgrade() -> None:
    with op.batch_alter_table("mozrest_worker") as batch:
        batch.drop_column("request_rate")
    op.drop_table("mozrest_rate")
    op.drop_table("mozrest_venue")
