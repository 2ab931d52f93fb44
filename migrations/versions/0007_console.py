"""The operator console's sessions: one row per signed-in browser.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db import MYSQL_TABLE_OPTIONS, UTCDateTime, utcnow

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mozrest_console_session",
        # The SHA-256 of the session id (hex): the id itself is only ever in the browser.
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("token_name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name="pk_mozrest_console_session"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index(
        "ix_mozrest_console_session_expires_at", "mozrest_console_session", ["expires_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_mozrest_console_session_expires_at", "mozrest_console_session")
    op.drop_table("mozrest_console_session")
