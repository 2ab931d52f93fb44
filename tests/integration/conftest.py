"""The integration tier's shared world: a real database (per backend), the Mozrest emulator
served on loopback, and one in-process worker at a time (`Relay`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.api import create_app
from app.db import READ_ONLY
from app.emulator import create_app as create_emulator_app
from app.models import attempt, delivery, outbox
from app.models import worker as worker_table
from app.policy import Verdict
from app.runtime import build_store, build_worker
from app.settings import Settings, load_settings
from app.store import AttemptResult, Store
from app.worker import Worker
from tests.conftest import eventually, free_port

TOKEN = "test-token"
#: Fast settings for every test: polls, backoff and cool-downs in milliseconds.
FAST: dict[str, Any] = {
    "relay_poll_interval_seconds": 0.02,
    "relay_retry_base_delay_seconds": 0.05,
    "relay_retry_max_delay_seconds": 0.2,
    "relay_circuit_threshold": 3,
    "relay_circuit_cooldown_seconds": 0.3,
    "relay_lease_seconds": 3.0,
    "relay_http_timeout_seconds": 1.0,
    "relay_shutdown_grace_seconds": 2.0,
    "relay_heartbeat_interval_seconds": 1.0,
}


class EmulatorServer:
    """The Mozrest emulator served by uvicorn on a loopback port, in a thread with its own loop."""

    def __init__(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            create_emulator_app(token=TOKEN, api_key="test-key"),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="emulator", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the emulator did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def emulator_server() -> Iterator[EmulatorServer]:
    server = EmulatorServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Relay:
    """One test's world: the database, the emulator's control API and one worker at a time."""

    def __init__(self, engine: AsyncEngine, database_url: str, emulator: httpx.AsyncClient) -> None:
        self.engine = engine
        self.database_url = database_url
        self.emulator = emulator
        self.reader = engine.execution_options(**{READ_ONLY: True})
        self.worker: Worker | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the relay --------------------------------------------------------------------------

    def settings(self, **overrides: Any) -> Settings:
        values = {
            "database_url": self.database_url,
            "mozrest_webhook_url": str(self.emulator.base_url).rstrip("/") + "/rms",
            "mozrest_webhook_token": TOKEN,
            **FAST,
            **overrides,
        }
        return Settings(_env_file=None, **values)

    def store(self, **overrides: Any) -> Store:
        return build_store(self.settings(**overrides), self.engine)

    async def start(self, **overrides: Any) -> Worker:
        """Run a fresh worker (as `mozrest-relay worker` would build it) as a task."""
        assert self._task is None, "one worker at a time"
        settings = self.settings(**overrides)
        self.worker = build_worker(settings, build_store(settings, self.engine))
        task = self._task = asyncio.create_task(self.worker.run(), name="worker")

        async def registered() -> bool:
            if task.done():
                task.result()  # a worker that died at start-up fails the test with its error
            async with self.reader.connect() as conn:
                ids = (await conn.execute(select(worker_table.c.id))).scalars().all()
            return worker_id in ids

        worker_id = self.worker.id
        await eventually(registered, timeout=5, message="the worker registered")
        return self.worker

    async def stop(self) -> None:
        if self._task is None or self.worker is None:
            return
        self.worker.stop()
        try:
            await asyncio.wait_for(self._task, timeout=10)
        finally:
            await self.worker.publisher.aclose()
            self._task = None

    # -- the emulator -----------------------------------------------------------------------

    async def set_faults(self, **faults: Any) -> None:
        (await self.emulator.put("/_emulator/faults", json=faults)).raise_for_status()

    async def clear_faults(self) -> None:
        (await self.emulator.delete("/_emulator/faults")).raise_for_status()

    async def requests(self, booking_id: str | None = None) -> list[dict[str, Any]]:
        params = {"booking_id": booking_id} if booking_id is not None else {}
        response = await self.emulator.get("/_emulator/requests", params=params)
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def bookings(self) -> dict[str, dict[str, Any]]:
        items: dict[str, dict[str, Any]] = (await self.emulator.get("/_emulator/bookings")).json()[
            "items"
        ]
        return items

    async def landed(self, booking_id: str) -> dict[str, Any] | None:
        """The state the emulator last accepted for a booking, or None."""
        found = (await self.bookings()).get(booking_id)
        return None if found is None else found["state"]

    async def wait_landed(self, expected: dict[str, Any], *, timeout: float = 5.0) -> None:
        async def check() -> bool:
            return await self.landed(expected["bookingId"]) == expected

        await eventually(check, timeout=timeout, message=f"{expected['bookingId']} landed")

    # -- the database -----------------------------------------------------------------------

    async def insert(self, *payloads: dict[str, Any]) -> list[int]:
        """Insert states as the RMS does: one transaction each, columns taken from the payload."""
        return [
            await self.insert_raw(p["bookingId"], p["venueId"], json.dumps(p)) for p in payloads
        ]

    async def insert_raw(self, booking_id: str, venue_id: str, payload_text: str) -> int:
        """The RMS's own statement (SPEC section 2), with the payload given as JSON text."""
        statement = text(
            "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) "
            "VALUES (:booking_id, :venue_id, :payload) RETURNING id"
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(
                statement,
                {"booking_id": booking_id, "venue_id": venue_id, "payload": payload_text},
            )
            return int(result.scalar_one())

    async def outbox_rows(self, *ids: int) -> list[Any]:
        async with self.reader.connect() as conn:
            query = select(outbox).order_by(outbox.c.id)
            if ids:
                query = query.where(outbox.c.id.in_(ids))
            return list(await conn.execute(query))

    async def outcomes(self, *ids: int) -> list[str | None]:
        by_id = {row.id: row.outcome for row in await self.outbox_rows(*ids)}
        return [by_id.get(i) for i in ids]

    async def wait_processed(self, *ids: int, timeout: float = 5.0) -> list[str | None]:
        async def check() -> list[str | None] | None:
            outcomes = await self.outcomes(*ids)
            return outcomes if all(o is not None for o in outcomes) else None

        result: list[str | None] = await eventually(check, timeout=timeout, message=f"{ids}")
        return result

    async def deliveries(self, booking_id: str | None = None) -> list[Any]:
        async with self.reader.connect() as conn:
            query = select(delivery).order_by(delivery.c.id)
            if booking_id is not None:
                query = query.where(delivery.c.booking_id == booking_id)
            return list(await conn.execute(query))

    async def delivery_of(self, outbox_id: int) -> Any:
        async with self.reader.connect() as conn:
            return (
                await conn.execute(select(delivery).where(delivery.c.outbox_id == outbox_id))
            ).one()

    async def wait_status(self, outbox_id: int, status: str, *, timeout: float = 5.0) -> Any:
        async def check() -> Any:
            async with self.reader.connect() as conn:
                row = (
                    await conn.execute(select(delivery).where(delivery.c.outbox_id == outbox_id))
                ).first()
            return row if row is not None and row.status == status else None

        return await eventually(check, timeout=timeout, message=f"delivery {status}")

    async def attempts(self, delivery_id: int | None = None) -> list[Any]:
        async with self.reader.connect() as conn:
            query = select(attempt).order_by(attempt.c.id)
            if delivery_id is not None:
                query = query.where(attempt.c.delivery_id == delivery_id)
            return list(await conn.execute(query))

    async def count(self, table: Any) -> int:
        async with self.reader.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


@pytest.fixture
async def relay(
    engine: AsyncEngine, database_url: str, emulator_server: EmulatorServer
) -> AsyncIterator[Relay]:
    async with httpx.AsyncClient(base_url=emulator_server.url, timeout=10) as client:
        harness = Relay(engine, database_url, client)
        try:
            yield harness
        finally:
            await harness.stop()


# -- the admin API, in process ----------------------------------------------------------

ADMIN_TOKEN = "adm-secret"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Api:
    """An app with its lifespan running, an authorised client, and the app's own store."""

    app: FastAPI
    client: httpx.AsyncClient
    store: Store

    async def write(self, *payloads: dict[str, Any], ingest: bool = True) -> list[int]:
        """Insert outbox rows as the RMS does (and ingest them); answers their ids."""
        ids = []
        async with self.store.engine.begin() as conn:
            for payload in payloads:
                result = await conn.execute(
                    insert(outbox)
                    .values(
                        booking_id=payload.get("bookingId", "?"),
                        venue_id=payload.get("venueId", "?"),
                        payload=payload,
                    )
                    .returning(outbox.c.id)
                )
                ids.append(int(result.scalar_one()))
        if ingest:
            await self.store.ingest(limit=1000)
        return ids

    async def answer(self, status_code: int) -> list[int]:
        """Claim every due delivery and record Mozrest's answer `status_code` for each."""
        verdict = {200: Verdict.DELIVERED, 400: Verdict.DEAD, 503: Verdict.RETRY}[status_code]
        claims = await self.store.claim_due(worker_id="test", limit=1000, lease_seconds=30)
        await self.store.record(
            [
                AttemptResult(
                    claim=claim,
                    verdict=verdict,
                    started_at=datetime.now(UTC),
                    duration_ms=7,
                    status_code=status_code,
                    error=None if status_code == 200 else f"HTTP {status_code}",
                    response_body='{"detail": "answer"}',
                )
                for claim in claims
            ],
            worker_id="test",
        )
        return [claim.delivery_id for claim in claims]

    async def set_delivery(self, delivery_id: int, **values: Any) -> None:
        async with self.store.engine.begin() as conn:
            await conn.execute(update(delivery).where(delivery.c.id == delivery_id).values(values))

    async def deliveries(self, **params: Any) -> list[dict[str, Any]]:
        response = await self.client.get("/api/deliveries", params={"limit": 500, **params})
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items


@asynccontextmanager
async def running_api(database_url: str, **overrides: Any) -> AsyncIterator[Api]:
    settings = load_settings(
        _env_file=None,
        database_url=database_url,
        relay_admin_token=overrides.pop("relay_admin_token", ADMIN_TOKEN),
        **overrides,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://relay", headers=AUTH
        ) as client:
            yield Api(app=app, client=client, store=app.state.context.store)


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    async with running_api(database_url) as running:
        yield running
