"""HTTP to Mozrest: the webhook POST and the Partner API's POS tables; the only httpx user."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx

from app import __version__
from app.policy import parse_retry_after

#: Keep this many bytes of an answer's body: attempts store at most 4 KiB (SPEC section 6).
ANSWER_BODY_LIMIT = 4096

Transport = Literal["aiohttp", "httpx"]


@dataclass(frozen=True, slots=True)
class WebhookAnswer:
    """Mozrest's answer to one webhook request; `status_code` is None when none came back."""

    status_code: int | None
    duration_ms: int
    started_at: datetime
    body: str | None = None
    error: str | None = None
    retry_after_seconds: float | None = None
    may_have_landed: bool = True
    """False only when the request surely never reached Mozrest (the connection failed)."""


class Publisher(Protocol):
    """Sends one booking state to Mozrest's webhook."""

    async def publish(self, body: bytes) -> WebhookAnswer: ...

    async def aclose(self) -> None: ...


def _transport(*, concurrency: int, transport: Transport) -> httpx.AsyncBaseTransport:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if transport == "aiohttp":
        # httpx's own pool costs several times the CPU per request of aiohttp's under
        # concurrency (docs/adr/0004-http-transport.md); the httpx API stays the same.
        from httpx_aiohttp import AiohttpTransport

        return AiohttpTransport(limits=limits)
    return httpx.AsyncHTTPTransport(limits=limits)


def _client(*, base_url: str, token: str | None) -> httpx.AsyncClient:
    """A plain httpx client for the Partner API's occasional reads."""
    headers = {"User-Agent": f"mozrest-relay/{__version__}", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # `PartnerApi.pos_tables` bounds each call with one overall asyncio deadline.
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None)  # noqa: S113


class HttpPublisher:
    """POSTs states to the webhook URL with a Bearer token, within one overall deadline.

    It speaks to an httpx transport directly rather than through `httpx.AsyncClient`: the
    client's per-request work (cookies, auth and event-hook plumbing, URL merging) cost as much
    CPU again as the request itself, and a webhook needs none of it (ADR 0004).
    """

    def __init__(
        self,
        *,
        url: str,
        token: str | None,
        timeout_seconds: float,
        concurrency: int,
        transport: Transport = "aiohttp",
    ) -> None:
        self.url = httpx.URL(url)
        self.timeout_seconds = timeout_seconds
        self._headers = [
            ("User-Agent", f"mozrest-relay/{__version__}"),
            ("Accept", "application/json"),
            ("Content-Type", "application/json"),
        ]
        if token:
            self._headers.append(("Authorization", f"Bearer {token}"))
        self._transport = _transport(concurrency=concurrency, transport=transport)

    async def publish(self, body: bytes) -> WebhookAnswer:
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        request = httpx.Request("POST", self.url, headers=self._headers, content=body)
        try:
            # One deadline for connect, send, wait and read: the lease must outlive all of it.
            async with asyncio.timeout(self.timeout_seconds):
                response = await self._transport.handle_async_request(request)
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            return WebhookAnswer(
                status_code=None,
                duration_ms=_elapsed_ms(start),
                started_at=started_at,
                error=f"timeout: no answer within {self.timeout_seconds:g}s",
            )
        except httpx.HTTPError as exc:
            return WebhookAnswer(
                status_code=None,
                duration_ms=_elapsed_ms(start),
                started_at=started_at,
                error=f"{type(exc).__name__}: {str(exc)[:300] or 'connection failed'}",
                # No connection, no request: nothing of it can land later.
                may_have_landed=not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout),
            )
        retry_after = parse_retry_after(
            response.headers.get("Retry-After"), now=_server_time(response)
        )
        error = None if response.is_success else f"HTTP {response.status_code}"
        return WebhookAnswer(
            status_code=response.status_code,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            body=content[:ANSWER_BODY_LIMIT].decode("utf-8", "replace"),
            error=error,
            retry_after_seconds=retry_after,
        )

    async def aclose(self) -> None:
        await self._transport.aclose()


class PartnerApiError(Exception):
    """Mozrest's Partner API failed; the message says how, without secrets."""


class PartnerApi:
    """Reads from Mozrest's Partner API (Bearer API key)."""

    def __init__(self, *, base_url: str, api_key: str | None, timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self._client = _client(base_url=self.base_url, token=api_key)
        self._has_key = api_key is not None

    async def pos_tables(self, venue_id: str) -> dict[str, Any]:
        """`GET /venues/{venueId}/pos-tables`, validated to the documented shape."""
        if not self._has_key:
            raise PartnerApiError("MOZREST_API_KEY is not set")
        path = f"/venues/{quote(venue_id, safe='')}/pos-tables"
        try:
            async with asyncio.timeout(self.timeout_seconds):
                response = await self._client.get(path)
        except TimeoutError:
            raise PartnerApiError(
                f"Mozrest did not answer within {self.timeout_seconds:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise PartnerApiError(f"could not reach Mozrest: {type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise PartnerApiError(
                f"Mozrest refused the API key (HTTP {response.status_code}): check MOZREST_API_KEY"
            )
        if response.status_code == 404:
            raise PartnerApiError(f"Mozrest does not know venue {venue_id!r} (HTTP 404)")
        if not response.is_success:
            raise PartnerApiError(f"Mozrest answered HTTP {response.status_code}")
        try:
            data = response.json()
            tables = [
                {"id": str(t["id"]), "name": str(t["name"]), "area": t.get("area")}
                for t in data["tables"]
            ]
        except (ValueError, KeyError, TypeError):
            raise PartnerApiError(
                "Mozrest's answer is not the documented POS tables shape"
            ) from None
        return {
            "venueId": str(data.get("venueId", venue_id)),
            "tables": tables,
            "count": len(tables),
        }

    async def aclose(self) -> None:
        await self._client.aclose()


def _elapsed_ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


def _server_time(response: httpx.Response) -> datetime | None:
    """The server's own clock, to read an HTTP-date `Retry-After` against."""
    try:
        return parsedate_to_datetime(response.headers.get("Date", ""))
    except (TypeError, ValueError):
        return None
