"""Trace context: an optional `traceparent` on outbox rows (written by the RMS) and deliveries.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding them rewrites no row, on any of the three databases.
    with op.batch_alter_table("mozrest_outbox") as batch:
        batch.add_column(sa.Column("traceparent", sa.String(255), nullable=True))
    with op.batch_alter_table("mozrest_delivery") as batch:
        batch.add_column(sa.Column("traceparent", sa.String(55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mozrest_delivery") as batch:
        batch.drop_column("traceparent")
    with op.batch_alter_table("mozrest_outbox") as batch:
        batch.drop_column("traceparent")
