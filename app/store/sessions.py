"""The operator console's sessions: open, find, end, prune (`mozrest_console_session`).

Only the SHA-256 of a session id is stored, so a copy of the table opens nothing. A session is
valid while its row exists and has not expired on the database's clock: every replica reads the
same rows, so a session opened on one works on all, and signing out on one ends it on all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, insert, select

from app.db import translate_errors
from app.models import console_session
from app.store.toolkit import Toolkit


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Who a session signed in as."""

    token_name: str
    role: str


def session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


class ConsoleSessions:
    """Sessions of the operator console (`Store.sessions`)."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    @translate_errors
    async def open(
        self, session_id: str, *, token_name: str, role: str, lifetime_seconds: float
    ) -> None:
        """Store a new session, and drop the expired ones while at it."""
        async with self.tools.write() as conn:
            now = await self.tools.now(conn)
            await conn.execute(delete(console_session).where(console_session.c.expires_at <= now))
            await conn.execute(
                insert(console_session).values(
                    id_hash=session_hash(session_id),
                    token_name=token_name,
                    role=role,
                    created_at=now,
                    expires_at=now + timedelta(seconds=lifetime_seconds),
                )
            )

    @translate_errors
    async def find(self, session_id: str) -> SessionRecord | None:
        """The live session with this id, or None (unknown, ended or expired)."""
        async with self.tools.read() as conn:
            now = await self.tools.now(conn)
            row = (
                await conn.execute(
                    select(console_session.c.token_name, console_session.c.role).where(
                        console_session.c.id_hash == session_hash(session_id),
                        console_session.c.expires_at > now,
                    )
                )
            ).first()
        return None if row is None else SessionRecord(token_name=row.token_name, role=row.role)

    @translate_errors
    async def end(self, session_id: str) -> None:
        async with self.tools.write() as conn:
            await conn.execute(
                delete(console_session).where(console_session.c.id_hash == session_hash(session_id))
            )
