"""HTTP to Mozrest: the webhook POST and the Partner API's POS tables; the only httpx user."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol
from urllib.parse import quote

import aiohttp
import httpx
import yarl

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


def _client(*, base_url: str, token: str | None) -> httpx.AsyncClient:
    """A plain httpx client for the Partner API's occasional reads."""
    headers = {"User-Agent": f"mozrest-relay/{__version__}", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # `PartnerApi.pos_tables` bounds each call with one overall asyncio deadline.
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None)  # noqa: S113


def make_publisher(
    *,
    url: str,
    token: str | None,
    timeout_seconds: float,
    concurrency: int,
    transport: Transport = "aiohttp",
) -> Publisher:
    """The webhook publisher for `RELAY_HTTP_TRANSPORT` (ADR 0004)."""
    kind = AiohttpPublisher if transport == "aiohttp" else HttpxPublisher
    return kind(url=url, token=token, timeout_seconds=timeout_seconds, concurrency=concurrency)


class _BasePublisher:
    """What both publishers share: the headers, the deadline, and reading Mozrest's answer."""

    def __init__(
        self, *, url: str, token: str | None, timeout_seconds: float, concurrency: int
    ) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.concurrency = concurrency
        self._headers = {
            "User-Agent": f"mozrest-relay/{__version__}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def _timed_out(self, start: float, started_at: datetime) -> WebhookAnswer:
        return WebhookAnswer(
            status_code=None,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            error=f"timeout: no answer within {self.timeout_seconds:g}s",
        )

    @staticmethod
    def _failed(
        exc: Exception, start: float, started_at: datetime, *, may_have_landed: bool
    ) -> WebhookAnswer:
        return WebhookAnswer(
            status_code=None,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            error=f"{type(exc).__name__}: {str(exc)[:300] or 'connection failed'}",
            may_have_landed=may_have_landed,
        )

    @staticmethod
    def _answered(
        status: int,
        headers: Mapping[str, str],
        content: bytes,
        start: float,
        started_at: datetime,
    ) -> WebhookAnswer:
        retry_after = parse_retry_after(
            headers.get("Retry-After"), now=_server_time(headers.get("Date"))
        )
        return WebhookAnswer(
            status_code=status,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            body=content[:ANSWER_BODY_LIMIT].decode("utf-8", "replace"),
            error=None if 200 <= status < 300 else f"HTTP {status}",
            retry_after_seconds=retry_after,
        )


class AiohttpPublisher(_BasePublisher):
    """POSTs states with aiohttp's client, within one overall deadline (the default).

    At the relay's concurrency aiohttp's pool costs a fraction of the CPU per request of
    httpx's own, and half that of httpx driven over an aiohttp transport (ADR 0004).
    """

    def __init__(
        self, *, url: str, token: str | None, timeout_seconds: float, concurrency: int
    ) -> None:
        super().__init__(
            url=url, token=token, timeout_seconds=timeout_seconds, concurrency=concurrency
        )
        self._url = yarl.URL(url)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                headers=self._headers,
                # Our own deadline bounds each request; aiohttp's default would add 5 minutes.
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def publish(self, body: bytes) -> WebhookAnswer:
        session = self._open()
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        try:
            # One deadline for connect, send, wait and read: the lease must outlive all of it.
            async with asyncio.timeout(self.timeout_seconds):
                async with session.post(self._url, data=body, allow_redirects=False) as response:
                    content = await _read_at_most(response.content, ANSWER_BODY_LIMIT)
                    return self._answered(
                        response.status, response.headers, content, start, started_at
                    )
        except TimeoutError:
            return self._timed_out(start, started_at)
        except aiohttp.ClientConnectorError as exc:
            # No connection, no request: nothing of it can land later.
            return self._failed(exc, start, started_at, may_have_landed=False)
        except (aiohttp.ClientError, OSError) as exc:
            return self._failed(exc, start, started_at, may_have_landed=True)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class HttpxPublisher(_BasePublisher):
    """POSTs states over httpx's own transport (`RELAY_HTTP_TRANSPORT=httpx`): an escape hatch,
    many times the CPU per request at concurrency (ADR 0004).

    It speaks to the transport directly rather than through `httpx.AsyncClient`: the client's
    per-request work (cookies, auth and event-hook plumbing, URL merging) is not needed here.
    """

    def __init__(
        self, *, url: str, token: str | None, timeout_seconds: float, concurrency: int
    ) -> None:
        super().__init__(
            url=url, token=token, timeout_seconds=timeout_seconds, concurrency=concurrency
        )
        self._url = httpx.URL(url)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._transport = httpx.AsyncHTTPTransport(limits=limits)

    async def publish(self, body: bytes) -> WebhookAnswer:
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        request = httpx.Request("POST", self._url, headers=self._headers, content=body)
        try:
            async with asyncio.timeout(self.timeout_seconds):
                response = await self._transport.handle_async_request(request)
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            return self._timed_out(start, started_at)
        except httpx.HTTPError as exc:
            connect_failed = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            return self._failed(exc, start, started_at, may_have_landed=not connect_failed)
        return self._answered(response.status_code, response.headers, content, start, started_at)

    async def aclose(self) -> None:
        await self._transport.aclose()


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes of a body; the rest is left unread (the connection is then closed)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


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


def _server_time(date: str | None) -> datetime | None:
    """The server's own clock (its `Date` header), to read an HTTP-date `Retry-After` against."""
    try:
        return parsedate_to_datetime(date or "")
    except (TypeError, ValueError):
        return None
