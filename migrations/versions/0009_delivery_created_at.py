"""Deliveries by creation time: the time window of the lists, the console and bulk retry.

`?since=&until=` (and `Retry all matching` with a window) filtered deliveries by `created_at`
along the primary key, newest first: a window three days back read every delivery written since
(365 ms at 1,000,000 deliveries). With this index the window is a range scan and the page a
top-N sort of what it holds (2 ms).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_mozrest_delivery_created_at", "mozrest_delivery", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_mozrest_delivery_created_at", "mozrest_delivery")
