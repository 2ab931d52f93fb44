"""LISTEN/NOTIFY wake-up on PostgreSQL (RELAY_NOTIFY), with polling still the authority."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.notify import set_trigger
from tests.conftest import Launcher, eventually

SEATED = {
    "bookingId": "bk-notify",
    "venueId": "v1",
    "partySize": 2,
    "status": "seated",
    "tables": ["T1"],
    "date": 1639578600,
}


async def _insert(engine: AsyncEngine, payload: dict[str, object]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) "
                "VALUES (:b, :v, CAST(:p AS jsonb))"
            ),
            {"b": payload["bookingId"], "v": payload["venueId"], "p": json.dumps(payload)},
        )


async def _installed(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        count = await conn.scalar(
            text("SELECT count(*) FROM pg_trigger WHERE tgname = 'mozrest_outbox_notify'")
        )
    return bool(count)


async def test_a_notified_worker_picks_up_a_row_long_before_its_next_poll(
    backend: str, database_url: str, engine: AsyncEngine, launcher: Launcher
) -> None:
    """With RELAY_NOTIFY and a 10 s poll interval, a committed row reaches Mozrest in under a
    second: the trigger's notification wakes ingest."""
    if backend != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    await set_trigger(database_url, enabled=True)
    assert await _installed(engine)
    emulator = launcher.emulator()
    launcher.start(
        "worker",
        env={
            "DATABASE_URL": database_url,
            "MOZREST_WEBHOOK_URL": f"{emulator.url}/rms",
            "MOZREST_WEBHOOK_TOKEN": "test-token",
            "RELAY_NOTIFY": "true",
            "RELAY_POLL_INTERVAL": "10s",
        },
    )
    # The worker's first ingest runs at start-up; wait until it is listening and idle.
    worker_log = launcher.processes[-1]
    await eventually(lambda: "notify.listening" in worker_log.output(), timeout=15)
    await asyncio.sleep(0.5)

    started = time.monotonic()
    await _insert(engine, SEATED)

    def landed() -> bool:
        answer = httpx.get(f"{emulator.url}/_emulator/bookings/bk-notify")
        return answer.status_code == 200

    await eventually(landed, timeout=5, interval=0.01)
    assert time.monotonic() - started < 1.0


async def test_migrate_removes_the_trigger_when_notify_is_off(
    backend: str, database_url: str, engine: AsyncEngine
) -> None:
    """Turning RELAY_NOTIFY off and migrating leaves the RMS's inserts without the trigger."""
    if backend != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    await set_trigger(database_url, enabled=True)
    assert await _installed(engine)
    await set_trigger(database_url, enabled=False)
    assert not await _installed(engine)
