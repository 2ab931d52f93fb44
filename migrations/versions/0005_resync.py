"""Why a delivery was made (`change`, `replay`, `resync`), and a venue's bookings for its resync.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mozrest_delivery") as batch:
        batch.add_column(
            sa.Column("reason", sa.String(16), nullable=False, server_default=sa.text("'change'"))
        )
    op.create_index("ix_mozrest_booking_venue_id", "mozrest_booking", ["venue_id"])


def downgrade() -> None:
    op.drop_index("ix_mozrest_booking_venue_id", table_name="mozrest_booking")
    with op.batch_alter_table("mozrest_delivery") as batch:
        batch.drop_column("reason")
