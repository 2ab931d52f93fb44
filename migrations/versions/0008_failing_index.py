"""The console's failure groups: a partial index of dead and retrying deliveries.

The Deliveries page groups the newest 10,000 dead and retrying deliveries by cause on every load.
Through `ix_mozrest_delivery_status` that is one heap fetch per delivery, scattered over the table
(about 300 ms with 1,000,000 deliveries); this index hands them over in id order with the columns
the grouping reads (PostgreSQL's INCLUDE), without touching the table. MySQL has no partial
indexes and keeps using `ix_mozrest_delivery_status`.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FAILING = "status IN ('dead', 'retrying')"


def upgrade() -> None:
    if op.get_bind().dialect.name == "mysql":
        return
    op.create_index(
        "ix_mozrest_delivery_failing",
        "mozrest_delivery",
        ["id"],
        postgresql_where=sa.text(_FAILING),
        sqlite_where=sa.text(_FAILING),
        postgresql_include=["venue_id", "status", "last_status_code", "last_error", "updated_at"],
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "mysql":
        return
    op.drop_index("ix_mozrest_delivery_failing", "mozrest_delivery")
