"""Sent-once rules after a claim given back, the venue-and-status index, exact ids on MariaDB.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Id columns compared exactly. MariaDB's and MySQL's `utf8mb4_bin` is PAD SPACE:
#: "B1 " equals "B1" there. These NO PAD binary collations compare byte for byte.
_ID_COLUMNS = {
    "mozrest_outbox": ("booking_id", "venue_id"),
    "mozrest_booking": ("booking_id", "venue_id"),
    "mozrest_delivery": ("booking_id", "venue_id"),
}


def _exact_collation(bind: sa.engine.Connection) -> str:
    return "utf8mb4_nopad_bin" if bind.dialect.is_mariadb else "utf8mb4_0900_bin"  # type: ignore[attr-defined]


def _collate_ids(collation: str) -> None:
    for table, columns in _ID_COLUMNS.items():
        changes = ", ".join(
            f"MODIFY {column} VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL"
            for column in columns
        )
        op.execute(f"ALTER TABLE {table} {changes}")


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("mozrest_booking") as batch:
        batch.add_column(
            sa.Column(
                "reached_send_status", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
    # A booking with a delivery had a state that could be sent: it reached a send status.
    op.execute(
        "UPDATE mozrest_booking SET reached_send_status = "
        + ("TRUE" if bind.dialect.name != "sqlite" else "1")
        + " WHERE sent_outbox_id IS NOT NULL OR EXISTS (SELECT 1 FROM mozrest_delivery d "
        "WHERE d.booking_id = mozrest_booking.booking_id)"
    )
    op.create_index(
        "ix_mozrest_delivery_venue_id_status", "mozrest_delivery", ["venue_id", "status", "id"]
    )
    if bind.dialect.name == "mysql":
        _collate_ids(_exact_collation(bind))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "mysql":
        _collate_ids("utf8mb4_bin")
    op.drop_index("ix_mozrest_delivery_venue_id_status", table_name="mozrest_delivery")
    with op.batch_alter_table("mozrest_booking") as batch:
        batch.drop_column("reached_send_status")
