"""Access and guest data: the audit trail, payload retention's walk and its index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db import MYSQL_TABLE_OPTIONS, BigId, JsonDocument, UTCDateTime, utcnow

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mozrest_audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("detail", JsonDocument, nullable=False),
        sa.Column("client", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mozrest_audit"),
        sqlite_autoincrement=True,
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_mozrest_audit_actor", "mozrest_audit", ["actor", "id"])
    op.create_index("ix_mozrest_audit_action", "mozrest_audit", ["action", "id"])
    op.create_index("ix_mozrest_audit_at", "mozrest_audit", ["at"])
    mark = op.create_table(
        "mozrest_scrub_mark",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("after_at", UTCDateTime(), nullable=True),
        sa.Column("after_id", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("name", name="pk_mozrest_scrub_mark"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.bulk_insert(mark, [{"name": "outbox", "after_id": 0}, {"name": "delivery", "after_id": 0}])
    op.create_index("ix_mozrest_delivery_updated_at", "mozrest_delivery", ["updated_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_mozrest_delivery_updated_at", table_name="mozrest_delivery")
    op.drop_table("mozrest_scrub_mark")
    op.drop_index("ix_mozrest_audit_at", table_name="mozrest_audit")
    op.drop_index("ix_mozrest_audit_action", table_name="mozrest_audit")
    op.drop_index("ix_mozrest_audit_actor", table_name="mozrest_audit")
    op.drop_table("mozrest_audit")
