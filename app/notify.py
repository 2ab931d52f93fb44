"""PostgreSQL LISTEN/NOTIFY wake-up for ingest (RELAY_NOTIFY). Polling stays the authority:
notifications sent while the listener reconnects are lost, and the next poll finds those rows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
from sqlalchemy.engine import make_url

from app.logs import get_logger, log_event

CHANNEL = "mozrest_outbox"
log = get_logger("notify")

#: A statement-level trigger: one notification per INSERT statement, not per row, and no payload,
#: so NOTIFY's commit-time queue lock is taken once per RMS transaction at most.
TRIGGER_DDL = (
    f"""
CREATE OR REPLACE FUNCTION mozrest_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END $$
""",
    "DROP TRIGGER IF EXISTS mozrest_outbox_notify ON mozrest_outbox",
    """
CREATE TRIGGER mozrest_outbox_notify AFTER INSERT ON mozrest_outbox
FOR EACH STATEMENT EXECUTE FUNCTION mozrest_outbox_notify()
""",
)
DROP_TRIGGER_DDL = (
    "DROP TRIGGER IF EXISTS mozrest_outbox_notify ON mozrest_outbox",
    "DROP FUNCTION IF EXISTS mozrest_outbox_notify()",
)


def _connect_kwargs(database_url: str) -> dict[str, object]:
    url = make_url(database_url)
    return {
        "user": url.username,
        "password": url.password,
        "host": url.host,
        "port": url.port,
        "database": url.database,
    }


async def set_trigger(database_url: str, *, enabled: bool) -> None:
    """Install or remove the NOTIFY trigger on the outbox, as RELAY_NOTIFY says."""
    conn = await asyncpg.connect(**_connect_kwargs(database_url))
    try:
        async with conn.transaction():
            for statement in TRIGGER_DDL if enabled else DROP_TRIGGER_DDL:
                await conn.execute(statement)
    finally:
        await conn.close()


async def listen(database_url: str, on_notify: Callable[[], None]) -> None:
    """Call `on_notify` for every notification, reconnecting for as long as the task runs."""
    delay = 0.5
    while True:
        try:
            conn = await asyncpg.connect(**_connect_kwargs(database_url))
        except (OSError, asyncpg.PostgresError) as exc:
            log_event(log, logging.WARNING, "notify.unavailable", error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        delay = 0.5
        lost = asyncio.Event()
        try:
            await conn.add_listener(CHANNEL, lambda *_: on_notify())
            conn.add_termination_listener(lambda *_, lost=lost: lost.set())
            log_event(log, logging.INFO, "notify.listening", channel=CHANNEL)
            on_notify()  # rows may have arrived while we were away
            await lost.wait()
        finally:
            if not conn.is_closed():
                await conn.close()
