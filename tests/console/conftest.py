"""The console's test world: the admin app in process with a viewer and an operator token, and
browser-like clients that sign in through the form and keep their session cookie."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.policy import Verdict
from app.store import AttemptResult
from tests.integration.conftest import ADMIN_TOKEN, Api, running_api

VIEWER, OPERATOR = "console-viewer-token-1", "console-operator-token-1"
TOKENS = ",".join(
    f"{name}:{role}:{hashlib.sha256(token.encode()).hexdigest()}"
    for name, role, token in (("vera", "viewer", VIEWER), ("otto", "operator", OPERATOR))
)
ALL_TOKENS = (VIEWER, OPERATOR, ADMIN_TOKEN)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


@asynccontextmanager
async def browser(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no Authorization header: only the console's cookie."""
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        yield client


async def sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    page = await client.get("/console/sign-in")
    assert page.status_code == 200, page.text
    return await client.post(
        "/console/sign-in",
        data={"token": token, "csrf": csrf_of(page.text), "next": "/console"},
    )


@asynccontextmanager
async def signed_in(api: Api, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with browser(api) as client:
        answer = await sign_in(client, token)
        assert answer.status_code == 303, answer.text
        yield client


async def post_form(
    client: httpx.AsyncClient, path: str, page: str, **fields: str
) -> httpx.Response:
    """Press a button: POST `fields` with the CSRF token read from `page`."""
    html = (await client.get(page)).text
    return await client.post(path, data={"csrf": csrf_of(html), **fields})


async def answer_with(
    api: Api, status_code: int, body: str | None, *, error: str | None = None
) -> list[int]:
    """Claim every due delivery and record Mozrest's answer (`body`) or a failure (`error`)."""
    verdict = Verdict.DELIVERED if status_code == 200 else Verdict.DEAD
    if status_code >= 500 or status_code == 0:
        verdict = Verdict.RETRY
    claims = await api.store.claim_due(worker_id="test", limit=1000, lease_seconds=30)
    await api.store.record(
        [
            AttemptResult(
                claim=claim,
                verdict=verdict,
                started_at=datetime.now(UTC),
                duration_ms=12,
                status_code=status_code or None,
                error=error
                if status_code == 0
                else (None if status_code == 200 else f"HTTP {status_code}"),
                response_body=body,
            )
            for claim in claims
        ],
        worker_id="test",
    )
    return [claim.delivery_id for claim in claims]


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    async with running_api(database_url, relay_api_tokens=TOKENS) as running:
        yield running


def audit_of(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(r["actor"], r["action"], r["target"], r["result"]) for r in rows]
