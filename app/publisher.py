"""HTTP to Mozrest's webhook: one booking state per POST, within the claim's deadline (the Partner
API is `app.partner_api`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

import aiohttp
import httpx
import yarl
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload

from app import __version__
from app.clock import lease_clock
from app.partner_api import aread_at_most
from app.policy import parse_http_date, parse_retry_after
from app.secret_files import SecretSource, as_secret_source, bearer
from app.text import storable

#: Keep this many bytes of an answer's body: attempts store at most 4 KiB.
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
    written: bool = True
    """Whether the state was written to the wire, even in part: only then was it sent."""
    lease_expired: bool = False
    """Nothing was written because the deadline had passed first (a frozen process)."""


class Publisher(Protocol):
    """Sends one booking state to Mozrest's webhook."""

    async def publish(
        self, body: bytes, *, deadline: float | None = None, traceparent: str | None = None
    ) -> WebhookAnswer:
        """POST `body` and read the answer, all before `deadline` (a `lease_clock()` time, before
        the claim's lease ends; by default the publisher's timeout from now). The deadline is
        checked again at the moment the body is written: past it nothing is written and the
        answer says `lease_expired`. `traceparent` (the request's span context, `app.tracing`)
        goes as the W3C header of that name."""
        ...

    def reload_credentials(self) -> bool:
        """Read the webhook token again from `MOZREST_WEBHOOK_TOKEN_FILE` when it was given that
        way; True when it changed, and the next request carries the new token. The worker's
        credentials probe calls this first while Mozrest answers 401."""
        ...

    def token_read_at(self) -> datetime | None:
        """When the webhook token was last read from its file (None for a plain value)."""
        ...

    async def aclose(self) -> None: ...


def make_publisher(
    *,
    url: str,
    token: str | SecretSource | None,
    timeout_seconds: float,
    concurrency: int,
    transport: Transport = "aiohttp",
) -> Publisher:
    """The webhook publisher for `RELAY_HTTP_TRANSPORT` (ADR 0004)."""
    kind = AiohttpPublisher if transport == "aiohttp" else HttpxPublisher
    return kind(url=url, token=token, timeout_seconds=timeout_seconds, concurrency=concurrency)


class _BasePublisher:
    """What both publishers share: the headers, the token, the deadline, and reading Mozrest's
    answer."""

    def __init__(
        self,
        *,
        url: str,
        token: str | SecretSource | None,
        timeout_seconds: float,
        concurrency: int,
    ) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.concurrency = concurrency
        #: The webhook token, re-readable from its file (`reload_credentials`); `token.read_at`
        #: says when it was last read.
        self.token = as_secret_source(token, variable="MOZREST_WEBHOOK_TOKEN")
        self._base_headers = {
            "User-Agent": f"mozrest-relay/{__version__}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._use_token()

    def _use_token(self) -> None:
        """Build the headers of the next requests from the token's current value."""
        self._auth_headers = bearer(self.token)
        self._headers = {**self._base_headers, **self._auth_headers}

    def reload_credentials(self) -> bool:
        """Read the webhook token again from `MOZREST_WEBHOOK_TOKEN_FILE` when it was given that
        way; True when it changed, and the next request carries the new token (requests already
        on the wire keep the old one). With a plain `MOZREST_WEBHOOK_TOKEN`, or a file that cannot
        be read at this moment, nothing changes: False, and `token.last_error` says why."""
        changed = self.token.reload()
        if changed:
            self._use_token()
        return changed

    def token_read_at(self) -> datetime | None:
        return self.token.read_at

    def _deadline(self, deadline: float | None) -> float:
        return lease_clock() + self.timeout_seconds if deadline is None else deadline

    def _timed_out(self, start: float, started_at: datetime, *, written: bool) -> WebhookAnswer:
        return WebhookAnswer(
            status_code=None,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            error=f"timeout: no answer within {time.perf_counter() - start:.3g}s"
            + ("" if written else " (nothing was sent)"),
            written=written,
        )

    @staticmethod
    def _unsent(start: float, started_at: datetime) -> WebhookAnswer:
        return WebhookAnswer(
            status_code=None,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            error="not sent: the claim's lease ran out before the request could be written",
            written=False,
            lease_expired=True,
        )

    @staticmethod
    def _failed(
        exc: Exception, start: float, started_at: datetime, *, written: bool
    ) -> WebhookAnswer:
        return WebhookAnswer(
            status_code=None,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            error=storable(
                f"{type(exc).__name__}: {str(exc)[:300] or 'connection failed'}", limit_bytes=400
            ),
            written=written,
        )

    @staticmethod
    def _answered(
        status: int,
        headers: Mapping[str, str],
        content: bytes,
        start: float,
        started_at: datetime,
    ) -> WebhookAnswer:
        """Mozrest's answer as recorded: whatever its headers and body hold, this never raises
        (an answered request, even a 200, must not turn into an error of ours)."""
        return WebhookAnswer(
            status_code=status,
            duration_ms=_elapsed_ms(start),
            started_at=started_at,
            body=storable(content[:ANSWER_BODY_LIMIT], limit_bytes=ANSWER_BODY_LIMIT),
            error=None if 200 <= status < 300 else f"HTTP {status}",
            retry_after_seconds=_retry_after(headers),
        )


class AiohttpPublisher(_BasePublisher):
    """POSTs states with aiohttp's client, within one overall deadline (the default).

    At the relay's concurrency aiohttp's pool costs a fraction of the CPU per request of
    httpx's own, and half that of httpx driven over an aiohttp transport (ADR 0004).
    """

    def __init__(
        self,
        *,
        url: str,
        token: str | SecretSource | None,
        timeout_seconds: float,
        concurrency: int,
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
                # The token is added per request (`_auth_headers`): it can change.
                headers=self._base_headers,
                # Our own deadline bounds each request; aiohttp's default would add 5 minutes.
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def publish(
        self, body: bytes, *, deadline: float | None = None, traceparent: str | None = None
    ) -> WebhookAnswer:
        deadline = self._deadline(deadline)
        session = self._open()
        headers = self._auth_headers
        if traceparent is not None:
            headers = {**headers, "traceparent": traceparent}
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        payload = _GuardedPayload(body, deadline=deadline)
        try:
            # One deadline for connect, send, wait and read: the lease must outlive all of it.
            async with asyncio.timeout(_loop_deadline(deadline)):
                async with session.post(
                    self._url, data=payload, headers=headers, allow_redirects=False
                ) as response:
                    content = await _read_at_most(response.content, ANSWER_BODY_LIMIT)
                    return self._answered(
                        response.status, response.headers, content, start, started_at
                    )
        except TimeoutError:
            if payload.refused:
                return self._unsent(start, started_at)
            return self._timed_out(start, started_at, written=payload.written)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if payload.refused:
                return self._unsent(start, started_at)
            # No connection, no request: nothing of it can land later.
            return self._failed(exc, start, started_at, written=payload.written)

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
        self,
        *,
        url: str,
        token: str | SecretSource | None,
        timeout_seconds: float,
        concurrency: int,
    ) -> None:
        super().__init__(
            url=url, token=token, timeout_seconds=timeout_seconds, concurrency=concurrency
        )
        self._url = httpx.URL(url)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._transport = httpx.AsyncHTTPTransport(limits=limits)

    async def publish(
        self, body: bytes, *, deadline: float | None = None, traceparent: str | None = None
    ) -> WebhookAnswer:
        deadline = self._deadline(deadline)
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        headers = self._headers
        if traceparent is not None:
            headers = {**headers, "traceparent": traceparent}
        request = httpx.Request("POST", self._url, headers=headers, content=body)
        # The same body and headers (Host, Content-Length), read through the deadline check.
        request.stream = stream = _GuardedStream(body, deadline=deadline)
        try:
            async with asyncio.timeout(_loop_deadline(deadline)):
                response = await self._transport.handle_async_request(request)
                try:
                    content = await aread_at_most(response, ANSWER_BODY_LIMIT)
                finally:
                    await response.aclose()
        except TimeoutError:
            if stream.refused:
                return self._unsent(start, started_at)
            return self._timed_out(start, started_at, written=stream.written)
        except (httpx.HTTPError, _LeaseExpired, ValueError) as exc:
            if stream.refused:
                return self._unsent(start, started_at)
            return self._failed(exc, start, started_at, written=stream.written)
        return self._answered(response.status_code, response.headers, content, start, started_at)

    async def aclose(self) -> None:
        await self._transport.aclose()


class _LeaseExpired(Exception):
    """The claim's deadline passed before its body was written: it must not be written."""


class _GuardedPayload(BytesPayload):
    """The webhook body for aiohttp, checking the claim's deadline at the moment it is written.

    aiohttp holds the headers back to send them with the body, and writes both without yielding
    to the event loop in between, so this check sits immediately before the state reaches the
    wire: a process frozen after its lease check and thawed past its deadline writes nothing.
    (An aiohttp that sends the headers first leaves Mozrest a request without a body: not a
    state.)
    """

    def __init__(self, body: bytes, *, deadline: float) -> None:
        super().__init__(body, content_type="application/json")
        self.deadline = deadline
        self.refused = False
        self.written = False

    def _check(self) -> None:
        if lease_clock() >= self.deadline:
            self.refused = True
            raise _LeaseExpired("the claim's lease ran out before the request was written")
        self.written = True

    async def write(self, writer: AbstractStreamWriter) -> None:
        self._check()
        await super().write(writer)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        self._check()
        await super().write_with_length(writer, content_length)


class _GuardedStream(httpx.AsyncByteStream):
    """`_GuardedPayload` for httpx: checked when httpcore asks for the body, after the headers."""

    def __init__(self, body: bytes, *, deadline: float) -> None:
        self.body = body
        self.deadline = deadline
        self.refused = False
        self.written = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if lease_clock() >= self.deadline:
            self.refused = True
            raise _LeaseExpired("the claim's lease ran out before the request was written")
        self.written = True
        yield self.body


def _loop_deadline(deadline: float) -> float:
    """A `lease_clock()` time on the event loop's clock, for `asyncio.timeout`."""
    return asyncio.get_running_loop().time() + (deadline - lease_clock())


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Mozrest's `Retry-After`, read against its own `Date` when that parses."""
    try:
        return parse_retry_after(
            headers.get("Retry-After"), now=parse_http_date(headers.get("Date"))
        )
    except Exception:
        return None


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


def _elapsed_ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)
