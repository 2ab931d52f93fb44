"""Rotated Mozrest keys picked up without a restart, publisher side: the webhook publishers and the
Partner API client against the real emulator on loopback, whose keys change at runtime
(`PUT /_emulator/token`) while the secret files are rewritten."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import create_engine
from app.partner_api import PartnerApi, PartnerApiError
from app.publisher import Transport, make_publisher
from app.secret_files import SecretSource
from mozrest_outbox import outbox_insert
from tests import factories
from tests.conftest import Launcher, eventually, free_port

SEATED = {
    "bookingId": "rot-1",
    "venueId": "venue-1",
    "partySize": 2,
    "status": "seated",
    "tables": ["T1"],
    "date": 1790000000,
}
BODY = httpx.Request("POST", "http://x", json=SEATED).content


def rotate_emulator(url: str, **keys: str) -> None:
    httpx.put(f"{url}/_emulator/token", json=keys, timeout=10).raise_for_status()


def secret_file(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    return path


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_the_webhook_token_is_read_again_and_used_by_the_next_request(
    launcher: Launcher, tmp_path: Path, transport: Transport
) -> None:
    """Mozrest rotates the token (401 from then on); once the file holds the new token,
    `reload_credentials()` says it changed and the next request is accepted."""
    emulator = launcher.emulator(token="token-1", api_key="key-1")
    assert emulator.url is not None
    path = secret_file(tmp_path, "webhook-token", "token-1")
    token = SecretSource(value="token-1", path=str(path), variable="MOZREST_WEBHOOK_TOKEN")
    publisher = make_publisher(
        url=f"{emulator.url}/rms",
        token=token,
        timeout_seconds=5,
        concurrency=4,
        transport=transport,
    )
    try:
        assert (await publisher.publish(BODY)).status_code == 200
        rotate_emulator(emulator.url, token="token-2")
        assert (await publisher.publish(BODY)).status_code == 401
        assert publisher.reload_credentials() is False  # the file is not rotated yet
        assert (await publisher.publish(BODY)).status_code == 401
        read_before = token.read_at
        path.write_text("token-2\n")
        assert publisher.reload_credentials() is True
        assert token.read_at is not None and read_before is not None
        assert token.read_at >= read_before
        assert (await publisher.publish(BODY)).status_code == 200
        assert publisher.reload_credentials() is False  # read again, unchanged
    finally:
        await publisher.aclose()


async def test_a_webhook_token_file_missing_mid_rotation_keeps_the_old_token(
    launcher: Launcher, tmp_path: Path
) -> None:
    """A file that cannot be read at the moment of the probe leaves the token as it was (the
    requests keep working) and says why."""
    emulator = launcher.emulator(token="token-1", api_key="key-1")
    path = secret_file(tmp_path, "webhook-token", "token-1")
    token = SecretSource(value="token-1", path=str(path), variable="MOZREST_WEBHOOK_TOKEN")
    publisher = make_publisher(
        url=f"{emulator.url}/rms", token=token, timeout_seconds=5, concurrency=4
    )
    try:
        path.unlink()
        assert publisher.reload_credentials() is False
        assert token.last_error is not None and "no such file" in token.last_error
        assert (await publisher.publish(BODY)).status_code == 200
    finally:
        await publisher.aclose()


async def test_a_plain_webhook_token_cannot_be_reloaded(launcher: Launcher) -> None:
    """With MOZREST_WEBHOOK_TOKEN given plain, a reload changes nothing."""
    emulator = launcher.emulator(token="token-1", api_key="key-1")
    publisher = make_publisher(
        url=f"{emulator.url}/rms", token="token-1", timeout_seconds=5, concurrency=4
    )
    try:
        assert publisher.reload_credentials() is False
        assert (await publisher.publish(BODY)).status_code == 200
    finally:
        await publisher.aclose()


async def test_pos_tables_reads_a_rotated_key_on_401_and_retries_once(
    launcher: Launcher, tmp_path: Path
) -> None:
    """The Partner API key rotated at Mozrest and in the file: the first call after it gets a
    401, reads the file, and succeeds on its one retry; the caller sees only the tables."""
    emulator = launcher.emulator(token="token-1", api_key="key-1")
    path = secret_file(tmp_path, "api-key", "key-1")
    api_key = SecretSource(value="key-1", path=str(path), variable="MOZREST_API_KEY")
    api = PartnerApi(base_url=emulator.url or "", api_key=api_key, timeout_seconds=5)
    try:
        assert (await api.pos_tables("venue-1"))["count"] == 4
        rotate_emulator(emulator.url or "", api_key="key-2")
        path.write_text("key-2\n")
        assert (await api.pos_tables("venue-1"))["count"] == 4
        assert api_key.current() == "key-2"
    finally:
        await api.aclose()


async def test_pos_tables_with_a_key_not_rotated_in_the_file_is_refused(
    launcher: Launcher, tmp_path: Path
) -> None:
    """Mozrest rotated the key but the file still holds the old one: a clear refusal naming the
    setting, after one read of the file and no retry with the same key."""
    emulator = launcher.emulator(token="token-1", api_key="key-1")
    path = secret_file(tmp_path, "api-key", "key-1")
    api_key = SecretSource(value="key-1", path=str(path), variable="MOZREST_API_KEY")
    api = PartnerApi(base_url=emulator.url or "", api_key=api_key, timeout_seconds=5)
    try:
        rotate_emulator(emulator.url or "", api_key="key-2")
        with pytest.raises(PartnerApiError, match=r"HTTP 401.*MOZREST_API_KEY"):
            await api.pos_tables("venue-1")
        assert api_key.read_at is not None
    finally:
        await api.aclose()


async def test_pos_tables_with_a_plain_key_is_refused_at_once(launcher: Launcher) -> None:
    """A plain MOZREST_API_KEY that Mozrest refuses is a PartnerApiError, no retry."""
    emulator = launcher.emulator(token="token-1", api_key="key-1")
    api = PartnerApi(base_url=emulator.url or "", api_key="wrong", timeout_seconds=5)
    try:
        with pytest.raises(PartnerApiError, match="HTTP 401"):
            await api.pos_tables("venue-1")
    finally:
        await api.aclose()


async def test_a_rotated_webhook_token_file_resumes_delivery_without_a_restart(
    launcher: Launcher, tmp_path: Path, database_url: str
) -> None:
    """End to end: a running `mozrest-relay run` whose token Mozrest stops accepting pauses
    (401, nothing dead-lettered) while a backlog waits; once the Secret's file holds the new
    token, delivery resumes within one cool-down, in the same process, and `/readyz` says when
    the file was read."""
    emulator = launcher.emulator(token="token-1", api_key="key-1")
    assert emulator.url is not None
    path = secret_file(tmp_path, "webhook-token", "token-1")
    port = free_port()
    cooldown = 2.0
    relay = launcher.start(
        "run",
        env={
            "DATABASE_URL": database_url,
            "MOZREST_WEBHOOK_URL": f"{emulator.url}/rms",
            "MOZREST_WEBHOOK_TOKEN_FILE": str(path),
            "RELAY_ADMIN_TOKEN": "admin",
            "RELAY_PORT": str(port),
            "RELAY_CIRCUIT_COOLDOWN": f"{cooldown}s",
            "RELAY_POLL_INTERVAL": "20ms",
            "RELAY_HEARTBEAT_INTERVAL": "200ms",
        },
        wait_url=f"http://127.0.0.1:{port}/healthz",
    )
    base = f"http://127.0.0.1:{port}"
    admin = {"Authorization": "Bearer admin"}
    async with httpx.AsyncClient(base_url=base, headers=admin, timeout=10) as api:
        await _enqueue(database_url, factories.state("rot-first"))
        await eventually(lambda: _held(emulator.url, "rot-first"), timeout=10, message="first")
        rotate_emulator(emulator.url, token="token-2")
        backlog = [factories.state(f"rot-{i}") for i in range(5)]
        for payload in backlog:
            await _enqueue(database_url, payload)

        async def paused() -> bool:
            ready = (await api.get("/readyz")).json()
            return ready["checks"]["mozrest"].startswith("credentials rejected")

        await eventually(paused, timeout=10, message="the credentials pause")
        assert (
            "token file was last read at" in (await api.get("/readyz")).json()["checks"]["mozrest"]
        )
        path.write_text("token-2\n")
        rotated_at = time.monotonic()
        for payload in backlog:
            await eventually(
                lambda p=payload: _held(emulator.url, p["bookingId"]),
                timeout=cooldown + 8,
                message=f"{payload['bookingId']} delivered after the rotation",
            )
        assert time.monotonic() - rotated_at < cooldown + 5
        dead = (await api.get("/api/deliveries", params={"status": "dead"})).json()
        assert dead["items"] == []
    assert relay.popen.poll() is None  # no restart


async def _enqueue(database_url: str, payload: dict[str, Any]) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(outbox_insert(payload))
    finally:
        await engine.dispose()


async def _held(emulator_url: str, booking_id: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as client:
        held = (await client.get(f"{emulator_url}/_emulator/bookings")).json()["items"]
    return booking_id in held
